"""The private thread pool: its size, the environment variable, and forked DataLoader workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError, NeuralMechanicsError

ENV = "NEURAL_MECHANICS_NUM_THREADS"


def run_python(code: str, env_value: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the environment variable is read by the new process);
    the timeout turns a hang into a failure instead of a stuck CI job."""
    env = dict(os.environ)
    env.pop(ENV, None)
    if env_value is not None:
        env[ENV] = env_value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_set_and_get():
    try:
        nm.set_num_threads(3)
        assert nm.get_num_threads() == 3
        nm.set_num_threads(1)
        assert nm.get_num_threads() == 1
    finally:
        nm.set_num_threads(0)
    assert nm.get_num_threads() >= 1


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None, 10**6, 2**70])
def test_set_bad_values(bad):
    with pytest.raises(InvalidArgumentError, match="set_num_threads") as info:
        nm.set_num_threads(bad)
    assert isinstance(info.value, ValueError)


def test_environment_variable():
    out = run_python(
        """
        import numpy as np, neural_mechanics as nm
        print(nm.get_num_threads())
        nm.group_stats(np.ones((512, 512), np.float32))  # large enough to use the pool
        nm.set_num_threads(1); print(nm.get_num_threads())
        nm.set_num_threads(0); print(nm.get_num_threads())
        """,
        env_value="3",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "1", "3"]


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "99999"])
def test_invalid_environment_variable(value):
    out = run_python(
        """
        import numpy as np, neural_mechanics as nm
        from neural_mechanics.errors import InvalidArgumentError
        for call in (nm.get_num_threads, lambda: nm.group_stats(np.ones((512, 512), np.float32)),
                     lambda: nm.group_stats(np.ones(3, np.float32))):
            try:
                call()
            except InvalidArgumentError as e:
                print("ERR", e)
        nm.set_num_threads(2)  # an explicit setting overrides the bad variable
        print("OK", nm.get_num_threads(), nm.group_stats(np.ones((512, 512), np.float32))["sum_theta"][0])
        """,
        env_value=value,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout
    for line in lines[:3]:
        assert line.startswith("ERR") and ENV in line and repr(value).strip("'") in line and "1 to 4096" in line
    assert lines[3] == "OK 2 512.0"


FORK_SCRIPT = """
import numpy as np, torch, neural_mechanics as nm
from torch.utils.data import DataLoader, Dataset

nm.set_num_threads(2)  # use the pool even on a one-core machine
big = torch.ones(512, 512)  # 262,144 elements: above the single-thread threshold

def stats():
    return nm.group_stats(big, big)["dot_theta_grad"].sum()

class Data(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return torch.tensor(stats() + i)

before = stats()  # the parent's pool exists before the fork
loader = DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="fork")
got = sorted(float(x) for batch in loader for x in batch)
after = stats()
assert before == after == 512 * 512, (before, after)
assert got == [512 * 512 + i for i in range(8)], got
print("OK")
"""


def test_no_hang_after_fork_in_dataloader_workers():
    try:
        out = run_python(FORK_SCRIPT, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("group_stats hung in a forked DataLoader worker")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "OK"


def test_no_hang_after_plain_fork():
    code = """
    import os, numpy as np, neural_mechanics as nm
    nm.set_num_threads(2)
    x = np.ones((1024, 1024), np.float32)
    nm.group_stats(x)
    pid = os.fork()
    if pid == 0:
        ok = nm.group_stats(x)["sum_theta"].sum() == 1024 * 1024
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert nm.group_stats(x)["sum_theta"].sum() == 1024 * 1024
    print("OK")
    """
    try:
        out = run_python(code, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("group_stats hung in a forked child")
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr


def test_errors_are_library_errors():
    assert issubclass(InvalidArgumentError, NeuralMechanicsError)


def test_max_threads_comes_from_the_core():
    from neural_mechanics import _native, threads

    assert threads.MAX_THREADS is _native.MAX_THREADS
    nm.set_num_threads(_native.MAX_THREADS)  # the limit itself is accepted (no pool is started)
    try:
        assert nm.get_num_threads() == _native.MAX_THREADS
    finally:
        nm.set_num_threads(0)
    with pytest.raises(InvalidArgumentError, match=str(_native.MAX_THREADS)):
        nm.set_num_threads(_native.MAX_THREADS + 1)
