"""The tracker's per-step fast paths give what the general paths give, and refuse what they cannot read.

- reducers.KernelPlan (Rust reducer, tensors by address, specs compiled once) against the item
  path (a view per reduction, a spec per item, every step);
- _native.TrackerLanes (the lanes' theory streams in one native object) against theory's
  streams, and its errors;
- Run.append_row (one copy per row) against Run.append (a dict of columns).
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import digits, train_steps

import neural_mechanics as nm
from neural_mechanics import _native, theory
from neural_mechanics.errors import (
    DeviceError,
    DTypeError,
    InvalidArgumentError,
    ShapeError,
)
from neural_mechanics.run import COLUMNS, GroupInfo, Run

X, Y = digits()


def convnet(channels_last: bool = False) -> nn.Module:
    """Convolutions (one grouped: row-range reductions), BatchNorm and linear layers."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train(model, opt, tracker, steps=6):
    train_steps(model, opt, X, Y, steps)
    return tracker.run


def tracked_run(*, item_path: bool, channels_last: bool = False, **opt_kw):
    model = convnet(channels_last)
    opt = torch.optim.SGD(model.parameters(), **({"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4} | opt_kw))
    tracker = nm.track(model, opt, nm.find_symmetries(model, X[:4]))
    assert tracker._kernel_plan is not None  # CPU parameters: the Rust reducer's fast path
    if item_path:
        tracker._kernel_plan = None  # the general path: items with views, specs built per step
    with tracker:
        return train(model, opt, tracker), tracker


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compiled_specs_give_the_item_path_bit_for_bit(channels_last, momentum):
    fast, tracker = tracked_run(item_path=False, channels_last=channels_last, momentum=momentum)
    slow, _ = tracked_run(item_path=True, channels_last=channels_last, momentum=momentum)
    assert any(r.rows is not None for r in tracker._plan.reductions)  # row ranges are covered
    for c in COLUMNS:
        np.testing.assert_array_equal(fast.array(c), slow.array(c))


def one_step_tracker():
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = nm.track(model, opt, nm.find_symmetries(model, X[:4]))
    train(model, opt, tracker, steps=1)
    return model, opt, tracker


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda p, st: st.__setitem__("momentum_buffer", st["momentum_buffer"].double()), DTypeError),
        (lambda p, st: st.__setitem__("momentum_buffer", st["momentum_buffer"].to("meta")), DeviceError),
        (lambda p, st: st.__setitem__("momentum_buffer", st["momentum_buffer"].reshape(-1)[:-1].clone()), ShapeError),
        (lambda p, st: setattr(p, "data", p.data.reshape(-1)[:-1].clone()), ShapeError),
    ],
    ids=["buffer-dtype", "buffer-device", "buffer-shape", "parameter-replaced"],
)
def test_a_tensor_the_plan_cannot_read_is_a_clear_error(spoil, error):
    model, opt, tracker = one_step_tracker()
    p = model[3].weight
    spoil(p, opt.state[p])
    with pytest.raises(error):
        tracker._pre_step(opt, (), {})


def test_a_non_contiguous_gradient_is_read_through_a_copy():
    model, opt, tracker = one_step_tracker()
    p = model[7].weight
    p.grad = p.grad.t().contiguous().t()  # same values, transposed strides
    assert not p.grad.is_contiguous()
    want = tracker._reducer.submit_blocks(*_items(tracker)).result()
    got = tracker._reducer.submit_tensors(tracker._kernel_plan, _tensors(tracker, opt), True).result()
    # Not bitwise: the fast path copies the gradient once for both of the weight's reductions,
    # so the kernel reads it once for rows and columns (a different summation order).
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[1], want[1])


def _tensors(tracker, opt):
    return [[p, p.grad, opt.state[p]["momentum_buffer"]] for p in (tracker._plan.params[n] for n in tracker._kernel_plan.names)]


