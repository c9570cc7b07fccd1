"""The adversarial campaign, kept: hypothesis properties over the three surfaces that take
untrusted input, sized to run in about a minute (``NM_FUZZ_SCALE=10`` runs ten times as many
cases).

- ``group_stats`` on random shapes, dtypes, layouts and array counts agrees with a float64 numpy
  reference (to summation rounding);
- the theory functions, fed random hyperparameters (edge values included: 0, −0.0, tiny, huge,
  NaN, ±inf, out of domain) and random inputs, return finite results of the documented shape or
  raise a library error, never anything else; a failed stream step changes nothing; the batch
  forms equal the streams bit for bit; equilibrium never returns NaN;
- ``load_run`` on crafted files (byte mutations of a real run, well-framed files with random
  metadata and arrays, random headers with a correct checksum) returns a run or raises
  RunFormatError / RunIOError, and never allocates more than a small multiple of the file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neural_mechanics as nm
from neural_mechanics import _native, theory
from neural_mechanics.errors import NeuralMechanicsError, RunFormatError, RunIOError
from neural_mechanics.run import COLUMNS, GroupInfo, Run, load_run

SCALE = float(os.environ.get("NM_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        derandomize=False,
    )


# --- group_stats against a float64 reference --------------------------------------------------


@st.composite
def stats_cases(draw):
    ndim = draw(st.integers(1, 4))
    dim = st.one_of(st.integers(0, 6), st.integers(7, 40), st.integers(60, 300))
    shape = [draw(dim) for _ in range(ndim)]
    while math.prod(shape) > 150_000:  # keep a case fast: shrink the largest dimension
        shape[int(np.argmax(shape))] //= 2
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
    arrays = draw(st.integers(1, 3))
    axis = draw(st.sampled_from([0, 1])) if ndim >= 2 else 0
    block = 1
    if axis == 1 and shape[1] > 0:
        divisors = [d for d in range(1, shape[1] + 1) if shape[1] % d == 0]
        block = draw(st.sampled_from(divisors))
    channels_last = ndim == 4 and axis == 0 and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return tuple(shape), dtype, arrays, axis, block, channels_last, seed, scale


def _reference(data: list[np.ndarray], axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums in float64 (as SUM_NAMES orders them) and the sums of their terms' absolute
    values (the scale of the rounding a different summation order may leave)."""
    shape = data[0].shape
    out, inner, rest = shape[0], (shape[1] if len(shape) > 1 else 1), math.prod(shape[2:])
    views = [a.reshape(out, inner, rest) for a in data]
    if axis == 0:
        groups = [v.reshape(out, inner * rest) for v in views]
    else:
        g = inner // block
        groups = [v.reshape(out, g, block, rest).transpose(1, 0, 2, 3).reshape(g, out * block * rest) for v in views]
    t = groups[0]
    terms = [t, t * t]
    if len(groups) > 1:
        gr = groups[1]
        terms += [gr, gr * gr, t * gr]
    if len(groups) > 2:
        v = groups[2]
        terms += [v * v, t * v, gr * v]
    return np.stack([s.sum(axis=1) for s in terms], 1), np.stack([np.abs(s).sum(axis=1) for s in terms], 1)


@fuzz(500)
@given(case=stats_cases())
def test_group_stats_matches_a_float64_reference(case):
    shape, dtype, arrays, axis, block, channels_last, seed, scale = case
    g = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(getattr(torch, dtype)) for _ in range(arrays)]
    exact = [t.double().numpy() for t in tensors]  # the values the kernel reads, widened exactly
    if channels_last:
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    elif dtype != "bfloat16" and seed % 2:
        tensors = [t.numpy() for t in tensors]  # numpy input too (no bfloat16 in numpy)
    got = nm.group_stats(*tensors, axis=axis, block=block)
    ref, size = _reference(exact, axis, block)
    names = nm.SUM_NAMES[: ref.shape[1]]
    assert list(got) == list(names)
    for k, name in enumerate(names):
        assert got[name].shape == (ref.shape[0],)
        err = np.abs(got[name] - ref[:, k])
        assert (err <= 1e-12 * size[:, k] + 1e-300).all(), (name, err.max(), size[:, k].max())


