"""track(): hooks, discovery at the first forward, options, and the awkward cases of real loops."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError, NothingToTrackError

from helpers import bn_mlp, digits, sgd, train_steps

X, Y = digits(flatten=True)


def loop(model, opt, steps, *, accumulate=1):
    """``steps`` SGD steps on batches of 32 flattened digits, the batches drawn from seed 0."""
    train_steps(model, opt, X, Y, steps, accumulate=accumulate)


def tracked(opt_factory, steps=60, **kw):
    model = bn_mlp()
    opt = opt_factory(model)
    with nm.track(model, opt, **kw) as tracker:
        loop(model, opt, steps)
    return tracker.run, model, opt, tracker


@pytest.mark.parametrize(
    "cfg",
    [dict(momentum=0.0), dict(momentum=0.9, dampening=0.3), dict(momentum=0.5, nesterov=True), dict(weight_decay=0.0)],
    ids=["plain", "dampening", "nesterov", "no-decay"],
)
def test_exact_ledger_for_every_sgd_variant(cfg):
    run, *_ = tracked(sgd(**cfg))
    assert run.errors("exact").max() <= 1e-5
    assert np.isfinite(run.errors("paper")).all()


def test_plain_sgd_paper_is_close():
    run, *_ = tracked(sgd(momentum=0.0), steps=100)
    assert run.errors("paper").max() <= 2e-2


def test_groups_are_discovered_at_the_first_forward_and_hooks_go_away():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = nm.track(model, opt)
    assert "?" in repr(tracker)
    with pytest.raises(NothingToTrackError):
        _ = tracker.run  # nothing recorded yet
    loop(model, opt, 3)
    run = tracker.run
    assert {"translation", "scale", "rescale"} <= set(run.groups.symmetry)
    tracker.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_pre_hooks
    before = run.to_pandas()
    loop(model, opt, 2)  # training after close is untouched and not recorded
    after = tracker.run.to_pandas()
    assert after["step"].max() == 3
    import pandas as pd

    pd.testing.assert_frame_equal(before, after)  # the final row was frozen at close()


def test_nothing_to_track_raises():
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh())  # tanh after the logits: no symmetry at all
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NothingToTrackError):
        with nm.track(model, opt):
            loop(model, opt, 1)
    empty = nm.find_symmetries(model, X[:4])
    assert len(empty) == 0 and empty.skipped
    with pytest.raises(NothingToTrackError):
        nm.track(model, opt, empty)


def test_bad_arguments():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in (dict(every=0), dict(record_every=-1), dict(every=1.5)):
        with pytest.raises(InvalidArgumentError):
            nm.track(model, opt, **kw)
    with pytest.raises(InvalidArgumentError):
        nm.track(model, "not an optimizer")


def test_arguments_are_checked_when_given(tmp_path):
    """every/record_every take any integer type and refuse bools and floats; memory_limit is
    None or an integer of at least Run.MIN_MEMORY_LIMIT (0, -1 and 1.5 used to write one chunk
    file per row); spill_dir is None or a folder path, created if missing; all at track(...),
    not at the first spill or forward."""
    from neural_mechanics.run import Run

    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in (dict(every=np.int64(2)), dict(record_every=np.int32(3)), dict(memory_limit=np.int64(2**21)), dict(memory_limit=None)):
        nm.track(model, opt, **kw).close()
    tracker = nm.track(model, opt, every=np.int64(2))
    assert type(tracker.every) is int and tracker.every == 2
    tracker.close()
    bad = [
        dict(every=True),
        dict(every=2.0),
        dict(record_every=np.float64(2)),
        dict(record_every="2"),
        dict(memory_limit="abc"),
        dict(memory_limit=0),
        dict(memory_limit=-1),
        dict(memory_limit=1.5),
        dict(memory_limit=True),
        dict(memory_limit=Run.MIN_MEMORY_LIMIT - 1),
        dict(spill_dir=42),
        dict(spill_dir=b"bytes"),
        dict(spill_dir=""),
    ]
    for kw in bad:
        with pytest.raises(InvalidArgumentError):
            nm.track(model, opt, **kw)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(InvalidArgumentError, match="not a folder"):
        nm.track(model, opt, spill_dir=a_file)
    missing = tmp_path / "made" / "here"
    nm.track(model, opt, spill_dir=missing).close()
    assert missing.is_dir()
    # No hook was left behind by the refused calls: a plain loop still runs untracked.
    loop(model, opt, 2)


def test_every_k_measures_sampled_steps_and_leaves_exact_nan():
    run, *_ = tracked(sgd(), steps=40, every=4)
    steps = run.step_index
    assert list(steps[:-1]) == list(range(0, 40, 4)) and steps[-1] == 40
    assert np.isnan(run.array("exact")).all()
    assert np.isfinite(run.array("paper")).all()
    assert "every=4" in run.summary()["note"].iloc[0]
    # the sampled drive held over 4 steps still follows the charges roughly
    assert run.errors("paper").max() < 0.1


def test_record_every_only_thins_storage():
    full, *_ = tracked(sgd(), steps=30)
    thin, *_ = tracked(sgd(), steps=30, record_every=5)
    assert list(thin.step_index) == [0, 5, 10, 15, 20, 25, 30]
    keep = np.isin(full.step_index, thin.step_index)
    np.testing.assert_allclose(thin.array("exact"), full.array("exact")[keep], rtol=0, atol=0)


def test_mixed_hyperparameters_inside_one_group():
    """The usual recipe: no weight decay on biases. Scale groups (row + bias) mix two param_groups."""

    def factory(m):
        decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return torch.optim.SGD(
            [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=0.05, momentum=0.9
        )

    run, *_ = tracked(factory)
    assert run.errors("exact").max() <= 1e-5
    summary = run.summary().set_index(["symmetry", "layer"])
    mixed = summary[summary["note"].str.contains("different hyperparameters")]
    assert len(mixed) > 0 and mixed["paper_max"].isna().all()
    pure = summary[~summary["note"].str.contains("different hyperparameters")]
    assert pure["paper_max"].notna().any()


def test_frozen_parameters_are_reported_not_dropped():
    model = bn_mlp()
    model[5].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    with nm.track(model, opt) as tracker:
        loop(model, opt, 10)
    run = tracker.run
    assert any("5.weight" in why for why in run.skipped.values())
    assert run.errors("exact").max() <= 1e-5


def test_existing_momentum_buffer_before_tracking():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.2, weight_decay=5e-4)
    loop(model, opt, 20)  # the buffer exists before tracking starts
    with nm.track(model, opt) as tracker:
        loop(model, opt, 60)
    run = tracker.run
    assert run.errors("exact").max() <= 1e-5
    assert run.errors("paper").max() <= 2e-2


def test_gradient_accumulation_counts_one_step_per_optimizer_step():
    model = bn_mlp()
    opt = sgd()(model)
    with nm.track(model, opt) as tracker:
        loop(model, opt, 12, accumulate=3)
    run = tracker.run
    assert run.step_index[-1] == 12
    assert run.errors("exact").max() <= 1e-5


def test_steps_skipped_by_grad_scaler_are_not_counted():
    model = bn_mlp()
    opt = sgd()(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(0)
    with nm.track(model, opt) as tracker:
        for n in range(10):
            idx = torch.randint(0, len(X), (32,), generator=g)
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            if n == 4:
                loss = loss * float("inf")  # inf gradients: the scaler skips this step
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    run = tracker.run
    assert run.step_index[-1] == 9  # 10 iterations, 9 optimizer steps
    assert run.errors("exact").max() <= 1e-5


def test_lr_scheduler_changes_are_followed():
    model = bn_mlp()
    opt = sgd()(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    with nm.track(model, opt) as tracker:
        for _ in range(30):
            loop(model, opt, 1)
            sched.step()
    table = tracker.run.to_pandas()
    lrs = table.groupby("step")["lr"].first()
    assert lrs.loc[9] == pytest.approx(0.05) and lrs.loc[10] == pytest.approx(0.025) and lrs.loc[29] == pytest.approx(0.0125)
    assert tracker.run.errors("exact").max() <= 1e-5
    time = table.groupby("step")["time"].first()
    assert time.loc[30] == pytest.approx(10 * 0.05 + 10 * 0.025 + 10 * 0.0125)


def test_table_columns_and_final_row():
    run, *_ = tracked(sgd(), steps=20)
    table = run.to_pandas()
    for col in ("step", "time", "lr", "symmetry", "layer", "group", "measured", "paper", "exact", "grad_sq", "update_sq", "flux", "magnitude", "update_sum"):
        assert col in table.columns
    last = table[table["step"] == 20]
    assert last["grad_sq"].isna().all() and last["measured"].notna().all()
    t = table[(table["symmetry"] == "translation") & (table["step"] < 20)]
    assert t["update_sum"].notna().all()
    assert table[table["symmetry"] != "translation"]["update_sum"].isna().all()
    assert "SGD" in repr(run) and "groups" in repr(run)


def test_save_and_reload_a_tracked_run(tmp_path):
    run, *_ = tracked(sgd(), steps=15)
    back = nm.load_run(run.save(tmp_path / "mlp.nmrun"))
    import pandas as pd

    pd.testing.assert_frame_equal(run.to_pandas(), back.to_pandas())
    pd.testing.assert_frame_equal(run.summary(), back.summary())


def test_a_parameter_without_gradient_is_reported():
    model = bn_mlp()
    opt = sgd()(model)
    with nm.track(model, opt) as tracker:
        loop(model, opt, 3)
        opt.zero_grad()
        F.cross_entropy(model(X[:32]), Y[:32]).backward()
        model[5].weight.grad = None  # e.g. a branch this batch did not use
        opt.step()
    notes = " ".join(tracker.run.notes)
    assert "5.weight had no gradient" in notes and "step 3" in notes


def test_a_param_group_added_during_training_does_not_break_the_loop():
    model = bn_mlp()
    head = [p for n, p in model.named_parameters() if n.startswith("5.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("5.")]
    opt = torch.optim.SGD(body, lr=0.05, momentum=0.9)
    with nm.track(model, opt) as tracker:
        loop(model, opt, 3)
        opt.add_param_group({"params": head, "lr": 0.01})
        loop(model, opt, 3)
    run = tracker.run
    assert run.step_index[-1] == 6
    assert any("not in the optimizer" in why for why in run.skipped.values())


# -- coverage, said at set-up ---------------------------------------------------------------------
class _Residual(nn.Module):
    """Linear → BatchNorm → ReLU, then a residual block whose BatchNorm output is added back: both
    BatchNorms' affine pairs feed the residual add, so no symmetry holds for them (discovery
    skips them with a reason)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.inp(x)
        return self.head(torch.relu(h + self.bn(self.fc(h))))


