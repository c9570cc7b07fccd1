"""Bad input to the theory engine raises a clear exception of neural_mechanics.errors, never a
panic or a silent NaN."""

from __future__ import annotations

import numpy as np
import pytest

from neural_mechanics import theory
from neural_mechanics.errors import DTypeError, InvalidArgumentError, NonFiniteError, ShapeError

Y0 = np.ones(3)
DRIVE = np.full((4, 3), 0.1)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(lr=-0.1), InvalidArgumentError, "lr"),
        (dict(lr=0.1, momentum=1.0), InvalidArgumentError, "momentum"),
        (dict(lr=0.1, momentum=-0.1), InvalidArgumentError, "momentum"),
        (dict(lr=0.1, momentum=0.9, dampening=1.5), InvalidArgumentError, "dampening"),
        (dict(lr=0.1, weight_decay=-1e-4), InvalidArgumentError, "weight_decay"),
        (dict(lr=np.array([0.1, 0.1, np.nan, 0.1])), NonFiniteError, "lr"),
        (dict(lr=np.array([0.1, 0.1, -1.0, 0.1])), InvalidArgumentError, "step 2"),
        (dict(lr=np.full(5, 0.1)), ShapeError, "steps"),
        (dict(lr=0.1, momentum=np.array([0.9, 0.9, 0.0, 0.9])), InvalidArgumentError, "all zero or all positive"),
        (dict(lr=0.1, momentum=0.9, dampening=1.0), InvalidArgumentError, "dampening = 1"),
        (dict(lr=0.1, ydot0=np.ones(3)), InvalidArgumentError, "ydot0"),
        (dict(lr=0.1, momentum=0.9, ydot0=np.ones(2)), ShapeError, "ydot0"),
    ],
)
def test_paper_bad_hyperparameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        theory.paper("scale", Y0, DRIVE, **kw)


def test_paper_bad_arrays():
    with pytest.raises(InvalidArgumentError, match="kind"):
        theory.paper("rotation", Y0, DRIVE, lr=0.1)
    with pytest.raises(ShapeError):
        theory.paper("scale", Y0, DRIVE[:, :2], lr=0.1)
    with pytest.raises(ShapeError):
        theory.paper("scale", Y0, DRIVE.T, lr=0.1)
    with pytest.raises(ShapeError):
        theory.paper("scale", np.ones((3, 1)), DRIVE, lr=0.1)
    bad = DRIVE.copy()
    bad[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="step 2, group 1"):
        theory.paper("scale", Y0, bad, lr=0.1, momentum=0.9)
    with pytest.raises(NonFiniteError):
        theory.paper("scale", [1.0, np.inf, 0.0], DRIVE, lr=0.1)
    with pytest.raises(InvalidArgumentError, match="drive"):
        theory.paper("scale", Y0, None, lr=0.1)
    with pytest.raises(InvalidArgumentError, match="steps"):
        theory.paper("translation", Y0, None, lr=0.1)
    with pytest.raises(DTypeError):
        theory.paper("scale", Y0, [["a"] * 3] * 4, lr=0.1)


