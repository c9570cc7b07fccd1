//! Unit tests of the statistics kernels: every path (rows, column tiles, long column blocks, the
//! fused read of rows and columns; portable, AVX2, AVX-512; every dtype and array count) against
//! a straightforward float64 reference.

use super::kernels::{self, ColAcc, Kernel, Rows};
use super::plan::pairs;
use super::sums::{each_sum, products, GRAD, ONE, PRODUCTS, THETA, VELOCITY};
use super::*;
use crate::pool;

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n).map(|_| lcg(&mut s)).collect()
}

/// Straightforward reference: per element, find its group from the 3-D index.
fn reference(shape3: (usize, usize, usize), axis: usize, block: usize, arrays: &[&[f64]]) -> Vec<f64> {
    let (out, inn, rest) = shape3;
    let groups = if axis == 0 { out } else { inn / block };
    let k = Sums::count(arrays.len());
    let mut r = vec![0f64; groups * k];
    for o in 0..out {
        for j in 0..inn {
            for q in 0..rest {
                let idx = (o * inn + j) * rest + q;
                let g = if axis == 0 { o } else { j / block };
                let x = arrays[0][idx];
                let row = &mut r[g * k..(g + 1) * k];
                row[0] += x;
                row[1] += x * x;
                if arrays.len() > 1 {
                    let y = arrays[1][idx];
                    row[2] += y;
                    row[3] += y * y;
                    row[4] += x * y;
                }
                if arrays.len() > 2 {
                    let (y, z) = (arrays[1][idx], arrays[2][idx]);
                    row[5] += z * z;
                    row[6] += x * z;
                    row[7] += y * z;
                }
            }
        }
    }
    r
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * scale, "{x} vs {y}");
    }
}

#[test]
fn layouts() {
    assert_eq!(Layout::from_shape(&[7], 0, 1).unwrap(), Layout { outer: 1, groups: 7, seg: 1 });
    assert_eq!(Layout::from_shape(&[4, 6], 1, 3).unwrap(), Layout { outer: 4, groups: 2, seg: 3 });
    assert_eq!(Layout::from_shape(&[4, 6, 3, 3], 0, 1).unwrap(), Layout { outer: 1, groups: 4, seg: 54 });
    assert!(matches!(Layout::from_shape(&[4, 6], 1, 4), Err(Error::InvalidArgument(_))));
    assert!(matches!(Layout::from_shape(&[4, 6], 0, 2), Err(Error::InvalidArgument(_))));
    assert!(matches!(Layout::from_shape(&[4, 6], 2, 1), Err(Error::InvalidArgument(_))));
    assert!(matches!(Layout::from_shape(&[], 0, 1), Err(Error::Shape(_))));
}

#[test]
fn f64_matches_reference_all_shapes() {
    let cases = [
        ((5, 7, 3), 0, 1),
        ((5, 8, 3), 1, 1),
        ((5, 8, 3), 1, 4),
        ((1, 1, 1), 0, 1),
        ((3, 600_000, 1), 0, 1), // long rows, split inside the segment
        ((2000, 300, 1), 1, 1),  // many outer rows, column tasks
        ((64, 64, 9), 1, 2),
    ];
    for (seed, ((o, i, r), axis, block)) in cases.into_iter().enumerate() {
        let n = o * i * r;
        let (t, g, v) = (random(n, seed as u64), random(n, 100 + seed as u64), random(n, 200 + seed as u64));
        let layout = Layout::from_shape(&[o, i, r], axis, block).unwrap();
        for arrays in 1..=3 {
            let item = Item {
                theta: Data::F64(&t),
                grad: (arrays > 1).then_some(Data::F64(&g)),
                velocity: (arrays > 2).then_some(Data::F64(&v)),
                layout,
            };
            let got = group_stats(&item).unwrap();
            let want = reference((o, i, r), axis, block, &[&t[..], &g[..], &v[..]][..arrays]);
            close(&got, &want, 1e-12);
        }
    }
}