def test_coverage_is_logged_at_set_up_and_in_repr(caplog):
    torch.manual_seed(0)
    model = _Residual()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with caplog.at_level("INFO", logger="neural_mechanics"):
        with nm.track(model, opt) as tracker:
            loop(model, opt, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "neural_mechanics"]
    assert len(lines) == 1, lines
    run = tracker.run
    uncovered = run.coverage["uncovered"]
    assert set(uncovered) == {"inp.1.weight", "inp.1.bias", "bn.weight", "bn.bias"}
    entries = sum(p.numel() for p in model.parameters())
    share = 100 * 64 / entries
    expected = f"{len(run.groups):,} groups in {len(set(run.groups.layer))} layers; 4 parameters ({share:.2g}% of weights) not covered: residual add (4)"
    assert expected in lines[0] and expected in repr(tracker)
    assert run.coverage["entries"] == entries and run.coverage["parameters"] == 10
    # the summary lists them, with the reason as sentences
    s = run.summary()
    row = s[s.verdict == "not covered"]
    assert list(row.layer) == ["inp.1", "bn"] and row.reason.iloc[0].startswith("weight: No scale or rescale group") and "bias: No scale or rescale group" in row.reason.iloc[0]


def test_coverage_names_parameters_outside_the_optimizer_and_layers_by_their_module():
    model = bn_mlp()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("5.")], lr=0.05)
    with nm.track(model, opt) as tracker:
        loop(model, opt, 2)
    run = tracker.run
    assert {"5.weight", "5.bias"} <= set(run.coverage["uncovered"])
    assert "not in the optimizer" in run.coverage["uncovered"]["5.weight"][1]
    assert "not in the optimizer (" in repr(tracker)
    # layers of nn.Sequential are named with their module
    assert run.groups.display("0") == "0 · Linear(64→32)" and run.groups.module_of("1") == "BatchNorm1d(32)"
    assert set(run.groups.normalizer[run.groups.symmetry == "scale"]) == {"BatchNorm"}