def test_streams_reject_and_keep_state():
    s = theory.PaperStream("scale", Y0)
    s.step(DRIVE[0], lr=0.1, momentum=0.9, weight_decay=1e-3)
    y = s.y
    with pytest.raises(NonFiniteError):
        s.step(np.array([0.1, np.nan, 0.1]), lr=0.1, momentum=0.9)
    with pytest.raises(ShapeError):
        s.step(np.ones(4), lr=0.1, momentum=0.9)
    with pytest.raises(InvalidArgumentError, match="stay"):
        s.step(DRIVE[0], lr=0.1, momentum=0.0)
    with pytest.raises(InvalidArgumentError):
        s.step(DRIVE[0], lr=-1.0, momentum=0.9)
    with pytest.raises(InvalidArgumentError):
        s.step(None, lr=0.1, momentum=0.9)
    assert np.array_equal(s.y, y) and s.steps == 1

    led = theory.LedgerStream("scale", Y0)
    with pytest.raises(InvalidArgumentError, match="update_sq"):
        led.step(flux=np.zeros(3), lr=0.1, momentum=0.9)
    with pytest.raises(InvalidArgumentError, match="nesterov"):
        led.step(flux=np.zeros(3), update_sq=np.ones(3), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(InvalidArgumentError, match="update_dot"):
        led.step(flux=np.zeros(3), update_sq=np.ones(3), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(NonFiniteError):
        led.step(flux=np.array([0.0, np.inf, 0.0]), update_sq=np.ones(3), lr=0.1, momentum=0.9)
    with pytest.raises(ShapeError):
        led.step(flux=np.zeros(2), update_sq=np.ones(3), lr=0.1)
    assert led.steps == 0 and np.array_equal(led.y, Y0)


def test_ledger_and_equilibrium_errors():
    with pytest.raises(ShapeError):
        theory.ledger("scale", Y0, flux=np.zeros((4, 3)), update_sq=np.zeros((5, 3)), lr=0.1)
    with pytest.raises(ShapeError):
        theory.ledger("scale", Y0, flux=np.zeros((4, 3)), update_sq=np.zeros((4, 3)), lr=np.full(3, 0.1))
    with pytest.raises(InvalidArgumentError):
        theory.ledger("scale", Y0, flux=np.zeros((4, 3)), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="nesterov"):
        theory.ledger("scale", Y0, flux=np.zeros((4, 3)), update_sq=np.zeros((4, 3)), lr=0.1, nesterov=np.array([True]))
    with pytest.raises(InvalidArgumentError):
        theory.ledger_measured("scale", Y0, lr=0.1, update_sq=np.zeros((4, 3)))
    with pytest.raises(InvalidArgumentError):
        theory.equilibrium_sgd(lr=0.1, weight_decay=1e-3, grad_sq_unit=1.0, momentum=1.0)
    with pytest.raises(NonFiniteError):
        theory.equilibrium_adamw(lr=0.1, weight_decay=np.nan, update_sq=1.0)
    with pytest.raises(ShapeError):
        theory.equilibrium_sgd(lr=[0.1, 0.2], weight_decay=[1e-3, 1e-3, 1e-3], grad_sq_unit=1.0)
    with pytest.raises(InvalidArgumentError):
        theory.regime(lr=0.1, momentum=1.2, weight_decay=1e-3)


def test_edge_shapes():
    assert theory.paper("scale", Y0, np.zeros((0, 3)), lr=0.1).shape == (1, 3)
    assert theory.paper("scale", np.zeros(0), np.zeros((4, 0)), lr=0.1).shape == (5, 0)
    out = theory.ledger("translation", np.zeros(0), flux=np.zeros((4, 0)), lr=0.1)
    assert out.shape == (5, 0)
    # lr = 0 steps are allowed and move nothing.
    y = theory.paper("scale", Y0, DRIVE, lr=0.0, momentum=0.9, weight_decay=0.1)
    assert np.array_equal(y, np.ones((5, 3)))


def test_many_groups_parallel_path_matches_serial():
    import neural_mechanics as nm

    rng = np.random.default_rng(0)
    g = 40_000
    y0 = rng.uniform(0.5, 2, g)
    drive = rng.uniform(0, 0.01, (3, g))
    try:
        nm.set_num_threads(2)
        par = theory.paper("scale", y0, drive, lr=0.1, momentum=0.9, weight_decay=1e-3)
        nm.set_num_threads(1)
        ser = theory.paper("scale", y0, drive, lr=0.1, momentum=0.9, weight_decay=1e-3)
    finally:
        nm.set_num_threads(0)  # back to the default
    assert np.array_equal(par, ser)


def test_native_arrays_must_be_contiguous_float64_and_the_argument_is_named():
    # neural_mechanics.theory always passes contiguous float64; the private functions check it.
    from neural_mechanics import _native

    one, zero = np.ones(1), np.zeros(1)
    with pytest.raises(ShapeError, match="not C-contiguous") as info:
        _native.theory_paper("scale", Y0, DRIVE, np.full(8, 0.1)[::2], zero, zero, zero, 4)
    assert "while processing 'lr'" in getattr(info.value, "__notes__", [])
    with pytest.raises(TypeError) as info:
        _native.theory_ledger_measured("scale", Y0, one.astype(np.float32), 4, None, None, None)
    assert "while processing 'lr'" in getattr(info.value, "__notes__", [])
    with pytest.raises(ShapeError, match="drive has shape"):
        _native.theory_paper("scale", Y0, DRIVE[:, :2].copy(), one, zero, zero, zero, 4)


# --- findings of the adversarial campaign ---------------------------------------------------------


@pytest.mark.parametrize("steps", [-1, 2.7, 3.0, True, "3", np.float64(3), 2**63])
def test_steps_must_be_a_non_negative_integer(steps):
    """Finding: steps=-1 gave OverflowError and steps=2.7 was silently truncated."""
    with pytest.raises(InvalidArgumentError, match="steps"):
        theory.paper("translation", np.zeros(1), None, lr=0.1, steps=steps)
    with pytest.raises(InvalidArgumentError, match="steps"):
        theory.times(lr=0.1, steps=steps)


def test_steps_of_any_integer_type():
    a = theory.paper("translation", np.ones(2), None, lr=0.1, weight_decay=1e-2, steps=np.int64(4))
    b = theory.paper("translation", np.ones(2), None, lr=0.1, weight_decay=1e-2, steps=4)
    assert a.shape == (5, 2) and np.array_equal(a, b)


@pytest.mark.parametrize("steps", [2**30, 2**32, 2**62])
def test_a_run_length_no_array_backs_is_bounded_before_allocating(steps):
    """Finding: paper("translation", ..., steps=2**32) ran for minutes ignoring Ctrl-C, and with
    steps=2**30 aborted on allocation. Now refused at once, naming the size."""
    import time

    start = time.perf_counter()
    cap = rf"at most {theory.MAX_UNBACKED_VALUES}" if steps < 2**60 else "too large for an array"
    with pytest.raises(InvalidArgumentError, match=rf"{steps + 1} values .*{cap}"):
        theory.paper("translation", np.zeros(1), None, lr=0.1, steps=steps)
    with pytest.raises(InvalidArgumentError, match=f"{steps + 1} values"):
        theory.times(lr=0.1, steps=steps)
    assert time.perf_counter() - start < 2.0
    if steps < 2**60:
        # A run with no groups holds no values: nothing to allocate or compute, however long.
        assert theory.paper("translation", np.zeros(0), None, lr=0.1, steps=steps).shape == (steps + 1, 0)
        assert theory.ledger("translation", np.zeros(0), flux=np.zeros((steps, 0)), lr=0.1).shape == (steps + 1, 0)
    else:
        # Beyond what a numpy array can describe, even with no values (numpy refuses the shape).
        with pytest.raises(InvalidArgumentError, match="too large for an array"):
            theory.paper("translation", np.zeros(0), None, lr=0.1, steps=steps)
    assert time.perf_counter() - start < 4.0


def test_ctrl_c_stops_a_long_batch_run():
    """Finding: a long batch run ignored Ctrl-C. A real SIGINT to a process inside a long
    theory.paper(...) raises KeyboardInterrupt there, long before the run would end."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    code = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from neural_mechanics import theory
        n = 2**22
        lr = np.linspace(0.01, 0.1, n)  # a new propagator at every step: a slow loop
        drive = np.full((n, 1), 0.1)
        theory.paper("scale", np.ones(1), drive[:1000], lr=lr[:1000], momentum=0.9, weight_decay=1e-3)
        print("started", flush=True)
        start = time.perf_counter()
        try:
            theory.paper("scale", np.ones(1), drive, lr=lr, momentum=0.9, weight_decay=1e-3)
            print("finished", time.perf_counter() - start, flush=True)
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - start, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.3)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        waited = time.perf_counter() - sent
    finally:
        proc.kill()
    assert out.startswith("interrupted"), (out, err)
    assert waited < 5.0, f"the interrupt took {waited:.1f} s to stop the loop"


@pytest.mark.parametrize(
    "kw,exc",
    [
        (dict(lr=-1.0, momentum=2.0), InvalidArgumentError),
        (dict(lr=0.1, momentum=2.0), InvalidArgumentError),
        (dict(lr=0.1, momentum=0.9, dampening=-0.5), InvalidArgumentError),
        (dict(lr=np.nan), NonFiniteError),
        (dict(lr=0.1, momentum=np.inf), NonFiniteError),
        (dict(lr=np.array([0.1, np.nan, 0.1])), NonFiniteError),
    ],
)
def test_times_checks_its_hyperparameters(kw, exc):
    """Finding: times(lr=-1.0, momentum=2.0) returned negative times; NaN was accepted."""
    with pytest.raises(exc):
        theory.times(steps=None if np.ndim(kw["lr"]) else 3, **kw)


def test_times_is_the_streams_clock_bit_for_bit():
    lr = np.array([0.1, 0.05, 0.3, 0.0, 0.2])
    t = theory.times(lr=lr, momentum=0.9, dampening=0.3)
    s = theory.PaperStream("scale", np.ones(1))
    clock = [s.time]
    for eta in lr:
        s.step(np.ones(1), lr=eta, momentum=0.9, dampening=0.3)
        clock.append(s.time)
    assert t.tolist() == clock
    assert theory.times(lr=0.1, steps=3).tolist() == [0.0, 0.1, 0.2, 0.30000000000000004]


@pytest.mark.parametrize("where", ["lr", "momentum", "dampening", "weight_decay"])
def test_nan_hyperparameters_are_refused_everywhere(where):
    """Finding: NaN hyperparameters were accepted (times); every entry point refuses them."""
    base = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3)
    bad = dict(base, **{where: np.nan})
    with pytest.raises(NonFiniteError, match=where):
        theory.paper("scale", Y0, DRIVE, **bad)
    with pytest.raises(NonFiniteError, match=where):
        theory.ledger("scale", Y0, flux=np.zeros((4, 3)), update_sq=np.zeros((4, 3)), **bad)
    with pytest.raises(NonFiniteError, match=where):
        theory.PaperStream("scale", Y0).step(DRIVE[0], **bad)
    with pytest.raises(NonFiniteError, match=where):
        theory.LedgerStream("scale", Y0).step(flux=np.zeros(3), update_sq=np.zeros(3), **bad)
    with pytest.raises(NonFiniteError, match=where):
        theory.regime(**bad)
    if where != "weight_decay":
        with pytest.raises(NonFiniteError, match=where):
            theory.times(steps=2, **{k: v for k, v in bad.items() if k != "weight_decay"})
    # Steps = 0 reads no value, but a NaN is still a bad call.
    with pytest.raises(NonFiniteError, match=where):
        theory.paper("scale", Y0, np.zeros((0, 3)), **bad)


def test_equilibrium_edges_follow_the_docs_never_nan():
    """Finding: equilibrium_*(lr=0) returned NaN where the docs say inf, and weight_decay=-0.0
    gave -inf. No step (lr = 0, or dampening = 1 with momentum) or no weight decay: no
    equilibrium (norm_sq inf, angle 0, effective lr 0, relaxation inf)."""
    none = {"norm_sq": np.inf, "angular_update": 0.0, "effective_lr": 0.0, "relaxation_steps": np.inf}
    for kw in (dict(lr=0.0, weight_decay=1e-3), dict(lr=0.1, weight_decay=0.0), dict(lr=0.0, weight_decay=0.0), dict(lr=0.1, weight_decay=-0.0), dict(lr=-0.0, weight_decay=1e-3)):
        assert theory.equilibrium_sgd(grad_sq_unit=1.0, **kw) == none, kw
        assert theory.equilibrium_adamw(update_sq=1.0, **kw) == none, kw
    assert theory.equilibrium_sgd(lr=0.1, weight_decay=1e-3, grad_sq_unit=1.0, momentum=0.9, dampening=1.0) == none
    zero_noise = theory.equilibrium_sgd(lr=0.1, weight_decay=1e-3, grad_sq_unit=0.0)
    assert zero_noise["norm_sq"] == 0.0 and zero_noise["effective_lr"] == np.inf
    grid = np.array([0.0, -0.0, 5e-324, 1e-300, 0.1, 1e300, np.finfo(float).max])
    lr, wd, g = np.meshgrid(grid, grid, grid, indexing="ij")
    for out in (
        theory.equilibrium_sgd(lr=lr, weight_decay=wd, grad_sq_unit=g, momentum=0.9),
        theory.equilibrium_adamw(lr=lr, weight_decay=wd, update_sq=g),
    ):
        for name, v in out.items():
            assert not np.isnan(v).any() and (v >= 0).all(), name


def test_paper_stream_with_a_tiny_learning_rate():
    """Finding: PaperStream with momentum and lr < 1e-160 raised and left its state NaN with the
    step count advanced. ω² is now computed without h², so such a step is (nearly) the identity."""
    s = theory.PaperStream("scale", np.array([1.0, 2.0]))
    s.step(np.array([0.1, 0.2]), lr=0.1, momentum=0.9, weight_decay=1e-3)
    y = s.y
    for lr in (1e-155, 1e-161, 1e-200, 1e-300):
        out = s.step(np.array([0.1, 0.2]), lr=lr, momentum=0.9, weight_decay=1e-3)
        assert np.isfinite(out).all() and np.isfinite(s.ydot).all()
        assert np.allclose(out, y, rtol=1e-12)
    assert s.steps == 5
    # Where ω² = 4λ/(lr(1+β)) itself overflows float64: a clear refusal, the state untouched.
    ydot = s.ydot
    with pytest.raises(InvalidArgumentError, match="too small"):
        s.step(np.array([0.1, 0.2]), lr=5e-324, momentum=0.9, weight_decay=1e-3)
    assert s.steps == 5 and np.array_equal(s.y, y) and np.array_equal(s.ydot, ydot)


def test_a_failed_stream_step_leaves_everything_unchanged():
    """A step whose result overflows float64 fails (NonFiniteError) and leaves y, ydot, steps and
    time as they were, as the docs say of every failed step; the stream goes on."""
    s = theory.PaperStream("scale", np.array([1.0, 1e300]))
    s.step(np.array([0.1, 0.2]), lr=0.1, momentum=0.9, weight_decay=1e-3)
    before = (s.y, s.ydot, s.steps, s.time)
    with pytest.raises(NonFiniteError, match="unchanged"):
        s.step(np.array([0.1, 1e308]), lr=0.1, momentum=0.9, weight_decay=1e-3)
    after = (s.y, s.ydot, s.steps, s.time)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    s.step(np.array([0.1, 0.2]), lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert s.steps == 2


@pytest.mark.parametrize("bad", [np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0]), "0.1", np.array([1 + 2j, 0, 0]), np.array([True, False, True])])
def test_inputs_that_would_be_misread_are_refused(bad):
    """Masked arrays (their mask would be dropped), strings, complex numbers, bools."""
    with pytest.raises(DTypeError):
        theory.paper("scale", bad, DRIVE, lr=0.1)
    with pytest.raises(DTypeError):
        theory.times(lr=bad, steps=None if np.ndim(bad) else 3)


def test_equilibrium_broadcasts_are_bounded():
    """(10**5, 1) against (1, 10**5) would broadcast to 10**10 values (80 GB per output) that no
    input holds: refused, naming the shape."""
    with pytest.raises(InvalidArgumentError, match=r"\(100000, 100000\)"):
        theory.equilibrium_sgd(lr=np.full((10**5, 1), 0.1), weight_decay=np.full((1, 10**5), 1e-3), grad_sq_unit=1.0)
    out = theory.equilibrium_sgd(lr=np.full((300, 1), 0.1), weight_decay=np.full((1, 300), 1e-3), grad_sq_unit=1.0)
    assert out["norm_sq"].shape == (300, 300)