# --- the theory functions ----------------------------------------------------------------------

EDGES = [0.0, -0.0, 5e-324, 1e-300, 1e-160, 1e-12, 0.05, 0.5, 0.9, 0.999, 1.0, 1.5, 1e154, 1e300, 1.7976931348623157e308, -0.1, math.nan, math.inf, -math.inf]
hyper = st.one_of(st.sampled_from(EDGES), st.floats(0.0, 1.0, allow_subnormal=True))
values = st.one_of(st.sampled_from([0.0, -0.0, 1e-300, 1.0, -1.0, 1e150, 1e300, math.nan, math.inf]), st.floats(-10, 10))


@st.composite
def theory_cases(draw):
    steps = draw(st.integers(0, 6))
    groups = draw(st.integers(0, 4))
    kind = draw(st.sampled_from(theory.KINDS))

    def per_step(strategy):
        return draw(st.one_of(strategy, st.lists(strategy, min_size=steps, max_size=steps).map(np.array)))

    hp = {k: per_step(hyper) for k in ("lr", "momentum", "dampening", "weight_decay")}
    y0 = np.array(draw(st.lists(values, min_size=groups, max_size=groups)), dtype=np.float64)
    drive = np.array(draw(st.lists(values, min_size=steps * groups, max_size=steps * groups)), dtype=np.float64).reshape(steps, groups)
    return kind, steps, groups, hp, y0, drive


def _ok_or_library_error(fn):
    try:
        return fn()
    except NeuralMechanicsError as e:
        assert str(e)
        return None


@fuzz(800)
@given(case=theory_cases(), nesterov=st.booleans())
def test_theory_functions_return_finite_results_or_library_errors(case, nesterov):
    kind, steps, groups, hp, y0, drive = case
    out = _ok_or_library_error(lambda: theory.paper(kind, y0, drive, steps=steps, **hp))
    if out is not None:
        assert out.shape == (steps + 1, groups) and np.isfinite(out).all()
    led = _ok_or_library_error(lambda: theory.ledger(kind, y0, flux=drive, update_sq=np.abs(drive), update_dot=drive, nesterov=nesterov, **hp))
    if led is not None:
        assert led.shape == (steps + 1, groups) and np.isfinite(led).all()
    t = _ok_or_library_error(lambda: theory.times(steps=steps, **{k: hp[k] for k in ("lr", "momentum", "dampening")}))
    if t is not None:
        assert t.shape == (steps + 1,) and np.isfinite(t).all() and (np.diff(t) >= 0).all()
    measured = _ok_or_library_error(
        lambda: theory.ledger_measured(kind, y0, lr=hp["lr"], dot_theta_update=drive, update_sq=drive, update_sum=drive)
    )
    if measured is not None:
        assert measured.shape == (steps + 1, groups) and np.isfinite(measured).all()
    # The stream, step by step: a failed step changes nothing; the successful ones are the batch's rows.
    stream = _ok_or_library_error(lambda: theory.PaperStream(kind, y0))
    if stream is None:
        return
    rows = [stream.y]
    for n in range(steps):
        h = {k: (v[n] if np.ndim(v) else v) for k, v in hp.items()}
        before = (stream.y, stream.ydot, stream.steps, stream.time)
        y = _ok_or_library_error(lambda n=n, h=h: stream.step(drive[n], **h))
        if y is None:
            after = (stream.y, stream.ydot, stream.steps, stream.time)
            assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
            break
        assert np.isfinite(y).all() and np.isfinite(stream.ydot).all()
        rows.append(y)
    else:
        if out is not None:
            assert np.array_equal(np.array(rows).reshape(steps + 1, groups), out)


