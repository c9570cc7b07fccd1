"""The tracker's per-step fast paths give what the general paths give, and refuse what they cannot read.

- reducers.KernelPlan (Rust reducer, tensors by address, specs compiled once) against the item
  path (a view per reduction, a spec per item, every step);
- _native.TrackerCore's lanes (the theory streams in one native object) against theory's
  streams, and its errors;
- Run.reserve_row / commit_row (a row written in place) against Run.append (a dict of columns).
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import neural_mechanics as nm
from neural_mechanics import _native, theory
from neural_mechanics.errors import (
    DeviceError,
    InvalidArgumentError,
    ShapeError,
)
from neural_mechanics.run import COLUMNS, GroupInfo, Run
from neural_mechanics.tracking.reducers import RustReducer

from helpers import digits, train_steps

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
    reducer = tracker._path.reducer
    assert isinstance(reducer, RustReducer) and reducer.compiled  # CPU parameters: the Rust reducer's fast path
    if item_path:
        reducer.compiled = False  # the general path: items with views, specs built per step
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


def one_step_tracker(on_error="note"):
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = nm.track(model, opt, nm.find_symmetries(model, X[:4]), on_error=on_error)
    train(model, opt, tracker, steps=1)
    return model, opt, tracker


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda p, st: st.__setitem__("momentum_buffer", st["momentum_buffer"].to("meta")), DeviceError),
        (lambda p, st: st.__setitem__("momentum_buffer", st["momentum_buffer"].reshape(-1)[:-1].clone()), ShapeError),
        (lambda p, st: setattr(p, "data", p.data.reshape(-1)[:-1].clone()), ShapeError),
    ],
    ids=["buffer-device", "buffer-shape", "parameter-replaced"],
)
def test_a_tensor_the_plan_cannot_read_is_a_clear_error(spoil, error):
    model, opt, tracker = one_step_tracker(on_error="raise")
    p = model[3].weight
    spoil(p, opt.state[p])
    with pytest.raises(error):
        tracker._pre_step(opt, (), {})
    # The default, on_error="note": the same failure is noted and the step is lost, not raised.
    model, opt, tracker = one_step_tracker()
    p = model[3].weight
    spoil(p, opt.state[p])
    tracker._pre_step(opt, (), {})
    tracker._post_step(opt, (), {})
    assert any(n.startswith(f"step 1: reading the step's tensors ({error.__name__}") for n in tracker.run.notes), tracker.run.notes


def test_a_buffer_in_another_dtype_is_read_in_the_wider_one():
    """A float64 momentum buffer next to float32 parameters (what model.to(bfloat16) mid-run
    also leaves behind): the sums are taken in the wider dtype, exactly."""
    model, opt, tracker = one_step_tracker(on_error="raise")
    p = model[3].weight
    opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].double()
    tracker._pre_step(opt, (), {})
    tracker._post_step(opt, (), {})
    assert tracker.run.step_index.tolist() == [0, 1]
    assert np.isfinite(tracker.run.array("measured")).all()


def test_a_non_contiguous_gradient_is_read_through_a_copy():
    model, opt, tracker = one_step_tracker()
    p = model[7].weight
    p.grad = p.grad.t().contiguous().t()  # same values, transposed strides
    assert not p.grad.is_contiguous()
    reducer = tracker._path.reducer
    want = reducer.submit_blocks(*_items(tracker)).result()
    got = reducer.reduce_plan(tracker._path.reads, _tensors(tracker, opt), True).result()
    # Not bitwise: the fast path copies the gradient once for both of the weight's reductions,
    # so the kernel reads it once for rows and columns (a different summation order).
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[1], want[1])


def _tensors(tracker, opt):
    return [[p, p.grad, opt.state[p]["momentum_buffer"]] for p in (tracker._plan.params[n] for n in tracker._plan.names)]


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
def native_core(column_group, column_param_group, *, every=1, kinds=None):
    """A TrackerCore whose parts are its columns, one row each."""
    n = len(column_group)
    idx = np.arange(n, dtype=np.int64)
    groups = int(max(column_group)) + 1
    plan = {
        "part_row_starts": np.arange(n + 1, dtype=np.int64), "part_rows": idx, "part_sign": np.ones(n), "part_column": idx,
        "part_size": np.ones(n), "column_group": np.asarray(column_group, dtype=np.int64),
        "column_param_group": np.asarray(column_param_group, dtype=np.int64),
        "group_kind": np.asarray(kinds if kinds is not None else [1] * groups, dtype=np.int64), "group_size": np.ones(groups),
        "extra_rows": np.zeros(0, dtype=np.int64), "rows": n,
    }  # fmt: skip
    return _native.TrackerCore(plan, sgd=True, every=every)


def test_lanes_follow_the_theory_streams():
    rng = np.random.default_rng(0)
    # group 1 has two columns in two param_groups (no closed form); a lane per param_group
    core = native_core([0, 1, 1, 2], [0, 0, 1, 1])
    field = {name: j for j, name in enumerate(_native.COLUMN_FIELDS)}
    hyper = [(0.1, 0.9, 0.0, 1e-3, False), (0.05, 0.9, 0.0, 0.0, False)]
    ledgers = papers = None
    for n in range(5):
        rows = np.abs(rng.normal(size=(4, 5)))
        core.step_sgd(n, rows, None, hyper)
        cols = core.last_columns()
        if ledgers is None:
            y0 = cols[:, field["charge"]]
            ledgers = [theory.LedgerStream("scale", y0[[0, 1]]), theory.LedgerStream("scale", y0[[2, 3]])]
            papers = [theory.PaperStream("scale", y0[[0]]), theory.PaperStream("scale", y0[[3]])]
        for i, c in enumerate(([0, 1], [2, 3])):
            lr, m, d, w, nest = hyper[i]
            ledgers[i].step(flux=cols[c, field["flux"]], update_sq=cols[c, field["update_sq"]], lr=lr, momentum=m, dampening=d, weight_decay=w, nesterov=nest)
            papers[i].step(cols[[c[0] if i == 0 else c[1]], field["drive"]], lr=lr, momentum=m, dampening=d, weight_decay=w)
    final = core.final_row(np.abs(rng.normal(size=(4, 2))))
    np.testing.assert_array_equal(final["exact"], [ledgers[0].y[0], ledgers[0].y[1] + ledgers[1].y[0], ledgers[1].y[1]])
    np.testing.assert_array_equal(final["paper"], [papers[0].y[0], np.nan, papers[1].y[0]])


def test_a_failed_paper_lane_stops_alone_and_says_why():
    core = native_core([0, 1], [0, 1], every=2)  # every=2: no exact column, unmeasured steps skip
    rows = np.ones((2, 5))
    assert core.step_sgd(0, rows, None, [(0.1, 0.9, 0.0, 0.0, False)] * 2)[1] == []
    notes = core.skip(1, [(0.1, 0.9, 0.0, 0.0, False), (0.1, 0.0, 0.0, 0.0, False)])
    assert len(notes) == 1 and notes[0].startswith("paper closed form stopped at step 1 for scale") and "momentum must stay" in notes[0]
    final = core.final_row(np.ones((2, 2)))
    assert np.isfinite(final["paper"][0]) and np.isnan(final["paper"][1]) and np.isnan(final["exact"]).all()
    assert core.step_sgd(2, rows, None, [(0.1, 0.9, 0.0, 0.0, False)] * 2)[1] == []  # lane 1 stays stopped


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


def test_the_native_core_refuses_bad_input():
    with pytest.raises(ShapeError):
        native_core([0, 5], [0, 0], kinds=[1, 1])  # a column of a group that does not exist
    with pytest.raises(ShapeError):
        native_core([0, 0], [0, 0], kinds=[1, 1])  # group 1 has no column
    with pytest.raises(ShapeError):
        native_core([0, 1], [0, 0], kinds=[1, 7])
    core = native_core([0, 1], [0, 0])
    hyper = [(0.1, 0.0, 0.0, 0.0, False)]
    with pytest.raises(ShapeError):
        core.step_sgd(0, np.ones((3, 5)), None, hyper)  # rows of another plan
    with pytest.raises(ShapeError):
        core.step_sgd(0, np.ones((2, 4)), None, hyper)
    with pytest.raises(ShapeError):
        core.step_sgd(0, np.ones((2, 5)), None, [])  # no hyperparameters for param_group 0
    with pytest.raises(ShapeError):
        core.step_sgd(0, np.ones((2, 5)), None, hyper, np.zeros((len(_native.ROW_FIELDS), 3)))  # a row of 3 groups
    with pytest.raises(ShapeError):
        core.step_sgd(0, np.ones((2, 5)).T.copy().T, None, hyper)  # not C-contiguous
    with pytest.raises(InvalidArgumentError):  # a bad hyperparameter: the core's own check
        core.step_sgd(0, np.ones((2, 5)), None, [(-0.1, 0.0, 0.0, 0.0, False)])
    assert core.final_row(np.ones((2, 2))) is None  # nothing measured: failed steps left no state


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


# -- the buffer sums of the translation rows only -------------------------------------------
def test_buffer_sums_of_the_translation_rows_reach_their_parts():
    from sgd_reference import PartSums, step_quantities

    n = 6
    idx = np.arange(n, dtype=np.int64)
    kind = (idx % 2 == 0).astype(np.int64)  # even parts are translation parts, odd ones scale
    plan = {
        "part_row_starts": np.arange(n + 1, dtype=np.int64), "part_rows": idx, "part_sign": np.ones(n), "part_column": idx,
        "part_size": np.ones(n), "column_group": idx, "column_param_group": np.zeros(n, dtype=np.int64), "group_kind": kind,
        "group_size": np.ones(n), "extra_rows": idx[kind == 0], "rows": n,
    }  # fmt: skip
    core = _native.TrackerCore(plan, sgd=True, every=1)
    rng = np.random.default_rng(2)
    rows = np.abs(rng.normal(size=(n, 8)))
    sums = rng.normal(size=3)
    dense = np.zeros(n)
    dense[kind == 0] = sums
    core.step_sgd(0, rows, np.column_stack([sums, sums**2]), [(0.1, 0.9, 0.0, 1e-3, False)])
    want = step_quantities(PartSums.from_rows(rows, dense), *(np.full(n, v) for v in (0.9, 0.0, 1e-3)), np.zeros(n, bool))
    update_sum = core.last_columns()[:, list(_native.COLUMN_FIELDS).index("update_sum")]
    np.testing.assert_allclose(update_sum[kind == 0], want.su[kind == 0], rtol=1e-14)
    with pytest.raises(ShapeError):
        core.step_sgd(1, rows, np.column_stack([sums, sums])[:2], [(0.1, 0.9, 0.0, 1e-3, False)])
    with pytest.raises(ShapeError):
        core.step_sgd(1, rows, None, [(0.1, 0.9, 0.0, 1e-3, False)])  # a buffer without its sums