def _items(tracker):
    plan, state = tracker._plan, tracker.optimizer.state
    items, extra = [], []
    for r, translation in zip(plan.reductions, plan.translation_reductions):
        p = plan.params[r.name]
        buf = state[p]["momentum_buffer"]
        items.append((r.view(p), r.view(p.grad), r.view(buf), r.axis, r.block))
        if translation:
            extra.append((r.view(buf), None, None, r.axis, r.block))
    return items, extra


# -- the lanes' streams ------------------------------------------------------------------------
def test_lanes_follow_the_theory_streams():
    rng = np.random.default_rng(0)
    column_group = np.array([0, 1, 1, 2], dtype=np.int64)  # group 1 has two columns (no paper)
    lanes = _native.TrackerLanes(column_group, 3)
    y0 = rng.normal(size=4)
    lanes.add_lane("scale", np.array([0, 1], dtype=np.int64), np.array([0], dtype=np.int64), "ledger", y0, None, True, None)
    lanes.add_lane("scale", np.array([2, 3], dtype=np.int64), np.array([3], dtype=np.int64), "ledger", y0, None, True, None)
    ledgers = [theory.LedgerStream("scale", y0[[0, 1]]), theory.LedgerStream("scale", y0[[2, 3]])]
    papers = [theory.PaperStream("scale", y0[[0]]), theory.PaperStream("scale", y0[[3]])]
    hyper = [(0.1, 0.9, 0.0, 1e-3, False), (0.05, 0.9, 0.0, 0.0, False)]
    for _ in range(5):
        cols = np.abs(rng.normal(size=(4, 8)))
        lanes.advance_ledger(cols, hyper)
        assert lanes.advance_paper(np.ascontiguousarray(cols[:, 5]), hyper) == []
        for i, c in enumerate(([0, 1], [2, 3])):
            lr, m, d, w, n = hyper[i]
            ledgers[i].step(flux=cols[c, 1], update_sq=cols[c, 3], lr=lr, momentum=m, dampening=d, weight_decay=w, nesterov=n)
            papers[i].step(cols[[c[0] if i == 0 else c[1]], 5], lr=lr, momentum=m, dampening=d, weight_decay=w)
    paper, exact = lanes.predictions()
    np.testing.assert_array_equal(exact, [ledgers[0].y[0], ledgers[0].y[1] + ledgers[1].y[0], ledgers[1].y[1]])
    np.testing.assert_array_equal(paper, [papers[0].y[0], np.nan, papers[1].y[0]])


def test_a_failed_paper_lane_stops_alone_and_says_why():
    lanes = _native.TrackerLanes(np.array([0, 1], dtype=np.int64), 2)
    for c in (0, 1):
        lanes.add_lane("scale", np.array([c], dtype=np.int64), np.array([c], dtype=np.int64), "none", np.ones(2), None, True, None)
    drive = np.ones(2)
    assert lanes.advance_paper(drive, [(0.1, 0.9, 0.0, 0.0, False)] * 2) == []
    failed = lanes.advance_paper(drive, [(0.1, 0.9, 0.0, 0.0, False), (0.1, 0.0, 0.0, 0.0, False)])
    assert [lane for lane, _ in failed] == [1] and "momentum must stay" in failed[0][1]
    paper, exact = lanes.predictions()
    assert np.isfinite(paper[0]) and np.isnan(paper[1]) and np.isnan(exact).all()
    assert lanes.advance_paper(drive, [(0.1, 0.9, 0.0, 0.0, False)] * 2) == []  # lane 1 stays stopped


def test_tracker_notes_a_paper_lane_that_stopped():
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with nm.track(model, opt, nm.find_symmetries(model, X[:4])) as tracker:
        train(model, opt, tracker, steps=3)
        opt.param_groups[0]["momentum"] = 0.0  # the closed forms of §5.1 and §5.2 do not chain
        run = train(model, opt, tracker, steps=3)
    assert any(n.startswith("paper closed form stopped at step 3 for") for n in run.notes)
    paper, exact = run.array("paper"), run.array("exact")
    assert np.isnan(paper[4:-1]).all() and np.isfinite(exact).all()