@fuzz(300)
@given(
    # Small enough to run, or past the cap (a run in between would allocate up to 1 GiB here).
    steps=st.one_of(
        st.integers(0, 2**16), st.integers(2**27, 2**64), st.sampled_from([2**27, 2**60, 2**61 - 1, 2**62, 2**63 - 1]), st.floats(), st.booleans()
    ),
    groups=st.integers(0, 3),
    lr=hyper,
)
def test_run_lengths_from_steps_alone_never_crash(steps, groups, lr):
    """``steps=`` sizes a result no input backs (translation without a drive, times): any value is
    a result or a library error, never a crash or a huge allocation. (This once found a
    segmentation fault: a (2**62 + 1, 0) result numpy cannot describe.)"""
    out = _ok_or_library_error(lambda: theory.paper("translation", np.ones(groups), None, lr=lr, steps=steps))
    if out is not None:
        assert out.shape == (steps + 1, groups) and out.size <= theory.MAX_UNBACKED_VALUES
    t = _ok_or_library_error(lambda: theory.times(lr=lr, steps=steps))
    if t is not None:
        assert t.shape == (steps + 1,) and t.size <= theory.MAX_UNBACKED_VALUES


@fuzz(600)
@given(lr=hyper, wd=hyper, g=st.one_of(hyper, st.floats(0, 1e308)), m=hyper, d=hyper)
def test_equilibrium_is_never_nan(lr, wd, g, m, d):
    for fn in (
        lambda: theory.equilibrium_sgd(lr=lr, weight_decay=wd, grad_sq_unit=g, momentum=m, dampening=d),
        lambda: theory.equilibrium_adamw(lr=lr, weight_decay=wd, update_sq=g, beta1=m),
    ):
        out = _ok_or_library_error(fn)
        if out is not None:
            for name, v in out.items():
                assert not math.isnan(v) and v >= 0, (name, v)
    regime = _ok_or_library_error(lambda: theory.regime(lr=lr, momentum=m, dampening=d, weight_decay=wd))
    assert regime is None or regime in theory.REGIMES


# --- load_run on crafted files -----------------------------------------------------------------

MAGIC = b"NMRUN\0\r\n"


def checksum(data: bytes) -> int:
    """The format's checksum (src/runfile.rs), so that crafted headers get past it."""
    mask, mult = 2**64 - 1, 0x0000_0100_0000_01B3
    h = 0xCBF2_9CE4_8422_2325
    n8 = len(data) // 8 * 8
    for w in np.frombuffer(data[:n8], dtype="<u8").tolist():
        h = ((h ^ w) * mult) & mask
        h = ((h << 29) | (h >> 35)) & mask
    tail = data[n8:]
    h = ((h ^ int.from_bytes(tail.ljust(8, b"\0"), "little") ^ len(tail)) * mult) & mask
    return h ^ (h >> 31)


def frame(header: bytes, payload: bytes, *, version: int = 1, header_len: int | None = None) -> bytes:
    body = MAGIC + version.to_bytes(4, "little") + bytes(4) + (len(header) if header_len is None else header_len).to_bytes(8, "little")
    body += header + bytes(-len(header) % 8) + payload
    return body + checksum(body).to_bytes(8, "little")


def _small_run(groups=3, rows=4) -> Run:
    info = GroupInfo(
        symmetry=np.array(["scale", "rescale", "translation"][:groups], dtype=object),
        layer=np.array(["a", "b", "c"][:groups], dtype=object),
        index=np.arange(groups),
        label=np.array(["x", "y", "z"][:groups], dtype=object),
        size=np.ones(groups, dtype=np.int64),
    )
    run = Run(groups=info, optimizer="SGD")
    rng = np.random.default_rng(0)
    for n in range(rows):
        run.append(n, 0.1 * n, {c: rng.normal(size=groups) for c in COLUMNS})
    return run


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.nmrun"
    _small_run().save(path)
    return path.read_bytes()


def _load_bytes(tmp_path, data: bytes):
    path = tmp_path / "case.nmrun"
    path.write_bytes(data)
    try:
        run = load_run(path)
    except (RunFormatError, RunIOError) as e:
        assert str(e)
        return None
    # Whatever loaded allocates at most a small multiple of the file's size.
    assert run._mem.block.nbytes <= 16 * len(data) + 4096
    return run