#[test]
fn sixteen_bit_and_f32_inputs() {
    let n = 3 * 2500;
    let t64 = random(n, 1);
    let g64 = random(n, 2);
    // Values exactly representable in each type, so the reference is exact.
    let t16: Vec<half::f16> = t64.iter().map(|&x| half::f16::from_f64(x)).collect();
    let g16: Vec<half::f16> = g64.iter().map(|&x| half::f16::from_f64(x)).collect();
    let tb: Vec<half::bf16> = t64.iter().map(|&x| half::bf16::from_f64(x)).collect();
    let gb: Vec<half::bf16> = g64.iter().map(|&x| half::bf16::from_f64(x)).collect();
    let tbits: Vec<u16> = tb.iter().map(|x| x.to_bits()).collect();
    let gbits: Vec<u16> = gb.iter().map(|x| x.to_bits()).collect();
    let t32: Vec<f32> = t64.iter().map(|&x| x as f32).collect();
    let g32: Vec<f32> = g64.iter().map(|&x| x as f32).collect();
    let layout = Layout::from_shape(&[3, 2500], 0, 1).unwrap();
    let check = |theta: Data, grad: Data, tr: Vec<f64>, gr: Vec<f64>| {
        let got = group_stats(&Item { theta, grad: Some(grad), velocity: None, layout }).unwrap();
        close(&got, &reference((3, 2500, 1), 0, 1, &[&tr, &gr]), 1e-12);
    };
    check(Data::F16(&t16), Data::F16(&g16), t16.iter().map(|x| x.to_f64()).collect(), g16.iter().map(|x| x.to_f64()).collect());
    check(Data::BF16(&tbits), Data::BF16(&gbits), tb.iter().map(|x| x.to_f64()).collect(), gb.iter().map(|x| x.to_f64()).collect());
    check(Data::F32(&t32), Data::F32(&g32), t32.iter().map(|&x| x as f64).collect(), g32.iter().map(|&x| x as f64).collect());
}

#[test]
fn batch_equals_single_and_is_thread_independent() {
    let a = random(512 * 4608, 3);
    let b = random(512 * 4608, 4);
    let layout0 = Layout::from_shape(&[512, 512, 9], 0, 1).unwrap();
    let layout1 = Layout::from_shape(&[512, 512, 9], 1, 1).unwrap();
    let items = [
        Item { theta: Data::F64(&a), grad: Some(Data::F64(&b)), velocity: None, layout: layout0 },
        Item { theta: Data::F64(&a), grad: None, velocity: None, layout: layout1 },
    ];
    let batch = group_stats_batch(&items).unwrap();
    assert_eq!(batch[0], group_stats(&items[0]).unwrap());
    assert_eq!(batch[1], group_stats(&items[1]).unwrap());
    pool::set_num_threads(1).unwrap();
    let one = group_stats_batch(&items).unwrap();
    pool::set_num_threads(0).unwrap();
    assert_eq!(batch, one, "results must not depend on the thread count");
}

#[test]
fn errors_and_empty() {
    let a = vec![1f64; 6];
    let f = vec![1f32; 6];
    let layout = Layout::from_shape(&[2, 3], 0, 1).unwrap();
    let bad_len = Layout::from_shape(&[2, 4], 0, 1).unwrap();
    let mixed = Item { theta: Data::F64(&a), grad: Some(Data::F32(&f)), velocity: None, layout };
    assert!(matches!(group_stats(&mixed), Err(Error::DType(_))));
    let short = Item { theta: Data::F64(&a), grad: None, velocity: None, layout: bad_len };
    assert!(matches!(group_stats(&short), Err(Error::Shape(_))));
    let vel_only = Item { theta: Data::F64(&a), grad: None, velocity: Some(Data::F64(&a)), layout };
    assert!(matches!(group_stats(&vel_only), Err(Error::InvalidArgument(_))));
    let empty: Vec<f64> = vec![];
    let rows_of_nothing = Layout::from_shape(&[3, 0], 0, 1).unwrap();
    let out = group_stats(&Item { theta: Data::F64(&empty), grad: None, velocity: None, layout: rows_of_nothing }).unwrap();
    assert_eq!(out, vec![0.0; 6]);
    let mut nan = a.clone();
    nan[4] = f64::NAN;
    let items = [Item { theta: Data::F64(&a), grad: Some(Data::F64(&nan)), velocity: None, layout }];
    let out = group_stats_batch(&items).unwrap();
    let err = check_finite(&items, &out).unwrap_err();
    assert!(matches!(&err, Error::NonFinite(m) if m.contains("group 1") && m.contains("grad")), "{err}");
}

