"""Activation checkpointing (train.checkpoint: off | nonlocal | stages): the same gradients, the same BN running
statistics (updated once per step, not again by the recomputation), less memory kept for backward, inference
untouched, and a training run whose weights do not depend on the setting."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nlvid.models.resnet3d as resnet3d
from nlvid.checkpoint import load_checkpoint
from nlvid.config import load_config
from nlvid.engine.train import RESUME_MUTABLE, train
from nlvid.errors import ConfigError
from nlvid.models import create_model

from engine_settings import FAST  # tests/engine_settings.py

MODES = ("nonlocal", "stages")
# (preset, options): C2D and I3D with NL blocks (norm bn, so NL BNs are recomputed too), grouped NL, basic blocks
MODELS = {
    "tiny": ("tiny", {}),
    "c2d_nl5": ("c2d_r50_nl5", dict(width=8)),
    "i3d_nl5_grouped": ("i3d_r50_nl5", dict(width=8, nonlocal_group={"res3": 2})),
}


def _model(key: str) -> torch.nn.Module:
    name, kw = MODELS[key]
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, dropout=0.0, **kw)
    with torch.no_grad():  # NL output BN gamma is zero at init: make the NL blocks matter for the gradients
        for n, p in model.named_parameters():
            if ".nl." in n and n.endswith("bn.weight"):
                p.fill_(0.5)
    return model


def _clip(batch: int = 2, frames: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, frames, size, size, generator=g), torch.tensor([1, 3, 0, 2][:batch])


def _steps(model: torch.nn.Module, mode: str, steps: int = 1):
    """`steps` SGD steps in training mode; -> (losses, grads of the last step, params, buffers)."""
    model = copy.deepcopy(model)
    model.set_checkpointing(mode)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _clip()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return (losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("key", list(MODELS))
def test_gradients_and_bn_statistics_equal_the_plain_run(key):
    model = _model(key)
    ref_losses, ref_grads, ref_params, ref_bufs = _steps(model, "off", steps=2)
    assert len(ref_grads) == len(list(model.parameters()))  # every parameter got a gradient
    for mode in MODES:
        losses, grads, params, bufs = _steps(model, mode, steps=2)
        assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7), mode
        assert grads.keys() == ref_grads.keys()
        for n in ref_grads:
            assert torch.allclose(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6), f"{mode}: grad of {n}"
        for n in ref_params:
            assert torch.allclose(params[n], ref_params[n], rtol=1e-5, atol=1e-6), f"{mode}: {n}"
        for n in ref_bufs:  # running statistics updated exactly once per step, as without checkpointing
            assert torch.allclose(bufs[n].double(), ref_bufs[n].double(), rtol=1e-6, atol=1e-7), f"{mode}: {n}"
        counts = {int(v) for n, v in bufs.items() if n.endswith("num_batches_tracked")}
        assert counts == {2}, f"{mode}: BN statistics updated {counts} times in 2 steps"


def test_the_recomputation_alone_would_update_bn_statistics_twice(monkeypatch):
    """The guard is needed: without `_KeepBNStats` torch's non-reentrant recomputation updates BN stats again."""

    class _Nothing:
        def __init__(self, bns):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(resnet3d, "_KeepBNStats", _Nothing)
    *_, bufs = _steps(_model("tiny"), "stages")
    assert int(bufs["res2.blocks.0.bn1.num_batches_tracked"]) == 2


