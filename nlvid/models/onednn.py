"""When a CPU product runs on oneDNN, and a matrix product that does.

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
    least 16, and a batch above 1 or more than 20480 values in the first four sizes. False while compiling (inductor picks its own
    kernels, and asking the thread count there is a graph break), tracing or exporting."""
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
