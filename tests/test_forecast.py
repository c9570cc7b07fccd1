"""The forecast of docs/theory.md §5.7 on toys where its assumptions hold, and its API.

The toys are numpy simulations of the optimizers on groups whose gradient obeys the symmetry
exactly: a scale group's gradient is orthogonal to θ with |ĝ|²|θ|² fixed (the noise at unit norm
is stationary), a translation group's sums to zero. Their rows are written into a Run as the
tracker would write them (``update_sq`` is the applied update over η, decoupled decay included),
so the forecast reads them through the same columns as a real run.
"""

from __future__ import annotations

import numpy as np
import pytest

from neural_mechanics import forecast as F
from neural_mechanics.errors import InvalidArgumentError, NonFiniteError, ShapeError, UnknownColumnError
from neural_mechanics.run import COLUMNS, GroupInfo, Run


def simulate(optimizer, steps, *, lr, wd, momentum=0.0, dampening=0.0, beta1=0.9, beta2=0.999, dim=64, groups=48,
             x0=1.0, noise=1.0, kind="scale", seed=0, record_every=1):
    """A Run of ``groups`` independent toy groups of ``dim`` entries. ``kind``: "scale" (ĝ ⊥ θ,
    |ĝ|²|θ|² ≈ noise), "translation" (⟨1, ĝ⟩ = 0, |ĝ|² ≈ noise) or "decay" (no gradient at all).
    ``lr``: a float or a callable of the step."""
    rng = np.random.default_rng(seed)
    rate = lr if callable(lr) else (lambda n: lr)
    theta = rng.standard_normal((groups, dim)) + (0.5 if kind == "translation" else 0.0)
    theta *= np.sqrt(x0) / np.linalg.norm(theta, axis=1, keepdims=True)
    buf, m, v = None, np.zeros_like(theta), np.zeros_like(theta)
    a_sq = []  # Adam's direction |a|², kept to check the forecast's recovery of it
    symmetry = "translation" if kind == "translation" else "scale"
    run = Run(groups=GroupInfo(symmetry=np.array([symmetry] * groups, dtype=object), layer=np.array(["toy"] * groups, dtype=object),
                               index=np.arange(groups), label=np.array([str(i) for i in range(groups)], dtype=object),
                               size=np.full(groups, dim)), optimizer=optimizer)
    for n in range(steps + 1):
        x, q = (theta**2).sum(1), theta.sum(1)
        row = {c: np.full(groups, np.nan) for c in COLUMNS}
        row.update(measured=q if kind == "translation" else x, magnitude=np.sqrt(dim * x) if kind == "translation" else x)
        if n < steps:
            xi = rng.standard_normal((groups, dim))
            if kind == "scale":
                xi -= (xi * theta).sum(1, keepdims=True) / x[:, None] * theta
                g = xi * np.sqrt(noise / dim / x)[:, None]
            elif kind == "translation":
                g = (xi - xi.mean(1, keepdims=True)) * np.sqrt(noise / dim)
            else:
                g = np.zeros_like(theta)
            e = rate(n)
            if optimizer == "SGD":
                w = g + wd * theta
                buf = w if momentum == 0 else (w.copy() if buf is None else momentum * buf + (1 - dampening) * w)
                new = theta - e * buf
            else:
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                a = (m / (1 - beta1 ** (n + 1))) / (np.sqrt(v / (1 - beta2 ** (n + 1))) + 1e-8)
                new = theta * (1 - e * wd) - e * a
                a_sq.append((a**2).sum(1))
            u = (theta - new) / e
            row.update(lr=e, momentum=momentum, dampening=dampening, weight_decay=wd, grad_sq=(g**2).sum(1),
                       update_sq=(u**2).sum(1), flux=(g.sum(1) if kind == "translation" else (theta * g).sum(1)), update_sum=u.sum(1))
            theta = new
        if n % record_every == 0 or n == steps:
            run.append(n, 0.0, row)
    run.toy_a_sq = np.array(a_sq)  # type: ignore[attr-defined]
    return run


def charge(frame, quantity="charge", column="forecast"):
    """(steps + 1, groups) of one column of a forecast frame."""
    f = frame[frame["quantity"] == quantity]
    return f.pivot(index="step", columns="group", values=column).to_numpy()


def mean_error(run, frame, at):
    """Largest relative error of the group-mean charge over the forecast's steps."""
    truth = run.array("measured")[at:].mean(1)
    return float(np.max(np.abs(charge(frame).mean(1) / truth - 1)))


