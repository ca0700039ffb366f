"""The training-speed paths of the backbone (issue #17) compute exactly what plain layers compute.

- conv -> BN -> (+ residual) -> ReLU runs BN on the folded 4-D view and the add / ReLU in place on BN's own result:
  gradients, outputs and BN statistics equal a plain nn.Conv3d / nn.BatchNorm3d network, and autograd records no
  CopySlices (an in-place op on a view, the cause of the slow backward).
- FrameConv3d keeps its weight channels_last_3d: same state-dict keys, shapes and values as nn.Conv3d, contiguous
  checkpoints load, and the layout survives loading.
- inference (no grad, BN folded) equals the autograd path.
- backward adds the two gradients of every block input (conv1 + shortcut) in place, never into a fresh buffer.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import nlvid.models.resnet3d as r3d
from nlvid.models import create_model
from nlvid.models.resnet3d import FrameConv3d, ResNet3d


def _plain_conv_bn(conv, bn, x, *, residual=None, relu=False, relu_mask=False):
    """The reference: plain Conv3d and BatchNorm3d forwards, nothing in place (relu_mask changes only what
    backward keeps)."""
    y = torch.nn.BatchNorm3d.forward(bn, torch.nn.Conv3d.forward(conv, x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _small(arch: str, depth: int = 50, **kw) -> ResNet3d:
    torch.manual_seed(0)
    m = ResNet3d(depth=depth, arch=arch, width=8, stage_depths=(2, 2, 2, 2), num_classes=7, dropout=0.0,
                 nonlocal_blocks={"res3": [1], "res4": [0]}, **kw)
    for mod in m.modules():  # non-trivial BN and NL so every path carries signal
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m


def _grads(model, x, y, plain: bool):
    model.zero_grad(set_to_none=True)
    xin = x.clone().requires_grad_()
    if plain:
        saved = r3d.conv_bn
        r3d.conv_bn = _plain_conv_bn
        try:
            out = model(xin.contiguous())
        finally:
            r3d.conv_bn = saved
    else:
        out = model(xin)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return out.detach(), xin.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,depth", [("i3d", 50), ("c2d", 50), ("i3d", 18)])
def test_training_step_equals_plain_layers(arch, depth):
    fast = _small(arch, depth).train()
    ref = copy.deepcopy(fast)
    for mod in ref.modules():
        if type(mod).__name__ == "NonLocalBlock":
            mod.impl = "explicit"
    x = torch.randn(2, 3, 8, 32, 32)
    y = torch.tensor([1, 5])
    out_f, gx_f, g_f = _grads(fast, x, y, plain=False)
    out_r, gx_r, g_r = _grads(ref, x, y, plain=True)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-3, atol=1e-4 * gx_r.abs().max().item())
    assert g_f.keys() == g_r.keys()
    # fp32 summation orders differ; some gradients are exactly zero in exact arithmetic (phi / g / out biases of an
    # NL block: a softmax row shift, a constant before train-mode BN), so the floor is relative to the largest one
    floor = 1e-5 * max(g.abs().max().item() for g in g_r.values())
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-3,
                                   atol=max(1e-4 * g_r[name].abs().max().item(), floor), msg=name)
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        # BN statistics updated alike (fp32 rounding of the batch means: relative to the buffer's scale)
        atol = 1e-6 + 1e-5 * b.abs().max().item() if b.is_floating_point() else 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_no_inplace_on_views_in_the_training_graph():
    """The cause of the slow training step: in-place ReLU / add on the 5-D view of a folded result became
    CopySlices + AsStridedBackward nodes (full-size clones, zero fills and copies in backward)."""
    m = create_model("i3d_r50_nl5", width=8, num_classes=5).train()
    names = _graph_names(m(torch.randn(2, 3, 8, 32, 32)).sum())
    assert "CopySlices" not in names and not any(n.startswith("AsStridedBackward") for n in names), names
    assert "ConvolutionBackward0" in names and "NativeBatchNormBackward0" in names


def test_block_input_is_not_modified():
    """The residual add goes into BN's output, never into the block input (a view shared with the caller)."""
    m = _small("i3d").train()
    block = m.res3.blocks[1]
    x = torch.randn(2, m.stage_dims[1], 4, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    before = x.clone()
    block(x).sum().backward()
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_frame_conv_weight_layout_and_state_dict():
    conv = FrameConv3d(4, 6, (3, 3, 3), padding=1, bias=False)
    plain = torch.nn.Conv3d(4, 6, (3, 3, 3), padding=1, bias=False)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    assert conv.state_dict()["weight"].shape == plain.state_dict()["weight"].shape
    conv.load_state_dict(plain.state_dict())  # a contiguous checkpoint loads, values equal, layout kept
    torch.testing.assert_close(conv.weight, plain.weight, rtol=0, atol=0)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 4, 5, 7, 7)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-4, atol=1e-5)
    buf = io.BytesIO()  # and a checkpoint written from it loads into a plain Conv3d with the same values
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    fresh = torch.nn.Conv3d(4, 6, (3, 3, 3), padding=1, bias=False)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh.weight, conv.weight, rtol=0, atol=0)


