"""Weight import/export: every format, from files written format-exactly by tests/fixtures_convert.py from nlvid
models whose outputs we know; the importer must pick the source's options to reproduce those outputs."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_convert import (
    caffe2_blobs,
    clip,
    mmaction2_state,
    pyslowfast_state,
    small_model,
    write_caffe2_pkl,
    write_mmaction2_pth,
    write_pyslowfast_pyth,
    _Py2Pickle,
)
from nlvid.config import ModelConfig, model_kwargs
from nlvid.errors import CheckpointError, ConfigError
from nlvid.models import create_model
from nlvid.models.convert import (
    BN_EPS,
    CAFFE2_RULES,
    EXPORTERS,
    IMPORTERS,
    MMACTION2_RULES,
    PYSLOWFAST_RULES,
    ImportResult,
    kinetics400_classes,
    read_caffe2_pickle,
)
from nlvid.models.weights import build_with_init, load_state_dict_checked

TOL = 1e-5


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _import_and_run(fmt: str, path: Path, cfg: ModelConfig, x: torch.Tensor):
    model, new_cfg, classes, report = build_with_init(cfg, f"{fmt}={path}")
    return _out(model, x), new_cfg, classes, report


def _assert_same_state(sd, model, ignore=()):
    own = model.state_dict()
    assert set(sd) == set(own)
    for k, v in own.items():
        if not k.endswith(ignore):
            assert torch.equal(sd[k], v), k


def _with_options(state, cfg: ModelConfig, x, **changes):
    """Output of the same weights in a model built with other NL/stem options (to show the options matter)."""
    import dataclasses

    m = create_model(cfg.name, **model_kwargs(dataclasses.replace(cfg, **changes)))
    load_state_dict_checked(m, state)
    return _out(m, x)


# ----------------------------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------------------------


def test_kinetics400_classes_official_order():
    names = kinetics400_classes()
    assert len(names) == 400 and len(set(names)) == 400
    assert names == sorted(names)  # the official ids are the alphabetical order of the label names
    assert names[:3] == ["abseiling", "air drumming", "answering questions"]
    assert names[-1] == "zumba"
    assert names[208:210] == ["passing American football (in game)", "passing American football (not in game)"]
    assert names[196] == "massaging person's head"


# ----------------------------------------------------------------------------------------------------------------
# Rule tables
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules,src,dst", [
    (CAFFE2_RULES, "res_conv1_bn_riv", "stem.bn.running_var"),
    (CAFFE2_RULES, "res4_5_branch2c_bn_rm", "res4.blocks.5.bn3.running_mean"),
    (CAFFE2_RULES, "res3_0_branch1_w", "res3.blocks.0.downsample.0.weight"),
    (CAFFE2_RULES, "nonlocal_conv4_5_theta_b", "res4.nl.5.theta.bias"),
    (CAFFE2_RULES, "nonlocal_conv3_1_bn_s", "res3.nl.1.bn.weight"),
    (PYSLOWFAST_RULES, "s4.pathway0_res13.branch2.b_bn.running_var", "res4.blocks.13.bn2.running_var"),
    (PYSLOWFAST_RULES, "s3.pathway0_nonlocal3.conv_g.weight", "res3.nl.3.g.weight"),
    (MMACTION2_RULES, "backbone.layer3.5.non_local_block.phi.0.conv.bias", "res4.nl.5.phi.bias"),
    (MMACTION2_RULES, "backbone.layer1.0.downsample.bn.num_batches_tracked",
     "res2.blocks.0.downsample.1.num_batches_tracked"),
])
def test_rules_translate_both_ways(rules, src, dst):
    got = [r.to_nlvid(src) for r in rules if r.to_nlvid(src)]
    assert got == [dst]
    back = next(r.to_source(dst) for r in rules if r.to_source(dst))
    assert back == src


# ----------------------------------------------------------------------------------------------------------------
# PySlowFast
# ----------------------------------------------------------------------------------------------------------------


def test_pyslowfast_pyth_reproduces_outputs(tmp_path):
    ref = small_model("i3d_r50_nl5")  # PySlowFast geometry: 8x8, stem pool padding 1, pool before phi/g, scale on
    x = clip(4, 32)
    path = write_pyslowfast_pyth(ref, tmp_path / "I3D_NLN_8x8_R50.pyth")
    out, cfg, classes, report = _import_and_run("pyslowfast", path, ModelConfig(name="i3d_r50_nl5"), x)
    assert _max_diff(out, _out(ref, x)) <= TOL
    got = (cfg.pool_position, cfg.scale, cfg.stem_pool_padding, cfg.layout, cfg.norm)
    assert got == ("input", True, 1, "8x8", "bn")
    assert cfg.width == 8 and cfg.nonlocal_blocks == {"res3": [1, 3], "res4": [1, 3, 5]}
    assert classes == kinetics400_classes()
    assert any("mapped 385 tensors" in line for line in report)


def test_pyslowfast_caffe2_format_pkl(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=3)
    path = write_caffe2_pkl(ref, tmp_path / "I3D_NLN_8x8_R50.pkl")
    res = IMPORTERS["pyslowfast"](path, ModelConfig(name="i3d_r50_nl5"))
    assert (res.model_cfg.stem_pool_padding, res.model_cfg.pool_position, res.model_cfg.layout) == (1, "input", "8x8")
    _assert_same_state(res.state_dict, ref, ignore=("num_batches_tracked",))  # Caffe2 files do not count batches
    assert res.classes is not None


def test_pyslowfast_c2d_baseline_without_nl(tmp_path):
    ref = small_model("c2d_r50", seed=4, num_classes=7)
    path = write_pyslowfast_pyth(ref, tmp_path / "c2d.pyth")
    res = IMPORTERS["pyslowfast"](path, ModelConfig(name="c2d_r50_nl5"))
    assert res.model_cfg.nonlocal_blocks == {} and res.model_cfg.num_classes == 7 and res.classes is None
    _assert_same_state(res.state_dict, ref)


# ----------------------------------------------------------------------------------------------------------------
# Caffe2 (video-nonlocal-net)
# ----------------------------------------------------------------------------------------------------------------


def test_caffe2_pkl_reproduces_outputs_and_options_matter(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=5, stem_pool_padding=0)  # official pool1: no padding (55x55)
    x = clip(4, 32)
    path = write_caffe2_pkl(ref, tmp_path / "i3d_nonlocal_8x8_IN_pretrain_400k.pkl")
    res = IMPORTERS["caffe2"](path, ModelConfig(name="i3d_r50_nl5"))
    assert isinstance(res, ImportResult)
    assert (res.model_cfg.stem_pool_padding, res.model_cfg.layout, res.model_cfg.pool_position) == (0, "8x8", "input")
    assert any("skipped" in line and "_momentum" in line for line in res.report)
    out, _, _, _ = _import_and_run("caffe2", path, ModelConfig(name="i3d_r50_nl5"), x)
    assert _max_diff(out, _out(ref, x)) <= TOL
    # the test can fail: the same weights with PySlowFast's padding or without the softmax scale compute otherwise
    assert _max_diff(_with_options(res.state_dict, res.model_cfg, x, stem_pool_padding=1), out) > 1e-3
    assert _max_diff(_with_options(res.state_dict, res.model_cfg, x, scale=False), out) > 1e-4


def test_caffe2_frozen_bn_32x2_without_nl_bn(tmp_path):
    # The official 128x1 model runs its res3 NL blocks on 4 groups of frames; the import sets that option.
    ref = small_model("i3d_r50_nl5", seed=6, layout="32x2", stem_pool_padding=0, norm="none",
                      nonlocal_group={"res3": 4})
    x = clip(128, 32)
    path = write_caffe2_pkl(ref, tmp_path / "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl", frozen_bn=True)
    assert not any(k.endswith("_rm") for k in read_caffe2_pickle(path))
    out, cfg, _, report = _import_and_run("caffe2", path, ModelConfig(name="i3d_r50_nl5"), x)
    assert (cfg.layout, cfg.norm, cfg.stem_pool_padding) == ("32x2", "none", 0)
    assert cfg.nonlocal_group == {"res3": 4}
    assert _max_diff(out, _out(ref, x)) <= TOL
    assert any("frozen-BN" in line for line in report)


def test_frozen_bn_as_batchnorm_is_exactly_affine():
    s = torch.randn(16)
    b = torch.randn(16)
    bn = torch.nn.BatchNorm3d(16, eps=BN_EPS).eval()
    with torch.no_grad():
        bn.weight.copy_(s)
        bn.bias.copy_(b)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - BN_EPS)
    assert torch.sqrt(bn.running_var + BN_EPS).eq(1.0).all()
    x = torch.randn(2, 16, 2, 3, 3)
    with torch.no_grad():
        y = bn(x)
    ref = x * s.view(1, -1, 1, 1, 1) + b.view(1, -1, 1, 1, 1)
    assert _max_diff(y, ref) <= 1e-6


def test_caffe2_wrong_architecture_says_which_preset(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=7, stem_pool_padding=0)
    path = write_caffe2_pkl(ref, tmp_path / "i3d_nonlocal_8x8_IN_pretrain_400k.pkl", momentum=False)
    with pytest.raises(CheckpointError, match=r"i3d_r50_nl5"):
        IMPORTERS["caffe2"](path, ModelConfig(name="c2d_r50_nl5"))


def test_caffe2_unknown_or_missing_blob_is_an_error(tmp_path):
    ref = small_model("c2d_r50_nl5", seed=8, stem_pool_padding=0)
    blobs = caffe2_blobs(ref, momentum=False)
    extra = dict(blobs, res3_1_branch2d_w=np.zeros((2, 2, 1, 1, 1), np.float32))
    p1 = tmp_path / "extra.pkl"
    p1.write_bytes(_Py2Pickle().dump(extra))
    with pytest.raises(CheckpointError, match="res3_1_branch2d_w"):
        IMPORTERS["caffe2"](p1, ModelConfig(name="c2d_r50_nl5"))
    missing = {k: v for k, v in blobs.items() if k != "res4_2_branch2b_w"}
    p2 = tmp_path / "missing.pkl"
    p2.write_bytes(_Py2Pickle().dump(missing))
    with pytest.raises(CheckpointError, match=r"res4\.blocks\.2\.conv2\.weight"):
        IMPORTERS["caffe2"](p2, ModelConfig(name="c2d_r50_nl5"))
    p3 = tmp_path / "truncated.pkl"
    p3.write_bytes(p1.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pkl"):
        IMPORTERS["caffe2"](p3, ModelConfig(name="c2d_r50_nl5"))


# ----------------------------------------------------------------------------------------------------------------
# MMAction2
# ----------------------------------------------------------------------------------------------------------------


def _mmaction2_reference(seed: int, **kwargs):
    from nlvid.models.convert import _mmaction2_layout

    layout = _mmaction2_layout() or "32x2"
    ref = small_model("i3d_r50_nl5", seed=seed, layout=layout, stem_pool_padding=1, pool_position="after",
                      scale=False, **kwargs)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("out.bias"):
                p.zero_()  # mmcv's conv_out (ConvModule with a norm) has no bias
    return ref


def test_mmaction2_pth_picks_pool_after_and_no_scale(tmp_path):
    ref = _mmaction2_reference(9)
    x = clip(8, 32)
    name = "i3d_nl_embedded_gaussian_r50_32x2x1_100e_kinetics400_rgb_20200813-6e6aef1b.pth"
    path = write_mmaction2_pth(ref, tmp_path / name)
    res = IMPORTERS["mmaction2"](path, ModelConfig(name="i3d_r50_nl5"))
    cfg = res.model_cfg
    assert (cfg.pool_position, cfg.scale, cfg.instantiation, cfg.norm) == ("after", False, "embedded_gaussian", "bn")
    assert any("no bias" in line for line in res.report)
    out, _, classes, _ = _import_and_run("mmaction2", path, ModelConfig(name="i3d_r50_nl5"), x)
    assert _max_diff(out, _out(ref, x)) <= TOL
    assert classes == kinetics400_classes()
    # the test can fail: PySlowFast-style options on the same weights compute something else
    assert _max_diff(_with_options(res.state_dict, cfg, x, pool_position="input"), out) > 1e-4
    assert _max_diff(_with_options(res.state_dict, cfg, x, scale=True), out) > 1e-4


@pytest.mark.parametrize("instantiation,name", [
    ("dot_product",
     "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb_20220812-8e1f2148.pth"),
    ("gaussian", "i3d_nl_gaussian_r50_32x2x1_100e_kinetics400_rgb_20200815-17f84aa2.pth"),  # told by the structure
])
def test_mmaction2_other_instantiations(tmp_path, instantiation, name):
    ref = _mmaction2_reference(10, instantiation=instantiation)
    x = clip(8, 32)
    path = write_mmaction2_pth(ref, tmp_path / name)
    out, cfg, _, _ = _import_and_run("mmaction2", path, ModelConfig(name="i3d_r50_nl5"), x)
    assert cfg.instantiation == instantiation and cfg.scale is False
    assert _max_diff(out, _out(ref, x)) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def test_export_pyslowfast_round_trip_is_exact(tmp_path):
    model = small_model("i3d_r50_nl5", seed=11)
    path = tmp_path / "out.pyth"
    report = EXPORTERS["pyslowfast"](model.state_dict(), path)
    assert report and "out.pyth" in report[0]
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model_state"}
    # names are those an independent writer spells from PySlowFast's source
    assert set(saved["model_state"]) == set(pyslowfast_state(model))
    res = IMPORTERS["pyslowfast"](path, ModelConfig(name="i3d_r50_nl5"))
    sd = model.state_dict()
    assert set(res.state_dict) == set(sd)
    for k, v in sd.items():
        assert torch.equal(res.state_dict[k], v), k


def test_export_refuses_what_pyslowfast_cannot_hold(tmp_path):
    model = small_model("c2d_r50_nl5", seed=12, instantiation="gaussian")
    with pytest.raises(CheckpointError, match=r"res3\.nl\.1 has no theta/phi: no PySlowFast equivalent"):
        EXPORTERS["pyslowfast"](model.state_dict(), tmp_path / "x.pyth")


def test_export_without_nl_bn_writes_identity_bn(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=15, norm="none")
    path = tmp_path / "frozen.pyth"
    report = EXPORTERS["pyslowfast"](ref.state_dict(), path)
    assert any("identity BN" in line for line in report)
    x = clip(4, 32)
    out, cfg, _, _ = _import_and_run("pyslowfast", path, ModelConfig(name="i3d_r50_nl5"), x)
    assert cfg.norm == "bn"
    assert _max_diff(out, _out(ref, x)) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Safety
# ----------------------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _pwned_path() -> Path:
    return Path("/tmp") / f"pwned_{uuid.uuid4().hex}"


def test_caffe2_pickle_with_code_is_refused_without_running_it(tmp_path):
    target = _pwned_path()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": _Evil(str(target))}}, protocol=2))
    for fmt in ("caffe2", "pyslowfast"):
        with pytest.raises(CheckpointError, match=r"evil\.pkl.*refused to load global (posix|os|nt)\.system"):
            IMPORTERS[fmt](path, ModelConfig(name="i3d_r50_nl5"))
    assert not target.exists()


@pytest.mark.parametrize("fmt,name,key", [("pyslowfast", "evil.pyth", "model_state"),
                                          ("mmaction2", "evil.pth", "state_dict")])
def test_torch_file_with_code_is_refused_without_running_it(tmp_path, fmt, name, key):
    target = _pwned_path()
    path = tmp_path / name
    torch.save({key: {"head.projection.weight": _Evil(str(target))}}, path)
    with pytest.raises(CheckpointError, match=rf"{name}: refused to unpickle"):
        IMPORTERS[fmt](path, ModelConfig(name="i3d_r50_nl5"))
    assert not target.exists()


def test_numpy_data_in_a_torch_file_is_accepted(tmp_path):
    ref = small_model("c2d_r50", seed=16)
    path = tmp_path / "with_numpy_meta.pth"
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.747)}, "mean": np.zeros(3, np.float32)},
                "state_dict": mmaction2_state(ref)}, path)
    res = IMPORTERS["mmaction2"](path, ModelConfig(name="c2d_r50"))
    _assert_same_state(res.state_dict, ref)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        IMPORTERS["caffe2"](tmp_path / "nope.pkl", ModelConfig(name="i3d_r50_nl5"))
    ref = small_model("c2d_r50", seed=13)
    path = write_pyslowfast_pyth(ref, tmp_path / "c2d.pyth")
    with pytest.raises(ConfigError, match="unknown model"):
        IMPORTERS["pyslowfast"](path, ModelConfig(name="resnet9000"))


def test_build_with_init_reinitialises_classifier_for_other_class_count(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=14, stem_pool_padding=0)
    path = write_caffe2_pkl(ref, tmp_path / "i3d_nonlocal_8x8_IN_pretrain_400k.pkl", momentum=False)
    model, cfg, classes, report = build_with_init(ModelConfig(name="i3d_r50_nl5"), f"caffe2={path}", num_classes=5)
    assert cfg.num_classes == 5 and classes is None
    assert torch.equal(model.res4.nl["5"].theta.weight, ref.res4.nl["5"].theta.weight)
    assert any("re-initialised" in line for line in report)
