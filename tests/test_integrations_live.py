"""tracker.live() / nm.live(tracker): inactive and free outside a notebook; with a display (the
notebook's, or a callable given for tests and benchmarks) it samples every ``every`` rows and
redraws within its time budget. notebooks/live.ipynb runs it in a real kernel
(tests/test_notebooks.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError
from neural_mechanics.integrations.live import LiveView, in_notebook

from helpers import bn_mlp, digits, sgd, train_steps

pytest.importorskip("matplotlib")


def test_outside_a_notebook_live_is_a_no_op():
    assert not in_notebook()
    x, y = digits(flatten=True)
    model = bn_mlp((8,))
    opt = sgd()(model)
    with nm.track(model, opt) as tracker:
        view = tracker.live(every=5)
        same = nm.live(tracker)
        train_steps(model, opt, x, y, 6)
        assert tracker._observers is None and tracker._path.on_row is None  # nothing attached
    assert isinstance(view, LiveView) and not view.active and not same.active
    assert view.frames == 0 and view.samples == 0 and "inactive" in repr(view)


def test_with_a_display_it_samples_and_draws_frames():
    x, y = digits(flatten=True)
    model = bn_mlp((16,))
    opt = sgd()(model)
    frames: list[bytes] = []
    with nm.track(model, opt) as tracker:
        view = tracker.live(every=6, display=frames.append, total=20, min_interval=0.0, budget=1.0)
        train_steps(model, opt, x, y, 20)
    assert view.active
    assert view.samples == 20 // 6 + 1 + 1  # rows 0, 6, 12, 18, then the last row at close
    assert view.frames == len(frames) >= 2 and all(f.startswith(b"\x89PNG") for f in frames)
    # panels: one per symmetry (the paper's layer), the errors, the effective learning rates
    assert len(view.figure.axes) == 3 + 2
    assert view.figure.axes[-1].get_yscale() == "log"
    assert view._bar is not None and view._bar.n == 20


def test_the_redraw_budget_and_thinning_bound_the_cost():
    x, y = digits(flatten=True)
    model = bn_mlp((8,))
    opt = sgd()(model)
    frames: list[bytes] = []
    with nm.track(model, opt) as tracker:
        view = nm.live(tracker, every=1, display=frames.append, budget=1e-6, min_interval=60.0, max_points=10, progress=False)
        train_steps(model, opt, x, y, 25)
    assert view.frames == 2  # the first sample, then none within the budget, then the final one at close
    assert len(view._steps) <= 10 and view._stride > 1  # every other sample dropped past max_points
    assert np.all(np.diff(view._steps) > 0)


def test_bad_arguments():
    x, y = digits(flatten=True)
    model = bn_mlp((8,))
    opt = sgd()(model)
    with nm.track(model, opt) as tracker:
        with pytest.raises(InvalidArgumentError):
            tracker.live(every=0, display=print)
        with pytest.raises(InvalidArgumentError):
            tracker.live(budget=0.0, display=print)
        train_steps(model, opt, x, y, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            view = tracker.live(layers=["nope"], display=print)  # groups known: checked at once, never raised into training
        assert any("no tracked group in these layers" in str(w.message) for w in caught)
        train_steps(model, opt, x, y, 2)
    assert view.frames == 0 and any("live view" in n for n in tracker.run.notes)
