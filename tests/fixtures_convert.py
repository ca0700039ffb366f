"""Format-exact checkpoint writers for the converter tests, built at test time (nothing binary committed).

Each writer walks an nlvid model module by module and writes its tensors under the SOURCE's names, spelled here
from the source repositories (not by inverting nlvid.models.convert's rule tables):
- PySlowFast: slowfast/models/{video_model_builder,stem_helper,resnet_helper,nonlocal_helper,head_helper}.py;
  a `.pyth` is torch.save({"epoch", "model_state", "optimizer_state", "cfg"}).
- video-nonlocal-net (Caffe2): lib/models/{resnet_video,resnet_helper,nonlocal_helper}.py, model_builder_video.py
  (Conv3dBN: `<prefix>_w` + `<prefix>_bn_{s,b,rm,riv}`; Conv3dAffine: `<prefix>_bn_{s,b}`), and
  lib/utils/checkpoints.py (a Python-2 `cPickle.dump(dict(blobs=...), f, HIGHEST_PROTOCOL)` holding float32 arrays,
  `<param>_momentum` blobs, `lr` and `model_iter`). The pickle is emitted opcode by opcode as Python 2 writes it
  (str as BINSTRING, arrays via numpy.core.multiarray._reconstruct), because Python 3's pickler cannot.
- MMAction2: mmaction/models/backbones/resnet3d.py + mmcv ConvModule/NonLocal3d (`.conv`/`.bn`, sub_sample
  Sequential `.0.conv`, conv_out without bias when it has a norm), head `cls_head.fc_cls`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nlvid.models import create_model

EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Models whose outputs we know
# ----------------------------------------------------------------------------------------------------------------


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, non-trivial BN statistics, non-zero NL output BN (so attention matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5 if p.dim() > 1
                    else 0.1 * torch.randn(p.shape, generator=g))
            if name.endswith("bn.weight") or ".bn" in name and name.endswith(".weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))  # BN gammas in [0.5, 1.5]: NL blocks are active
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return model.eval()


def small_model(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A preset at width 8 (R50 structure, 8x fewer channels), random weights, eval mode."""
    kwargs.setdefault("width", 8)
    kwargs.setdefault("num_classes", 400)
    return randomize(create_model(name, **kwargs), seed)


def clip(frames: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone()


def _stages(model):
    for s in (2, 3, 4, 5):
        yield s, getattr(model, f"res{s}")


# ----------------------------------------------------------------------------------------------------------------
# PySlowFast
# ----------------------------------------------------------------------------------------------------------------


def pyslowfast_state(model: nn.Module) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, m: nn.BatchNorm3d) -> None:
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            sd[f"{prefix}.{p}"] = _t(getattr(m, p))

    sd["s1.pathway0_stem.conv.weight"] = _t(model.stem.conv.weight)  # ResNetBasicStem.conv
    bn("s1.pathway0_stem.bn", model.stem.bn)
    for s, stage in _stages(model):
        for i, blk in enumerate(stage.blocks):
            pre = f"s{s}.pathway0_res{i}"  # ResStage.add_module("pathway{}_res{}")
            if blk.downsample is not None:  # ResBlock.branch1 / branch1_bn
                sd[f"{pre}.branch1.weight"] = _t(blk.downsample[0].weight)
                bn(f"{pre}.branch1_bn", blk.downsample[1])
            for letter, conv, norm in (("a", blk.conv1, blk.bn1), ("b", blk.conv2, blk.bn2), ("c", blk.conv3, blk.bn3)):
                sd[f"{pre}.branch2.{letter}.weight"] = _t(conv.weight)  # BottleneckTransform.a / a_bn ...
                bn(f"{pre}.branch2.{letter}_bn", norm)
        for i, nl in stage.nl.items():
            pre = f"s{s}.pathway0_nonlocal{i}"  # ResStage.add_module("pathway{}_nonlocal{}")
            for c in ("theta", "phi", "g", "out"):
                sd[f"{pre}.conv_{c}.weight"] = _t(getattr(nl, c).weight)
                sd[f"{pre}.conv_{c}.bias"] = _t(getattr(nl, c).bias)
            bn(f"{pre}.bn", nl.bn)
    sd["head.projection.weight"] = _t(model.head.fc.weight)  # ResNetBasicHead.projection (Linear)
    sd["head.projection.bias"] = _t(model.head.fc.bias)
    return sd