#[test]
fn column_kernel_16_bit_and_long_column_segments() {
    // Short segments (column kernel, several tiles) and long ones (segment kernel) with
    // every dtype and array count, against the f64 reference of the widened values.
    for &(o, i, r, block) in &[(37usize, 700usize, 1usize, 1usize), (9, 6, 40, 2), (300, 20, 3, 5)] {
        let n = o * i * r;
        let layout = Layout::from_shape(&[o, i, r], 1, block).unwrap();
        let raw: Vec<Vec<f64>> = (0..3).map(|s| random(n, 40 + s)).collect();
        let h: Vec<Vec<half::f16>> = raw.iter().map(|v| v.iter().map(|&x| half::f16::from_f64(x)).collect()).collect();
        let b: Vec<Vec<u16>> = raw.iter().map(|v| v.iter().map(|&x| half::bf16::from_f64(x).to_bits()).collect()).collect();
        let f: Vec<Vec<f32>> = raw.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
        for arrays in 1..=3 {
            let exact = |conv: &dyn Fn(usize) -> Vec<f64>| (0..3).map(conv).collect::<Vec<_>>();
            let cases: Vec<(Item, Vec<Vec<f64>>)> = vec![
                (
                    Item {
                        theta: Data::F16(&h[0]),
                        grad: (arrays > 1).then_some(Data::F16(&h[1])),
                        velocity: (arrays > 2).then_some(Data::F16(&h[2])),
                        layout,
                    },
                    exact(&|k| h[k].iter().map(|x| x.to_f64()).collect()),
                ),
                (
                    Item {
                        theta: Data::BF16(&b[0]),
                        grad: (arrays > 1).then_some(Data::BF16(&b[1])),
                        velocity: (arrays > 2).then_some(Data::BF16(&b[2])),
                        layout,
                    },
                    exact(&|k| b[k].iter().map(|&x| half::bf16::from_bits(x).to_f64()).collect()),
                ),
                (
                    Item {
                        theta: Data::F32(&f[0]),
                        grad: (arrays > 1).then_some(Data::F32(&f[1])),
                        velocity: (arrays > 2).then_some(Data::F32(&f[2])),
                        layout,
                    },
                    exact(&|k| f[k].iter().map(|&x| x as f64).collect()),
                ),
            ];
            for (item, vals) in cases {
                let refs: Vec<&[f64]> = vals.iter().map(|v| &v[..]).collect();
                let want = reference((o, i, r), 1, block, &refs[..arrays]);
                close(&group_stats(&item).unwrap(), &want, 1e-12);
            }
        }
    }
}

#[test]
fn rows_and_columns_of_one_tensor_are_read_once() {
    // A tensor given twice (rows, then column blocks) is fused into one read; both results
    // must match the reference, for short and long segments, every dtype and array count,
    // and must not depend on the thread count.
    for &(o, i, r, block) in &[(70usize, 600usize, 1usize, 1usize), (512, 64, 9, 1), (40, 12, 49, 1), (33, 30, 3, 5)] {
        let n = o * i * r;
        let raw: Vec<Vec<f64>> = (0..3).map(|s| random(n, 70 + s)).collect();
        let h: Vec<Vec<u16>> = raw.iter().map(|v| v.iter().map(|&x| half::bf16::from_f64(x).to_bits()).collect()).collect();
        let f: Vec<Vec<f32>> = raw.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
        let rows = Layout::from_shape(&[o, i, r], 0, 1).unwrap();
        let cols = Layout::from_shape(&[o, i, r], 1, block).unwrap();
        for arrays in 1..=3 {
            for dtype in 0..3 {
                let data = |k: usize| match dtype {
                    0 => Data::F64(&raw[k]),
                    1 => Data::F32(&f[k]),
                    _ => Data::BF16(&h[k]),
                };
                let exact: Vec<Vec<f64>> = (0..3)
                    .map(|k| match dtype {
                        0 => raw[k].clone(),
                        1 => f[k].iter().map(|&x| x as f64).collect(),
                        _ => h[k].iter().map(|&x| half::bf16::from_bits(x).to_f64()).collect(),
                    })
                    .collect();
                let refs: Vec<&[f64]> = exact.iter().map(|v| &v[..]).collect();
                let item =
                    |layout| Item { theta: data(0), grad: (arrays > 1).then(|| data(1)), velocity: (arrays > 2).then(|| data(2)), layout };
                let items = [item(rows), item(cols)];
                assert_eq!(pairs(&items), vec![None, Some(0)], "the pair must be fused");
                let got = group_stats_batch(&items).unwrap();
                close(&got[0], &reference((o, i, r), 0, 1, &refs[..arrays]), 1e-12);
                close(&got[1], &reference((o, i, r), 1, block, &refs[..arrays]), 1e-12);
                pool::set_num_threads(1).unwrap();
                let one = group_stats_batch(&items).unwrap();
                pool::set_num_threads(0).unwrap();
                assert_eq!(got, one, "results must not depend on the thread count");
            }
        }
    }
    // Different arrays, or a layout that is not the other's transpose: not fused.
    let (a, b) = (random(24, 1), random(24, 2));
    let item = |t: &'static [f64], layout| Item { theta: Data::F64(t), grad: None, velocity: None, layout };
    let (a, b): (&'static [f64], &'static [f64]) = (a.leak(), b.leak());
    let rows = Layout::from_shape(&[4, 6], 0, 1).unwrap();
    let cols = Layout::from_shape(&[4, 6], 1, 2).unwrap();
    assert_eq!(pairs(&[item(a, rows), item(b, cols)]), vec![None, None]);
    assert_eq!(pairs(&[item(a, Layout::from_shape(&[6, 4], 0, 1).unwrap()), item(a, cols)]), vec![None, None]);
}

