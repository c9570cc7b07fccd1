"""verify: residuals, statuses, Hessian constraints, the hand-declaration API and the result type."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def test_statuses_bn_eps_and_model_untouched():
    m = bn_net()
    with torch.no_grad():  # tiny-variance channels: BatchNorm's epsilon becomes visible
        m[0].weight[:3] *= 1e-3
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    df = nm.verify(m, F.cross_entropy, (x, y), hessian=True)
    assert list(df.columns) == ["layer", "symmetry", "index", "label", "residual", "status", "predicted",
                                "hessian_residual", "grad_norm"]
    eps = df[df.status == "BatchNorm ε"]
    assert len(eps) >= 3
    ratio = eps.residual / eps.predicted
    # eps/(var+eps) bounds the breaking flux; the residual is that times a cosine (<= 1), so it
    # sits at or below the prediction, within 10x for most groups
    assert (ratio <= 10).all() and 0.1 <= ratio.median() <= 10, ratio
    ok = df[df.status == "ok"]
    assert ok.residual.max() <= 1e-5
    # the Hessian constraint feels epsilon more strongly; exact groups satisfy it to float32 noise
    assert (df[(df.status == "ok") & df.predicted.isna()].hessian_residual < 1e-3).all()
    assert set(df[(df.layer == "0") & (df.symmetry == "translation")].status) == {"no gradient"}
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.training


def test_false_claims_are_violated_and_dead_units_have_no_gradient():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        m[0].bias[0] = -100.0  # unit 0 never fires
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    wrong = nm.declare(m, [
        nm.SymmetryGroup("scale", "0", 0, "row 1 (false)", [("0.weight", (1,), 1)]),
        nm.SymmetryGroup("translation", "2", 0, "row 0 (false)", [("2.weight", (0,), 1)]),
        nm.SymmetryGroup("rescale", "0", 0, "unit 0", [("0.weight", (0,), 1), ("0.bias", (0,), 1),
                                                       ("2.weight", (slice(None), 0), -1)]),
    ])
    df = nm.verify(m, F.cross_entropy, (x, y), symmetries=wrong, hessian=True)
    assert list(df.status) == ["violated", "violated", "no gradient"]
    assert df.residual[:2].min() > 1e-2 and math.isnan(df.residual[2])


def test_declare_validation_and_adding_to_discovered_groups():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2))
    ok = [nm.SymmetryGroup("rescale", "0", 0, "ch 0", [("0.weight", (0,), 1), ("2.weight", (slice(0, 2), 0), -1)]),
          {"symmetry": "scale", "layer": "mine", "index": 0, "label": "all", "parts": [("0.weight", (slice(None),), 1)]},
          nm.SymmetryGroup("translation", "2", 1, "block", [("2.weight", (slice(None), slice(0, 2)), 1)])]
    declared = nm.declare(m, ok)
    assert len(declared) == 3 and declared[1].parts == (("0.weight", (slice(None),), 1),)
    found = nm.find_symmetries(m, torch.randn(1, 3, 5, 5), output="features")
    both = nm.declare(m, ok[1:2], found)
    assert len(both) == len(found) + 1
    bad = [
        [("nope.weight", (0,), 1)],
        [("0.weight", (4,), 1)],  # row out of range
        [("0.weight", (0, 1), 1)],  # not an allowed form
        [("0.weight", (slice(None), 3), 1)],  # column out of range
        [("0.weight", (slice(1, 9), 0), 1)],  # row range out of range
        [("0.bias", (slice(None), 0), 1)],  # a column of a vector
        [("0.weight", (0,), 2)],  # sign
        [("0.weight", ([0, 1],), 1)],  # fancy index
    ]
    for parts in bad:
        with pytest.raises(InvalidArgumentError):
            nm.declare(m, [nm.SymmetryGroup("scale", "x", 0, "bad", parts)])
    with pytest.raises(InvalidArgumentError):
        nm.declare(m, [nm.SymmetryGroup("rotation", "x", 0, "bad", [("0.weight", (0,), 1)])])
    with pytest.raises(InvalidArgumentError):  # rescale needs both sides
        nm.declare(m, [nm.SymmetryGroup("rescale", "x", 0, "bad", [("0.weight", (0,), 1)])])
    with pytest.raises(InvalidArgumentError):  # duplicate (symmetry, layer, index)
        nm.declare(m, [ok[0], ok[0]])


def test_result_type_summary_repr_and_empty_model():
    m = bn_net()
    sym = nm.find_symmetries(m, torch.randn(2, 3, 8, 8))
    s = sym.summary()
    assert list(s.columns) == ["layer", "symmetry", "groups", "parameters"]
    assert s.groups.sum() == len(sym) == len(list(sym))
    assert sum(len(sym.by_kind(k)) for k in ("translation", "scale", "rescale")) == len(sym)
    assert "Symmetries(" in repr(sym) and "<table>" in sym._repr_html_()
    g = sym.by_kind("scale")[0]
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        g.index = 3  # frozen
    empty = nm.find_symmetries(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)),
                               torch.randn(2, 3), output="regression")
    assert len(empty) == 0 and set(empty.skipped) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "GELU" in empty.skipped["0.weight"]
    assert empty.summary().empty
    assert nm.verify(nn.Sequential(nn.Linear(3, 2)), F.mse_loss, (torch.randn(2, 3), torch.randn(2, 2)),
                     symmetries=empty).empty


def test_verify_discovers_and_keeps_eval_mode():
    m = bn_net().eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    df = nm.verify(m, F.cross_entropy, (x, y))
    assert not m.training and set(df.status) <= {"ok", "no gradient"}
    with pytest.raises(InvalidArgumentError):
        nm.verify(m, F.cross_entropy, x)
