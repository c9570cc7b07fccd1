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
