"""find_symmetries on hand-built models: every pattern of docs/theory.md §2, proved by verify."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm

torch.manual_seed(0)


def holds(model, x, y, sym=None, loss=F.cross_entropy, hessian=False):
    """verify every claimed group; return the DataFrame after checking that they all hold."""
    df = nm.verify(model, loss, (x, y), symmetries=sym, hessian=hessian)
    bad = df[~df.status.isin(["ok", "no gradient"]) & ~df.status.str.endswith("ε")]
    assert bad.empty, bad.to_string()
    eps = df[df.status.str.endswith("ε")]
    assert (eps.residual <= 10 * eps.predicted).all()
    scored = df[df.status == "ok"]
    assert len(scored) > 0.5 * len(df)
    return df


def kinds(sym):
    return {k: len(sym.by_kind(k)) for k in ("translation", "scale", "rescale")}


def group(sym, symmetry, layer, index):
    return next(g for g in sym if g.symmetry == symmetry and g.layer == layer and g.index == index)


def test_relu_mlp_rescale_and_classifier_translation():
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    sym = nm.find_symmetries(m, x)
    assert kinds(sym) == {"translation": 6 + 1, "scale": 0, "rescale": 7 + 6}
    g = group(sym, "rescale", "0", 3)
    assert g.parts == (("0.weight", (3,), 1), ("0.bias", (3,), 1), ("2.weight", (slice(None), 3), -1))
    assert g.label == "unit 3"
    b = group(sym, "translation", "4", 6)  # the bias group comes after the 6 columns
    assert b.parts == (("4.bias", (slice(None),), 1),) and b.label == "bias"
    assert group(sym, "translation", "4", 2).parts == (("4.weight", (slice(None), 2), 1),)
    assert sym.skipped == {}
    holds(m, x, y, sym, hessian=True)


def test_conv_bn_stack_scale_bias_translation_affine_rescale():
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    sym = nm.find_symmetries(m, x)
    s = group(sym, "scale", "0", 2)
    assert s.parts == (("0.weight", (2,), 1), ("0.bias", (2,), 1)) and s.label == "channel 2"
    assert group(sym, "translation", "0", 5).parts == (("0.bias", (5,), 1),)
    r = group(sym, "rescale", "1", 1)
    assert r.parts == (("1.weight", (1,), 1), ("1.bias", (1,), 1), ("4.weight", (slice(None), 1), -1))
    assert kinds(sym) == {"translation": 6 + 8 + 1, "scale": 6 + 8, "rescale": 6 + 8}
    df = holds(m, x, y, sym)
    # the bias before BatchNorm has no gradient: reported, not scored
    assert (df[(df.layer == "0") & (df.symmetry == "translation")].status == "no gradient").all()


def test_flatten_gives_column_blocks():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.2),
                      nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 5, (8,))
    sym = nm.find_symmetries(m, x)
    g = group(sym, "rescale", "0", 1)
    assert g.parts[-1] == ("5.weight", (slice(None), slice(16, 32)), -1)
    holds(m, x, y, sym)


class Functional(nn.Module):
    """Parameters used by hand through functional calls, in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 4) * 0.5)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(3, 8) * 0.5)

    def forward(self, x):
        h = F.linear(x, self.w1, self.b1)
        h.relu_()
        return F.log_softmax(F.linear(h, self.w2), dim=1)


def test_functional_inplace_and_softmax_inside_model():
    m = Functional()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for output in ("logits", "log_probs"):  # the model's own log_softmax absorbs the translation
        sym = nm.find_symmetries(m, x, output=output)
        assert kinds(sym) == {"translation": 8, "scale": 0, "rescale": 8}
    assert group(sym, "rescale", "w1", 0).parts == (("w1", (0,), 1), ("b1", (0,), 1), ("w2", (slice(None), 0), -1))
    holds(m, x, y, sym, loss=F.nll_loss)


def test_grouped_and_depthwise_convolutions():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randn(4, 3, 10, 10), torch.randint(0, 3, (4,))
    sym = nm.find_symmetries(m, x)
    assert group(sym, "rescale", "0", 5).parts[-1] == ("2.weight", (slice(4, 6), 1), -1)
    assert group(sym, "rescale", "2", 5).parts[-1] == ("4.weight", (slice(5, 6), 0), -1)
    holds(m, x, y, sym)


def test_layernorm_scale_translation_and_affine_rescale():
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    sym = nm.find_symmetries(m, x)
    s = group(sym, "scale", "0", 0)
    assert s.parts == (("0.weight", (slice(None),), 1), ("0.bias", (slice(None),), 1))
    assert group(sym, "translation", "0", 5 + 0).parts == (("0.bias", (slice(None),), 1),)
    assert group(sym, "translation", "0", 2).parts == (("0.weight", (slice(None), 2), 1),)
    assert len([g for g in sym.by_kind("rescale") if g.layer == "1"]) == 6
    holds(m, x, y, sym)


def test_rmsnorm_scale_without_translation():
    m = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    sym = nm.find_symmetries(m, x)
    assert [g.symmetry for g in sym if g.layer == "0"] == ["scale"]
    holds(m, x, y, sym)


