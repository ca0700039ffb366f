"""The published Non-local / baseline weight files nlvid can import, as data (one `ZooEntry` per file).

Each entry says where the file is (primary URL first, then known mirrors), what it is (format, nlvid preset and
the architecture options that make nlvid compute what the source computes), how the source fed it (`data`: the
`DataConfig` values of its test protocol: frames x stride, mean/std, test sizes, views), what the source reports
(top-1 / top-5 and the protocol), its licence, and the published hash where there is one (MMAction2 and torchvision
put the first 8 hex digits of the file's SHA-256 in the file name). `nlvid.models.hub` downloads, verifies and
converts them; `nlvid models` lists them; `--pretrained NAME` uses them.

Where every value comes from (read in the sources, not guessed):
- video-nonlocal-net README (github.com/facebookresearch/video-nonlocal-net): file names, top-1 / top-5, the move of
  the files from s3.amazonaws.com/video-nonlocal/ to dl.fbaipublicfiles.com/video-nonlocal/ (README history),
  CC-BY-NC 4.0; lib/core/config.py (MODEL.MEAN 114.75 / STD 57.375 on 0..255 = 0.45 / 0.225, TEST.SCALE 256);
  README "Testing" (10 clips x 3 crops of 256, fully convolutional); lib/models/resnet_video{,_org}.py (8x8 / 32x4
  files: conv1 temporal stride 1, pool1 1x3x3 without padding; 32x2 / 128x1 files: conv1 and pool1 temporal stride
  2; frozen-BN files: res3 NL on groups of 4 frames, `res_stage_nonlocal_group`).
- PySlowFast MODEL_ZOO.md (github.com/facebookresearch/SlowFast): URLs and top-1 / top-5 (3 crops x 10 clips);
  configs/Kinetics/c2/{I3D_NLN,I3D,C2D_NOPOOL}_8x8_R50.yaml (8 frames x 8, TEST_CROP_SIZE 256, NL after res3 [1, 3]
  and res4 [1, 3, 5], ARCH c2d_nopool); slowfast/config/defaults.py (DATA.MEAN 0.45, STD 0.225); Apache-2.0.
- MMAction2 configs/recognition/i3d/README.md (1.x): URLs with the SHA-256 prefix, top-1 / top-5 (10 clips x 3
  crops); the configs (SampleFrames 32 x 2, Resize short side 256, ThreeCrop 256; data_preprocessor ImageNet
  mean/std); Apache-2.0.
- torchvision ResNet{18,34,50,101}_Weights.IMAGENET1K_V1: URL (with SHA-256 prefix), acc@1 / acc@5, file size;
  BSD-3-Clause.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from nlvid.errors import ConfigError

FORMATS = ("caffe2", "pyslowfast", "mmaction2", "imagenet")

LICENSES = {
    "video-nonlocal-net": "CC-BY-NC-4.0",
    "pyslowfast": "Apache-2.0",
    "mmaction2": "Apache-2.0",
    "torchvision": "BSD-3-Clause",
}
SOURCES = {
    "video-nonlocal-net": "https://github.com/facebookresearch/video-nonlocal-net#main-results",
    "pyslowfast": "https://github.com/facebookresearch/SlowFast/blob/main/MODEL_ZOO.md",
    "mmaction2": "https://github.com/open-mmlab/mmaction2/tree/main/configs/recognition/i3d",
    "torchvision": "https://pytorch.org/vision/stable/models/resnet.html",
}


@dataclass(frozen=True)
class ZooEntry:
    name: str  # what `--pretrained` takes
    urls: tuple[str, ...]  # primary first, then known mirrors
    format: str  # caffe2 | pyslowfast | mmaction2 | imagenet (torchvision 2-D ResNet, for initialisation)
    preset: str  # nlvid preset (models.presets)
    model: dict[str, Any]  # ModelConfig values that make nlvid compute what the source computes
    data: dict[str, Any]  # DataConfig values of the source's test protocol (frames x stride, mean/std, sizes, views)
    top1: float | None
    top5: float | None
    protocol: str  # how top1/top5 were measured
    origin: str  # a key of LICENSES / SOURCES
    sha256: str | None = None  # published hash (prefix) or None
    size_mb: float | None = None  # file size where published
    notes: str = ""
    dataset: str = "Kinetics-400"

    @property
    def file_name(self) -> str:
        return self.urls[0].rsplit("/", 1)[-1]

    @property
    def license(self) -> str:
        return LICENSES[self.origin]

    @property
    def source(self) -> str:
        return SOURCES[self.origin]

    @property
    def is_classifier(self) -> bool:
        """True for video classifiers (a converted nlvid checkpoint); False for ImageNet backbones (init only)."""
        return self.format != "imagenet"

    def digest(self) -> str:
        """8 hex digits that change whenever what the converted checkpoint holds would change."""
        key = json.dumps([self.format, self.preset, self.model, self.data, self.file_name], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:8]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(file_name=self.file_name, license=self.license, source=self.source)
        return d


# ---------------------------------------------------------------------------------------------- shared settings

_VNL_PAGE = "video-nonlocal"
_CAFFE2_MEAN = [0.45, 0.45, 0.45]  # 114.75 / 255
_CAFFE2_STD = [0.225, 0.225, 0.225]  # 57.375 / 255
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_VIEWS_10x3_256 = dict(test_short_side=256, test_crop_size=256, num_clips=10, num_crops=3)
_VNL_PROTOCOL = "K400 val, 10 clips x 3 crops of 256 (short side 256), fully convolutional, softmax averaged"


def _vnl_urls(file: str) -> tuple[str, ...]:
    return (f"https://dl.fbaipublicfiles.com/{_VNL_PAGE}/{file}", f"https://s3.amazonaws.com/{_VNL_PAGE}/{file}")


def _vnl(name: str, file: str, preset: str, frames: int, stride: int, top1: float, top5: float, *,
         frozen: bool = False, notes: str = "") -> ZooEntry:
    layout = "32x2" if (frames, stride) in ((32, 2), (128, 1)) else "8x8"
    model: dict[str, Any] = {"layout": layout, "stem_pool_padding": 0}
    if "_nl" in preset:
        model.update(instantiation="embedded_gaussian", scale=True, pool_position="input",
                     norm="none" if frozen else "bn")
        if frozen and frames >= 32:  # res3 has 16 frames: 4 groups of 4 (add_nonlocal_group, group_size=4)
            model["nonlocal_group"] = {"res3": 4}
    return ZooEntry(name=name, urls=_vnl_urls(file), format="caffe2", preset=preset, model=model,
                    data=dict(num_frames=frames, stride=stride, mean=_CAFFE2_MEAN, std=_CAFFE2_STD,
                              **_VIEWS_10x3_256),
                    top1=top1, top5=top5, protocol=_VNL_PROTOCOL, origin="video-nonlocal-net", notes=notes)


_PYSF_BASE = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/kinetics400/"


def _pysf(name: str, file: str, preset: str, top1: float, top5: float, *, layout: str = "8x8") -> ZooEntry:
    model: dict[str, Any] = {"layout": layout, "stem_pool_padding": 1}
    if "_nl" in preset:
        model.update(instantiation="embedded_gaussian", scale=True, pool_position="input", norm="bn")
    return ZooEntry(name=name, urls=(_PYSF_BASE + file,), format="pyslowfast", preset=preset, model=model,
                    data=dict(num_frames=8, stride=8, mean=_CAFFE2_MEAN, std=_CAFFE2_STD, **_VIEWS_10x3_256),
                    top1=top1, top5=top5, protocol="K400 val, 10 clips x 3 crops (TEST_CROP_SIZE 256)",
                    origin="pyslowfast")


_MM_BASE = "https://download.openmmlab.com/mmaction/v1.0/recognition/i3d/"


def _mm(name: str, config: str, stamp: str, instantiation: str | None, top1: float, top5: float) -> ZooEntry:
    file = f"{config}_{stamp}.pth"
    model: dict[str, Any] = {"layout": "mmaction2", "stem_pool_padding": 1}
    preset = "i3d_r50"
    if instantiation is not None:
        preset = "i3d_r50_nl5"
        model.update(instantiation=instantiation, scale=False, pool_position="after", pool_size=[1, 2, 2],
                     norm="bn")
    return ZooEntry(name=name, urls=(f"{_MM_BASE}{config}/{file}",), format="mmaction2", preset=preset, model=model,
                    data=dict(num_frames=32, stride=2, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, **_VIEWS_10x3_256),
                    top1=top1, top5=top5, sha256=stamp.rsplit("-", 1)[1],
                    protocol="K400 val (19796 videos), 10 clips x 3 crops of 256 (short side 256), prob averaged",
                    origin="mmaction2")


def _tv(depth: int, file: str, top1: float, top5: float, size_mb: float) -> ZooEntry:
    return ZooEntry(name=f"torchvision_resnet{depth}", urls=(f"https://download.pytorch.org/models/{file}",),
                    format="imagenet", preset=f"c2d_r{depth}", model={},
                    data=dict(mean=_IMAGENET_MEAN, std=_IMAGENET_STD), top1=top1, top5=top5,
                    sha256=file.rsplit("-", 1)[1].split(".")[0], size_mb=size_mb, dataset="ImageNet-1k",
                    protocol="ImageNet-1k val, 1 crop of 224 (resize 256)", origin="torchvision",
                    notes="2-D ImageNet backbone for initialisation (inflated into any C2D / I3D preset of this "
                          "depth); no video classifier")


# ---------------------------------------------------------------------------------------------- the registry

_ENTRIES: tuple[ZooEntry, ...] = (
    # video-nonlocal-net, "Modifications for improving speed" (8x8 and 32x4 clips)
    _vnl("vnl_c2d_r50_8x8", "c2d_baseline_8x8_IN_pretrain_400k.pkl", "c2d_r50", 8, 8, 71.9, 90.0),
    _vnl("vnl_c2d_r50_nl_8x8", "c2d_nonlocal_8x8_IN_pretrain_400k.pkl", "c2d_r50_nl5", 8, 8, 74.4, 91.4),
    _vnl("vnl_i3d_r50_8x8", "i3d_baseline_8x8_IN_pretrain_400k.pkl", "i3d_r50", 8, 8, 73.4, 90.9),
    _vnl("vnl_i3d_r50_nl_8x8", "i3d_nonlocal_8x8_IN_pretrain_400k.pkl", "i3d_r50_nl5", 8, 8, 74.7, 91.6),
    _vnl("vnl_i3d_r50_frozenbn_32x4", "i3d_baseline_32x4_I3D_pretrain_400k.pkl", "i3d_r50", 32, 4, 75.5, 92.0,
         frozen=True),
    _vnl("vnl_i3d_r50_nl_frozenbn_32x4", "i3d_nonlocal_32x4_I3D_pretrain_400k.pkl", "i3d_r50_nl5", 32, 4, 76.5, 92.6,
         frozen=True),
    # video-nonlocal-net, "Main Results" (the paper's 32x2 and 128x1 clips)
    _vnl("vnl_c2d_r50_32x2", "c2d_baseline_32x2_IN_pretrain_400k.pkl", "c2d_r50", 32, 2, 72.0, 90.0),
    _vnl("vnl_c2d_r50_nl_32x2", "c2d_nonlocal_32x2_IN_pretrain_400k.pkl", "c2d_r50_nl5", 32, 2, 73.9, 91.0),
    _vnl("vnl_i3d_r50_32x2", "i3d_baseline_32x2_IN_pretrain_400k.pkl", "i3d_r50", 32, 2, 73.6, 90.8),
    _vnl("vnl_i3d_r50_nl_32x2", "i3d_nonlocal_32x2_IN_pretrain_400k.pkl", "i3d_r50_nl5", 32, 2, 74.9, 91.6),
    _vnl("vnl_i3d_r50_frozenbn_128x1", "i3d_baseline_128x1_I3D_pretrain_400k.pkl", "i3d_r50", 128, 1, 75.2, 92.0,
         frozen=True),
    _vnl("vnl_i3d_r50_nl_frozenbn_128x1", "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl", "i3d_r50_nl5", 128, 1,
         76.5, 92.7, frozen=True),
    # video-nonlocal-net, "Fewer training iterations" / "Training with fewer GPUs"
    _vnl("vnl_i3d_r50_8x8_300k", "i3d_baseline_8x8_IN_pretrain_300k.pkl", "i3d_r50", 8, 8, 73.2, 90.8),
    _vnl("vnl_i3d_r50_8x8_600k_4gpu", "i3d_baseline_8x8_IN_pretrain_600k_4gpu.pkl", "i3d_r50", 8, 8, 73.0, 90.4,
         notes="4 GPUs, training data of 12/20/2017 (some videos missing)"),
    _vnl("vnl_i3d_r50_8x8_300k_4gpu", "i3d_baseline_8x8_IN_pretrain_300k_4gpu.pkl", "i3d_r50", 8, 8, 72.0, 90.1,
         notes="4 GPUs, 300k iterations, less regularisation (a sanity-check baseline)"),
    # PySlowFast model zoo (Caffe2-format .pkl)
    _pysf("pysf_i3d_r50_nl_8x8", "I3D_NLN_8x8_R50.pkl", "i3d_r50_nl5", 74.0, 91.1),
    _pysf("pysf_i3d_r50_8x8", "I3D_8x8_R50.pkl", "i3d_r50", 73.5, 90.8),
    _pysf("pysf_c2d_r50_nopool_8x8", "C2D_NOPOOL_8x8_R50.pkl", "c2d_r50", 67.2, 87.8, layout="8x8_nopool"),
    # MMAction2 1.x
    _mm("mmaction2_i3d_r50_nl_embedded_gaussian_32x2",
        "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb", "20220812-afd8f562",
        "embedded_gaussian", 74.73, 91.80),
    _mm("mmaction2_i3d_r50_nl_dot_product_32x2",
        "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb", "20220812-8e1f2148",
        "dot_product", 74.80, 92.07),
    _mm("mmaction2_i3d_r50_nl_gaussian_32x2",
        "i3d_imagenet-pretrained-r50-nl-gaussian_8xb8-32x2x1-100e_kinetics400-rgb", "20220812-0c5cbf5a",
        "gaussian", 73.97, 91.33),
    _mm("mmaction2_i3d_r50_32x2", "i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb",
        "20220812-e213c223", None, 73.47, 91.27),
    # torchvision ImageNet ResNets (IMAGENET1K_V1), for --init imagenet / fine-tuning
    _tv(18, "resnet18-f37072fd.pth", 69.758, 89.078, 44.661),
    _tv(34, "resnet34-b627a593.pth", 73.314, 91.420, 83.275),
    _tv(50, "resnet50-0676ba61.pth", 76.130, 92.862, 97.781),
    _tv(101, "resnet101-63fe2227.pth", 77.374, 93.546, 170.511),
)

REGISTRY: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def list_entries() -> list[ZooEntry]:
    """Every registry entry, in registry order."""
    return list(REGISTRY.values())


def _aliases() -> dict[str, ZooEntry]:
    """Published file names (with and without extension, any case) -> entry."""
    out: dict[str, ZooEntry] = {}
    for e in REGISTRY.values():
        out[e.file_name.lower()] = e
        out[e.file_name.rsplit(".", 1)[0].lower()] = e
    return out


def get_entry(name: str) -> ZooEntry:
    """The entry called `name` (or whose published file name is `name`); ConfigError naming the closest names."""
    if name in REGISTRY:
        return REGISTRY[name]
    alias = _aliases().get(name.lower()) or REGISTRY.get(name.lower())
    if alias is not None:
        return alias
    close = difflib.get_close_matches(name.lower(), list(REGISTRY), n=3, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ConfigError(f"unknown pretrained model {name!r}{hint} (`nlvid models` lists all {len(REGISTRY)})",
                      key="pretrained")


def config_overrides(entry: ZooEntry) -> list[str]:
    """`--set`-style overrides (KEY=YAML) that give a config the entry's architecture options and preprocessing."""
    out = [f"model.{k}={json.dumps(v)}" for k, v in entry.model.items()]
    out += [f"data.{k}={json.dumps(v)}" for k, v in entry.data.items()]
    return out


def describe_arch(entry: ZooEntry) -> str:
    """'i3d_r50_nl5 (layout 32x2, NL groups res3: 4)': the preset and the options that differ from its defaults."""
    m = entry.model
    extra = []
    if "layout" in m:
        extra.append(f"layout {m['layout']}")
    if m.get("instantiation") and m["instantiation"] != "embedded_gaussian":
        extra.append(m["instantiation"])
    if "frozenbn" in entry.name:
        extra.append("frozen BN")
    if m.get("nonlocal_group"):
        extra.append("NL groups " + ", ".join(f"{s}: {g}" for s, g in m["nonlocal_group"].items()))
    return entry.preset + (f" ({', '.join(extra)})" if extra else "")


def clip_spec(entry: ZooEntry) -> str:
    d = entry.data
    return f"{d['num_frames']}x{d['stride']}" if "num_frames" in d else "-"


__all__ = ["FORMATS", "LICENSES", "REGISTRY", "SOURCES", "ZooEntry", "clip_spec", "config_overrides",
           "describe_arch", "get_entry", "list_entries"]
