"""C2D / I3D ResNet backbones with Non-local blocks (Wang et al., CVPR 2018), as data tables.

Shape legend: B batch, C channels, T frames, H/W height/width; a "folded" tensor is (B*T, C, H, W).

Module names (converters and the visualiser rely on them):
    stem.conv / stem.bn / stem.pool
    res2..res5: .blocks (ModuleList of residual blocks), .nl (ModuleDict: str(block index) -> NonLocalBlock,
                applied AFTER that block, on its post-ReLU output)
    pool2 (temporal max-pool after res2)
    bottleneck: conv1, bn1, conv2, bn2, conv3, bn3, downsample.0 (conv) / downsample.1 (bn)
    basic:      conv1, bn1, conv2, bn2, downsample.0 / downsample.1
    head.dropout, head.fc

Variants are data:
- `STAGE_DEPTHS` / `BLOCK_KIND`: ResNet-18/34 (basic blocks) and ResNet-50/101 (bottleneck blocks).
- `ARCHS`: which conv of a block gets a temporal kernel of 3, the stem's temporal kernel, and the per-block
  inflation pattern (official video-nonlocal-net pattern for I3D; C2D inflates nothing).
- `LAYOUTS`: "8x8" (PySlowFast: conv1 stride (1,2,2), pool1 1x3x3, pool2 2x1x1 stride 2 after res2) and
  "32x2" (paper / official Caffe2: conv1 stride (2,2,2), pool1 2x3x3 stride 2, pool2 2x1x1 stride 2) and
  "mmaction2" (MMAction2's I3D: conv1 stride (2,2,2), pool1 1x3x3 stride (2,2,2), pool2 2x1x1 stride 2) and
  "8x8_nopool" (PySlowFast's c2d_nopool: 8x8 without pool2).
- `nonlocal_group` ({"res3": 4}): the NL blocks of a stage run on G groups of consecutive frames (PySlowFast
  NONLOCAL.GROUP; the official frozen-BN 32x4 / 128x1 models attend within 4 groups of 4 frames at res3).

Speed: every 1xkxk convolution is a `FrameConv3d`, a Conv3d (same parameters and state-dict shapes) whose
forward folds time into the batch and runs conv2d. The trunk keeps activations in `channels_last_3d` memory
order, i.e. (B, T, H, W, C) in memory, so folding (B, C, T, H, W) -> (B*T, C, H, W) channels_last is a view, not a
copy; pooling, BN and the temporal (I3D) convs also run fastest in that layout on CPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from nlvid.errors import ConfigError
from nlvid.models.nonlocal_block import NonLocalBlock
from nlvid.models.onednn import conv1x1_uses_onednn, temporal_conv_weight_grad, temporal_weight_grad_by_taps

# ----------------------------------------------------------------------------------------------------------------
# Data tables
# ----------------------------------------------------------------------------------------------------------------

STAGES = ("res2", "res3", "res4", "res5")

STAGE_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
BLOCK_KIND: dict[int, str] = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck"}

# Per-stage inflation patterns (1 = this block gets a temporal kernel of 3), repeated to the stage depth.
# Official video-nonlocal-net: res2 (1,1,1), res3 (1,0,1,0), res4 (1,0,1,0,1,0), res5 (0,1,0); R101 res4: even blocks.
INFLATE_PATTERN: tuple[tuple[int, ...], ...] = ((1, 1, 1), (1, 0), (1, 0), (0, 1, 0))

# arch -> stem temporal kernel, which conv of a block is inflated ("first": conv1, the 1x1 of a bottleneck;
# "middle": conv2, the 3x3 of a bottleneck), and whether the inflation pattern applies at all.
ARCHS: dict[str, dict[str, Any]] = {
    "c2d": dict(stem_kt=1, inflate=None),
    "i3d": dict(stem_kt=5, inflate="first"),  # I3D_3x1x1 (paper Table 2f, official code)
    "i3d333": dict(stem_kt=5, inflate="middle"),  # I3D_3x3x3 (paper Table 2e)
}

# layout -> stem conv temporal stride, pool1 (kernel, stride), pool2 (kernel, stride); all (t, h, w).
LAYOUTS: dict[str, dict[str, Any]] = {
    "8x8": dict(stem_stride=(1, 2, 2), pool1_kernel=(1, 3, 3), pool1_stride=(1, 2, 2),
                pool2_kernel=(2, 1, 1), pool2_stride=(2, 1, 1)),
    "32x2": dict(stem_stride=(2, 2, 2), pool1_kernel=(2, 3, 3), pool1_stride=(2, 2, 2),
                 pool2_kernel=(2, 1, 1), pool2_stride=(2, 1, 1)),
    # MMAction2's I3D ResNet3d (conv1_stride_t=2, pool1_stride_t=2): pool1 subsamples time without pooling over it.
    "mmaction2": dict(stem_stride=(2, 2, 2), pool1_kernel=(1, 3, 3), pool1_stride=(2, 2, 2),
                      pool2_kernel=(2, 1, 1), pool2_stride=(2, 1, 1)),
    # PySlowFast's `c2d_nopool` / `i3d_nopool` (_POOL1 = [[1, 1, 1]]): 8x8 without the temporal pool after res2.
    "8x8_nopool": dict(stem_stride=(1, 2, 2), pool1_kernel=(1, 3, 3), pool1_stride=(1, 2, 2),
                       pool2_kernel=(1, 1, 1), pool2_stride=(1, 1, 1)),
}


def inflation_flags(depths: Sequence[int]) -> list[list[int]]:
    """The official per-block inflation flags for stage depths, e.g. (3, 4, 6, 3) -> [[1,1,1],[1,0,1,0],...]."""
    out = []
    for pattern, depth in zip(INFLATE_PATTERN, depths):
        out.append([pattern[i % len(pattern)] for i in range(depth)])
    return out


def temporal_kernels(arch: str, depths: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Per stage, per block: (temporal kernel of the first conv, temporal kernel of the middle conv)."""
    inflate = ARCHS[arch]["inflate"]
    flags = inflation_flags(depths)
    out = []
    for stage_flags in flags:
        ks = []
        for f in stage_flags:
            kt = 3 if (inflate is not None and f) else 1
            ks.append((kt, 1) if inflate == "first" else (1, kt))
        out.append(ks)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class FrameConv3d(nn.Conv3d):
    """A Conv3d that runs a 1xkxk kernel as conv2d over (B*T) frames; same parameters/state dict as nn.Conv3d.

    Outputs equal `F.conv3d` (tested). Temporal kernels > 1 take the ordinary conv3d path; in training, I3D's
    (kt, 1, 1) convs get their weight gradient one temporal tap at a time where that is faster (`_TapWeightGrad`).

    The weight is stored channels_last_3d, the layout the channels-last kernels want it in (for a 1x1x1 kernel both
    layouts are the same memory). A contiguous weight would be copied to that layout in every forward and backward,
    its gradient converted back and copied again by AccumulateGrad: ~4 passes over the weights per training step.
    Shapes, values and state-dict keys are those of nn.Conv3d; `load_state_dict` copies into this layout.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.weight = nn.Parameter(self.weight.contiguous(memory_format=torch.channels_last_3d))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """`weight`/`bias` replace the module's own (used by `conv_bn` to run with BN folded in)."""
        if weight is None:
            weight, bias = self.weight, self.bias
        if (self.kernel_size[0] != 1 or self.padding[0] != 0 or self.padding_mode != "zeros" or x.dim() != 5
                or (self.kernel_size == (1, 1, 1) and conv1x1_uses_onednn(x))):
            if (bias is None and self.kernel_size[1:] == (1, 1) and self.stride == (1, 1, 1)
                    and self.padding == (self.kernel_size[0] // 2, 0, 0) and self.kernel_size[0] % 2 == 1
                    and self.dilation == (1, 1, 1) and self.groups == 1 and torch.is_grad_enabled()
                    and x.dim() == 5 and temporal_weight_grad_by_taps(x, weight)):
                # an I3D temporal conv: torch's forward and input gradient, the weight gradient per tap
                y = F.conv3d(x, weight.detach(), None, self.stride, self.padding)
                return _TapWeightGrad.apply(y, x.detach(), weight)
            # 1x1x1 on oneDNN: as fast unfolded on channels-last input, and its input gradient is then a tensor of
            # its own rather than a view, which autograd can accumulate in place (see `early_shortcut`). Where
            # torch would not use oneDNN (one thread and a batch < 16) the fold's batch B*T gets it there.
            return self._conv_forward(x, weight, bias)
        st = self.stride[0]
        if st > 1:
            x = x[:, :, ::st]  # a 1-frame kernel with temporal stride s just keeps every s-th frame
        B, C, T, H, W = x.shape
        # (B, C, T, H, W) -> (B, T, C, H, W) -> (B*T, C, H, W): a view when x is channels_last_3d
        x2 = x.transpose(1, 2).reshape(B * T, C, H, W)
        if not x2.is_contiguous(memory_format=torch.channels_last):
            x2 = x2.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x2, weight.squeeze(2), bias, self.stride[1:], self.padding[1:],
                     self.dilation[1:], self.groups)
        # (B*T, C', H', W') -> (B, T, C', H', W') -> (B, C', T, H', W'): channels_last_3d view of y
        return y.reshape(B, T, *y.shape[1:]).transpose(1, 2)