def write_pyslowfast_pyth(model: nn.Module, path: Path) -> Path:
    torch.save({"epoch": 196, "model_state": pyslowfast_state(model),
                "optimizer_state": {"state": {}, "param_groups": []}, "cfg": "MODEL:\n  ARCH: i3d\n"}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Caffe2 (video-nonlocal-net)
# ----------------------------------------------------------------------------------------------------------------

_BN_C2 = (("s", "weight"), ("b", "bias"), ("rm", "running_mean"), ("riv", "running_var"))


def caffe2_blobs(model: nn.Module, *, frozen_bn: bool = False, momentum: bool = True) -> dict[str, Any]:
    """Blob dict of the official code. frozen_bn: every BN stored as a folded affine (`_bn_s`, `_bn_b` only), as
    process_data/convert_models/modify_caffe2_ftvideo.py writes them; NL blocks must then have no BN."""
    blobs: dict[str, Any] = {}

    def a(x: torch.Tensor) -> np.ndarray:
        return x.detach().numpy().astype(np.float32).copy()

    def conv_bn(prefix: str, conv: nn.Conv3d, bn: nn.BatchNorm3d) -> None:
        blobs[f"{prefix}_w"] = a(conv.weight)
        bn_prefix = "res_conv1_bn" if prefix == "conv1" else f"{prefix}_bn"  # resnet_video.py: 'res_conv1_bn'
        if frozen_bn:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            blobs[f"{bn_prefix}_s"] = a(scale)
            blobs[f"{bn_prefix}_b"] = a(bn.bias - bn.running_mean * scale)
        else:
            for c2, pt in _BN_C2:
                blobs[f"{bn_prefix}_{c2}"] = a(getattr(bn, pt))

    conv_bn("conv1", model.stem.conv, model.stem.bn)
    for s, stage in _stages(model):
        for i, blk in enumerate(stage.blocks):
            pre = f"res{s}_{i}"  # res_stage_nonlocal: "{}_{}".format(prefix, idx)
            conv_bn(f"{pre}_branch2a", blk.conv1, blk.bn1)
            conv_bn(f"{pre}_branch2b", blk.conv2, blk.bn2)
            conv_bn(f"{pre}_branch2c", blk.conv3, blk.bn3)
            if blk.downsample is not None:
                conv_bn(f"{pre}_branch1", blk.downsample[0], blk.downsample[1])
        for i, nl in stage.nl.items():
            pre = f"nonlocal_conv{s}_{i}"  # nonlocal_name + '_{}'.format(idx)
            for c in ("theta", "phi", "g", "out"):
                blobs[f"{pre}_{c}_w"] = a(getattr(nl, c).weight)
                blobs[f"{pre}_{c}_b"] = a(getattr(nl, c).bias)
            if hasattr(nl, "bn"):
                assert not frozen_bn, "frozen-BN models have no NL BN"
                for c2, pt in _BN_C2:
                    blobs[f"{pre}_bn_{c2}"] = a(getattr(nl.bn, pt))
    blobs["pred_w"] = a(model.head.fc.weight)  # FC: (classes, 2048)
    blobs["pred_b"] = a(model.head.fc.bias)
    if momentum:
        for name in [n for n in blobs if not n.endswith(("_rm", "_riv"))]:
            blobs[name + "_momentum"] = np.zeros_like(blobs[name])
    blobs["lr"] = np.array([1e-4], dtype=np.float32)
    blobs["model_iter"] = 400000
    return blobs


class _Py2Pickle:
    """Emit a protocol-2 pickle the way Python 2's cPickle writes {'blobs': {str: ndarray | int}}."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")

    def str2(self, x: str | bytes) -> None:  # Python 2 str: SHORT_BINSTRING / BINSTRING
        b = x.encode("latin1") if isinstance(x, str) else bytes(x)
        self.out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    def uni(self, x: str) -> None:  # Python 2 unicode (unicode_literals keys like 'blobs'): BINUNICODE
        b = x.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(b)) + b

    def int_(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])
        elif 0 <= n < 65536:
            self.out += b"M" + struct.pack("<H", n)
        else:
            self.out += b"J" + struct.pack("<i", n)

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def array(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        assert a.dtype == np.float32
        self.glob("numpy.core.multiarray", "_reconstruct")
        self.glob("numpy", "ndarray")
        self.int_(0)
        self.out += b"\x85"  # TUPLE1 -> (0,)
        self.str2("b")
        self.out += b"\x87R"  # TUPLE3, REDUCE -> _reconstruct(ndarray, (0,), 'b')
        self.out += b"("  # MARK: state (1, shape, dtype, is_fortran, rawdata)
        self.int_(1)
        self.out += b"("
        for d in a.shape:
            self.int_(d)
        self.out += b"t"
        self.glob("numpy", "dtype")
        self.str2("f4")
        self.int_(0)
        self.int_(1)
        self.out += b"\x87R"  # dtype('f4', 0, 1)
        self.out += b"("
        self.int_(3)
        self.str2("<")
        self.out += b"NNN"
        self.int_(-1)
        self.int_(-1)
        self.int_(0)
        self.out += b"tb"  # dtype.__setstate__((3, '<', None, None, None, -1, -1, 0))
        self.out += b"\x89"  # NEWFALSE: C order
        self.str2(a.tobytes())
        self.out += b"tb"  # ndarray.__setstate__(...)

    def value(self, v: Any) -> None:
        if isinstance(v, np.ndarray):
            self.array(v)
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, dict):
            self.dict_(v, unicode_keys=False)
        else:
            raise TypeError(type(v))

    def dict_(self, d: dict, *, unicode_keys: bool) -> None:
        self.out += b"}("
        for k, v in d.items():
            self.uni(k) if unicode_keys else self.str2(k)
            self.value(v)
        self.out += b"u"

    def dump(self, blobs: dict[str, Any]) -> bytes:
        self.out += b"}("
        self.uni("blobs")
        self.dict_(blobs, unicode_keys=False)
        self.out += b"u."
        return bytes(self.out)


def write_caffe2_pkl(model: nn.Module, path: Path, **kwargs: Any) -> Path:
    path.write_bytes(_Py2Pickle().dump(caffe2_blobs(model, **kwargs)))
    return path


# ----------------------------------------------------------------------------------------------------------------
# MMAction2
# ----------------------------------------------------------------------------------------------------------------


def mmaction2_state(model: nn.Module) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, m: nn.BatchNorm3d) -> None:
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            sd[f"{prefix}.{p}"] = _t(getattr(m, p))

    sd["backbone.conv1.conv.weight"] = _t(model.stem.conv.weight)  # ResNet3d.conv1 = ConvModule
    bn("backbone.conv1.bn", model.stem.bn)
    for s, stage in _stages(model):
        for i, blk in enumerate(stage.blocks):
            pre = f"backbone.layer{s - 1}.{i}"
            for n, conv, norm in (("conv1", blk.conv1, blk.bn1), ("conv2", blk.conv2, blk.bn2),
                                  ("conv3", blk.conv3, blk.bn3)):
                sd[f"{pre}.{n}.conv.weight"] = _t(conv.weight)
                bn(f"{pre}.{n}.bn", norm)
            if blk.downsample is not None:
                sd[f"{pre}.downsample.conv.weight"] = _t(blk.downsample[0].weight)
                bn(f"{pre}.downsample.bn", blk.downsample[1])
            if str(i) in stage.nl:
                nl = stage.nl[str(i)]
                nlp = f"{pre}.non_local_block"
                if hasattr(nl, "theta"):
                    sd[f"{nlp}.theta.conv.weight"] = _t(nl.theta.weight)
                    sd[f"{nlp}.theta.conv.bias"] = _t(nl.theta.bias)
                    sd[f"{nlp}.phi.0.conv.weight"] = _t(nl.phi.weight)  # sub_sample: Sequential(conv, pool)
                    sd[f"{nlp}.phi.0.conv.bias"] = _t(nl.phi.bias)
                sd[f"{nlp}.g.0.conv.weight"] = _t(nl.g.weight)
                sd[f"{nlp}.g.0.conv.bias"] = _t(nl.g.bias)
                sd[f"{nlp}.conv_out.conv.weight"] = _t(nl.out.weight)  # ConvModule with norm: no conv bias
                assert torch.all(nl.out.bias == 0), "mmcv's conv_out has no bias: zero it in the reference model"
                bn(f"{nlp}.conv_out.bn", nl.bn)
    sd["cls_head.fc_cls.weight"] = _t(model.head.fc.weight)
    sd["cls_head.fc_cls.bias"] = _t(model.head.fc.bias)
    return sd


def write_mmaction2_pth(model: nn.Module, path: Path) -> Path:
    torch.save({"meta": {"mmcv_version": "1.3.1", "epoch": 100, "iter": 0, "config": "model = dict(...)"},
                "state_dict": mmaction2_state(model), "optimizer": {"state": {}, "param_groups": []}}, path)
    return path
