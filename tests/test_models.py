"""Backbones, presets, summary counts vs the paper, fast C2D layers, weight loading / inflation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from nlvid.errors import CheckpointError, ConfigError
from nlvid.models import create_model, list_models, summarize
from nlvid.models.resnet3d import FrameBatchNorm3d, FrameConv3d, inflation_flags
from nlvid.models.weights import inflate_torchvision, load_state_dict_checked

ALL = list_models()
# The default pass trains one preset per block kind / inflation / NL placement; the rest run in the slow pass.
FAST = {"tiny", "c2d_r18_nl5", "c2d_r50_nl5", "i3d_r50_nl10", "i3d333_r50_nl1", "c2d_r34_nl1"}
ALL_SPLIT = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ALL]


def _meta(name: str, **kw):
    """Build on the meta device: shapes and counts without allocating or initialising weights."""
    with torch.device("meta"):
        return create_model(name, **kw)


# ---------------------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------------------


def test_preset_names():
    want = {"tiny"}
    for base in ("c2d_r18", "c2d_r34", "c2d_r50", "c2d_r101", "i3d_r50", "i3d_r101", "i3d333_r50", "i3d333_r101"):
        want |= {base, f"{base}_nl1", f"{base}_nl5", f"{base}_nl10"}
    assert set(ALL) == want
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("name", ALL_SPLIT)
def test_every_preset_trains_small(name):
    """Forward + backward at a small width: right shape, finite, a gradient on every parameter."""
    torch.manual_seed(0)
    model = create_model(name, width=4, num_classes=7).train()
    for mod in model.modules():  # NL blocks start as the identity (BN gamma 0): open them so theta/phi/g learn
        if type(mod).__name__ == "NonLocalBlock" and hasattr(mod, "bn"):
            torch.nn.init.ones_(mod.bn.weight)
    x = torch.randn(2, 3, 8, 32, 32)
    y = model(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        if ".nl." in pname and pname.endswith(".weight") and ".bn." not in pname:
            assert p.grad.abs().sum() > 0, f"{pname}: no gradient flows through the NL block"


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_preset_real_width(name):
    model = create_model(name).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 8, 32, 32))
    assert y.shape == (1, 400) and torch.isfinite(y).all()


def test_nl_blocks_at_init_are_identity():
    torch.manual_seed(0)
    nl = create_model("c2d_r18_nl10", width=8).eval()
    base = create_model("c2d_r18", width=8).eval()
    load_state_dict_checked(base, {k: v for k, v in nl.state_dict().items() if ".nl." not in k})
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nl(x), base(x))


def test_placements_and_module_names():
    m = _meta("c2d_r50_nl5")
    keys = set(m.state_dict())
    for k in ("stem.conv.weight", "stem.bn.running_var", "res2.blocks.0.conv1.weight", "res2.blocks.0.bn3.weight",
              "res2.blocks.0.downsample.0.weight", "res2.blocks.0.downsample.1.weight", "res5.blocks.2.conv3.weight",
              "head.fc.weight", "head.fc.bias", "res3.nl.1.theta.weight", "res4.nl.5.out.bias"):
        assert k in keys, k
    assert sorted(m.res3.nl) == ["1", "3"] and sorted(m.res4.nl) == ["1", "3", "5"]
    assert not m.res2.nl and not m.res5.nl
    assert sorted(map(int, _meta("c2d_r101_nl5").res4.nl)) == [6, 13, 20]
    assert sorted(map(int, _meta("c2d_r101_nl1").res4.nl)) == [21]
    assert sorted(map(int, _meta("i3d_r50_nl1").res4.nl)) == [4]
    assert len(_meta("i3d_r50_nl10").res3.nl) == 4 and len(_meta("i3d_r50_nl10").res4.nl) == 6
    assert "res2.blocks.0.conv2.weight" in _meta("c2d_r18").state_dict()  # basic blocks: conv1, conv2
    assert "res2.blocks.0.conv3.weight" not in _meta("c2d_r18").state_dict()
    assert _meta("c2d_r50", nonlocal_blocks={}).res3.nl.keys() == set()


def test_nl_block_takes_the_output_of_its_residual_block():
    model = create_model("tiny").eval()
    seen = {}
    model.res3.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("block", out.clone()))
    model.res3.nl["0"].register_forward_pre_hook(lambda m, a: seen.__setitem__("nl", a[0].clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 64, 64))
    torch.testing.assert_close(seen["nl"], seen["block"])
    assert (seen["nl"] >= 0).all()  # post-ReLU


def test_i3d_inflation_pattern():
    assert inflation_flags((3, 4, 6, 3)) == [[1, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0]]
    r101 = inflation_flags((3, 4, 23, 3))[2]
    assert r101 == [1 - i % 2 for i in range(23)]  # even-indexed blocks
    i3d, i333, c2d = _meta("i3d_r50"), _meta("i3d333_r50"), _meta("c2d_r50")
    assert i3d.stem.conv.kernel_size == (5, 7, 7) and c2d.stem.conv.kernel_size == (1, 7, 7)
    for s, stage in enumerate(("res2", "res3", "res4", "res5")):
        for i, flag in enumerate(inflation_flags((3, 4, 6, 3))[s]):
            b1, b2, b0 = getattr(i3d, stage).blocks[i], getattr(i333, stage).blocks[i], getattr(c2d, stage).blocks[i]
            assert b1.conv1.kernel_size == (3 if flag else 1, 1, 1) and b1.conv2.kernel_size == (1, 3, 3)
            assert b2.conv1.kernel_size == (1, 1, 1) and b2.conv2.kernel_size == (3 if flag else 1, 3, 3)
            assert b0.conv1.kernel_size == (1, 1, 1) and b0.conv2.kernel_size == (1, 3, 3)
            # spatial stride on the 3x3 conv of the first block of res3..res5 ("stride_1x1=False")
            assert b0.conv2.stride == ((1, 2, 2) if (i == 0 and stage != "res2") else (1, 1, 1))
            assert b0.conv1.stride == (1, 1, 1)


@pytest.mark.parametrize("layout,frames,pad,want", [
    ("8x8", 8, 1, {"stem": (8, 56, 56), "pool2": (4, 56, 56), "res5": (4, 7, 7)}),
    ("32x2", 32, 1, {"stem": (8, 56, 56), "pool2": (4, 56, 56), "res3": (4, 28, 28), "res5": (4, 7, 7)}),
    ("32x2", 32, 0, {"stem": (8, 55, 55), "res3": (4, 28, 28), "res5": (4, 7, 7)}),
])
def test_layout_grids(layout, frames, pad, want):
    m = create_model("c2d_r18", layout=layout, stem_pool_padding=pad, width=4)
    grids = m.feature_grids(frames, 224, 224)
    for k, v in want.items():
        assert grids[k] == v, k
    with torch.no_grad():  # the arithmetic agrees with the layers
        out = m.eval().forward_features(torch.randn(1, 3, frames, 64, 64))
    assert tuple(out.shape[2:]) == m.feature_grids(frames, 64, 64)["res5"]


def test_layout_layers():
    m = _meta("c2d_r50", layout="32x2")
    assert m.stem.conv.stride == (2, 2, 2)
    assert m.stem.pool.kernel_size == (2, 3, 3) and m.stem.pool.stride == (2, 2, 2)
    assert m.pool2.kernel_size == (2, 1, 1) and m.pool2.stride == (2, 1, 1)
    m = _meta("c2d_r50")
    assert m.stem.conv.stride == (1, 2, 2) and m.stem.pool.kernel_size == (1, 3, 3)
    assert m.stem.pool.padding == (0, 1, 1) and m.head.dropout.p == 0.5
    assert m.layout == "8x8"


def test_tiny_keeps_time_at_nl_stages():
    m = create_model("tiny")
    g = m.feature_grids(8, 64, 64)
    assert g["res3"][0] >= 2 and g["res4"][0] >= 2
    assert len(m.res3.nl) + len(m.res4.nl) >= 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="c2d_r51"), "unknown model 'c2d_r51'; available: c2d_r101"),
    (dict(name="c2d_r50", layout="16x4"), "8x8, 32x2"),
    (dict(name="c2d_r50", nonlocal_blocks={"res6": [1]}), "unknown stage 'res6'"),
    (dict(name="c2d_r50", nonlocal_blocks={"res3": [4]}), r"res3 has 4 blocks \(allowed 0..3\)"),
    (dict(name="c2d_r50", nonlocal_blocks={"res3": [1, 1]}), "listed twice"),
    (dict(name="c2d_r50", instantiation="softmax"), "gaussian, embedded_gaussian"),
    (dict(name="c2d_r50", mode="spatial"), "spacetime, space, time"),
    (dict(name="c2d_r50", pool_size=(1, 2)), "3 positive integers"),
    (dict(name="c2d_r50", width=0), "positive integer"),
    (dict(name="c2d_r50", stem_pool_padding=2), "0, 1"),
])
def test_config_errors(kwargs, match):
    name = kwargs.pop("name")
    with torch.device("meta"), pytest.raises(ConfigError, match=match):
        create_model(name, **kwargs)


def test_input_validation():
    m = _meta("c2d_r50", layout="32x2")
    with pytest.raises(ConfigError, match=r"4 frames is too short .* layout 32x2 \(needs >= 7 frames\)"):
        m.check_input((1, 3, 4, 224, 224))
    m = _meta("c2d_r50", stem_pool_padding=0)
    with pytest.raises(ConfigError, match=r"4x4 is too small .*\(needs >= 5x5\)"):
        m.check_input((3, 8, 4, 4))
    with pytest.raises(ConfigError, match="expected"):
        m.check_input((1, 1, 8, 64, 64))
    m.check_input((3, 8, 5, 5))


# ---------------------------------------------------------------------------------------------------------------
# fast C2D layers are the same functions as Conv3d / BatchNorm3d
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,kernel,channels_last", [
    ((1, 2, 2), (1, 7, 7), True), ((2, 2, 2), (1, 7, 7), False), ((1, 1, 1), (1, 3, 3), True),
    ((1, 1, 1), (1, 1, 1), False), ((1, 1, 1), (3, 1, 1), True), ((2, 2, 2), (1, 3, 3), True),
])
def test_frame_conv_equals_conv3d(stride, kernel, channels_last):
    torch.manual_seed(0)
    conv = FrameConv3d(6, 5, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=True)
    x = torch.randn(2, 6, 5, 9, 11, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
    y = conv(xin)
    ref = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)
    assert conv.state_dict()["weight"].shape == (5, 6, *kernel)


@pytest.mark.parametrize("train", [True, False])
def test_frame_batchnorm_equals_batchnorm3d(train):
    torch.manual_seed(0)
    ours, ref = FrameBatchNorm3d(6), torch.nn.BatchNorm3d(6)
    for bn in (ours, ref):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.running_var.fill_(2.0)
    ours.load_state_dict(ref.state_dict())
    ours.train(train), ref.train(train)
    x = torch.randn(2, 6, 3, 5, 5).contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(ours(x), ref(x.contiguous()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def _plain_conv_bn(conv, bn, x, *, residual=None, relu=False, relu_mask=False):
    """conv_bn with the plain module calls: no BN folding, nothing in place."""
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def test_model_matches_plain_conv3d_reference():
    """The whole C2D (folded layout) equals the same network run with plain Conv3d/BatchNorm3d calls."""
    torch.manual_seed(0)
    model = create_model("c2d_r18_nl5", width=8).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        fast = model(x)
        import nlvid.models.resnet3d as r

        orig_conv, orig_bn, orig_conv_bn = r.FrameConv3d.forward, r.FrameBatchNorm3d.forward, r.conv_bn
        try:
            r.FrameConv3d.forward = torch.nn.Conv3d.forward
            r.FrameBatchNorm3d.forward = torch.nn.BatchNorm3d.forward
            r.conv_bn = _plain_conv_bn  # no BN folding, nothing in place either
            slow = model(x.contiguous())
        finally:
            r.FrameConv3d.forward, r.FrameBatchNorm3d.forward, r.conv_bn = orig_conv, orig_bn, orig_conv_bn
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# counts vs the paper (Table 2e, MMAction2 zoo); on the meta device, so cheap
# ---------------------------------------------------------------------------------------------------------------


def _count(name: str, layout: str = "32x2", frames: int = 32) -> tuple[float, float]:
    s = summarize(_meta(name, layout=layout), (3, frames, 224, 224))
    return s["params"], s["macs"]


def test_counts_reproduce_the_paper():
    p, m = _count("c2d_r101")
    assert abs(p / 43.2e6 - 1) < 0.04 and abs(m / 34.2e9 - 1) < 0.04, (p, m)
    for name, (rp, rm) in {"i3d333_r101": (1.5, 1.8), "i3d_r101": (1.2, 1.5), "c2d_r101_nl5": (1.2, 1.2)}.items():
        p2, m2 = _count(name)
        assert abs(p2 / p - rp) < 0.05 and abs(m2 / m - rm) < 0.05, (name, p2 / p, m2 / m)
    p3, m3 = _count("c2d_r50_nl5")  # "5-block R50 has ~70% params and ~80% FLOPs of the R101 baseline"
    assert abs(p3 / p - 0.7) < 0.05 and abs(m3 / m - 0.8) < 0.05
    p4, _ = _count("i3d_r50_nl5")
    assert abs(p4 / 35.4e6 - 1) < 0.01
    assert abs(_count("i3d_r50")[0] / 28.0e6 - 1) < 0.01


def test_summary_fields():
    s = summarize(create_model("tiny"), (3, 8, 64, 64))
    assert isinstance(s["params"], int) and isinstance(s["macs"], int) and s["macs"] > 0
    assert [st["name"] for st in s["stages"]] == ["stem", "res2", "pool2", "res3", "res4", "res5", "head"]
    assert s["stages"][-2]["output"] == [128, 4, 2, 2]
    assert sum(st["params"] for st in s["stages"]) == s["params"]
    assert [n["name"] for n in s["nonlocal"]] == ["res3.nl.0", "res4.nl.0"]
    n = s["nonlocal"][0]
    assert n["queries"] == 4 * 8 * 8 and n["keys"] == 4 * 4 * 4 and n["attention_bytes"] == n["queries"] * n["keys"] * 4
    space = summarize(create_model("tiny", mode="space"), (3, 8, 64, 64))["nonlocal"][0]
    assert space["keys"] == 16 and space["mode"] == "space"
    s8 = summarize(_meta("c2d_r50"), (3, 8, 224, 224))  # pytorchvideo's c2d_r50 counts 19.49 G here
    assert abs(s8["macs"] / 19.49e9 - 1) < 0.01


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------


def _random_torchvision(depth: int):
    torch.manual_seed(1)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    for mod in tv.modules():  # non-trivial BN so that a mistake in the BN mapping shows
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1), mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5), mod.bias.data.uniform_(-0.1, 0.1)
    return tv


def _tv_features(tv, img):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(img))))
    return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


@pytest.mark.parametrize("name,depth,layout", [("c2d_r50_nl5", 50, "8x8"), ("c2d_r18_nl10", 18, "32x2")])
def test_inflated_c2d_on_static_clip_equals_2d_network(name, depth, layout):
    tv = _random_torchvision(depth)
    model = create_model(name, layout=layout).eval()
    report = inflate_torchvision(model, tv.state_dict())
    assert report["skipped"] == ["fc.weight", "fc.bias"]
    assert all(".nl." in k or k.startswith("head.") for k in report["kept_init"])
    img = torch.randn(1, 3, 64, 64)
    clip = img.unsqueeze(2).repeat(1, 1, 8 if layout == "8x8" else 16, 1, 1)  # a static clip
    with torch.no_grad():
        ref = _tv_features(tv, img)
        feat = model.forward_features(clip)
    for t in range(feat.shape[2]):
        torch.testing.assert_close(feat[:, :, t], ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item() * 1e-2)


def test_inflated_i3d_kernels_sum_to_2d():
    tv = _random_torchvision(50)
    model = create_model("i3d333_r50_nl1")
    report = inflate_torchvision(model, tv.state_dict())
    assert len(report["inflated"]) == 1 + 3 + 2 + 3 + 1
    sd, tvs = model.state_dict(), tv.state_dict()
    torch.testing.assert_close(sd["stem.conv.weight"].sum(2), tvs["conv1.weight"])
    w = sd["res2.blocks.0.conv2.weight"]
    assert w.shape[2] == 3
    torch.testing.assert_close(w[:, :, 0], w[:, :, 2])
    torch.testing.assert_close(w.sum(2), tvs["layer1.0.conv2.weight"])


def test_inflation_refuses_the_wrong_depth():
    with pytest.raises(CheckpointError, match="ResNet-50 model: .* not covered"):
        inflate_torchvision(create_model("c2d_r50", width=64), torchvision.models.resnet18(weights=None).state_dict())


def test_load_state_dict_checked_lists_problems():
    model = create_model("tiny")
    sd = model.state_dict()
    sd.pop("stem.conv.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["head.fc.weight"] = torch.zeros(3, 128)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_checked(model, sd)
    msg = str(err.value)
    assert "1 missing (stem.conv.weight)" in msg and "1 unexpected (extra.weight)" in msg
    assert "1 with a different shape (head.fc.weight (3, 128) vs model (400, 128))" in msg
    assert "\n" not in msg
    good = create_model("tiny")
    load_state_dict_checked(model, good.state_dict())
    torch.testing.assert_close(model.stem.conv.weight, good.stem.conv.weight)


def test_eval_bn_folding_equals_plain_bn_and_follows_weight_changes():
    """Under no_grad in eval mode the backbone folds BN into the convs (cached); the result must equal the plain
    conv -> BN path, and a change of any weight or statistic must be seen (no stale cache)."""
    torch.manual_seed(0)
    m = create_model("c2d_r18", num_classes=5, nonlocal_blocks={}, width=8)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    m.eval()
    x = torch.randn(2, 3, 8, 32, 32)
    plain = m(x)  # autograd on: the unfolded path
    with torch.no_grad():
        folded = m(x)
        assert torch.allclose(folded, plain, atol=1e-5, rtol=1e-5)
        m.res2.blocks[0].bn1.running_var.mul_(3.0)  # in place: the cache must notice
        m.stem.conv.weight.add_(0.01)
        changed = m(x)
    assert torch.allclose(changed, m(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, folded, atol=1e-4)
    m.train()
    with torch.no_grad():
        m(x)  # training mode: plain BN with batch statistics, running stats updated


# ---------------------------------------------------------------------------------------------------------------
# the Global Context block (GCNet) as an instantiation of the NL family
# ---------------------------------------------------------------------------------------------------------------


def test_global_context_model_identity_at_init_and_trains():
    torch.manual_seed(0)
    gc = create_model("c2d_r18_nl5", width=8, instantiation="global_context").eval()
    base = create_model("c2d_r18", width=8).eval()
    load_state_dict_checked(base, {k: v for k, v in gc.state_dict().items() if ".nl." not in k})
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gc(x), base(x))
    gc.train()
    for mod in gc.modules():  # out is zero at init: open it so mask/g/ln learn
        if type(mod).__name__ == "NonLocalBlock":
            torch.nn.init.normal_(mod.out.weight, std=0.1)
    gc(torch.randn(2, 3, 8, 32, 32)).square().mean().backward()
    for pname, p in gc.named_parameters():
        if ".nl." in pname and pname.endswith(".weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_global_context_counts():
    """params C + C'(C + 1) + 2C' + C(C' + 1) with C' = C/4; MACs: the mask (N' x C), the attention sum (N' x C),
    g and out on one vector (C C' each) per sample; NL MACs of the same place for contrast."""
    s = summarize(create_model("tiny", instantiation="global_context"), (3, 8, 64, 64))
    nl = summarize(create_model("tiny"), (3, 8, 64, 64))
    for row, nl_row in zip(s["nonlocal"], nl["nonlocal"]):
        C, t, h, w = row["input"]
        Ci = C // 4
        n_keys = t * (h // 2) * (w // 2)
        assert row["params"] == (C + 1) + Ci * (C + 1) + 2 * Ci + C * (Ci + 1), row
        assert row["macs"] == 2 * n_keys * C + 2 * C * Ci, row
        assert row["attention_bytes"] == n_keys * 4  # one map per clip
        assert row["macs"] < nl_row["macs"] / 50
    assert s["params"] < nl["params"]