class _TapWeightGrad(torch.autograd.Function):
    """y = conv3d(x, weight) (a (kt, 1, 1) kernel, stride 1, padding kt // 2 in time), made by torch with the
    weight detached, passed through here: backward hands y's gradient on to torch's conv (which then computes the
    input gradient only) and gives the weight its gradient one temporal tap at a time (`temporal_conv_weight_grad`;
    ~2x faster on oneDNN for the I3D R50 shapes it is used for). The input gradient stays torch's own, a tensor no
    Python code held, so autograd can still add the shortcut's gradient to it in place (see `early_shortcut`)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # the conv keeps the same tensor: no extra memory
        ctx.kt = weight.shape[2]
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad, None, temporal_conv_weight_grad(x, grad, ctx.kt)


def conv_bn(conv: FrameConv3d, bn: nn.BatchNorm3d, x: torch.Tensor, *, residual: torch.Tensor | None = None,
            relu: bool = False, relu_mask: bool = False) -> torch.Tensor:
    """bn(conv(x)), then `+ residual` and a ReLU when asked (a block's residual join and activation).

    relu_mask: the ReLU keeps a bool mask for its backward instead of its output (a quarter of the bytes), for a
    result that nothing else keeps (`_ReLUKeepMask`).

    Inference (no autograd, BN in eval mode): the BN is folded into the conv's weights instead: the same function up
    to fp32 rounding, one pass over the activations fewer (BN was ~16% of a C2D R50 inference on CPU). The folded
    weights are cached on the conv until a tensor they derive from changes (version counters and storage), so
    training, `load_state_dict` and `.to()` are always seen.

    Otherwise BN runs on the folded (B*T, C, H, W) channels-last view of the conv output, and the add and the ReLU
    run in place on BN's 4-D result (a tensor of its own) before it is viewed as (B, C, T, H, W) again. An in-place
    op on the 5-D *view* would be recorded by autograd as CopySlices + AsStrided, whose backward clones the gradient,
    zero-fills and copies whole activations and hands the next backward a gradient in a foreign layout: about a
    third of an I3D-R50-NL5 training step on CPU before this was done (benchmarks/bench_model.py)."""
    if bn.training or torch.is_grad_enabled() or bn.running_mean is None or bn.weight is None:
        y = conv(x)
        if y.dim() != 5 or not y.is_contiguous(memory_format=torch.channels_last_3d):
            return _join(bn(y), residual, relu, relu_mask)
        B, C, T, H, W = y.shape
        z = bn(y.transpose(1, 2).reshape(B * T, C, H, W))  # (B, C, T, H, W) -> (B*T, C, H, W) channels_last view
        if residual is not None:
            residual = residual.transpose(1, 2).reshape(B * T, C, H, W)  # the same fold (a view when channels-last)
        # (B*T, C, H, W) -> (B, T, C, H, W) -> (B, C, T, H, W): a channels_last_3d view
        return _join(z, residual, relu, relu_mask).reshape(B, T, C, H, W).transpose(1, 2)
    srcs = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((t._version, t.data_ptr(), t.dtype) if t is not None else None for t in srcs) + (bn.eps,)
    cached = conv.__dict__.get("_bn_folded")
    if cached is None or cached[0] != key:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C',)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        cached = conv.__dict__["_bn_folded"] = (key, weight, bias)
    return _join(conv(x, cached[1], cached[2]), residual, relu)


def early_shortcut(x: torch.Tensor) -> torch.Tensor:
    """A block's identity shortcut as an alias of x recorded before the block's convs (when autograd records).

    Why: x feeds conv1 and the shortcut, and autograd adds the two gradients in place only when the first to
    arrive is a tensor of its own that nobody else holds. The shortcut's gradient comes through the views that
    fold it for the 4-D join (`conv_bn`), and a view never qualifies; backward runs later-recorded nodes first,
    so with the shortcut used as is its gradient arrived first and every block input got an out-of-place add: a
    fresh (B, C, T, H, W) buffer per block and step (~15 ms at res2 for 2 x 8 frames under glibc's default
    malloc, which faults fresh pages in). Recorded before conv1, the alias hands its gradient over last, after
    conv1's (a plain tensor: 1x1x1 convs run unfolded, see FrameConv3d), and the add happens in place."""
    return x.view(x.shape) if x.requires_grad and torch.is_grad_enabled() else x


def _inplace_ok(y: torch.Tensor) -> bool:
    """Whether an in-place op on y is free: not when autograd would record it on a view (CopySlices, see
    `conv_bn`). Without grad nothing is recorded and in place is the cheaper choice. Under torch.compile: never
    (inductor fuses the out-of-place ops itself, and asking `_is_view` there is a graph break per call)."""
    if torch.compiler.is_compiling():
        return False
    return not (y.requires_grad and y._is_view())


def _join(z: torch.Tensor, residual: torch.Tensor | None, relu: bool, relu_mask: bool = False) -> torch.Tensor:
    """relu(z + residual), in place on z where that is free (`_inplace_ok`). z is a BN output: BN's backward needs
    its input, not its output, and neither the add's backward nor ReLU's (which keeps its result) needs z.
    relu_mask: see `conv_bn`."""
    if residual is not None:
        z = z.add_(residual) if _inplace_ok(z) else z + residual
    if relu and relu_mask and z.requires_grad and not torch.compiler.is_compiling():
        return _ReLUKeepMask.apply(z, _inplace_ok(z))
    if relu:
        z = z.relu_() if _inplace_ok(z) else torch.relu(z)
    return z


class _ReLUKeepMask(torch.autograd.Function):
    """ReLU whose backward keeps `result > 0` as a bool tensor (1 byte per value) instead of the fp32 result.

    torch's ReLU keeps its result, which costs nothing when the next layer keeps that tensor anyway (a conv's
    input), but 4 bytes per value when nothing else does: a residual block's output recomputed under stage
    checkpointing (the next block's kept input was released when that block's backward finished). Same gradient:
    grad where the result is > 0, else 0 (torch.where: no float copy of the mask)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = z.relu_() if inplace else torch.relu(z)
        if inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        # the result in the mask's (= the ReLU output's) memory layout, as torch's ReLU backward gives it: a layout
        # that follows the incoming gradient instead can make the next kernels pick another algorithm (seen on
        # 1x1 maps, whose strides are ambiguous) and change the gradients' rounding
        return torch.where(mask, grad, grad.new_zeros(()), out=torch.empty_like(mask, dtype=grad.dtype)), None


def _conv(dim_in: int, dim_out: int, kernel: tuple[int, int, int],
          stride: tuple[int, int, int] = (1, 1, 1)) -> nn.Conv3d:
    padding = tuple(k // 2 for k in kernel)
    return FrameConv3d(dim_in, dim_out, kernel, stride=stride, padding=padding, bias=False)


class FrameBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d (same parameters, buffers and statistics) that runs on the folded (B*T, C, H, W) view.

    Per-channel statistics over (B, T, H, W) are the same either way; on CPU the 4-D channels_last kernel is ~2x
    faster than the 5-D channels_last_3d one.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (4, 5):
            raise ValueError(f"expected 4D or 5D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return super().forward(x)
        B, C, T, H, W = x.shape
        # (B, C, T, H, W) -> (B*T, C, H, W) channels_last view, and back
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))
        return y.reshape(B, T, C, H, W).transpose(1, 2)


def _bn(dim: int) -> nn.BatchNorm3d:
    return FrameBatchNorm3d(dim, eps=1e-5, momentum=0.1)


# model.bn: "bn" = BatchNorm with batch statistics in training; "frozen" = FrozenBatchNorm3d everywhere
BN_MODES = ("bn", "frozen")


class FrozenBatchNorm3d(nn.Module):
    """BatchNorm with fixed statistics, the "affine" BN of the official frozen-BN 32x4 / 128x1 models (Caffe2
    AffineNd) and of PySlowFast's BN.FREEZE: y = weight * (x - running_mean) / sqrt(running_var + eps) + bias in
    train and eval mode alike: one per-channel scale and shift (eval-mode batch_norm; no statistics computed).

    - The statistics are never updated. The module is not a torch `_BatchNorm`, so precise BN, SyncBN conversion
      and anything else that looks for BatchNorms leave it alone.
    - weight and bias stay trainable parameters, as the official code's AffineNd scale/bias (in `model.params`,
      updated by SGD); like every norm parameter in nlvid they get no weight decay.
    - Same parameters, buffers and state-dict keys as nn.BatchNorm3d (num_batches_tracked is kept, never
      incremented): checkpoints and weight import work the same for a BN and a frozen-BN model, and `conv_bn`
      folds it into the conv at inference like an eval-mode BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.affine, self.track_running_stats = True, True  # what code reading a BatchNorm's flags expects
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_bn(cls, bn: nn.Module) -> FrozenBatchNorm3d:
        """A frozen copy of a BatchNorm (its parameters, statistics and eps; requires_grad kept)."""
        out = cls(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.weight is not None:
                out.weight.copy_(bn.weight)
                out.weight.requires_grad_(bn.weight.requires_grad)
            if bn.bias is not None:
                out.bias.copy_(bn.bias)
                out.bias.requires_grad_(bn.bias.requires_grad)
            if bn.running_mean is not None:
                out.running_mean.copy_(bn.running_mean)
                out.running_var.copy_(bn.running_var)
                out.num_batches_tracked.copy_(bn.num_batches_tracked)
        ref = bn.weight if bn.weight is not None else bn.running_mean
        return out.to(ref.device) if ref is not None else out

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), both (C,): y = x * scale + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        # eval-mode batch_norm is the per-channel scale and shift (no statistics computed); its fused backward is
        # faster on CPU than autograd through x * scale + shift
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm3d({self.num_features}): input of shape {tuple(x.shape)}")
        if x.dim() != 5 or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return self._affine(x)
        B, C, T, H, W = x.shape
        # (B, C, T, H, W) -> (B*T, C, H, W) channels_last view, and back (the 4-D kernel is faster, as for
        # FrameBatchNorm3d)
        y = self._affine(x.transpose(1, 2).reshape(B * T, C, H, W))
        return y.reshape(B, T, C, H, W).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm inside `module` by a `FrozenBatchNorm3d` with its values, in place; returns the
    number replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, FrozenBatchNorm3d.from_bn(child))
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def _init_conv_bn(module: nn.Module) -> None:
    """Kaiming (fan_out, ReLU) for convs, BN gamma 1 / beta 0 (PySlowFast / Caffe2 msra fill)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            # drawn in the standard (contiguous) order, then copied into the weight's layout (FrameConv3d keeps
            # channels_last_3d), so a seed gives the same weights whatever the layout
            with torch.no_grad():
                m.weight.copy_(nn.init.kaiming_normal_(torch.empty(m.weight.shape, dtype=m.weight.dtype),
                                                       mode="fan_out", nonlinearity="relu"))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _downsample(dim_in: int, dim_out: int, spatial_stride: int) -> nn.Sequential | None:
    if dim_in == dim_out and spatial_stride == 1:
        return None
    return nn.Sequential(_conv(dim_in, dim_out, (1, 1, 1), (1, spatial_stride, spatial_stride)), _bn(dim_out))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (spatial stride here) -> 1x1, BN + ReLU, projection shortcut when the shape changes.

    `kt` = (temporal kernel of conv1, temporal kernel of conv2): C2D (1, 1), I3D_3x1x1 (3, 1), I3D_3x3x3 (1, 3).
    """

    expansion = 4

    def __init__(self, dim_in: int, dim_inner: int, *, spatial_stride: int = 1, kt: tuple[int, int] = (1, 1),
                 zero_init_last_bn: bool = False):
        super().__init__()
        dim_out = dim_inner * self.expansion
        self.conv1 = _conv(dim_in, dim_inner, (kt[0], 1, 1))
        self.bn1 = _bn(dim_inner)
        self.conv2 = _conv(dim_inner, dim_inner, (kt[1], 3, 3), (1, spatial_stride, spatial_stride))
        self.bn2 = _bn(dim_inner)
        self.conv3 = _conv(dim_inner, dim_out, (1, 1, 1))
        self.bn3 = _bn(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(dim_in, dim_out, spatial_stride)
        self.init_weights(zero_init_last_bn)

    def init_weights(self, zero_init_last_bn: bool = False) -> None:
        _init_conv_bn(self)
        if zero_init_last_bn:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor, *, relu_mask: bool = False) -> torch.Tensor:
        """relu_mask: the output's ReLU keeps a bool mask for backward, not the output (see `conv_bn`)."""
        ds = self.downsample
        shortcut = early_shortcut(x) if ds is None else conv_bn(ds[0], ds[1], x)
        y = conv_bn(self.conv1, self.bn1, x, relu=True)
        y = conv_bn(self.conv2, self.bn2, y, relu=True)
        return conv_bn(self.conv3, self.bn3, y, residual=shortcut, relu=True, relu_mask=relu_mask)


