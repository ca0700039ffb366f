"""A pytorchvideo-built reference for nlvid's whole models `i3d_r50_nl5` and `c2d_r50_nl5` (issue #17 fallback).

    from ptv_reference import build_ptv            # with benchmarks/ on sys.path
    m = build_ptv("i3d_r50_nl5", frames=8, size=224)   # (B, 3, 8, 224, 224) -> (B, 400) logits

`benchmarks/bench_model.py` compares nlvid against PySlowFast's model builder; when that snapshot is absent, this
module gives a reference built from pytorchvideo (0.1.5) pieces instead. It matches nlvid's model as bench_model
builds it, `create_model(model, layout="8x8", num_classes=400, stem_pool_padding=1)`: same parameter count to the
digit and the same multiply-adds per clip (torch FlopCounterMode, as bench_model.macs counts them).

What is built (all from pytorchvideo; no layer of our own was needed):
- `pytorchvideo.models.resnet.create_resnet` with the recipe of pytorchvideo's own hub models `i3d_r50` / `c2d_r50`
  (the 8x8 setting), which is nlvid's "8x8" layout:
    stem      conv 5x7x7 (I3D) or 1x7x7 (C2D), stride (1, 2, 2), padding (k // 2) = (2, 3, 3) / (0, 3, 3), no bias;
              BN, ReLU; max-pool 1x3x3 stride (1, 2, 2) padding (0, 1, 1) (= nlvid stem_pool_padding=1: 56x56 at 224)
    res2      3 bottlenecks, then a temporal max-pool 2x1x1 stride 2 (`stage1_pool`, = nlvid's pool2)
    res3..5   4, 6, 3 bottlenecks; spatial stride 2 in the 1x3x3 conv (conv_b) of the first block of each stage,
              projection shortcut (1x1x1 conv + BN) wherever the shape changes (first block of every stage)
    bottleneck conv_a (kt x 1 x 1) -> BN -> ReLU -> conv_b (1x3x3) -> BN -> ReLU -> conv_c (1x1x1) -> BN, + shortcut,
              ReLU; inner widths 64, 128, 256, 512, outputs 4x that; no conv bias
    I3D temporal kernels (conv_a 3x1x1, padding (1, 0, 0); nlvid's "i3d" = I3D_3x1x1, inflating the first conv):
              res2 every block [3, 3, 3]; res3 [3, 1, 3, 1]; res4 [3, 1, 3, 1, 3, 1]; res5 [1, 3, 1]
              (nlvid's INFLATE_PATTERN; pytorchvideo's create_res_stage repeats a per-stage kernel list to the depth).
              C2D: every conv_a is 1x1x1 and the stem is 1x7x7.
    head      `create_res_basic_head`: AvgPool3d over the whole res5 map (kernel = that map: (frames/2, 7, 7) at 224,
              as pytorchvideo's hub uses (4, 7, 7) for 8 frames), dropout 0.5, Linear(2048, 400), then its global
              average (a no-op on the 1x1x1 map) and a view to (B, 400). Same as nlvid's mean + dropout + fc.
- 5 Non-local blocks from `pytorchvideo.layers.nonlocal_net.create_nonlocal`, placed AFTER residual blocks
  res3[1], res3[3], res4[1], res4[3], res4[5] (0-based; nlvid's NL_PLACEMENTS[50]["nl5"], the paper's NL5), on that
  block's post-ReLU output. They are inserted into the stage's `ResStage.res_blocks` list, which pytorchvideo
  documents as holding "Residual blocks, Non-Local layers, ...": the stage runs them in sequence.
  Each block: dim_in C (512 / 1024), dim_inner C/2, instantiation "softmax" (= nlvid's default embedded_gaussian with
  scale C'^-0.5), pool_size (1, 2, 2) (max-pool, kernel = stride, no padding) applied to x BEFORE phi and g (= nlvid
  pool_position "input"), theta/phi/g/out 1x1x1 convs WITH bias (as nlvid's), BatchNorm3d(C) after the output conv,
  residual add, no ReLU after it. Parameters per block: 3 (C C' + C') + (C' C + C) + 2C, identical to nlvid's.
  benchmarks/bench_nonlocal.py already checks that this layer and nlvid's NonLocalBlock compute the same function
  given the same weights.

Choices, and where this differs from nlvid (none of it changes parameters or multiply-adds):
- ReLU: pytorchvideo's default activation is `nn.ReLU` constructed with no arguments, i.e. NOT in place. We pass
  `nn.ReLU(inplace=True)` (what PySlowFast and nlvid do) so the reference is not handicapped by extra activation
  buffers; `relu_inplace=False` gives pytorchvideo's literal default.
- Norms are pytorchvideo's default nn.BatchNorm3d (eps 1e-5, momentum 0.1), as nlvid's.
- Weight init: pytorchvideo's `init_net_weights` (Net's own, msra-fill convs, fc normal std 0.01, the last BN of
  each bottleneck zero-gamma). The NL blocks are added after `create_resnet` has built (and initialised) the Net, so
  they get the same init explicitly, their output BN marked `block_final_bn` -> gamma 0: each NL block is the
  identity at init, as nlvid's (nlvid zeroes NL BN gamma and beta). The backbone differs from nlvid in that
  pytorchvideo zeroes the last BN gamma of every bottleneck (nlvid keeps 1, zero_init_last_bn=False); this only
  changes the numbers, not the work. The RNG is not seeded here (bench_model.build seeds before building).
- Implementation details that are pytorchvideo's own and are kept, since they are what is being compared against:
  activations in the default contiguous (channels-first) memory layout (nlvid keeps channels_last_3d), plain
  nn.Conv3d for 1xkxk convs (nlvid folds time into the batch and runs conv2d), the NL attention as two einsums
  materialising the (N, N') affinity (nlvid: scaled_dot_product_attention), separate phi and g convs, and no BN
  folding at inference. FlopCounterMode counts pytorchvideo's einsums as bmm and nlvid's SDPA with torch's SDPA
  formula (bench_model.macs): both are the two N x N' x C' products, so the counts agree.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from pytorchvideo.layers.nonlocal_net import create_nonlocal
from pytorchvideo.models.resnet import ResStage, create_bottleneck_block, create_resnet
from pytorchvideo.models.weight_init import init_net_weights

MODELS = ("i3d_r50_nl5", "c2d_r50_nl5")

# Temporal kernels of conv_a (the bottleneck's first 1x1x1 conv), per stage res2..res5. A list is repeated to the
# stage depth by pytorchvideo's create_res_stage: [(3,1,1), (1,1,1)] over res3's 4 blocks -> 3, 1, 3, 1.
# I3D: nlvid's INFLATE_PATTERN ((1, 1, 1), (1, 0), (1, 0), (0, 1, 0)) with arch "i3d" (inflate the first conv).
_I3D_CONV_A = (
    (3, 1, 1),  # res2: every block
    [(3, 1, 1), (1, 1, 1)],  # res3: blocks 0, 2
    [(3, 1, 1), (1, 1, 1)],  # res4: blocks 0, 2, 4
    [(1, 1, 1), (3, 1, 1)],  # res5: block 1 only (the list repeated to 3 -> 1, 3, 1)
)
_C2D_CONV_A = ((1, 1, 1),) * 4  # C2D: no temporal kernel anywhere

# model -> stem temporal kernel and conv_a kernels (the only differences between the two models)
_ARCH = {
    "i3d_r50_nl5": dict(stem_kt=5, conv_a=_I3D_CONV_A),
    "c2d_r50_nl5": dict(stem_kt=1, conv_a=_C2D_CONV_A),
}

# NL5 placement for ResNet-50 (nlvid's NL_PLACEMENTS[50]["nl5"]): stage -> 0-based residual blocks that a Non-local
# block follows. Index into Net.blocks: [stem, res2, pool2, res3, res4, res5, head].
_NL5 = {"res3": [1, 3], "res4": [1, 3, 5]}
_NET_INDEX = {"res2": 1, "res3": 3, "res4": 4, "res5": 5}


def _res5_grid(frames: int, size: int) -> tuple[int, int, int]:
    """(T, H, W) of the res5 map for a (frames, size, size) clip: the head's average-pool kernel (whole map).

    Stem conv: temporal stride 1, padding kt // 2 (T kept); spatial 7x7 stride 2 padding 3 -> (s + 6 - 7) // 2 + 1.
    Stem pool 1x3x3 stride (1, 2, 2) padding (0, 1, 1) -> (s + 2 - 3) // 2 + 1. pool2 2x1x1 stride 2 -> T // 2.
    res3, res4, res5: a 3x3 conv with stride 2 and padding 1 each -> (s - 1) // 2 + 1."""
    s = (size + 6 - 7) // 2 + 1  # stem conv
    s = (s + 2 - 3) // 2 + 1  # stem pool (res2 keeps it)
    t = frames // 2  # pool2 after res2
    for _ in range(3):  # res3, res4, res5
        s = (s - 1) // 2 + 1
    if t < 1 or s < 1:
        raise ValueError(f"clip {frames}x{size}x{size} is too small for the R50 8x8 layout (needs >= 2 frames)")
    return t, s, s