# -- SGD: the scale charge relaxes as |θ|⁴ does, and holding |ĝ|² instead gets it wrong -------------
@pytest.mark.parametrize(
    "x0, momentum, dampening",
    [(30.0, 0.9, 0.0), (3.0, 0.9, 0.0), (3.0, 0.9, 0.3), (3.0, 0.0, 0.0)],
    ids=["from-above", "from-below", "dampening", "no-momentum"],
)
def test_sgd_scale_relaxation_matches_the_simulation(x0, momentum, dampening):
    # Equilibrium |θ*|² = √(η(1−d)E|g̃|²/(2λ(1−β))) ≈ 11 (β = 0.9), 4.5 (β = 0); relaxation 250 steps.
    lr = 0.05 if momentum else 0.25
    run = simulate("SGD", 900, lr=lr, wd=2e-3, momentum=momentum, dampening=dampening, x0=x0)
    frame = F.forecast(run, 800, at=100)
    assert mean_error(run, frame, 100) < 0.02  # measured 0.2–1.1%: the O(ηλ/(1−β)²) of §5.4
    x = run.array("measured")
    assert abs(x[-1].mean() / x[100].mean() - 1) > 0.3  # the charge really relaxes
    # The constant-drive model holds |u|² (not |u|²|θ|²) at its window value: wrong equilibrium.
    d = F.estimate_drive(run, 100)
    beta, h = momentum, lr * (1 - dampening if momentum else 1)
    kappa, gain = 2 * h * 2e-3 / (1 - beta), (1 + beta) / (1 - beta)
    const = np.empty(801)
    const[0] = x[100].mean()
    for k in range(800):
        const[k + 1] = const[k] * np.exp(-kappa) + lr**2 * gain * (d.value / x[100]).mean() * (1 - np.exp(-kappa)) / kappa
    assert np.max(np.abs(const / x[100:].mean(1) - 1)) > 0.15  # measured 25–45%


def test_sgd_forecast_follows_a_learning_rate_schedule():
    schedule = lambda n: 0.05 if n < 400 else 0.01
    run = simulate("SGD", 900, lr=schedule, wd=2e-3, momentum=0.9, x0=1.0)
    as_callable = F.forecast(run, 800, at=100, lr=schedule)
    as_array = F.forecast(run, 800, at=100, lr=[schedule(n) for n in range(100, 900)])
    np.testing.assert_array_equal(charge(as_callable), charge(as_array))
    assert mean_error(run, as_callable, 100) < 0.02
    held = F.forecast(run, 800, at=100)  # lr=None holds 0.05: a different, wrong, future
    assert mean_error(run, held, 100) > 0.05


def test_sgd_translation_is_exact():
    # ⟨1, ĝ⟩ = 0: the charge obeys the exact recursion of §5.3 with ⟨1, b⟩ as state.
    run = simulate("SGD", 400, lr=0.05, wd=5e-3, momentum=0.9, dampening=0.2, kind="translation", noise=4.0)
    frame = F.forecast(run, 300, at=100)
    truth = run.array("measured")[100:]
    scale = np.abs(run.array("magnitude")).max(0)
    assert np.max(np.abs(charge(frame) - truth) / scale) < 1e-12
    assert np.min(np.abs(truth[-1] / truth[0] - 1)) > 0.3  # it moved


# -- Adam-style optimizers: decoupled decay, the drive |a|² held ---------------------------------------
def test_adamw_separates_the_decoupled_decay_exactly():
    # The run records |u|² = |d|²/η² with d = η(λθ + a); Adam's |a|² comes back from two rows.
    run = simulate("AdamW", 60, lr=0.01, wd=0.05, beta2=0.9)
    x, u2 = run.array("measured"), run.array("update_sq")
    a2 = F._adam_direction_sq(run.step_index, x, u2, np.full_like(x, 0.05), np.full_like(x, 0.01))
    np.testing.assert_allclose(a2[:-1], run.toy_a_sq, rtol=1e-9)
    assert np.abs(u2[:-1] / run.toy_a_sq - 1).max() > 1e-4  # the decay was really there


def test_adamw_pure_decay_is_exact_for_every_kind():
    run = simulate("AdamW", 200, lr=0.02, wd=0.1, kind="decay")
    frame = F.forecast(run, 150, at=50)
    np.testing.assert_allclose(charge(frame), run.array("measured")[50:], rtol=1e-12)


@pytest.mark.parametrize(
    "beta1, beta2, x0",
    [(0.0, 0.0, 0.5), (0.0, 0.0, 4.0), (0.9, 0.5, 0.5), (0.9, 0.5, 4.0)],
    ids=["sign-below", "sign-above", "adam-below", "adam-above"],
)
def test_adamw_scale_relaxation_matches_the_simulation(beta1, beta2, x0):
    # Equilibrium ηE|a|²(1+β1)/(2λ(1−β1)) = η·dim/(2λ) = 6.4 under pure noise; relaxation 1/(2ηλ) = 1,000 steps.
    # β1 = β2 = 0 is sign descent with decoupled decay: |a|² = dim exactly, the model exact in mean.
    run = simulate("AdamW", 1000, lr=0.01, wd=0.05, beta1=beta1, beta2=beta2, x0=x0)
    frame = F.forecast(run, 900, at=100, beta1=beta1)
    x = run.array("measured")
    # Sign descent's radial noise makes each group a random walk: the mean of 48 is within ~3%
    # (measured 3.2%, 3.9%); Adam 0.6% (from above) and 2.3% (from below: v lags the falling |ĝ|²).
    assert mean_error(run, frame, 100) < (0.06 if beta1 == 0 else 0.035)
    assert abs(x[-1].mean() / x[100].mean() - 1) > 0.25
    band = charge(frame, column="low")[-1], charge(frame, column="high")[-1]
    assert np.mean((x[-1] >= band[0]) & (x[-1] <= band[1])) >= 0.6


