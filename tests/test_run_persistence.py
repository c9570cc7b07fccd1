"""Saved runs: round trip, atomic replacement, clear errors, reload without torch, bounded memory."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from neural_mechanics.errors import InvalidArgumentError, NeuralMechanicsError, RunFormatError, RunIOError
from neural_mechanics.run import COLUMNS, STEP_COLUMNS, GroupInfo, Run, load_run


def synthetic_run(groups=7, steps=25, **kw) -> Run:
    rng = np.random.default_rng(0)
    info = GroupInfo(
        symmetry=np.array(["scale"] * 3 + ["rescale"] * 2 + ["translation"] * 2, dtype=object)[:groups],
        layer=np.array(["conv", "conv", "conv", "fc1", "fc1", "fc2", "fc2"], dtype=object)[:groups],
        index=np.arange(groups),
        label=np.array([f"g{i}" for i in range(groups)], dtype=object),
        size=np.arange(1, groups + 1),
    )
    run = Run(groups=info, optimizer="SGD", **kw)
    for n in range(steps):
        values = {c: rng.normal(size=groups) for c in STEP_COLUMNS}
        run.append(n, 0.05 * n, dict(values, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4))
    run.final = {"step": steps, "time": 0.05 * steps, "measured": rng.normal(size=groups), "magnitude": np.ones(groups)}
    run.paper_notes[("scale", "conv")] = "a note"
    run.note_regime("scale", "underdamped")
    run.skipped["head.weight"] = "frozen"
    return run


def test_round_trip_gives_the_same_table_and_summary(tmp_path):
    run = synthetic_run()
    path = run.save(tmp_path / "r.nmrun")
    back = load_run(path)
    pd.testing.assert_frame_equal(run.to_pandas(), back.to_pandas())
    pd.testing.assert_frame_equal(run.summary(), back.summary())
    assert back.skipped == run.skipped and back.regimes == run.regimes
    assert back.to_pandas()["step"].max() == 25  # the final row survives


def test_reload_in_a_fresh_process_without_torch(tmp_path):
    run = synthetic_run()
    path = run.save(tmp_path / "r.nmrun")
    expected = tmp_path / "expected.pkl"
    run.to_pandas().to_pickle(expected)
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import pandas as pd
        import neural_mechanics as nm
        back = nm.load_run({str(path)!r})
        pd.testing.assert_frame_equal(back.to_pandas(), pd.read_pickle({str(expected)!r}))
        print("ok", len(back.to_pandas()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_truncated_corrupted_and_foreign_files_raise(tmp_path):
    path = synthetic_run().save(tmp_path / "r.nmrun")
    data = path.read_bytes()
    for cut in (0, 5, 30, len(data) // 2, len(data) - 1):
        (tmp_path / "cut").write_bytes(data[:cut])
        with pytest.raises(RunFormatError):
            load_run(tmp_path / "cut")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(RunFormatError, match="corrupt"):
        load_run(tmp_path / "flip")
    (tmp_path / "foreign").write_text("step,value\n0,1\n")
    with pytest.raises(RunFormatError, match="not a neural-mechanics run"):
        load_run(tmp_path / "foreign")
    with pytest.raises(RunIOError):
        load_run(tmp_path / "does-not-exist")
    assert issubclass(RunFormatError, ValueError) and issubclass(RunIOError, OSError)


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "r.nmrun"
    first = synthetic_run(steps=5)
    first.save(path)
    before = path.read_bytes()
    broken = synthetic_run(steps=8)
    broken.notes.append(float("nan"))  # not JSON: the save fails before the target is touched
    with pytest.raises((NeuralMechanicsError, ValueError)):
        broken.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.nmrun"]  # no temporary left behind


def test_a_save_killed_midway_leaves_the_previous_file(tmp_path):
    """A process killed while writing a large run never leaves a half-written target."""
    path = tmp_path / "r.nmrun"
    synthetic_run(steps=3).save(path)
    before = path.read_bytes()
    code = textwrap.dedent(
        f"""
        import os, threading, numpy as np
        from neural_mechanics.run import GroupInfo, Run, COLUMNS
        n = 20000
        info = GroupInfo(np.array(['scale'] * n, dtype=object), np.array(['l'] * n, dtype=object),
                         np.arange(n), np.array(['g'] * n, dtype=object), np.ones(n, dtype=np.int64))
        run = Run(groups=info)
        row = {{c: np.ones(n) for c in COLUMNS}}
        for s in range(400):
            run.append(s, float(s), row)
        threading.Timer(0.05, lambda: os._exit(9)).start()
        while True:
            run.save({str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    data = path.read_bytes()
    # Either the old file or a complete new one, never a torn one.
    back = load_run(path)
    assert data == before or len(back.to_pandas()) == 400 * 20000


def test_spilling_keeps_memory_bounded_and_the_table_identical(tmp_path):
    plain = synthetic_run(steps=60)
    spilled = synthetic_run(steps=60, max_rows_in_memory=16, spill_dir=str(tmp_path / "spill"))
    assert len(spilled.chunks) == 3 and spilled._mem.n == 60 - 48
    pd.testing.assert_frame_equal(plain.to_pandas(), spilled.to_pandas())
    back = load_run(spilled.save(tmp_path / "s.nmrun"))
    pd.testing.assert_frame_equal(plain.to_pandas(), back.to_pandas())


def test_a_temporary_spill_folder_goes_away_with_the_run():
    import gc

    run = synthetic_run(steps=40, max_rows_in_memory=16)
    folder = run.spill_folder
    assert run.spill_dir is None and folder
    assert sorted(os.listdir(folder)) == ["LOCK", "chunk-000000.nmrun", "chunk-000001.nmrun"]
    del run
    gc.collect()
    assert not os.path.exists(folder)


def test_a_million_steps_of_the_acceptance_network_stay_under_the_limit(tmp_path):
    """10^6 steps at the acceptance network's group count (~210 groups), recorded every 10th
    step (the tracker's record_every) with a 16 MiB limit: the process's peak memory grows by
    about the limit, not the 1.7 GB the 10^5 rows take (they spill to disk). Runs in a fresh
    process (no torch) so that its peak resident size is meaningful."""
    code = textwrap.dedent(
        f"""
        import os, resource, numpy as np
        from neural_mechanics import _native
        from neural_mechanics.run import GroupInfo, Run, COLUMNS
        groups, limit, steps, record_every = 210, 16 * 2**20, 1_000_000, 10
        info = GroupInfo(np.array(["scale"] * groups, dtype=object), np.array(["l"] * groups, dtype=object),
                         np.arange(groups), np.array(["g"] * groups, dtype=object), np.ones(groups, dtype=np.int64))
        values = {{c: np.zeros(groups) for c in COLUMNS}}
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run = Run(groups=info, max_rows_in_memory=Run.rows_for_memory(groups, limit), spill_dir={str(tmp_path / "spill")!r})
        for n in range(0, steps, record_every):
            values["measured"][0] = n
            run.append(n, 0.0, values)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        on_disk = sum(len(np.asarray(dict(_native.load_run(c)[1])["steps"])) for c in run.chunks)
        print(grown, on_disk, len(run.chunks), run._mem.n)
        for c in run.chunks:
            os.remove(c)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    grown, on_disk, chunks, in_memory = map(int, proc.stdout.split())
    limit = 16 * 2**20
    assert grown < 2 * limit, f"peak memory grew by {grown / 2**20:.0f} MiB"
    assert on_disk + in_memory == 100_000  # every recorded row was kept (rows on disk, compressed)
    assert chunks > 50 and in_memory > 0


# --- findings of the adversarial campaign ---------------------------------------------------------


def test_two_runs_given_one_spill_dir_never_collide(tmp_path):
    """Finding: two runs given the same spill_dir both wrote chunk-000000...: run A's spilled
    rows silently became run B's. Each run now spills into a folder of its own (created
    exclusively inside spill_dir) holding a LOCK file while the run lives."""
    import gc

    spill = tmp_path / "spill"
    a = synthetic_run(steps=40, max_rows_in_memory=16, spill_dir=str(spill))
    b = Run(groups=a.groups, optimizer="SGD", max_rows_in_memory=16, spill_dir=str(spill))
    rng = np.random.default_rng(1)
    for n in range(40):
        b.append(n, 0.0, {c: rng.normal(size=len(a.groups)) + 100 for c in COLUMNS})
    assert a.spill_folder != b.spill_folder
    assert {os.path.dirname(a.spill_folder), os.path.dirname(b.spill_folder)} == {str(spill)}
    assert not set(a.chunks) & set(b.chunks)
    plain = synthetic_run(steps=40)
    pd.testing.assert_frame_equal(a.to_pandas(), plain.to_pandas())  # A reads its own rows
    assert (b.array("measured") > 50).all()
    for run in (a, b):
        assert os.path.isfile(os.path.join(run.spill_folder, "LOCK"))
    folder_a = a.spill_folder
    del a
    gc.collect()
    # A folder the caller named keeps its chunks; the lock goes with the run.
    assert not os.path.exists(os.path.join(folder_a, "LOCK"))
    assert sorted(os.listdir(folder_a)) == ["chunk-000000.nmrun", "chunk-000001.nmrun"]


def test_a_spill_folder_that_cannot_be_made_is_a_library_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run = Run(groups=synthetic_run().groups, max_rows_in_memory=2, spill_dir=str(blocker / "below"))
    values = {c: np.zeros(7) for c in COLUMNS}
    run.append(0, 0.0, values)
    with pytest.raises(RunIOError, match="cannot spill"):
        run.append(1, 0.0, values)


def _save_raw(path, meta, arrays):
    """A well-framed, checksummed file with any metadata and arrays (the native writer checks
    neither against the run schema): what a hostile file can contain."""
    from neural_mechanics import _native

    _native.save_run(str(path), json.dumps(meta), [(k, np.ascontiguousarray(v)) for k, v in arrays.items()])
    return path


def _valid_parts(rows=3, groups=2):
    run = synthetic_run(groups=groups, steps=rows - 1)
    meta = run._meta()
    steps, time, cols = run._rows()
    arrays = {"steps": steps, "time": time, **{c: cols[c] for c in COLUMNS}}
    return meta, arrays


def test_crafted_arrays_are_refused_not_broadcast(tmp_path):
    """Finding: a 175 KB crafted file loaded to 7.3 GB (shape-(1,) columns broadcast over the
    declared rows x groups; steps stored as float accepted), a 581 KB one asked for 38.7 GiB.
    Every array must have exactly its dtype and the shape the counts give."""
    meta, arrays = _valid_parts()
    assert len(load_run(_save_raw(tmp_path / "ok.nmrun", meta, arrays)).to_pandas()) == 3 * 2
    big_meta = dict(meta, groups={k: [v[0]] * 20_000 for k, v in meta["groups"].items()})
    cases = {
        "broadcast column": (meta, dict(arrays, measured=np.zeros(1))),
        "float steps": (meta, dict(arrays, steps=arrays["steps"].astype(np.float64))),
        "int column": (meta, dict(arrays, flux=np.zeros((3, 2), np.int64))),
        "transposed column": (meta, dict(arrays, flux=np.zeros((2, 3)))),
        "2-d steps": (meta, dict(arrays, steps=np.zeros((3, 1), np.int64))),
        "short time": (meta, dict(arrays, time=np.zeros(2))),
        "many declared groups, tiny columns": (big_meta, {**arrays, **{c: np.zeros((3, 1)) for c in COLUMNS}}),
        "many rows, no column rows": (meta, {**arrays, "steps": np.zeros(50_000, np.int64), "time": np.zeros(50_000)}),
        "missing column": (meta, {k: v for k, v in arrays.items() if k != "paper"}),
    }
    for what, (m, a) in cases.items():
        path = _save_raw(tmp_path / "bad.nmrun", m, a)
        with pytest.raises(RunFormatError, match="malformed|lacks"):
            load_run(path)
        assert os.path.getsize(path) < 2**20, what


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: [],
        lambda m: dict(m, kind=None),
        lambda m: {k: v for k, v in m.items() if k != "groups"},
        lambda m: dict(m, groups=[1, 2]),
        lambda m: dict(m, groups=dict(m["groups"], symmetry=[1, 2])),
        lambda m: dict(m, groups=dict(m["groups"], symmetry=["rotation", "scale"])),
        lambda m: dict(m, groups=dict(m["groups"], index=[0.5, 1])),
        lambda m: dict(m, groups=dict(m["groups"], size=[True, 1])),
        lambda m: dict(m, groups=dict(m["groups"], size=[-1, 1])),
        lambda m: dict(m, groups=dict(m["groups"], label=["only one"])),
        lambda m: dict(m, optimizer=3),
        lambda m: dict(m, paper_notes={"a": 1}),
        lambda m: dict(m, paper_notes=[["scale", "conv"]]),
        lambda m: dict(m, paper_notes=[["scale", "conv", 5]]),
        lambda m: dict(m, exact_note=["x"]),
        lambda m: dict(m, regimes=["underdamped"]),
        lambda m: dict(m, regimes={"scale": "underdamped"}),
        lambda m: dict(m, skipped={"w": 1}),
        lambda m: dict(m, notes="one note"),
        lambda m: dict(m, notes=[None]),
    ],
)
def test_malformed_metadata_is_a_run_format_error(tmp_path, edit):
    """Finding: malformed metadata raised AttributeError, KeyError or ValueError from deep inside
    load_run. The metadata is checked against a schema: every malformed case is RunFormatError."""
    meta, arrays = _valid_parts()
    path = _save_raw(tmp_path / "m.nmrun", edit(meta), arrays)
    with pytest.raises(RunFormatError):
        load_run(path)


def test_only_regular_files_are_read(tmp_path):
    """Finding: load_run read the whole file before checking the magic: /dev/zero grew until
    allocation failed, a FIFO hung. Only regular files are read, header first."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            load_run(fifo)
        except Exception as exc:  # recorded for the assertion below
            outcome.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "load_run hung on a FIFO"
    assert isinstance(outcome[0], RunIOError) and "FIFO" in str(outcome[0])
    if os.path.exists("/dev/zero"):
        with pytest.raises(RunIOError, match="a device"):
            load_run("/dev/zero")
    with pytest.raises(RunIOError, match="a folder"):
        load_run(tmp_path)
    big = tmp_path / "big-foreign"
    with open(big, "wb") as f:
        f.truncate(2**40)  # a sparse 1 TiB file: refused after its first 24 bytes
    with pytest.raises(RunFormatError, match="magic"):
        load_run(big)


def test_save_refuses_anything_but_a_regular_file(tmp_path):
    """Finding: run.save() renamed over whatever the path was (as root, save("/dev/null")
    replaced the device with a regular file; a symlink was replaced by a file). A symbolic
    link, a folder, a FIFO, a device are refused and left as they were."""
    run = synthetic_run(steps=3)
    target = run.save(tmp_path / "target.nmrun")
    before = target.read_bytes()
    link = tmp_path / "link.nmrun"
    link.symlink_to(target)
    with pytest.raises(RunIOError, match="symbolic link"):
        run.save(link)
    assert link.is_symlink() and target.read_bytes() == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RunIOError, match="FIFO"):
        run.save(fifo)
    assert stat_is_fifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(RunIOError, match="folder"):
        run.save(folder)
    assert folder.is_dir() and sorted(os.listdir(tmp_path)) == ["fifo", "folder", "link.nmrun", "target.nmrun"]
    with pytest.raises(InvalidArgumentError):
        run.save(42)
    with pytest.raises(InvalidArgumentError):
        load_run(None)


def stat_is_fifo(path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_the_checksum_is_documented_as_corruption_detection_not_forgery():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "tracking.md").read_text()
    assert "not forgery" in docs and "not forgery" in load_run.__doc__


def test_a_large_memory_limit_is_a_ceiling_not_an_allocation():
    """A memory limit of 2**50 bytes used to preallocate that many bytes of rows up front (a
    MemoryError, or terabytes of address space); rows now grow by doubling up to the limit."""
    info = synthetic_run().groups
    run = Run(groups=info, max_rows_in_memory=Run.rows_for_memory(len(info), 2**50))
    assert run._mem.block.nbytes < 2**20
    for n in range(300):
        run.append(n, 0.0, {c: np.full(len(info), float(n)) for c in COLUMNS})
    assert run.array("measured")[:, 0].tolist() == list(range(300)) and not run.chunks
    # Growth stops at the limit, where the run spills.
    small = Run(groups=info, max_rows_in_memory=100, spill_dir=None)
    for n in range(250):
        small.append(n, 0.0, {c: np.full(len(info), float(n)) for c in COLUMNS})
    assert len(small._mem.steps) <= 100 and len(small.chunks) == 2
    assert small.array("measured")[:, 0].tolist() == list(range(250))
