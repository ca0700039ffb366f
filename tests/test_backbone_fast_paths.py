"""Two CPU fast paths of the backbone (nlvid.models.resnet3d) compute what the plain layers compute.

- I3D's temporal (kt, 1, 1) convs take their weight gradient one tap at a time (`temporal_conv_weight_grad` in
  nlvid.models.onednn, `_TapWeightGrad`): the gradients equal a float64 conv3d's, the path is taken where it is
  meant to be and nowhere else, the block input still adds its two gradients in place, and stage checkpointing
  recomputes through it to the same gradients.
- pool2 without autograd is the maximum of even and odd frames (`FramePairMaxPool3d`): max_pool3d's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nlvid.models.resnet3d as r3d
from nlvid.models.onednn import temporal_conv_weight_grad
from nlvid.models.resnet3d import Bottleneck, FrameConv3d

CL3 = torch.channels_last_3d


def _reference_grads(x, weight, grad, pad):
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    F.conv3d(xd, wd, padding=(pad, 0, 0)).backward(grad.double())
    return xd.grad, wd.grad


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kt,shape", [(3, (2, 16, 5, 6, 7)), (3, (3, 8, 2, 4, 4)), (5, (2, 8, 6, 3, 5))])
def test_weight_gradient_by_taps_equals_conv3d(kt, shape, two_threads):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=CL3)
    weight = torch.randn(12, shape[1], kt, 1, 1)
    grad = torch.randn(shape[0], 12, *shape[2:]).contiguous(memory_format=CL3)
    got = temporal_conv_weight_grad(x, grad, kt)
    assert got.shape == weight.shape and got.is_contiguous(memory_format=CL3)
    assert _rel(got, _reference_grads(x, weight, grad, kt // 2)[1]) < 1e-5
    # a gradient in another layout gives the same result
    assert _rel(temporal_conv_weight_grad(x, grad.contiguous(), kt), _reference_grads(x, weight, grad, kt // 2)[1]) < 1e-5


def _tapped(conv, x):
    y = conv(x)
    return y, type(y.grad_fn).__name__ == "_TapWeightGradBackward"


def test_i3d_sized_temporal_conv_takes_the_tap_path_with_equal_gradients(two_threads):
    torch.manual_seed(0)
    conv = FrameConv3d(256, 64, (3, 1, 1), padding=(1, 0, 0), bias=False)
    x = torch.randn(2, 256, 4, 32, 32).contiguous(memory_format=CL3).requires_grad_()
    y, tapped = _tapped(conv, x)
    assert tapped
    assert y.is_contiguous(memory_format=CL3)
    assert _rel(y, F.conv3d(x.detach().double(), conv.weight.detach().double(), padding=(1, 0, 0))) < 1e-5
    grad = torch.randn_like(y)
    y.backward(grad)
    gx, gw = _reference_grads(x, conv.weight, grad, 1)
    assert _rel(x.grad, gx) < 1e-5
    assert _rel(conv.weight.grad, gw) < 1e-5
    assert conv.weight.grad.is_contiguous(memory_format=CL3)  # the parameter's own layout


def test_tap_path_is_not_taken_where_it_does_not_pay_or_apply(two_threads):
    torch.manual_seed(0)
    big = torch.randn(2, 256, 4, 32, 32).contiguous(memory_format=CL3)
    conv = FrameConv3d(256, 64, (3, 1, 1), padding=(1, 0, 0), bias=False)
    assert _tapped(conv, big)[1]
    assert not _tapped(FrameConv3d(256, 32, (3, 1, 1), padding=(1, 0, 0), bias=False), big)[1]  # 256 x 32 channels
    assert not _tapped(conv, big[:, :, :, :8, :8].contiguous(memory_format=CL3))[1]  # 3 x 8 x 8 rows per tap
    assert not _tapped(conv, big.contiguous())[1]  # not channels-last
    assert not _tapped(FrameConv3d(256, 64, (3, 1, 1), padding=(1, 0, 0), bias=True), big)[1]  # a bias
    assert not _tapped(FrameConv3d(256, 64, (3, 3, 3), padding=1, bias=False), big)[1]  # a spatial kernel
    conv.weight.requires_grad_(False)
    assert not _tapped(conv, big)[1]  # no weight gradient wanted
    conv.weight.requires_grad_(True)
    with torch.no_grad():
        assert conv(big).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the conv runs in bf16 while x stays fp32
        y, tapped = _tapped(conv, big.requires_grad_())
    assert not tapped
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    torch.set_num_threads(1)  # torch would not run the 1x1x1 weight gradients on oneDNN
    assert not _tapped(conv, big)[1]


def _block():
    torch.manual_seed(0)
    block = Bottleneck(256, 64, kt=(3, 1)).train()
    for mod in block.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return block


def test_block_input_still_adds_its_gradients_in_place(two_threads):
    """The input gradient comes from torch's own conv backward, so the shortcut's gradient is added to it in place
    (see early_shortcut): no (B, C, T, H, W) aten::add in backward."""
    from torch.profiler import ProfilerActivity, profile

    block = _block()
    x = torch.randn(2, 256, 4, 32, 32).contiguous(memory_format=CL3).requires_grad_()
    y = block(x)
    assert type(block.conv1(x).grad_fn).__name__ == "_TapWeightGradBackward"
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y.square().sum().backward()

    def activation_adds(op):  # 5-D tensors of batch 2: activations
        return [e.input_shapes[0] for e in prof.key_averages(group_by_input_shape=True)
                if e.key == op and e.input_shapes and len(e.input_shapes[0]) == 5 and e.input_shapes[0][0] == 2]

    assert activation_adds("aten::add") == []
    assert activation_adds("aten::add_") == [[2, 256, 4, 32, 32]]


def test_stage_checkpointing_recomputes_through_the_tap_path(two_threads):
    block = _block()
    x = torch.randn(2, 256, 4, 32, 32).contiguous(memory_format=CL3)

    def grads(fn):
        block.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_()
        fn(xin).square().sum().backward()
        return [xin.grad] + [p.grad.clone() for p in block.parameters()]

    plain = grads(block)
    recomputed = grads(lambda xin: r3d.recompute(block, xin, block))
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("frames", [8, 7, 2])
@pytest.mark.parametrize("layout", [CL3, torch.contiguous_format])
def test_pool2_without_autograd_equals_max_pool3d(frames, layout):
    """FramePairMaxPool3d's inference path (maximum of even and odd frames) gives max_pool3d's values, NaN and
    -inf included, and keeps the layout; with autograd it is max_pool3d itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, frames, 5, 4)
    x[0, 1, 0, 0, 0] = float("nan")
    x[1, 2, 1, 1, 1] = float("-inf")
    x[1, 3, 0] = x[1, 3, 1]  # ties
    x = x.contiguous(memory_format=layout)
    pool = r3d.FramePairMaxPool3d((2, 1, 1), (2, 1, 1))
    expected = F.max_pool3d(x, (2, 1, 1), (2, 1, 1))
    with torch.no_grad():
        got = pool(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got.is_contiguous(memory_format=layout)
    assert type(pool(x.requires_grad_()).grad_fn).__name__.startswith("MaxPool3DWithIndices")