class BasicBlock(nn.Module):
    """3x3 (spatial stride here) -> 3x3, BN + ReLU, projection shortcut when the shape changes.

    `kt` = (temporal kernel of conv1, temporal kernel of conv2).
    """

    expansion = 1

    def __init__(self, dim_in: int, dim_inner: int, *, spatial_stride: int = 1, kt: tuple[int, int] = (1, 1),
                 zero_init_last_bn: bool = False):
        super().__init__()
        dim_out = dim_inner * self.expansion
        self.conv1 = _conv(dim_in, dim_inner, (kt[0], 3, 3), (1, spatial_stride, spatial_stride))
        self.bn1 = _bn(dim_inner)
        self.conv2 = _conv(dim_inner, dim_out, (kt[1], 3, 3))
        self.bn2 = _bn(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(dim_in, dim_out, spatial_stride)
        self.init_weights(zero_init_last_bn)

    def init_weights(self, zero_init_last_bn: bool = False) -> None:
        _init_conv_bn(self)
        if zero_init_last_bn:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor, *, relu_mask: bool = False) -> torch.Tensor:
        """relu_mask: the output's ReLU keeps a bool mask for backward, not the output (see `conv_bn`)."""
        ds = self.downsample
        shortcut = early_shortcut(x) if ds is None else conv_bn(ds[0], ds[1], x)
        y = conv_bn(self.conv1, self.bn1, x, relu=True)
        return conv_bn(self.conv2, self.bn2, y, residual=shortcut, relu=True, relu_mask=relu_mask)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class Stem(nn.Module):
    def __init__(self, dim_out: int, *, kt: int, stride: tuple[int, int, int], pool_kernel: tuple[int, int, int],
                 pool_stride: tuple[int, int, int], pool_padding: int):
        super().__init__()
        self.conv = _conv(3, dim_out, (kt, 7, 7), stride)
        self.bn = _bn(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(pool_kernel, pool_stride, padding=(0, pool_padding, pool_padding))
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(conv_bn(self.conv, self.bn, x, relu=True))


class FramePairMaxPool3d(nn.MaxPool3d):
    """nn.MaxPool3d (same arguments, no state). Without autograd, pool2's (2, 1, 1) kernel with stride (2, 1, 1)
    is the elementwise maximum of the even and the odd frames: the same values (NaN propagates in both), in the
    input's memory layout, without writing max_pool3d's int64 indices (inference at (2, 256, 8, 56, 56)
    channels-last: 12.8 -> 1.5 ms). Training keeps max_pool3d, whose backward needs the indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kernel_size == (2, 1, 1) and self.stride == (2, 1, 1) and self.padding == 0 and self.dilation == 1
                and not self.ceil_mode and not self.return_indices and x.dim() == 5 and x.shape[2] >= 2
                and not (x.requires_grad and torch.is_grad_enabled())
                and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())):
            n = x.shape[2] // 2 * 2  # floor mode: an odd last frame is dropped
            return torch.maximum(x[:, :, 0:n:2], x[:, :, 1:n:2])
        return super().forward(x)


def run_grouped(block: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """`block` applied to each of `groups` chunks of consecutive frames of x (B, C, T, H, W) separately, in one call:
    time is folded into the batch before the block and unfolded after (PySlowFast NONLOCAL.GROUP, the official
    `add_nonlocal_group`). groups=1 is `block(x)`. T must be a multiple of `groups`."""
    if groups == 1:
        return block(x)
    B, C, T, H, W = x.shape
    if T % groups:
        raise ConfigError(f"model.nonlocal_group: {T} frames at this stage do not split into {groups} groups")
    # (B, C, T, H, W) -> (B, C, G, T/G, H, W) -> (B, G, C, T/G, H, W) -> (B*G, C, T/G, H, W)
    y = x.reshape(B, C, groups, T // groups, H, W).transpose(1, 2).reshape(B * groups, C, T // groups, H, W)
    y = block(y)
    # (B*G, C, T/G, H, W) -> (B, G, C, T/G, H, W) -> (B, C, G, T/G, H, W) -> (B, C, T, H, W)
    return y.reshape(B, groups, C, T // groups, H, W).transpose(1, 2).reshape(B, C, T, H, W)


# train.checkpoint (activation checkpointing): what is recomputed in backward instead of kept from forward
CHECKPOINT_MODES = ("off", "nonlocal", "stages")


class _KeepBNStats:
    """The context of a checkpointed segment's recomputation in backward. The segment runs its train-mode
    BatchNorms again (with the same batch statistics: the same values and gradients), which would update their
    running statistics a second time; their running_mean / running_var / num_batches_tracked are put back as they
    were before the recomputation, so each training step updates them exactly once."""

    def __init__(self, bns: list[nn.Module]):
        self.bns = bns
        self.saved: list[tuple[torch.Tensor, ...]] = []

    def __enter__(self) -> None:
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.bns]

    def __exit__(self, *exc: Any) -> bool:
        with torch.no_grad():
            for m, (mean, var, n) in zip(self.bns, self.saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)
        self.saved = []
        return False


def recompute(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *owners: nn.Module) -> torch.Tensor:
    """fn(x) under non-reentrant activation checkpointing: only x is kept for backward, where fn runs again.
    `owners` are the modules fn runs: their train-mode BatchNorms' running statistics survive the recomputation
    unchanged (`_KeepBNStats`). fn must be deterministic (no dropout: nlvid's only randomness is the head's, which is
    never checkpointed; the RNG state is preserved anyway). Under torch.compile fn(x) runs plainly: dynamo takes
    no context_fn, and its compiled recomputation updates BN statistics a second time (measured)."""
    if torch.compiler.is_compiling():
        return fn(x)
    bns = [m for o in owners if o is not None for m in o.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None]
    return _checkpoint(fn, x, use_reentrant=False, context_fn=lambda: (nullcontext(), _KeepBNStats(bns)))


class Stage(nn.Module):
    """Residual blocks plus Non-local blocks: `nl[str(i)]` runs on the output of `blocks[i]` (on `group` groups of
    consecutive frames separately when group > 1).

    `checkpoint` (set by `ResNet3d.set_checkpointing`; used only in training mode with autograd on): "nonlocal"
    recomputes each NL block in backward, "stages" each residual block together with the NL block after it."""

    def __init__(self, blocks: list[nn.Module], nl: dict[str, nn.Module], group: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.nl = nn.ModuleDict(nl)
        self.group = group
        self.checkpoint = "off"

    def _nonlocal(self, nl: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = run_grouped(nl, x, self.group)
        if not x.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.contiguous(memory_format=torch.channels_last_3d)  # keep the trunk in one layout
        return x

    def _block(self, block: nn.Module, nl: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        x = block(x)
        return x if nl is None else self._nonlocal(nl, x)

    def _recomputed_block(self, block: nn.Module, nl: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """_block under stage checkpointing: without an NL block after it nothing else keeps the block's output when
        its backward runs, so its ReLU keeps a bool mask instead (an NL block keeps the output anyway)."""
        return self._block(block, nl, x) if nl is not None else block(x, relu_mask=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.checkpoint if self.training and torch.is_grad_enabled() else "off"
        for i, block in enumerate(self.blocks):
            nl = self.nl[str(i)] if str(i) in self.nl else None
            if mode == "stages":
                x = recompute(partial(self._recomputed_block, block, nl), x, block, nl)
            elif mode == "nonlocal" and nl is not None:
                x = recompute(partial(self._nonlocal, nl), block(x), nl)
            else:
                x = self._block(block, nl, x)
        return x


class Head(nn.Module):
    """Global average pool over (T, H, W), dropout, linear classifier (normal std 0.01, bias 0)."""

    def __init__(self, dim_in: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(dim_in, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = feat.mean(dim=(2, 3, 4))  # (B, C, T, H, W) -> (B, C)
        return self.fc(self.dropout(x))


# ----------------------------------------------------------------------------------------------------------------
# Shape arithmetic (validate a clip before running anything)
# ----------------------------------------------------------------------------------------------------------------


def _pool_out(n: int, k: int, s: int, p: int) -> int | None:
    if n + 2 * p < k:
        return None
    return (n + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------


class ResNet3d(nn.Module):
    """C2D / I3D ResNet for clips (B, 3, T, H, W), with Non-local blocks after chosen residual blocks.

    Args (all explicit; a config is turned into these once, in `nlvid.models.presets.create_model`):
        depth: 18, 34 (basic blocks), 50, 101 (bottleneck blocks).
        arch: "c2d", "i3d" (I3D_3x1x1) or "i3d333" (I3D_3x3x3).
        layout: "8x8" or "32x2" (see `LAYOUTS`).
        width: base width (64 in the paper); stage inner widths are width * (1, 2, 4, 8).
        stage_depths: override the depth's blocks per stage (tiny models), e.g. (1, 1, 1, 1).
        nonlocal_blocks: {"res3": [1, 3], "res4": [1, 3, 5]}: NL block after these (0-based) residual blocks.
        nonlocal_kwargs: passed to every NonLocalBlock (instantiation, scale, pool_size, ...); None = its defaults.
        stem_pool_padding: pool1 spatial padding, 1 (PySlowFast, 56x56 at 224) or 0 (Caffe2, 55x55).
        zero_init_last_bn: zero the last BN gamma of each residual branch (PySlowFast ZERO_INIT_FINAL_BN);
            default off (the paper and official code use gamma 1).
        nonlocal_group: {"res3": 4}: that stage's NL blocks attend within 4 groups of consecutive frames
            (PySlowFast NONLOCAL.GROUP); the stage's frame count must be a multiple of it.
        bn: "bn" (BatchNorm, batch statistics in training) or "frozen" (every BatchNorm of the model, backbone and
            NL blocks with norm "bn", is a `FrozenBatchNorm3d`: fixed statistics, trainable scale/shift).
        checkpoint: activation checkpointing in training, see `set_checkpointing`.
    """

    def __init__(self, *, depth: int = 50, arch: str = "c2d", layout: str = "8x8", width: int = 64,
                 stage_depths: Sequence[int] | None = None, nonlocal_blocks: dict[str, Sequence[int]] | None = None,
                 nonlocal_kwargs: dict[str, Any] | None = None, num_classes: int = 400, dropout: float = 0.5,
                 stem_pool_padding: int = 1, zero_init_last_bn: bool = False,
                 nonlocal_group: dict[str, int] | None = None, bn: str = "bn", checkpoint: str = "off"):
        super().__init__()
        if bn not in BN_MODES:
            raise ConfigError(f"bn {bn!r} is not one of {', '.join(BN_MODES)}")
        if depth not in STAGE_DEPTHS:
            raise ConfigError(f"depth {depth!r} is not one of {', '.join(map(str, STAGE_DEPTHS))}")
        if arch not in ARCHS:
            raise ConfigError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if stem_pool_padding not in (0, 1):
            raise ConfigError(f"stem_pool_padding {stem_pool_padding!r} is not one of 0, 1")
        if not isinstance(width, int) or width < 1:
            raise ConfigError(f"width {width!r} must be a positive integer")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes {num_classes!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout {dropout!r} must be in [0, 1)")
        depths = tuple(stage_depths) if stage_depths is not None else STAGE_DEPTHS[depth]
        nonlocal_blocks = validate_nonlocal_blocks(nonlocal_blocks or {}, depths)
        nonlocal_kwargs = dict(nonlocal_kwargs or {})
        nonlocal_group = validate_nonlocal_group(nonlocal_group or {})

        self.depth, self.arch, self.layout, self.width = depth, arch, layout, width
        self.stage_depths = depths
        self.nonlocal_blocks = nonlocal_blocks
        self.nonlocal_kwargs = nonlocal_kwargs
        self.nonlocal_group = nonlocal_group
        self.stem_pool_padding = stem_pool_padding
        self.num_classes = num_classes

        lay = LAYOUTS[layout]
        block_cls = BLOCKS[BLOCK_KIND[depth]]
        kts = temporal_kernels(arch, depths)
        self.stem = Stem(width, kt=ARCHS[arch]["stem_kt"], stride=lay["stem_stride"],
                         pool_kernel=lay["pool1_kernel"], pool_stride=lay["pool1_stride"],
                         pool_padding=stem_pool_padding)
        dim_in = width
        self.stage_dims: list[int] = []
        for s, name in enumerate(STAGES):
            dim_inner = width * 2**s
            blocks = []
            for i in range(depths[s]):
                stride = 2 if (i == 0 and s > 0) else 1
                blocks.append(block_cls(dim_in, dim_inner, spatial_stride=stride, kt=kts[s][i],
                                        zero_init_last_bn=zero_init_last_bn))
                dim_in = dim_inner * block_cls.expansion
            nl = {str(i): _make_nonlocal(dim_in, nonlocal_kwargs) for i in nonlocal_blocks.get(name, [])}
            setattr(self, name, Stage(blocks, nl, nonlocal_group.get(name, 1)))
            self.stage_dims.append(dim_in)
            if name == "res2":
                self.pool2 = FramePairMaxPool3d(lay["pool2_kernel"], lay["pool2_stride"])
        self.num_features = dim_in
        self.head = Head(dim_in, num_classes, dropout)
        self.bn_mode = bn
        if bn == "frozen":
            freeze_batchnorm(self)
        self.checkpointing = "off"
        self.set_checkpointing(checkpoint)

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing, used only in training mode with autograd on (inference is unchanged):
        "off"; "nonlocal": each NL block is recomputed in backward; "stages": the stem, each residual block
        together with the NL block after it, and pool2 are recomputed (only their inputs are kept), which is
        about one extra forward pass. The head (dropout) is never recomputed; BN running statistics are
        updated once per step either way, and gradients equal the plain run's."""
        if mode not in CHECKPOINT_MODES:
            raise ConfigError(f"checkpoint {mode!r} is not one of {', '.join(CHECKPOINT_MODES)}")
        self.checkpointing = mode
        for name in STAGES:
            getattr(self, name).checkpoint = mode

    # -- API ----------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> res5 map (B, C, T', H', W') (in channels_last_3d memory order)."""
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.checkpointing == "stages" and self.training and torch.is_grad_enabled():
            x = recompute(self.stem, x, self.stem)
            x = recompute(self.pool2, self.res2(x))  # keeps res2's output, not also pool2's int64 indices
        else:
            x = self.stem(x)
            x = self.pool2(self.res2(x))
        x = self.res3(x)
        x = self.res4(x)
        return self.res5(x)

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- shapes -------------------------------------------------------------------------------------------------

    def feature_grids(self, frames: int, height: int, width: int) -> dict[str, tuple[int, int, int]]:
        """Output grid (T, H, W) of stem, res2, pool2, res3, res4, res5 for a clip; ConfigError if it cannot run.

        Computed with the layers' own arithmetic, so a clip is validated before any tensor is made.
        """
        out = self._grids(frames, height, width)
        if out is None:
            raise self._shape_error(frames, height, width)
        return out

    def _grids(self, frames: int, height: int, width: int) -> dict[str, tuple[int, int, int]] | None:
        lay = LAYOUTS[self.layout]
        conv = self.stem.conv
        grid = []
        for d, n in enumerate((frames, height, width)):
            o = _pool_out(n, conv.kernel_size[d], conv.stride[d], conv.padding[d])
            if o is not None:
                p = (0, self.stem_pool_padding, self.stem_pool_padding)[d]
                o = _pool_out(o, lay["pool1_kernel"][d], lay["pool1_stride"][d], p)
            if o is None:
                return None
            grid.append(o)
        t, h, w = grid
        out: dict[str, tuple[int, int, int]] = {"stem": (t, h, w), "res2": (t, h, w)}
        tp = _pool_out(t, lay["pool2_kernel"][0], lay["pool2_stride"][0], 0)
        if tp is None:
            return None
        t = tp
        out["pool2"] = (t, h, w)
        for name in STAGES[1:]:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 3x3 conv, stride 2, padding 1
            out[name] = (t, h, w)
            if t % self.nonlocal_group.get(name, 1):
                return None  # the stage's frames do not split into its NL groups
        # NL blocks need no check: their key/value pool kernel is min(pool_size, axis size) per axis.
        return out

    def min_input(self) -> tuple[int, int]:
        """Smallest (frames, square size) this model accepts."""
        t = next((t for t in range(1, 1025) if self._grids(t, 1024, 1024) is not None), 1025)
        s = next((s for s in range(1, 1025) if self._grids(1024, s, s) is not None), 1025)
        return t, s

    def _shape_error(self, frames: int, height: int, width: int) -> ConfigError:
        min_t, min_s = self.min_input()
        what = []
        if frames < min_t:
            what.append(f"{frames} frames is too short for the temporal strides of layout {self.layout} "
                        f"(needs >= {min_t} frames)")
        if min(height, width) < min_s:
            what.append(f"{height}x{width} is too small for the stem and stage strides (needs >= {min_s}x{min_s})")
        groups = {s: g for s, g in self.nonlocal_group.items() if g > 1}
        if not what and groups:
            what.append(f"{frames} frames: the NL groups {groups} (model.nonlocal_group) need each stage's frame "
                        f"count to be a multiple of its group count")
        if not what:
            what.append(f"clip {frames}x{height}x{width} does not fit (needs >= {min_t} frames and >= {min_s} px)")
        return ConfigError("input clip: " + "; ".join(what))

    def check_input(self, x_shape: Sequence[int]) -> None:
        """Raise ConfigError unless (B, 3, T, H, W) (or (3, T, H, W)) is a clip this model can run."""
        shape = tuple(x_shape)
        if len(shape) == 4:
            shape = (1, *shape)
        if len(shape) != 5 or shape[1] != 3:
            raise ConfigError(f"input shape {tuple(x_shape)}: expected (B, 3, T, H, W)")
        self.feature_grids(*shape[2:])


def _make_nonlocal(dim: int, kwargs: dict[str, Any]) -> nn.Module:
    return NonLocalBlock(dim, None, **kwargs)


def validate_nonlocal_group(groups: dict[str, int]) -> dict[str, int]:
    """Check {"res3": 4}: known stages, positive integer group counts."""
    if not isinstance(groups, dict):
        raise ConfigError(f"nonlocal_group {groups!r}: expected a mapping like {{res3: 4}}")
    out = {}
    for stage, g in groups.items():
        if stage not in STAGES:
            raise ConfigError(f"nonlocal_group: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"nonlocal_group.{stage}: expected a positive integer (groups of frames), got {g!r}")
        out[stage] = g
    return out


def validate_nonlocal_blocks(placement: dict[str, Sequence[int]], depths: Sequence[int]) -> dict[str, list[int]]:
    """Check {"res3": [1, 3], ...}: known stages, integer block indices inside the stage, no repeats."""
    if not isinstance(placement, dict):
        raise ConfigError(f"nonlocal_blocks {placement!r}: expected a mapping like {{res3: [1, 3], res4: [1, 3, 5]}}")
    out: dict[str, list[int]] = {}
    for stage, idx in placement.items():
        if stage not in STAGES:
            raise ConfigError(f"nonlocal_blocks: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
        depth = depths[STAGES.index(stage)]
        if isinstance(idx, int) and not isinstance(idx, bool):
            idx = [idx]
        if not isinstance(idx, (list, tuple)):
            raise ConfigError(f"nonlocal_blocks.{stage}: expected a list of block indices, got {idx!r}")
        seen: list[int] = []
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
                raise ConfigError(
                    f"nonlocal_blocks.{stage}: block index {i!r} is out of range; {stage} has {depth} blocks "
                    f"(allowed 0..{depth - 1})"
                )
            if i in seen:
                raise ConfigError(f"nonlocal_blocks.{stage}: block index {i} is listed twice")
            seen.append(i)
        if seen:
            out[stage] = sorted(seen)
    return out