def _nonlocal(dim: int) -> nn.Module:
    """pytorchvideo's Non-local layer configured as nlvid's default NonLocalBlock(dim): C' = C/2, softmax with
    scale C'^-0.5, max-pool (1, 2, 2) of x before phi/g, BN after the output conv. Initialised the pytorchvideo way
    with the output BN's gamma (and beta) zero, so the block is the identity at init."""
    nl = create_nonlocal(dim_in=dim, dim_inner=dim // 2, pool_size=(1, 2, 2), instantiation="softmax",
                         norm=nn.BatchNorm3d)
    nl.norm.block_final_bn = True  # init_net_weights zeroes the gamma of BNs carrying this flag
    init_net_weights(nl)  # msra-fill convs (bias 0), BN gamma 0 here, beta 0
    return nl


def build_ptv(model: str, frames: int, size: int, *, relu_inplace: bool = True) -> nn.Module:
    """A pytorchvideo `Net` equivalent in size and work to nlvid's `create_model(model, layout="8x8",
    num_classes=400, stem_pool_padding=1)`: takes (B, 3, frames, size, size), returns (B, 400) logits.

    model: "i3d_r50_nl5" or "c2d_r50_nl5". frames/size: the clip the head's average pool is sized for (it pools
    the whole res5 map, as PySlowFast's head does). relu_inplace: see the module docstring (False = pytorchvideo's
    literal default nn.ReLU())."""
    if model not in _ARCH:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(MODELS)}")
    arch = _ARCH[model]
    activation = partial(nn.ReLU, inplace=True) if relu_inplace else nn.ReLU
    net = create_resnet(
        input_channel=3,
        model_depth=50,  # stage depths (3, 4, 6, 3)
        model_num_class=400,
        dropout_rate=0.5,  # nlvid's default head dropout
        norm=nn.BatchNorm3d,
        activation=activation,
        # stem: conv kt x 7 x 7, stride (1, 2, 2), padding k // 2 (create_resnet derives it); pool 1x3x3 stride
        # (1, 2, 2) with padding (0, 1, 1) (create_resnet: k // 2), i.e. nlvid's stem_pool_padding=1
        stem_dim_out=64,
        stem_conv_kernel_size=(arch["stem_kt"], 7, 7),
        stem_conv_stride=(1, 2, 2),
        stem_pool=nn.MaxPool3d,
        stem_pool_kernel_size=(1, 3, 3),
        stem_pool_stride=(1, 2, 2),
        # temporal max-pool 2x1x1 stride 2 after res2 (nlvid's pool2 in the 8x8 layout)
        stage1_pool=nn.MaxPool3d,
        stage1_pool_kernel_size=(2, 1, 1),
        stage_conv_a_kernel_size=arch["conv_a"],
        stage_conv_b_kernel_size=((1, 3, 3),) * 4,
        stage_spatial_h_stride=(1, 2, 2, 2),
        stage_spatial_w_stride=(1, 2, 2, 2),
        stage_temporal_stride=(1, 1, 1, 1),
        bottleneck=create_bottleneck_block,
        # head: average over the whole res5 map, dropout, Linear(2048, 400), global average, view -> (B, 400)
        head_pool=nn.AvgPool3d,
        head_pool_kernel_size=_res5_grid(frames, size),
        head_output_with_global_average=True,
    )
    # Insert the 5 NL blocks into res3 / res4: the stage's ModuleList [b0, b1, b2, b3] becomes
    # [b0, b1, NL, b2, b3, NL] (res3) and [b0, b1, NL, b2, b3, NL, b4, b5, NL] (res4); ResStage runs them in order.
    for stage_name, after in _NL5.items():
        stage = net.blocks[_NET_INDEX[stage_name]]
        assert isinstance(stage, ResStage)
        dim = stage.res_blocks[0].branch2.conv_c.out_channels  # the stage's output width: 512 (res3), 1024 (res4)
        layers: list[nn.Module] = []
        for i, block in enumerate(stage.res_blocks):
            layers.append(block)
            if i in after:
                layers.append(_nonlocal(dim))
        stage.res_blocks = nn.ModuleList(layers)
    return net


if __name__ == "__main__":  # a quick look: parameter counts and one 8-frame forward shape
    torch.set_num_threads(1)
    for name in MODELS:
        m = build_ptv(name, 8, 224).eval()
        with torch.no_grad():
            out = m(torch.randn(1, 3, 8, 224, 224))  # (B, 3, T, H, W) -> (B, 400)
        print(f"{name}: {sum(p.numel() for p in m.parameters()):,} parameters, output {tuple(out.shape)}")