def test_groupnorm_and_instancenorm():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                      nn.InstanceNorm2d(4, affine=True), nn.ReLU(), nn.Conv1d if False else nn.Identity(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(4, 3, 9, 9), torch.randint(0, 3, (4,))
    sym = nm.find_symmetries(m, x)
    gn = [g for g in sym.by_kind("scale") if g.layer == "0"]
    assert len(gn) == 2 and gn[1].parts[0] == ("0.weight", (4,), 1) and len(gn[1].parts) == 8
    assert [g.parts for g in sym.by_kind("translation") if g.layer == "0"][0] == tuple(
        ("0.bias", (i,), 1) for i in range(4))
    assert len([g for g in sym.by_kind("scale") if g.layer == "3"]) == 4
    holds(m, x, y, sym)


def test_conv1d_and_conv3d():
    m1 = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 3, 3),
                       nn.AdaptiveAvgPool1d(1), nn.Flatten())
    x1, y = torch.randn(6, 2, 12), torch.randint(0, 3, (6,))
    holds(m1, x1, y)
    m3 = nn.Sequential(nn.Conv3d(2, 4, 2), nn.ReLU(), nn.AvgPool3d(2, padding=1), nn.Conv3d(4, 3, 2),
                       nn.AdaptiveAvgPool3d(1), nn.Flatten())
    x3 = torch.randn(4, 2, 6, 6, 6)
    sym = nm.find_symmetries(m3, x3)
    assert kinds(sym)["rescale"] == 4
    holds(m3, x3, y[:4], sym)


def test_weight_norm_and_spectral_norm_leaves():
    wn = nn.utils.parametrizations.weight_norm
    sn = nn.utils.parametrizations.spectral_norm
    m = nn.Sequential(wn(nn.Linear(5, 6)), nn.BatchNorm1d(6), nn.ReLU(), sn(nn.Linear(6, 4)), nn.ReLU(),
                      nn.Linear(4, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    sym = nm.find_symmetries(m, x)
    v = "0.parametrizations.weight.original1"
    assert group(sym, "scale", v, 2).parts == ((v, (2,), 1),)
    assert "identically zero" in sym.skipped["0.parametrizations.weight.original0"]
    orig = "3.parametrizations.weight.original"
    assert group(sym, "scale", orig, 0).parts == ((orig, (slice(None),), 1),)
    assert "3.parametrizations.weight.original" not in sym.skipped
    holds(m, x, y, sym)


def test_channel_with_several_consumers():
    class Branch(nn.Module):
        def __init__(self, residual):
            super().__init__()
            self.residual = residual
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 if residual else 8, 3)

        def forward(self, x):
            h = F.relu(self.a(x))
            u, w = self.b(h), self.c(h)
            z = u + h if self.residual else torch.cat([u, w], 1)
            return self.fc(F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))

    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    m = Branch(residual=False)
    sym = nm.find_symmetries(m, x)
    g = group(sym, "rescale", "a", 1)
    assert g.parts[2:] == (("b.weight", (slice(None), 1), -1), ("c.weight", (slice(None), 1), -1))
    assert group(sym, "rescale", "c", 2).parts[-1] == ("fc.weight", (slice(None), 6), -1)
    holds(m, x, y, sym)
    m = Branch(residual=True)  # h is also added to b's output: nothing crosses the add
    sym = nm.find_symmetries(m, x)
    assert not [g for g in sym if g.layer in ("a", "b", "c") and g.symmetry != "translation"]
    assert "residual add" in sym.skipped["a.weight"]


@pytest.mark.parametrize("act", [nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish])
def test_non_homogeneous_activations_block_everything(act):
    m = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3), act())
    sym = nm.find_symmetries(m, torch.randn(8, 4))
    assert len(sym) == 0 and set(sym.skipped) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_no_translation_for_non_logit_output_and_mse_breaks_it():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    sym = nm.find_symmetries(m, x, output="regression")
    assert kinds(sym) == {"translation": 0, "scale": 0, "rescale": 6}
    holds(m, x, y, sym, loss=F.mse_loss)
    claimed = nm.find_symmetries(m, x)  # claims softmax translation, false under MSE
    df = nm.verify(m, F.mse_loss, (x, y), symmetries=claimed)
    bad = df[df.symmetry == "translation"]
    assert (bad.status == "violated").all() and bad.residual.min() > 1e-2


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.c(x))
        if h.sum() > -1e9:  # data-dependent control flow: symbolic / meta tracing cannot decide it
            h = F.relu(h)
        return self.fc(h.mean((2, 3)))


def test_untraceable_model_falls_back_to_a_real_forward_and_is_left_unchanged():
    m = Untraceable()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sym = nm.find_symmetries(m, x)
    assert kinds(sym) == {"translation": 4 + 4 + 1, "scale": 4, "rescale": 4}
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.training
    holds(m, x, y, sym)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_mode_batchnorm_is_not_a_normaliser_and_mode_is_kept():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    sym = nm.find_symmetries(m, x)
    assert not [g for g in sym if g.layer == "0" and g.symmetry == "scale"]
    assert not m.training and not m[1].training
    holds(m, x, y, sym)