def test_whole_model_state_dict_matches_a_plain_build():
    m = create_model("i3d_r50_nl5", width=8, num_classes=5)
    sd = m.state_dict()
    other = create_model("i3d_r50_nl5", width=8, num_classes=5)
    contiguous = {k: v.contiguous() for k, v in sd.items()}
    other.load_state_dict(contiguous)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    # gradients land in the parameters' own layout (no per-step layout conversion by AccumulateGrad)
    m.train()
    m(torch.randn(2, 3, 8, 32, 32)).sum().backward()
    w = m.res2.blocks[0].conv2.weight
    assert w.grad is not None and w.grad.stride() == w.stride()


@pytest.mark.parametrize("arch", ["i3d", "c2d"])
def test_inference_equals_the_autograd_path(arch):
    """Eval mode: no_grad (BN folded into the convs, in-place joins) equals the grad-enabled path."""
    m = _small(arch).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 32, 32)
    with_grad = m(x)
    with torch.no_grad():
        no_grad = m(x)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-4, atol=1e-5)


def test_a_seed_gives_the_same_initial_weights_whatever_the_layout():
    """Kaiming init draws in the contiguous order, so the channels-last weight holds what a plain Conv3d would
    (runs and experiments with a fixed seed start from the same weights as before the layout change)."""
    conv = FrameConv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=False)
    plain = torch.nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=False)
    torch.manual_seed(3)
    r3d._init_conv_bn(conv)
    torch.manual_seed(3)
    r3d._init_conv_bn(plain)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv.weight, plain.weight, rtol=0, atol=0)


def test_training_forward_has_no_graph_breaks_under_torch_compile():
    """train.compile: the in-place join must not ask `_is_view` while dynamo traces (a graph break per block,
    which sent the compiled training step into dynamic-shape recompiles that inductor failed on)."""
    m = create_model("tiny", num_classes=3).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(torch.randn(2, 3, 8, 32, 32))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("arch", ["c2d", "i3d"])
def test_block_inputs_accumulate_their_gradients_in_place(arch, two_threads):
    """early_shortcut + unfolded 1x1x1 convs: no out-of-place aten::add on an activation in backward (each was a
    fresh (B, C, T, H, W) buffer per block and step), and the in-place adds do happen."""
    from torch.profiler import ProfilerActivity, profile

    m = _small(arch).train()  # two threads: 1x1x1 convs run unfolded only where torch gives them to oneDNN
    loss = m(torch.randn(2, 3, 8, 32, 32)).square().sum()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()

    def activation_adds(op):  # 5-D tensors of batch 2: activations (weights' first dim is a channel count >= 8)
        return [e.input_shapes[0] for e in prof.key_averages(group_by_input_shape=True)
                if e.key == op and len(e.input_shapes[0]) == 5 and e.input_shapes[0][0] == 2]

    assert activation_adds("aten::add") == []
    assert len(activation_adds("aten::add_")) >= 3