#[test]
fn portable_and_simd_kernels_agree() {
    let t: Vec<f32> = random(1003, 5).iter().map(|&x| x as f32).collect();
    let g: Vec<f32> = random(1003, 6).iter().map(|&x| x as f32).collect();
    let v: Vec<f32> = random(1003, 7).iter().map(|&x| x as f32).collect();
    for arrays in 1..=3 {
        let k = Sums::count(arrays);
        let (gs, vs) = ((arrays > 1).then_some(&g[..]), (arrays > 2).then_some(&v[..]));
        let (mut a, mut b) = (vec![0f64; k], vec![0f64; k]);
        kernels::segment_with(Kernel::Portable, &t, gs, vs, &mut a);
        kernels::segment(&t, gs, vs, &mut b);
        close(&a, &b, 1e-14);
        // The tile kernel: 7 rows of 203 columns (a vector part and a scalar tail), 110 apart.
        let rows = Rows::new([&t[..], &g[..], &v[..]], arrays, 110, 7, 203);
        let mut results = Vec::new();
        for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
            let mut acc = ColAcc::zeroed();
            let mut per_row = vec![0f64; 7 * k];
            kernels::tile_with(kernel, &rows, &mut acc, Some(&mut per_row));
            let mut cols_only = ColAcc::zeroed();
            kernels::tile_with(kernel, &rows, &mut cols_only, None);
            let flat = |a: &ColAcc| a.0[..k].iter().flat_map(|r| r[..203].to_vec()).collect::<Vec<f64>>();
            close(&flat(&acc), &flat(&cols_only), 1e-14);
            results.push((flat(&acc), per_row));
        }
        close(&results[0].0, &results[2].0, 1e-14);
        close(&results[0].1, &results[2].1, 1e-14);
        close(&results[0].0, &results[1].0, 1e-14);
        close(&results[0].1, &results[1].1, 1e-14);
    }
}

#[test]
fn read_pass_reads_every_byte() {
    let bytes: Vec<u8> = (0..5_000_003u32).map(|i| (i * 7 + 3) as u8).collect();
    // Wrapping sum of the 8-byte words plus the unaligned ends: compare with chunks read
    // one at a time (same definition), and check that a change anywhere changes the sum.
    let whole = read_pass(&[&bytes[..]]).unwrap();
    let mut changed = bytes.clone();
    changed[4_999_999] ^= 1;
    assert_ne!(whole, read_pass(&[&changed[..]]).unwrap());
    assert_eq!(read_pass(&[]).unwrap(), 0);
    assert_eq!(read_pass(&[&[][..], &[1u8, 2][..]]).unwrap(), read_pass(&[&[1u8, 2][..]]).unwrap());
}

#[test]
fn shapes_print_like_python() {
    assert_eq!(fmt_shape(&[4, 6]), "(4, 6)");
    assert_eq!(fmt_shape(&[5]), "(5,)");
    assert_eq!(fmt_shape(&[]), "()");
}

#[test]
fn the_product_table_gives_the_names_the_counts_and_the_culprit_input() {
    let inputs = ["theta", "grad", "velocity"];
    for (q, &(a, b)) in PRODUCTS.iter().enumerate() {
        let name = match (a, b) {
            (a, ONE) => format!("sum_{}", inputs[a]),
            (a, b) if a == b => format!("sumsq_{}", inputs[a]),
            (a, b) => format!("dot_{}_{}", inputs[a], inputs[b]),
        };
        assert_eq!(Sums::NAMES[q], name, "NAMES follows PRODUCTS");
    }
    // The sums of the first `arrays` arrays are exactly the first count(arrays) of the table.
    for arrays in 1..=3 {
        let reads_only_given = |&(a, b): &(usize, usize)| a < arrays && (b < arrays || b == ONE);
        let k = Sums::count(arrays);
        assert!(PRODUCTS[..k].iter().all(reads_only_given) && !PRODUCTS[k..].iter().any(reads_only_given), "{arrays} arrays");
    }
    let culprits: Vec<usize> = (0..8).map(Sums::newest_input).collect();
    assert_eq!(culprits, [THETA, THETA, GRAD, GRAD, GRAD, VELOCITY, VELOCITY, VELOCITY]);
    let (x, y, z) = (1.5, -2.0, 0.25);
    assert_eq!(products([x, y, z]), [x, x * x, y, y * y, x * y, z * z, x * z, y * z]);
}

