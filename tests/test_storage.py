"""Runs of real length (docs/tracking.md, "Storage"): per-layer aggregates at every step, per-group
rows thinned under a byte budget, compressed saved files that give every bit back."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from neural_mechanics import _native
from neural_mechanics.errors import InvalidArgumentError, RunFormatError, UnknownColumnError
from neural_mechanics.run import COLUMNS, HYPER_COLUMNS, LAYER_FIELDS, GroupInfo, Run, load_run
from neural_mechanics.storage import LR_CHANGE, PER_GROUP_RATES

# Groups of three layers, interleaved (not layer by layer), so the aggregates must gather.
SYMMETRY = np.array(["scale", "rescale", "scale", "translation", "rescale", "scale", "translation"], dtype=object)
LAYER = np.array(["conv", "fc1", "conv", "fc2", "fc1", "conv", "fc2"], dtype=object)


def info() -> GroupInfo:
    n = len(SYMMETRY)
    return GroupInfo(symmetry=SYMMETRY, layer=LAYER, index=np.arange(n), label=np.array([f"g{i}" for i in range(n)], dtype=object), size=np.arange(1, n + 1))


def record(run: Run, steps: int, *, drop_at: int | None = None, seed: int = 0) -> None:
    """A synthetic run: charges that drift slowly (errors ~1e-7 relative), a residual NaN for
    one group at some steps (no gradient), lr 0.1 dropping ×0.1 at ``drop_at``."""
    rng = np.random.default_rng(seed)
    n = len(run.groups)
    charge = rng.uniform(1, 2, n)
    for k in range(steps):
        charge = charge * (1 + 1e-3 * rng.normal(size=n))
        row = {c: rng.normal(size=n) for c in COLUMNS}
        row.update(lr=0.1 if drop_at is None or k < drop_at else 0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4)
        row.update(measured=charge, exact=charge * (1 + 1e-7 * rng.normal(size=n)), paper=charge * (1 + 1e-3 * rng.normal(size=n)))
        row["magnitude"] = np.abs(charge)
        row["residual"] = np.abs(rng.normal(size=n)) * 1e-8
        if k % 3 == 0:
            row["residual"][1] = np.nan
        run.append(k, 0.1 * k, row)
    run.final = {"step": steps, "time": 0.1 * steps, "measured": charge, "magnitude": np.abs(charge)}


def test_per_layer_aggregates_are_the_layer_sums_maxima_and_first_values():
    run = Run(groups=info(), optimizer="SGD")
    record(run, 30)
    frame = run.to_pandas(per="layer")
    steps = run.step_index
    assert len(frame) == len(steps) * 3 and list(frame.columns[:5]) == ["step", "time", "symmetry", "layer", "groups"]
    assert list(frame.columns[5:]) == list(LAYER_FIELDS)
    errors = {t: np.abs(run.array(t) - run.array("measured")) for t in ("exact", "paper")}
    for (sym, layer), got in frame.groupby(["symmetry", "layer"], observed=True):
        mask = (SYMMETRY == sym) & (LAYER == layer)
        assert (got["groups"] == mask.sum()).all() and got["step"].tolist() == steps.tolist()
        for c in COLUMNS:
            want = run.array(c)[:, mask]
            if c in HYPER_COLUMNS:
                np.testing.assert_array_equal(got[c], want[:, 0])
            elif c == "residual":
                np.testing.assert_array_equal(got[c], np.fmax.reduce(want, axis=1))
            elif c in PER_GROUP_RATES:
                np.testing.assert_allclose(got[c], want.mean(axis=1), rtol=1e-13, atol=1e-15)
            else:  # a sum in another order: rounding up to ~1e-15 of the terms' size
                np.testing.assert_allclose(got[c], want.sum(axis=1), rtol=1e-13, atol=1e-15 * np.nanmax(np.abs(want).sum(axis=1)))
        residual = run.array("residual")[:, mask]
        assert got["residual_groups"].tolist() == np.isfinite(residual).sum(axis=1).tolist()
        # The error fields bound Run.errors() from above (they divide by the magnitude so far).
        for t in ("exact", "paper"):
            bound = got[f"{t}_error_max"].to_numpy()[:-1]
            assert (bound >= np.nanmax(run.errors(t)[:-1, mask], axis=1) * (1 - 1e-12)).all()
            assert (bound <= np.nanmax(errors[t][:-1, mask], axis=1) / np.nanmin(run.array("magnitude")[:1, mask]) + 1e-15).all()
    assert frame["exact_error_max"].max() < 1e-5 < frame["paper_error_max"].max()
    with pytest.raises(UnknownColumnError):
        run.layer_array("nope")
    with pytest.raises(InvalidArgumentError, match="per must be"):
        run.to_pandas(per="neuron")


def _kept_steps(max_bytes, steps=1000, drop_at=600, **kw):
    run = Run(groups=info(), optimizer="SGD", max_bytes=max_bytes, **kw)
    record(run, steps, drop_at=drop_at)
    return run


def test_thinning_keeps_the_budget_dense_early_every_lr_change_first_and_last(tmp_path):
    row = len(COLUMNS) * len(SYMMETRY) * 8 + 16
    layer_row = len(LAYER_FIELDS) * 3 * 8 + 16
    budget = 1001 * layer_row + 60 * row
    run = _kept_steps(budget)
    kept = run.step_index[:-1]  # the last row is the final one (step 1000)
    assert run.thinned and run.recorded_steps == 1000
    assert len(kept) <= 60 and len(kept) >= 15
    assert kept[0] == 0 and kept[-1] == 999 and 600 in kept  # first, last, the lr drop
    # Dense early (every step of the first part), sparser later (one in `stride`).
    stride = run._thinning.stride
    assert kept[:10].tolist() == list(range(10)) and stride >= 8
    late = kept[(kept > 100) & (kept < 600)]
    assert len(late) >= 5 and (late % stride == 0).all()
    # The aggregates keep every step.
    assert run.layer_step_index.tolist() == list(range(1001))
    # The stored rows are the rows as recorded (thinning moves rows, never changes them).
    full = Run(groups=info(), optimizer="SGD")
    record(full, 1000, drop_at=600)
    at = np.searchsorted(full.step_index, run.step_index)
    for c in COLUMNS:
        np.testing.assert_array_equal(run.array(c), full.array(c)[at])
    pd.testing.assert_frame_equal(run.to_pandas(per="layer"), full.to_pandas(per="layer"))
    # The saved file honours the budget (metadata aside), and loads bit for bit.
    path = run.save(tmp_path / "thin.nmrun")
    meta = len(json.dumps(run._meta())) + 4096
    assert os.path.getsize(path) <= budget + meta
    back = load_run(path)
    pd.testing.assert_frame_equal(back.to_pandas(), run.to_pandas())
    pd.testing.assert_frame_equal(back.to_pandas(per="layer"), run.to_pandas(per="layer"))
    assert back.recorded_steps == 1000 and back.max_bytes == budget and back.thinned and not full.thinned
    # The summary still sees every step where it can (residual_max from the aggregates); the
    # figures draw the kept rows.
    pd.testing.assert_series_equal(back.summary()["residual_max"], full.summary()["residual_max"])
    import matplotlib

    matplotlib.use("Agg")
    for fig in (back.plot("scale"), back.plot_errors(), back.plot_residuals()):
        assert fig.axes


def test_thinning_with_spilled_chunks_keeps_the_same_rows(tmp_path):
    row = len(COLUMNS) * len(SYMMETRY) * 8 + 16
    budget = 1001 * (len(LAYER_FIELDS) * 3 * 8 + 16) + 40 * row
    plain = _kept_steps(budget)
    spilled = _kept_steps(budget, max_rows_in_memory=7, spill_dir=str(tmp_path / "spill"))
    assert spilled.chunks and spilled.layer_chunks
    assert spilled.step_index.tolist() == plain.step_index.tolist()
    pd.testing.assert_frame_equal(spilled.to_pandas(), plain.to_pandas())
    pd.testing.assert_frame_equal(spilled.to_pandas(per="layer"), plain.to_pandas(per="layer"))
    back = load_run(spilled.save(tmp_path / "s.nmrun"))
    pd.testing.assert_frame_equal(back.to_pandas(), plain.to_pandas())
    # Thinning removed emptied chunks from disk.
    on_disk = {f for f in os.listdir(spilled.spill_folder) if f.startswith("chunk-")}
    assert on_disk == {os.path.basename(c) for c in spilled.chunks}


def test_a_smooth_schedule_is_no_lr_change_but_a_drop_is():
    run = Run(groups=info(), optimizer="SGD", max_bytes=10**9)
    thin = run._thinning
    assert thin is not None
    lr = np.full(len(SYMMETRY), 0.1)
    for k in range(50):
        thin.classify(k, lr * (1 - 0.01 * k))  # 1% a step: cosine-like drift
    assert thin.protected == {0}
    thin.classify(50, lr * (1 - LR_CHANGE) * 0.5)
    assert 50 in thin.protected


def test_compression_gives_every_bit_back_and_shrinks_the_file(tmp_path):
    run = Run(groups=info(), optimizer="SGD")
    record(run, 400)
    path = run.save(tmp_path / "r.nmrun")
    back = load_run(path)
    for c in COLUMNS:
        a, b = run.array(c), back.array(c)
        assert a.tobytes() == b.tobytes(), c  # bit for bit, NaNs included
    pairs = len(set(zip(SYMMETRY, LAYER)))
    raw = 401 * ((len(COLUMNS) * len(SYMMETRY) + len(LAYER_FIELDS) * pairs) * 8 + 16)  # rows and aggregates
    assert os.path.getsize(path) < raw  # even random-normal test columns shrink (hyperparameters, NaN)
    assert _native.RUN_FORMAT_VERSION == 2


def _v1_file(path, meta: dict, arrays: list) -> None:
    """A run file in format version 1 (raw arrays, header first), as this package wrote before."""
    entries, offset, payload = [], 0, b""
    for name, a in arrays:
        a = np.ascontiguousarray(a)
        entries.append({"name": name, "elem": "i64" if a.dtype == np.int64 else "f64", "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
        payload += a.astype("<" + a.dtype.str[1:]).tobytes()
    header = json.dumps({"format_version": 1, "producer": "neural-mechanics 0.1.0", "meta": meta, "arrays": entries}).encode()
    body = b"NMRUN\0\r\n" + (1).to_bytes(4, "little") + bytes(4) + len(header).to_bytes(8, "little") + header + bytes(-len(header) % 8) + payload
    mask, mult, h = 2**64 - 1, 0x0000_0100_0000_01B3, 0xCBF2_9CE4_8422_2325
    for w in np.frombuffer(body, dtype="<u8").tolist():
        h = ((h ^ w) * mult) & mask
        h = ((h << 29) | (h >> 35)) & mask
    h = (h * mult) & mask
    path.write_bytes(body + (h ^ (h >> 31)).to_bytes(8, "little"))


def test_version_1_files_still_load_with_their_aggregates(tmp_path):
    run = Run(groups=info(), optimizer="SGD")
    record(run, 20)
    steps, time, cols = run._rows()
    meta = {k: v for k, v in run._meta().items() if k != "storage"}
    _v1_file(tmp_path / "old.nmrun", meta, [("steps", steps), ("time", time)] + [(c, cols[c]) for c in COLUMNS])
    old = load_run(tmp_path / "old.nmrun")
    pd.testing.assert_frame_equal(old.to_pandas(), run.to_pandas())
    pd.testing.assert_frame_equal(old.to_pandas(per="layer").drop(columns=["exact_error_max", "paper_error_max"]),
                                  run.to_pandas(per="layer").drop(columns=["exact_error_max", "paper_error_max"]))


def test_malformed_per_layer_arrays_are_a_run_format_error(tmp_path):
    run = Run(groups=info(), optimizer="SGD")
    record(run, 5)
    steps, time, cols = run._rows()
    arrays = [("steps", steps), ("time", time)] + [(c, np.ascontiguousarray(cols[c])) for c in COLUMNS]
    arrays += [("layers.steps", steps), ("layers.time", time)] + [("layers." + f, np.zeros((len(steps), 2))) for f in LAYER_FIELDS]
    _native.save_run(str(tmp_path / "bad.nmrun"), json.dumps(run._meta()), arrays)
    with pytest.raises(RunFormatError, match="per-layer array"):
        load_run(tmp_path / "bad.nmrun")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GB"])
def test_track_checks_max_bytes_when_given(bad):
    torch = pytest.importorskip("torch")
    import neural_mechanics as nm

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(InvalidArgumentError, match="max_bytes must be a positive integer"):
        nm.track(model, torch.optim.SGD(model.parameters(), lr=0.1), max_bytes=bad)


def _v2_file(header: dict, payload: bytes) -> bytes:
    """A version-2 run file around ``payload`` and ``header``, framed and checksummed."""
    body = b"NMRUN\0\r\n" + (2).to_bytes(4, "little") + bytes(12) + payload + bytes(-len(payload) % 8)
    h = json.dumps(header).encode()
    body += h + bytes(-len(h) % 8) + len(h).to_bytes(8, "little")
    mask, mult, s = 2**64 - 1, 0x0000_0100_0000_01B3, 0xCBF2_9CE4_8422_2325
    for w in np.frombuffer(body, dtype="<u8").tolist():
        s = ((s ^ w) * mult) & mask
        s = ((s << 29) | (s >> 35)) & mask
    s = (s * mult) & mask
    return body + (s ^ (s >> 31)).to_bytes(8, "little")


def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path):
    import zlib

    payload = zlib.compress(bytes(8 * 4096), 9)[2:-4]  # raw deflate of 4096 zero words
    block = {"offset": 24, "nbytes": len(payload), "codec": "deflate"}
    ok = {"format_version": 2, "producer": "x", "meta": {}, "arrays": [{"name": "a", "elem": "f64", "shape": [64, 64], "blocks": [dict(block, rows=64)]}]}
    (tmp_path / "ok").write_bytes(_v2_file(ok, payload))
    assert _native.load_run(str(tmp_path / "ok"))[1][0][1].shape == (64, 64)
    bomb = json.loads(json.dumps(ok))
    bomb["arrays"][0]["shape"] = [10**9, 64]
    bomb["arrays"][0]["blocks"][0]["rows"] = 10**9  # 512 GB from a few hundred bytes
    (tmp_path / "bomb").write_bytes(_v2_file(bomb, payload))
    with pytest.raises(RunFormatError, match="more than"):
        load_run(tmp_path / "bomb")


def test_a_tracked_run_under_a_budget_keeps_exact_rows_and_every_step_per_layer():
    """A real tracked MLP with a step schedule: under max_bytes the kept rows are the rows the
    unbudgeted run recorded, bit for bit, and the per-layer table is the same at every step."""
    torch = pytest.importorskip("torch")
    import neural_mechanics as nm

    def train(max_bytes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=120, gamma=0.1)
        x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
        with nm.track(model, opt, max_bytes=max_bytes) as tracker:
            for _ in range(200):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
        return tracker.run

    full = train(None)
    groups = len(full.groups)
    budget = 201 * (len(LAYER_FIELDS) * len(full.layers) * 8 + 16) + 30 * (len(COLUMNS) * groups * 8 + 16)
    thin = train(budget)
    assert thin.thinned and not full.thinned and len(thin.step_index) <= 31
    kept = thin.step_index
    assert 0 in kept and 120 in kept and kept[-2] == 199  # first, the lr drop, last (then the final row)
    at = np.searchsorted(full.step_index, kept)
    for c in COLUMNS:
        np.testing.assert_array_equal(thin.array(c), full.array(c)[at])
    pd.testing.assert_frame_equal(thin.to_pandas(per="layer"), full.to_pandas(per="layer"))
