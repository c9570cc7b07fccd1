"""The forecast of docs/theory.md §5.7 against real runs: the digits acceptance network.

Two runs of 400 steps (batch 64, seed 0), each with MultiStepLR (×0.2 at step 240): SGD (lr 0.05,
momentum 0.9, weight decay 5e-4: the acceptance run of test_tracking_acceptance.py) and AdamW
(lr 3e-3, weight decay 0.05). From step 200, 40 steps before the milestone, each is forecast to
step 400 with the scheduler's future rates passed as ``lr``, and compared with what the run then
measured, per symmetry: median and 90th percentile of the error (docs/theory.md §1) of the
forecast and of the two baselines (hold the value at step 200; extend the last 50 steps
linearly), and the share of groups whose band holds the measured value. The issue's criteria,
asserted on scale groups: the forecast beats both baselines by 2× in median, its band covers at
least 80% of the groups at the horizon. docs/theory.md §5.7 tabulates the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neural_mechanics as nm
from neural_mechanics import forecast as F
from neural_mechanics import report

from helpers import acceptance_net, digits, train_steps

STEPS, AT, MILESTONE, BATCH = 400, 200, 240, 64


def schedule(opt):
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[MILESTONE], gamma=0.2)


def future_rates(make_optimizer, start, stop):
    """The rates a fresh copy of the optimizer and scheduler gives steps start … stop−1."""
    opt = make_optimizer([torch.zeros(1, requires_grad=True)])
    sched = schedule(opt)
    rates = []
    for _ in range(stop):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(rates[start:stop])


def train(make_optimizer):
    # One torch thread: the run (and so the numbers of docs/theory.md §5.7) does not depend on
    # the machine's core count, and a small network trains fastest so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y = digits()
        model = acceptance_net()
        opt = make_optimizer(model.parameters())
        with nm.track(model, opt) as tracker:
            train_steps(model, opt, x, y, STEPS, batch=BATCH, seed=0, scheduler=schedule(opt))
    finally:
        torch.set_num_threads(threads)
    return tracker.run


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
}


@pytest.fixture(scope="module", params=list(OPTIMIZERS))
def validated(request):
    make = OPTIMIZERS[request.param]
    run = train(make)
    table = F.forecast_errors(run, at=AT, lr=future_rates(make, AT, STEPS))
    print(f"\n{request.param}:\n{table.to_string(float_format=lambda v: f'{v:.2e}')}")
    return request.param, run, table.set_index("symmetry")


def test_the_scheduler_rates_are_the_recorded_ones(validated):
    name, run, _ = validated
    np.testing.assert_allclose(future_rates(OPTIMIZERS[name], AT, STEPS), run.array("lr")[AT:STEPS, 0], rtol=1e-12)


def test_scale_forecast_beats_both_baselines_by_2x(validated):
    name, _, table = validated
    s = table.loc["scale"]
    assert s["groups"] == 16 and s["horizon"] == STEPS
    assert 2 * s["forecast_median"] <= s["hold_median"], (name, s.to_dict())
    assert 2 * s["forecast_median"] <= s["linear_median"], (name, s.to_dict())


def test_scale_band_covers_80_percent_at_the_horizon(validated):
    name, _, table = validated
    assert table.loc["scale", "band_coverage"] >= 0.8, (name, table.loc["scale"].to_dict())


def test_what_holds_for_the_other_symmetries(validated):
    # Not the criteria; what the numbers of docs/theory.md §5.7 show, kept from regressing.
    name, _, table = validated
    t, r = table.loc["translation"], table.loc["rescale"]
    if name == "SGD":
        # ⟨1, ĝ⟩ = 0: the exact recursion, to float32 rounding
        assert t["forecast_p90"] <= 1e-5 and t["band_coverage"] >= 0.8
        assert 2 * r["forecast_median"] <= min(r["hold_median"], r["linear_median"])
    else:
        # Adam's ⟨1, a⟩ has no sign to hold: the forecast is the decoupled decay, as good as holding
        assert t["forecast_median"] <= 1.5 * t["hold_median"]
        assert r["forecast_median"] <= r["hold_median"] and r["forecast_median"] <= r["linear_median"]
    assert r["band_coverage"] >= 0.7


def test_report_has_the_forecast_panel(validated, tmp_path):
    _, run, _ = validated
    figures = report.run_figures(run, tmp_path)
    assert figures["forecast"] == tmp_path / "forecast.png" and figures["forecast"].stat().st_size > 0