#[test]
fn each_sum_runs_the_first_k_sum_indices_in_order() {
    for k in 0..=8 {
        let mut seen = Vec::new();
        each_sum!(k, |Q| {
            seen.push(Q);
        });
        assert_eq!(seen, (0..k).collect::<Vec<_>>());
    }
}

#[test]
fn dtype_codes_round_trip() {
    assert_eq!(DType::ALL.map(DType::code), [0, 1, 2, 3]);
    for dtype in DType::ALL {
        assert_eq!(DType::from_code(dtype.code()), Some(dtype));
    }
    assert_eq!(DType::from_code(4), None);
    assert_eq!(Data::F16(&[]).dtype(), DType::F16);
    assert_eq!(Data::BF16(&[]).dtype_name(), "bfloat16");
}

#[test]
fn every_segment_kernel_agrees_on_every_tail_length() {
    // Lengths around the widths of the vector kernels (4 lanes, 1, 2 or 4 vectors per
    // iteration), in float32 and float64, against the float64 reference of one group.
    for n in [0usize, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100] {
        let raw: Vec<Vec<f64>> = (0..3).map(|s| random(n, 90 + s)).collect();
        let f: Vec<Vec<f32>> = raw.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
        let f_exact: Vec<Vec<f64>> = f.iter().map(|v| v.iter().map(|&x| x as f64).collect()).collect();
        for arrays in 1..=3 {
            let k = Sums::count(arrays);
            let want64 = reference((1, n, 1), 0, 1, &[&raw[0][..], &raw[1][..], &raw[2][..]][..arrays]);
            let want32 = reference((1, n, 1), 0, 1, &[&f_exact[0][..], &f_exact[1][..], &f_exact[2][..]][..arrays]);
            for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
                let (g, v) = ((arrays > 1).then_some(&raw[1][..]), (arrays > 2).then_some(&raw[2][..]));
                let mut got = vec![0f64; k];
                kernels::segment_with(kernel, &raw[0], g, v, &mut got);
                close(&got, &want64, 1e-14);
                let (g, v) = ((arrays > 1).then_some(&f[1][..]), (arrays > 2).then_some(&f[2][..]));
                let mut got = vec![0f64; k];
                kernels::segment_with(kernel, &f[0], g, v, &mut got);
                close(&got, &want32, 1e-14);
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn fused_row_segments_add_each_segment_to_its_group_and_its_row() {
    use super::kernels::RowSegments;
    let Some(best) = RowSegments::detect() else { return };
    // Both widths where the CPU has them, segments with and without a masked tail.
    let kinds: Vec<RowSegments> = if best == RowSegments::Avx512 { vec![RowSegments::Avx2, RowSegments::Avx512] } else { vec![best] };
    for kernel in kinds {
        for seg in [1usize, 3, 4, 7, 8, 9, 33, 49] {
            let groups = 5;
            let raw: Vec<Vec<f64>> = (0..3).map(|s| random(groups * seg, 60 + s)).collect();
            for arrays in 1..=3 {
                let k = Sums::count(arrays);
                let lanes = kernel.lanes();
                let mut cols = vec![[0f64; 64]; groups];
                let mut row = [0f64; 64];
                kernel.add([&raw[0][..], &raw[1][..], &raw[2][..]], arrays, groups, seg, &mut cols, &mut row);
                let add_lanes = |v: &[f64; 64]| (0..k).map(|q| v[q * lanes..(q + 1) * lanes].iter().sum()).collect::<Vec<f64>>();
                let refs = [&raw[0][..], &raw[1][..], &raw[2][..]];
                let per_group: Vec<f64> = cols.iter().flat_map(add_lanes).collect();
                close(&per_group, &reference((1, groups, seg), 1, 1, &refs[..arrays]), 1e-14);
                close(&add_lanes(&row), &reference((1, groups * seg, 1), 0, 1, &refs[..arrays]), 1e-14);
            }
        }
    }
}
