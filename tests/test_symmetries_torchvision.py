"""Discovery on torchvision architectures (random weights), proved by verify."""

import torch
import torch.nn.functional as F
import torchvision

import neural_mechanics as nm


def build(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


def check(model, size=32, batch=2):
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sym = nm.find_symmetries(model, x)
    df = nm.verify(model, F.cross_entropy, (x, y), symmetries=sym)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    eps = df[df.status.str.endswith("ε")]
    assert set(df.status) <= {"ok", "no gradient", "BatchNorm ε"}, df[df.status == "violated"].head()
    assert (eps.residual <= 10 * eps.predicted).all()
    assert df[df.status == "ok"].residual.max() <= 1e-5
    return sym, df


def test_vgg11_bn():
    m = build("vgg11_bn")
    sym, df = check(m)
    s = sym.summary()
    # 8 convs -> BN (scale + bias translation), 8 BN affines (rescale), 2 hidden Linear (rescale)
    assert (s.symmetry == "scale").sum() == 8 and (s.symmetry == "rescale").sum() == 10
    conv_channels = sum(c.out_channels for c in m.features if isinstance(c, torch.nn.Conv2d))
    assert len(sym.by_kind("translation")) == conv_channels + 4097  # conv biases + classifier
    assert sym.skipped == {}
    bn = df[df.status == "BatchNorm ε"]
    print("vgg11_bn: BN-eps residual/predicted in", (bn.residual / bn.predicted).agg(["min", "max"]).tolist())


def test_vgg16_discovery_only():
    m = build("vgg16")
    sym = nm.find_symmetries(m, torch.randn(1, 3, 64, 64))
    assert {g.symmetry for g in sym} == {"rescale", "translation"}
    assert len(sym.by_kind("rescale")) == sum(m.features[i].out_channels for i in range(len(m.features))
                                              if hasattr(m.features[i], "out_channels")) + 4096 * 2
    assert len(sym.by_kind("translation")) == 4097


def test_resnet18_no_claim_across_residual_adds():
    sym, df = check(build("resnet18"), size=64, batch=4)
    rescale_layers = {g.layer for g in sym.by_kind("rescale")}
    assert rescale_layers == {f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)}
    assert "residual add" in sym.skipped["layer1.0.bn2.weight"]
    assert len(sym.by_kind("translation")) == 513


def test_mobilenet_v2_relu6_blocks_rescale():
    sym, df = check(build("mobilenet_v2"), size=64, batch=4)
    # ReLU6 everywhere: the only rescale groups are BN -> conv without activation or residual
    assert {g.layer for g in sym.by_kind("rescale")} == {"features.1.conv.2", "features.17.conv.3"}
    assert "ReLU6" in sym.skipped["features.0.1.weight"]
    depthwise = [g for g in sym.by_kind("scale") if g.layer == "features.2.conv.1.0"]
    assert len(depthwise) == 96


def test_squeezenet_concat_consumers():
    sym, df = check(build("squeezenet1_0"), size=64)
    g = next(g for g in sym.by_kind("rescale") if g.layer == "features.3.squeeze" and g.index == 0)
    assert {p[0] for p in g.outgoing} == {"features.3.expand1x1.weight", "features.3.expand3x3.weight"}
    g = next(g for g in sym.by_kind("rescale") if g.layer == "features.3.expand3x3" and g.index == 0)
    assert g.outgoing == (("features.4.squeeze.weight", (slice(None), 64), -1),)