def test_lanes_refuse_bad_input():
    with pytest.raises(ShapeError):
        _native.TrackerLanes(np.array([0, 5], dtype=np.int64), 2)
    lanes = _native.TrackerLanes(np.array([0, 1], dtype=np.int64), 2)
    one = np.array([0], dtype=np.int64)
    with pytest.raises(ShapeError):
        lanes.add_lane("scale", np.array([2], dtype=np.int64), one, "ledger", np.ones(2))
    with pytest.raises(InvalidArgumentError):
        lanes.add_lane("spin", one, one, "ledger", np.ones(2))
    with pytest.raises(InvalidArgumentError):
        lanes.add_lane("scale", one, one, "guess", np.ones(2))
    with pytest.raises(ShapeError):
        lanes.add_lane("scale", one, one, "ledger", np.ones(1)[:0])  # y0 shorter than the columns
    lanes.add_lane("scale", np.array([0, 1], dtype=np.int64), one, "ledger", np.ones(2), None, True, None)
    with pytest.raises(ShapeError):
        lanes.advance_ledger(np.ones((3, 8)), [(0.1, 0.0, 0.0, 0.0, False)])
    with pytest.raises(ShapeError):
        lanes.advance_ledger(np.ones((2, 8)), [])
    with pytest.raises(ShapeError):
        lanes.advance_paper(np.ones(3), [(0.1, 0.0, 0.0, 0.0, False)])
    with pytest.raises(ShapeError):
        lanes.advance_measured(np.ones(3))
    with pytest.raises(InvalidArgumentError):  # a bad hyperparameter: the core's own check
        lanes.advance_ledger(np.ones((2, 8)), [(-0.1, 0.0, 0.0, 0.0, False)])


# -- rows --------------------------------------------------------------------------------------
def test_append_row_stores_what_append_stores():
    info = GroupInfo.from_groups([], np.zeros(0))
    info = GroupInfo(*(np.resize(a, 3) for a in (info.symmetry, info.layer, info.index, info.label, info.size)))
    a, b = Run(groups=info), Run(groups=info)
    rng = np.random.default_rng(1)
    for step in range(100):  # past the first capacity: the block grows
        row = rng.normal(size=(len(COLUMNS), 3))
        values = {c: row[j] for j, c in enumerate(COLUMNS)}
        values["lr"] = float(row[0, 0])  # a scalar broadcasts
        row[0] = row[0, 0]
        a.append(step, 0.1 * step, values)
        b.append_row(step, 0.1 * step, row)
    for c in COLUMNS:
        np.testing.assert_array_equal(a.array(c), b.array(c))
    np.testing.assert_array_equal(a.time_index, b.time_index)


# -- measure_sgd with the buffer sums of some rows only ----------------------------------------
def test_buffer_rows_give_the_dense_buffer_sums():
    n = 6
    idx = np.arange(n, dtype=np.int64)
    flag = (idx % 2).astype(np.int64)  # odd parts are translation parts
    core = _native.TrackerPlan(np.arange(n + 1, dtype=np.int64), idx, np.ones(n), flag, idx, idx, np.ones(n), idx, flag, np.ones(n))
    rng = np.random.default_rng(2)
    rows, hyper = np.abs(rng.normal(size=(n, 8))), [np.full(n, 0.9), np.zeros(n), np.full(n, 1e-3), np.zeros(n)]
    at = np.array([1, 3, 5], dtype=np.int64)
    sums = rng.normal(size=3)
    dense = np.zeros(n)
    dense[at] = sums
    want = core.measure_sgd(rows, dense, *hyper)
    got = core.measure_sgd(rows, sums, *hyper, at)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    with pytest.raises(ShapeError):
        core.measure_sgd(rows, sums[:2], *hyper, at)
    with pytest.raises(ShapeError):
        core.measure_sgd(rows, sums, *hyper, np.array([1, 3, 6], dtype=np.int64))
    with pytest.raises(InvalidArgumentError):
        core.measure_sgd(rows, None, *hyper, at)