# -- the API ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return simulate("SGD", 120, lr=0.05, wd=2e-3, momentum=0.9, x0=2.0, groups=6)


def test_the_frame(toy):
    frame = toy.forecast(30, at=100)
    assert list(frame.columns) == ["step", "symmetry", "layer", "group", "quantity", "forecast", "low", "high"]
    assert set(frame["quantity"]) == set(F.QUANTITIES)
    assert frame["step"].min() == 100 and frame["step"].max() == 130
    assert len(frame) == 31 * 6 * 4
    start = frame[frame["step"] == 100]
    x100 = toy.array("measured")[100]
    np.testing.assert_array_equal(start[start["quantity"] == "charge"]["forecast"], x100)
    assert (frame["low"] <= frame["forecast"]).all() and (frame["forecast"] <= frame["high"]).all()
    assert frame.attrs["at"] == 100 and frame.attrs["model"] == "sgd" and frame.attrs["window"] == 50
    # derived quantities follow from the charge
    np.testing.assert_allclose(charge(frame, "norm"), np.sqrt(charge(frame)))
    np.testing.assert_allclose(charge(frame, "effective_lr"), 0.05 / charge(frame))


def test_lr_forms_and_the_default_start(toy):
    a = charge(toy.forecast(20, at=100, lr=0.05))
    np.testing.assert_array_equal(a, charge(toy.forecast(20, at=100)))
    np.testing.assert_array_equal(a, charge(toy.forecast(20, at=100, lr=np.full(20, 0.05))))
    np.testing.assert_array_equal(a, charge(toy.forecast(20, at=100, lr=lambda n: 0.05)))
    last = toy.forecast(5)
    assert last.attrs["at"] == 120 and last["step"].max() == 125


def test_only_rows_up_to_at_are_read(toy):
    before = charge(toy.forecast(20, at=100), column="high")
    spoiled = simulate("SGD", 120, lr=0.05, wd=2e-3, momentum=0.9, x0=2.0, groups=6)
    for col in spoiled._mem.cols.values():
        col[101 : spoiled._mem.n] = 1e9
    np.testing.assert_array_equal(charge(spoiled.forecast(20, at=100), column="high"), before)


def test_thinned_rows_still_forecast():
    run = simulate("SGD", 900, lr=0.05, wd=2e-3, momentum=0.9, x0=30.0, record_every=5)
    frame = F.forecast(run, 800, at=100)
    truth = run.array("measured")[-1].mean()
    assert abs(charge(frame)[-1].mean() / truth - 1) < 0.02


def test_errors(toy):
    for bad in (0, -3, 1.5, True, "10"):
        with pytest.raises(InvalidArgumentError):
            toy.forecast(bad)
    with pytest.raises(InvalidArgumentError, match="not recorded"):
        toy.forecast(5, at=500)
    with pytest.raises(InvalidArgumentError):
        toy.forecast(5, at=10.5)
    with pytest.raises(InvalidArgumentError, match="before step 0"):
        toy.forecast(5, at=0)
    with pytest.raises(ShapeError):
        toy.forecast(5, at=100, lr=[0.1, 0.1])
    with pytest.raises(NonFiniteError):
        toy.forecast(3, at=100, lr=[0.1, np.nan, 0.1])
    with pytest.raises(InvalidArgumentError):
        toy.forecast(3, at=100, lr=[0.1, -0.1, 0.1])
    with pytest.raises(InvalidArgumentError):
        toy.forecast(3, at=100, window=0)
    with pytest.raises(InvalidArgumentError):
        toy.forecast(3, at=100, beta1=1.0)
    unnamed = simulate("", 60, lr=0.05, wd=2e-3, groups=2)
    with pytest.raises(InvalidArgumentError, match="optimizer"):
        F.forecast(unnamed, 5)

    class Lacking:
        groups, optimizer, step_index = toy.groups, "SGD", toy.step_index

        def array(self, column):
            if column == "update_sq":
                raise UnknownColumnError(column)
            return toy.array(column)

    with pytest.raises(UnknownColumnError, match="update_sq"):
        F.forecast(Lacking(), 5, at=100)


def test_plot_forecast(toy):
    from matplotlib.figure import Figure

    fig = toy.plot_forecast()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.collections) == 2 * 6  # one band per group per forecast
    fig = toy.plot_forecast(toy.forecast(20, at=100), quantity="angular_update", groups=3)
    assert len(fig.axes[0].collections) == 3
    with pytest.raises(InvalidArgumentError):
        toy.plot_forecast(quantity="nope")
    with pytest.raises(InvalidArgumentError):
        toy.plot_forecast(symmetry="rescale")
