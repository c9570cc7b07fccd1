"""Saved runs: round trip, atomic replacement, clear errors, reload without torch, bounded memory."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from neural_mechanics.errors import NeuralMechanicsError, RunFormatError, RunIOError
from neural_mechanics.run import STEP_COLUMNS, GroupInfo, Run, load_run


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
        on_disk = sum(os.path.getsize(c) for c in run.chunks)
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
    assert on_disk > 0.9 * 100_000 * 210 * 13 * 8  # every recorded row was kept, on disk
    assert chunks > 50 and in_memory > 0