@fuzz(600)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "insert", "overwrite"]), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_run_files_load_identically_or_are_refused(tmp_path, valid_file, edits):
    data = bytearray(valid_file)
    for op, where, blob in edits:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[at] ^= blob[0] or 1
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = blob
        else:
            data[at : at + len(blob)] = blob
    run = _load_bytes(tmp_path, bytes(data))
    if run is not None:
        assert bytes(data) == valid_file or run.to_pandas().equals(load_run_bytes(tmp_path, valid_file).to_pandas())


def load_run_bytes(tmp_path, data: bytes) -> Run:
    path = tmp_path / "reference.nmrun"
    path.write_bytes(data)
    return load_run(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=5), children, max_size=4)),
    max_leaves=12,
)


@st.composite
def run_metadata(draw):
    """Mostly-valid metadata with random parts swapped for random JSON."""
    groups = draw(st.integers(0, 5))
    meta = {
        "kind": "neural-mechanics run",
        "optimizer": "SGD",
        "groups": {
            "symmetry": [draw(st.sampled_from(["scale", "rescale", "translation"])) for _ in range(groups)],
            "layer": ["l"] * groups,
            "index": list(range(groups)),
            "label": ["g"] * groups,
            "size": [1] * groups,
        },
        "paper_notes": [],
        "exact_note": "",
        "regimes": {},
        "skipped": {},
        "notes": [],
    }
    for key in draw(st.lists(st.sampled_from(sorted(meta) + ["groups.size", "groups.symmetry", "groups.index"]), max_size=2)):
        if key.startswith("groups."):
            if isinstance(meta["groups"], dict):
                meta["groups"][key[7:]] = draw(json_values)
        else:
            meta[key] = draw(json_values)
    return meta, groups


@fuzz(400)
@given(
    meta=run_metadata(),
    rows=st.integers(0, 5),
    shapes=st.dictionaries(
        st.sampled_from(["steps", "time", *COLUMNS, "extra"]),
        st.tuples(st.lists(st.integers(0, 6), max_size=3), st.sampled_from([np.float64, np.int64])),
        max_size=4,
    ),
)
def test_well_framed_files_with_random_contents_load_or_are_refused(tmp_path, meta, rows, shapes):
    meta, groups = meta
    arrays = {"steps": np.arange(rows, dtype=np.int64), "time": np.zeros(rows), **{c: np.zeros((rows, groups)) for c in COLUMNS}}
    for name, (shape, dtype) in shapes.items():
        arrays[name] = np.zeros(shape, dtype=dtype)
    path = tmp_path / "framed.nmrun"
    _native.save_run(str(path), json.dumps(meta), list(arrays.items()))
    run = _load_bytes(tmp_path, path.read_bytes())
    if run is not None:
        assert len(run.groups) == groups and len(run.step_index) == rows


@st.composite
def headers(draw):
    entries = []
    offset = 0
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**40, 2**63, 2**64 - 1])), max_size=3))
        n = math.prod(shape) * 8
        entry = {
            "name": draw(st.sampled_from(["steps", "time", "measured", "x"])),
            "elem": draw(st.sampled_from(["f64", "i64", "f32", 7])),
            "shape": shape,
            "offset": draw(st.one_of(st.just(offset), st.integers(0, 2**64 - 1))),
            "nbytes": draw(st.one_of(st.just(n), st.integers(0, 2**64 - 1))),
        }
        offset += n
        entries.append(entry)
    header = {"format_version": draw(st.sampled_from([1, 1, 1, 0, 2])), "producer": "fuzz", "meta": draw(json_values), "arrays": entries}
    payload_len = draw(st.one_of(st.just(min(offset, 4096)), st.integers(0, 256)))
    return json.dumps(header).encode(), bytes(min(payload_len, 4096)), draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))


@fuzz(600)
@given(case=headers(), version=st.sampled_from([1, 1, 1, 0, 2, 2**32 - 1]))
def test_crafted_headers_with_a_valid_checksum_are_refused_cleanly(tmp_path, case, version):
    header, payload, header_len = case
    _load_bytes(tmp_path, frame(header, payload, version=version, header_len=header_len))
