"""Frozen BN (model.bn=frozen): the official frozen-BN ("affine") models' normalisation. Fixed statistics in train
and eval mode, trainable scale/shift, the BatchNorm3d state-dict layout, untouched by precise BN and SyncBN, set by
the import of a frozen-BN Caffe2 file, and a training run end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlvid.checkpoint import load_checkpoint
from nlvid.config import ModelConfig, load_config
from nlvid.engine.optim import recompute_bn_stats
from nlvid.engine.train import train
from nlvid.errors import ConfigError
from nlvid.models import build_with_init, create_model, load_model
from nlvid.models.resnet3d import FrameBatchNorm3d, FrozenBatchNorm3d

from engine_settings import FAST  # tests/engine_settings.py
from fixtures_convert import clip, small_model, write_caffe2_pkl  # tests/fixtures_convert.py


def _random_bn(c: int = 16, seed: int = 0) -> nn.BatchNorm3d:
    g = torch.Generator().manual_seed(seed)
    bn = FrameBatchNorm3d(c)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return bn


def _norms(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm3d)]
    return bns, frozen


def _randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif n.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def test_frozen_bn_equals_eval_mode_bn_in_any_mode_and_layout():
    bn = _random_bn()
    frozen = FrozenBatchNorm3d.from_bn(bn)
    bn.eval()
    x = torch.randn(2, 16, 3, 5, 5)
    for inp in (x, x.contiguous(memory_format=torch.channels_last_3d), x[:, :, 0]):
        for training in (True, False):
            frozen.train(training)
            y = frozen(inp)
            assert torch.allclose(y, F.batch_norm(inp, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                  False, 0.0, bn.eps), atol=1e-6)
            if inp.dim() == 5 and inp.is_contiguous(memory_format=torch.channels_last_3d):
                assert y.is_contiguous(memory_format=torch.channels_last_3d)  # the trunk stays in one layout
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen(x.bfloat16()).dtype == torch.bfloat16


def test_every_bn_of_the_model_is_frozen_and_training_mode_is_eval_mode():
    model = _randomize_stats(create_model("i3d_r50_nl5", width=8, num_classes=5, dropout=0.0, bn="frozen"))
    bns, frozen = _norms(model)
    assert not bns and frozen
    assert any(".nl." in n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm3d))  # NL bn too
    x = clip(8, 32)
    model.train()
    y_train = model(x)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)  # conv_bn folds the frozen BNs into the convs here
    assert torch.allclose(y_train, y_eval, atol=1e-5)


def test_state_dict_layout_is_batchnorms_and_values_carry_over():
    plain = _randomize_stats(create_model("tiny", num_classes=5, dropout=0.0)).eval()
    frozen = create_model("tiny", num_classes=5, dropout=0.0, bn="frozen").eval()
    a, b = plain.state_dict(), frozen.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    frozen.load_state_dict(a)
    x = clip(8, 32)
    with torch.no_grad():
        assert torch.allclose(frozen(x), plain(x), atol=1e-5)
    plain.load_state_dict(frozen.state_dict())  # and back


def test_a_training_step_keeps_the_statistics_and_trains_scale_and_shift():
    model = _randomize_stats(create_model("tiny", num_classes=4, dropout=0.0, bn="frozen")).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = clip(8, 32), torch.tensor([0, 1])
    x = torch.cat([x, x.flip(-1)])[:2]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n  # statistics and num_batches_tracked never move
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, params[n])]
    assert "stem.bn.weight" in changed and "res2.blocks.0.bn1.bias" in changed  # scale/shift are learned


def test_precise_bn_and_sync_bn_leave_frozen_bn_alone():
    model = _randomize_stats(create_model("tiny", num_classes=4, bn="frozen"))
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert recompute_bn_stats(model, [(clip(8, 32),)], num_batches=1, device=torch.device("cpu")) == 0
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    for n, b in converted.named_buffers():
        assert torch.equal(b, before[n]), n


def test_frozen_bn_with_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    base = _randomize_stats(create_model("i3d_r50_nl5", width=8, num_classes=5, dropout=0.0, bn="frozen"))
    x, y = clip(8, 32), torch.tensor([1])
    grads = {}
    for mode in ("off", "stages", "nonlocal"):
        m = copy.deepcopy(base)
        m.set_checkpointing(mode)
        m.train()
        F.cross_entropy(m(x), y).backward()
        grads[mode] = {n: p.grad for n, p in m.named_parameters()}
    for mode in ("stages", "nonlocal"):
        for n, g in grads["off"].items():
            assert torch.allclose(grads[mode][n], g, rtol=1e-5, atol=1e-6), (mode, n)


def test_bad_value_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["model.bn=affine"])
    assert str(e.value) == "config key 'model.bn': 'affine' is not one of bn, frozen"
    with pytest.raises(ConfigError, match="model.bn: 'affine' is not one of bn, frozen"):
        create_model("tiny", bn="affine")
    assert load_config("tiny").model.bn is None  # None: the preset's BatchNorm
    assert load_config("tiny", ["model.bn=frozen"]).model.bn == "frozen"


def test_importing_a_frozen_bn_caffe2_file_sets_model_bn_frozen(tmp_path):
    ref = small_model("i3d_r50_nl5", seed=6, layout="32x2", stem_pool_padding=0, norm="none",
                      nonlocal_group={"res3": 4})
    path = write_caffe2_pkl(ref, tmp_path / "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl", frozen_bn=True)
    model, cfg, _, report = build_with_init(ModelConfig(name="i3d_r50_nl5"), f"caffe2={path}")
    assert cfg.bn == "frozen"
    assert any(line.startswith("model.bn: frozen") for line in report)
    bns, frozen = _norms(model)
    assert not bns and frozen
    x = clip(128, 32)
    model.train()  # frozen: training mode computes what the source computes
    model.head.eval()  # (but for the head's dropout)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4)
    # an explicit model.bn is kept (and said)
    _, cfg2, _, report2 = build_with_init(ModelConfig(name="i3d_r50_nl5", bn="bn"), f"caffe2={path}")
    assert cfg2.bn == "bn" and any("keeping model.bn='bn'" in line for line in report2)


def test_training_run_with_frozen_bn_end_to_end(synthetic_data, tmp_path):
    cfg = load_config("tiny", FAST + ["train.epochs=1", "train.batch_size=6", "model.dropout=0.0", "model.bn=frozen",
                                      "train.precise_bn_batches=1"])
    res = train(cfg, data=synthetic_data / "train", out=tmp_path / "run", progress=None)
    ckpt = load_checkpoint(res["last_path"])
    assert ckpt["config"]["model"]["bn"] == "frozen"
    state = ckpt["model"]
    stats = {k: v for k, v in state.items() if "running_" in k or "num_batches" in k}
    assert stats and all(torch.equal(v, torch.zeros_like(v)) for k, v in stats.items() if "running_mean" in k)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in stats.items() if "running_var" in k)
    assert all(int(v) == 0 for k, v in stats.items() if "num_batches" in k)
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith("bn1.weight"))
    # the checkpoint reloads as a frozen-BN model and predicts what a BatchNorm model in eval mode with the same
    # weights predicts (and the same in training mode: frozen statistics)
    model, _, loaded_cfg = load_model(res["last_path"])
    assert loaded_cfg.model.bn == "frozen" and not _norms(model)[0]
    plain = create_model("tiny", num_classes=model.num_classes, dropout=0.0)
    plain.load_state_dict(state)
    plain.eval()
    x = clip(8, 32)
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(y, plain(x), atol=1e-5)
        model.train()
        assert torch.allclose(model(x), y, atol=1e-5)