def _saved_bytes(model: torch.nn.Module, mode: str, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps from the forward pass for backward (checkpointed
    segments keep only their inputs): a deterministic measure of activation memory, no wall-clock involved."""
    model = copy.deepcopy(model)
    model.set_checkpointing(mode)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    total = sum(seen.values())
    loss.backward()  # the checkpointed graph still runs backward
    return total


def test_checkpointing_keeps_less_for_backward():
    torch.manual_seed(0)
    model = create_model("i3d_r50_nl5", num_classes=5, width=8)
    x = torch.randn(1, 3, 16, 64, 64)
    off, nl, stages = (_saved_bytes(model, m, x) for m in ("off", "nonlocal", "stages"))
    assert nl < off
    assert stages < 0.3 * off, (off, nl, stages)


def test_inference_is_unchanged_and_not_checkpointed(monkeypatch):
    model = _model("i3d_nl5_grouped").eval()
    x, _ = _clip()
    with torch.no_grad():
        ref = model(x)

    def fail(*a, **k):
        raise AssertionError("checkpoint() called outside training")

    monkeypatch.setattr(resnet3d, "_checkpoint", fail)
    for mode in ("off", *MODES):
        model.set_checkpointing(mode)
        with torch.no_grad():
            assert torch.equal(model(x), ref)
        assert torch.allclose(model(x), ref, atol=1e-5)  # eval mode with autograd on (BN not folded): not either
        with torch.no_grad():
            copy.deepcopy(model).train()(x)  # training mode without autograd (e.g. precise BN): not either


def test_bad_mode_is_a_one_line_error():
    model = create_model("tiny", num_classes=3)
    with pytest.raises(ConfigError, match="checkpoint 'all' is not one of off, nonlocal, stages"):
        model.set_checkpointing("all")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["train.checkpoint=everything"])
    assert str(e.value) == "config key 'train.checkpoint': 'everything' is not one of off, nonlocal, stages"
    assert "\n" not in str(e.value)


def test_config_values_and_yaml_off(tmp_path):
    assert load_config("tiny").train.checkpoint == "off"
    assert load_config("tiny", ["train.checkpoint=off"]).train.checkpoint == "off"  # YAML reads `off` as false
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  checkpoint: off\n")
    assert load_config(path).train.checkpoint == "off"
    path.write_text("train:\n  checkpoint: stages\n")
    cfg = load_config(path)
    assert cfg.train.checkpoint == "stages"
    assert "checkpoint: stages" in cfg.to_yaml()
    assert "train.checkpoint" in RESUME_MUTABLE


def test_training_run_does_not_depend_on_the_setting(synthetic_data, tmp_path):
    """The engine sets the mode from train.checkpoint; the weights after the run are the same either way."""
    weights = {}
    for mode in ("off", "stages"):
        cfg = load_config("tiny", FAST + ["train.epochs=1", "train.batch_size=6", "model.dropout=0.0",
                                          f"train.checkpoint={mode}"])
        res = train(cfg, data=synthetic_data / "train", out=tmp_path / mode, progress=None)
        ckpt = load_checkpoint(res["last_path"])
        assert ckpt["config"]["train"]["checkpoint"] == mode
        weights[mode] = ckpt["model"]
    for k, v in weights["off"].items():
        assert torch.allclose(weights["stages"][k].double(), v.double(), rtol=1e-5, atol=1e-6), k


def test_checkpointing_with_compile_is_a_config_error(tmp_path):
    cfg = load_config("tiny", FAST + ["train.compile=true", "train.checkpoint=stages"])
    with pytest.raises(ConfigError, match="train.checkpoint=stages does not work with train.compile"):
        train(cfg, data=tmp_path / "unused", out=tmp_path / "run", progress=None)


@pytest.mark.parametrize("shape", [(4, 16, 5, 5), (8, 32, 1, 1)])
def test_mask_relu_is_torch_relu_keeping_a_bool_mask(shape):
    """The block-output ReLU under stage checkpointing keeps `result > 0` (1 byte per value), and its gradient is
    torch's ReLU gradient to the bit and in the same memory layout (on 1x1 maps, whose strides are ambiguous, a
    layout following the incoming gradient changed the next kernels' rounding)."""
    torch.manual_seed(0)
    z0 = torch.randn(*shape)  # on a 1x1 map: strides (C, 1, 1, 1), as BN's output there
    N, C, H, W = shape
    # a channels-last gradient with the strides channels-last conv backward gives, (C, 1, C, C) on a 1x1 map
    grad = torch.empty_strided(shape, (H * W * C, 1, W * C, C)).copy_(torch.randn(*shape))
    got, want, packed = [], [], []
    z = z0.clone().requires_grad_()
    z.register_hook(got.append)  # the gradient as the op returns it, before accumulation into .grad
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = resnet3d._ReLUKeepMask.apply(z, False)
    out.backward(grad)
    ref_z = z0.clone().requires_grad_()
    ref_z.register_hook(want.append)
    ref = torch.relu(ref_z)
    ref.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(got[0], want[0]) and got[0].stride() == want[0].stride()
    assert [t.dtype for t in packed] == [torch.bool]
