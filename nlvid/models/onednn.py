"""When a CPU product runs on oneDNN, a matrix product that does, and the weight gradient of a temporal conv.

Why it matters here: on these machines (AMD EPYC, torch 2.14.1 built with MKL) torch's plain matrix products
(`mm`, `bmm`, `addmm`, `linear`, and its CPU attention kernel, which calls the same BLAS) run on MKL's sgemm at 85-95
GMAC/s, while oneDNN, which runs torch's convolutions, does the same product as a channels-last 1x1 convolution at
~180-210 GMAC/s (e.g. (1568 x 1024) x (1024 x 512): 9.7 ms vs 4.7 ms). But torch sends a 1x1 convolution to oneDNN
only under its own rule, and otherwise to an im2col + BLAS fallback that is slower than either (a 1x1x1 conv3d of
(2, 256, 8, 56, 56) -> 64, forward + backward on one thread: 265 ms vs 77 ms folded into a batch of 16), so the
callers ask `conv1x1_uses_onednn` before choosing a convolution over a matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def conv1x1_uses_onednn(x: torch.Tensor) -> bool:
    """Whether torch runs a 1x1 (or 1x1x1) convolution of x, batch first, through oneDNN: fp32 on CPU with oneDNN
    and, by torch's rules for 1x1 kernels (aten Convolution.cpp, use_mkldnn), more than one thread or a batch of at
    least 16, and a batch above 1 or more than 20480 values in the first four sizes. False while compiling
    (inductor picks its own kernels, and asking the thread count there is a graph break), tracing or exporting."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()  # traces and exports keep the plain paths (and no shape-dependent branch)
        and not torch.onnx.is_in_onnx_export()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and (x.shape[0] >= 16 or torch.get_num_threads() > 1)
        and (x.shape[0] > 1 or math.prod(x.shape[:4]) > 20480)  # torch's test looks at the first four sizes only
    )


def gemm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T -> (M, N), both contiguous, computed by oneDNN as a 1x1 convolution where torch
    would run that convolution on oneDNN (`conv1x1_uses_onednn`), else by torch's matmul.

    a is viewed as a (1, K, M, 1) channels-last image (its memory as is) and b as N filters of K channels; the
    channels-last output (1, N, M, 1) is the (M, N) product in row-major memory."""
    M, K = a.shape
    x = a.view(1, M, 1, K).permute(0, 3, 1, 2)  # (M, K) -> (1, K, M, 1) channels-last view
    if not conv1x1_uses_onednn(x):
        return a @ b.t()
    y = F.conv2d(x, b.view(b.shape[0], K, 1, 1))  # (1, N, M, 1) channels-last
    return y.permute(0, 2, 3, 1).reshape(M, -1)  # (1, N, M, 1) -> (1, M, 1, N) -> (M, N), a view


# (kt, 1, 1) convolutions whose weight gradient is faster as one 1x1 weight gradient per temporal tap: both channel
# counts' product and the rows of one tap of one clip at least these (measured, I3D R50 at 2 x 8 x 224, 2 threads,
# glibc's default malloc:
# 256 -> 64 at 8x56x56 40.5 -> 17.7 ms, 512 -> 256 at 4x28x28 20.8 -> 13.6, 1024 -> 256 at 4x14x14 10.2 -> 7.6; not
# 64 -> 64 at 8x56x56, 4.7 vs 5.5, or 2048 -> 512 at 4x7x7, 9.1 vs 15.3: a 147-row product is too short to pay)
_TAP_GRAD_MIN_CHANNEL_PRODUCT = 128 * 128
_TAP_GRAD_MIN_ROWS = 512


def temporal_weight_grad_by_taps(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `temporal_conv_weight_grad` is the faster weight gradient of conv3d(x, weight), a (kt, 1, 1) kernel
    with stride 1 and padding (kt // 2, 0, 0), for a channels_last_3d x (B, C, T, H, W)."""
    B, C, T, H, W = x.shape
    kt = weight.shape[2]
    return (
        weight.requires_grad
        and weight.dtype == x.dtype
        and not torch.is_autocast_enabled(x.device.type)  # the conv would run in another dtype than x
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and C * weight.shape[0] >= _TAP_GRAD_MIN_CHANNEL_PRODUCT
        and (T - kt // 2) * H * W >= _TAP_GRAD_MIN_ROWS  # also: every shifted tap sees at least one frame
        and conv1x1_uses_onednn(x[:1, :, kt // 2:])
    )


def temporal_conv_weight_grad(x: torch.Tensor, grad: torch.Tensor, kt: int) -> torch.Tensor:
    """The weight gradient (C', C, kt, 1, 1) of y = conv3d(x, w, padding=(kt // 2, 0, 0)), stride 1, from x
    (B, C, T, H, W) and grad = dL/dy (B, C', T, H, W), both channels_last_3d: tap j sees frame t + j - kt // 2 for
    output frame t, so its gradient is the 1x1x1 weight gradient of the frames that overlap. oneDNN's own (kt, 1, 1)
    weight gradient runs at ~50-100 GMAC/s here, its 1x1x1 one at ~130-200. A tap's frames of one clip are one
    dense channels-last block; across clips they are not, so the shifted taps go clip by clip."""
    B, C, T, H, W = x.shape
    pad = kt // 2
    grad = grad.contiguous(memory_format=torch.channels_last_3d)  # a no-op for the gradients BN hands back
    out = torch.empty((grad.shape[1], C, kt, 1, 1), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    w1 = torch.empty((grad.shape[1], C, 1, 1, 1), dtype=x.dtype, device=x.device,
                     memory_format=torch.channels_last_3d)  # only its shape and layout are read

    def grad_1x1(g: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(g, xs, w1, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], False,
                                                   [0, 0, 0], 1, [False, True, False])[1]

    for j in range(kt):
        s = j - pad  # output frame t reads input frame t + s
        if s == 0:
            out[:, :, j:j + 1] = grad_1x1(grad, x)
            continue
        t0, t1 = max(0, -s), min(T, T - s)  # output frames whose input frame exists (the rest see zero padding)
        acc = None
        for b in range(B):
            d = grad_1x1(grad[b:b + 1, :, t0:t1], x[b:b + 1, :, t0 + s:t1 + s])
            acc = d if acc is None else acc.add_(d)
        out[:, :, j:j + 1] = acc
    return out
