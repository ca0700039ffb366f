"""Load the models people already have: PySlowFast (.pyth / .pkl), official Caffe2 video-nonlocal-net (.pkl),
MMAction2 (.pth); write PySlowFast .pyth files.

Every importer is `fn(path, model_cfg) -> ImportResult(state_dict, model_cfg, classes, report)`:
- `state_dict` uses nlvid module names (`stem.conv.weight`, `res3.blocks.0.conv1.weight`, `res3.nl.1.theta.bias`,
  `head.fc.weight`, ...) and is complete for the model that `model_cfg` builds (strict load);
- `model_cfg` is an adjusted copy of the one given: the options the source used (NL pooling position, softmax scale,
  stem pool padding, layout, NL placement and norm, class count) so the nlvid model computes what the source did;
- `classes` are the Kinetics-400 names when the file has 400 classes (the order all these checkpoints use);
- `report` says what was loaded, skipped, filled in and changed.

Names are translated by rule: each format has a table of `Rule(source template, nlvid template, field values)`;
a key that no rule matches and that is not known bookkeeping (optimizer momentum, `lr`, `model_iter`) is an error,
and so is any nlvid parameter the file does not provide. Shapes are checked against the model the adjusted config
builds (on the meta device, no memory), with a hint when the temporal kernels say the file is another architecture.

Reading is safe: `.pyth`/`.pth` go through `torch.load(weights_only=True)`; Caffe2 `.pkl` (Python 2 pickles of
{'blobs': {name: numpy array}}) go through `_Caffe2Unpickler`, which resolves only numpy array reconstruction and
plain containers and refuses every other global before anything runs.

Source facts this module relies on (checked in the sources, not guessed):
- PySlowFast `nonlocal_helper.Nonlocal`: conv_theta/phi/g/out (with bias), BN named `bn`, max-pool of x BEFORE phi/g,
  softmax of theta.phi * dim_inner^-0.5; stem pool 1x3x3 stride (1,2,2) padding (0,1,1); `head.projection` Linear.
  Its Caffe2-format model-zoo files (I3D_NLN_8x8_R50.pkl) use Caffe2 blob names, converted by
  `slowfast/utils/c2_model_loading.py` with exactly the Caffe2 table below.
- video-nonlocal-net (Caffe2): NONLOCAL.USE_MAXPOOL (pool before phi/g) and USE_SCALE default True; pool1 has no
  padding (55x55 at 224); frozen-BN ("affine") models store only `_bn_s`/`_bn_b` (y = s*x + b) and their NL blocks
  have no BN (NONLOCAL.USE_BN False, zero-init W_z); MODEL.USE_BGR False (RGB input).
  Its frozen-BN ("affine") models run the res3 NL on groups of 4 frames (`res_stage_nonlocal_group` ->
  `add_nonlocal_group`, group_size=4, group_num = res3 frames / 4 at the training clip length): the import sets
  `model.nonlocal_group` to that group count (4 for the 32x4 and 128x1 files).
- PySlowFast's `c2d_nopool` architecture (C2D_NOPOOL_8x8_R50) has no temporal pool after res2 (_POOL1 [[1, 1, 1]]):
  nlvid's `8x8_nopool` layout.

Preprocessing the sources used (`source_data_settings`): frames x stride from the file name (`8x8`, `32x2x1`, ...),
and MMAction2's ImageNet mean/std; `nlvid build --init ... --out` stores them in the checkpoint's data config.

The container is told from the bytes (`sniff_format`: zip = torch >= 1.6 file, pickle = Caffe2 / legacy), never
from the file extension.
- MMAction2 ResNet3d + mmcv NonLocal3d: NL applied inside the Bottleneck after the residual add + ReLU (= nlvid's
  "after block i"); sub_sample wraps g and phi as Sequential(ConvModule, MaxPool3d(1,2,2)) (pool AFTER the convs);
  ConvModule with a norm has no conv bias (loaded as zeros); the Kinetics NL configs use use_scale=False.
  Its I3D stem is conv1 stride (2,2,2) then max-pool 1x3x3 stride (2,2,2) padding (0,1,1).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from nlvid.checkpoint import atomic_save, first_line, read_torch_file, require_file
from nlvid.config import ModelConfig, model_kwargs
from nlvid.errors import CheckpointError, ConfigError
from nlvid.models.presets import PRESETS, create_model, list_models
from nlvid.models.resnet3d import ARCHS, LAYOUTS, STAGE_DEPTHS, temporal_kernels

BN_EPS = 1e-5  # nlvid's BatchNorm3d eps (resnet3d._bn, NonLocalBlock.bn); Caffe2 used 1.0000001e-5
RESOURCES = Path(__file__).resolve().parent.parent / "resources"

__all__ = [
    "IMPORTERS",
    "EXPORTERS",
    "ImportResult",
    "Rule",
    "kinetics400_classes",
    "import_pyslowfast",
    "import_caffe2",
    "import_mmaction2",
    "export_pyslowfast",
    "to_pyslowfast_names",
    "read_caffe2_pickle",
    "sniff_format",
    "source_data_settings",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CAFFE2_RULES",
    "PYSLOWFAST_RULES",
    "MMACTION2_RULES",
]


@dataclass
class ImportResult:
    state_dict: dict[str, torch.Tensor]  # nlvid names, complete for `model_cfg`
    model_cfg: ModelConfig  # adjusted copy (source options)
    classes: list[str] | None  # Kinetics-400 names for 400-class files
    report: list[str]
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # `data.*` the source used (source_data_settings)


# torchvision / MMAction2 normalisation of [0, 1] RGB (MMAction2: mean 123.675/116.28/103.53, std 58.395/57.12/57.375
# on 0..255, i.e. these values x 255)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def sniff_format(path: str | Path) -> str:
    """What a weights file is, from its first bytes: "zip" (torch.save since 1.6: .pth / .pyth), "torch-legacy"
    (torch.save's older pickle stream, starting with its magic number) or "pickle" (a Caffe2 .pkl); CheckpointError
    for anything else (an HTML error page saved as .pkl, a truncated file)."""
    path = Path(path)
    require_file(path, "weights file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"):
        return "torch-legacy"  # pickle protocol 2, LONG1 torch.serialization.MAGIC_NUMBER
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    shown = head[:8].hex(" ") or "empty"
    raise CheckpointError(f"{path}: not a weights file (first bytes {shown}: neither a torch zip nor a pickle)")


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics class names in the order the official checkpoints use (alphabetical; video-nonlocal-net
    `process_data/kinetics/classids.json`, identical to PySlowFast's and MMAction2's K400 label maps)."""
    path = RESOURCES / "kinetics400_classes.txt"
    names = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != 400:  # pragma: no cover (a packaging bug)
        raise CheckpointError(f"{path}: expected 400 Kinetics class names, found {len(names)}")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Naming rules
# ----------------------------------------------------------------------------------------------------------------

_FIELD = re.compile(r"\{(\w+)\}")


class Rule:
    """One naming rule between a source template and an nlvid template.

    Templates hold `{fields}`. A field listed in `values` takes one of the given spellings (source -> nlvid);
    any other field is a decimal index copied unchanged. `linear=True`: the value is a classifier weight that some
    sources store with trailing 1-sized dims ((K, C, 1, 1, 1)); it is reshaped to (K, C) on import.
    `export=False`: an alternative source spelling accepted on import only.
    """

    def __init__(self, src: str, dst: str, values: dict[str, dict[str, str]] | None = None, *,
                 linear: bool = False, export: bool = True):
        self.src, self.dst = src, dst
        self.values = values or {}
        self.inverse = {f: {v: k for k, v in m.items()} for f, m in self.values.items()}
        self.linear = linear
        self.export = export
        self._src_re = self._compile(src, self.values)
        self._dst_re = self._compile(dst, self.inverse)

    @staticmethod
    def _compile(template: str, values: dict[str, dict[str, str]]) -> re.Pattern:
        parts, pos = [], 0
        for m in _FIELD.finditer(template):
            parts.append(re.escape(template[pos:m.start()]))
            name = m[1]
            if name in values:
                choices = sorted(values[name], key=len, reverse=True)
                parts.append(f"(?P<{name}>{'|'.join(map(re.escape, choices))})")
            else:
                parts.append(rf"(?P<{name}>\d+)")
            pos = m.end()
        parts.append(re.escape(template[pos:]))
        return re.compile("".join(parts) + r"\Z")

    def to_nlvid(self, name: str) -> str | None:
        m = self._src_re.match(name)
        if m is None:
            return None
        return self.dst.format(**{k: self.values[k][v] if k in self.values else v for k, v in m.groupdict().items()})

    def to_source(self, name: str) -> str | None:
        if not self.export:
            return None
        m = self._dst_re.match(name)
        if m is None:
            return None
        return self.src.format(**{k: self.inverse[k][v] if k in self.inverse else v for k, v in m.groupdict().items()})

    def __repr__(self) -> str:
        return f"Rule({self.src!r} -> {self.dst!r})"


_BN_C2 = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}  # riv: running VARIANCE
_WB_C2 = {"w": "weight", "b": "bias"}
_BN_PT = {k: k for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
_WB_PT = {"weight": "weight", "bias": "bias"}
_ABC_CONV = {"a": "conv1", "b": "conv2", "c": "conv3"}  # bottleneck branch2 a/b/c = 1x1 / 3x3 / 1x1
_ABC_BN = {"a": "bn1", "b": "bn2", "c": "bn3"}
_NL_CONVS = {"theta": "theta", "phi": "phi", "g": "g", "out": "out"}

# Official video-nonlocal-net (lib/models/resnet_video.py, resnet_helper.py, nonlocal_helper.py); PySlowFast's
# c2_model_loading.py converts the same names. The NL prefix is nonlocal_conv{stage}_{index of the block it follows}.
CAFFE2_RULES: tuple[Rule, ...] = (
    Rule("conv1_w", "stem.conv.weight"),
    Rule("res_conv1_bn_{p}", "stem.bn.{p}", {"p": _BN_C2}),
    Rule("res{s}_{i}_branch2{c}_w", "res{s}.blocks.{i}.{c}.weight", {"c": _ABC_CONV}),
    Rule("res{s}_{i}_branch2{c}_bn_{p}", "res{s}.blocks.{i}.{c}.{p}", {"c": _ABC_BN, "p": _BN_C2}),
    Rule("res{s}_{i}_branch1_w", "res{s}.blocks.{i}.downsample.0.weight"),
    Rule("res{s}_{i}_branch1_bn_{p}", "res{s}.blocks.{i}.downsample.1.{p}", {"p": _BN_C2}),
    Rule("nonlocal_conv{s}_{i}_{c}_{p}", "res{s}.nl.{i}.{c}.{p}", {"c": _NL_CONVS, "p": _WB_C2}),
    Rule("nonlocal_conv{s}_{i}_bn_{p}", "res{s}.nl.{i}.bn.{p}", {"p": _BN_C2}),
    Rule("pred_w", "head.fc.weight", linear=True),  # FC (K, C); the test net's 1x1x1 conv form (K, C, 1, 1, 1)
    Rule("pred_b", "head.fc.bias"),
)
# Training bookkeeping saved next to the weights (checkpoints.save_model_params): skipped, counted in the report.
CAFFE2_SKIP = re.compile(r"(.+_momentum|lr|model_iter)\Z")

# PySlowFast (slowfast/models/video_model_builder.py ResNet, resnet_helper.py, stem_helper.py, nonlocal_helper.py,
# head_helper.py). Single pathway: pathway0.
PYSLOWFAST_RULES: tuple[Rule, ...] = (
    Rule("s1.pathway0_stem.conv.weight", "stem.conv.weight"),
    Rule("s1.pathway0_stem.bn.{p}", "stem.bn.{p}", {"p": _BN_PT}),
    Rule("s{s}.pathway0_res{i}.branch2.{c}.weight", "res{s}.blocks.{i}.{c}.weight", {"c": _ABC_CONV}),
    Rule("s{s}.pathway0_res{i}.branch2.{c}_bn.{p}", "res{s}.blocks.{i}.{c}.{p}", {"c": _ABC_BN, "p": _BN_PT}),
    Rule("s{s}.pathway0_res{i}.branch1.weight", "res{s}.blocks.{i}.downsample.0.weight"),
    Rule("s{s}.pathway0_res{i}.branch1_bn.{p}", "res{s}.blocks.{i}.downsample.1.{p}", {"p": _BN_PT}),
    Rule("s{s}.pathway0_nonlocal{i}.conv_{c}.{p}", "res{s}.nl.{i}.{c}.{p}", {"c": _NL_CONVS, "p": _WB_PT}),
    Rule("s{s}.pathway0_nonlocal{i}.bn.{p}", "res{s}.nl.{i}.bn.{p}", {"p": _BN_PT}),
    # some PySlowFast versions name the NL norm `norm` (their source plans that rename): import only
    Rule("s{s}.pathway0_nonlocal{i}.norm.{p}", "res{s}.nl.{i}.bn.{p}", {"p": _BN_PT}, export=False),
    Rule("head.projection.weight", "head.fc.weight", linear=True),
    Rule("head.projection.bias", "head.fc.bias"),
)

# MMAction2 ResNet3d (layer1..4 = res2..res5) with mmcv ConvModule (`.conv` / `.bn`) and NonLocal3d.
_MM_STAGE = {"1": "2", "2": "3", "3": "4", "4": "5"}
_MM_CONV = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3"}
_MM_BN = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}
_MM_PG = {"phi": "phi", "g": "g"}
_MM_NL = "backbone.layer{L}.{i}.non_local_block"
MMACTION2_RULES: tuple[Rule, ...] = (
    Rule("backbone.conv1.conv.weight", "stem.conv.weight"),
    Rule("backbone.conv1.bn.{p}", "stem.bn.{p}", {"p": _BN_PT}),
    Rule("backbone.layer{L}.{i}.{c}.conv.weight", "res{L}.blocks.{i}.{c}.weight", {"L": _MM_STAGE, "c": _MM_CONV}),
    Rule("backbone.layer{L}.{i}.{c}.bn.{p}", "res{L}.blocks.{i}.{c}.{p}", {"L": _MM_STAGE, "c": _MM_BN, "p": _BN_PT}),
    Rule("backbone.layer{L}.{i}.downsample.conv.weight", "res{L}.blocks.{i}.downsample.0.weight", {"L": _MM_STAGE}),
    Rule("backbone.layer{L}.{i}.downsample.bn.{p}", "res{L}.blocks.{i}.downsample.1.{p}",
         {"L": _MM_STAGE, "p": _BN_PT}),
    Rule(_MM_NL + ".theta.conv.{p}", "res{L}.nl.{i}.theta.{p}", {"L": _MM_STAGE, "p": _WB_PT}),
    # sub_sample=True: phi / g are Sequential(ConvModule, MaxPool3d) -> `.0.conv`; sub_sample=False: `.conv`
    Rule(_MM_NL + ".{c}.0.conv.{p}", "res{L}.nl.{i}.{c}.{p}", {"L": _MM_STAGE, "c": _MM_PG, "p": _WB_PT}),
    Rule(_MM_NL + ".{c}.conv.{p}", "res{L}.nl.{i}.{c}.{p}", {"L": _MM_STAGE, "c": _MM_PG, "p": _WB_PT}, export=False),
    Rule(_MM_NL + ".conv_out.conv.{p}", "res{L}.nl.{i}.out.{p}", {"L": _MM_STAGE, "p": _WB_PT}),
    Rule(_MM_NL + ".conv_out.bn.{p}", "res{L}.nl.{i}.bn.{p}", {"L": _MM_STAGE, "p": _BN_PT}),
    Rule(_MM_NL + ".concat_project.conv.weight", "res{L}.nl.{i}.concat_project.weight", {"L": _MM_STAGE},
         linear=True),
    Rule("cls_head.fc_cls.weight", "head.fc.weight", linear=True),
    Rule("cls_head.fc_cls.bias", "head.fc.bias"),
)
MMACTION2_SKIP = re.compile(r"data_preprocessor\..+\Z")  # mmengine preprocessor mean/std buffers


def _translate(source: dict[str, Any], rules: Iterable[Rule], skip: re.Pattern | None, path: Path, fmt: str
               ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Source names -> nlvid names. Returns (mapped, skipped source keys, source key of each mapped name in order)."""
    rules = tuple(rules)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    skipped, unknown = [], []
    for key, value in source.items():
        if skip is not None and skip.match(key):
            skipped.append(key)
            continue
        for rule in rules:
            name = rule.to_nlvid(key)
            if name is not None:
                break
        else:
            unknown.append(key)
            continue
        tensor = _as_tensor(value, key, path)
        if rule.linear and tensor.dim() > 2:
            if any(d != 1 for d in tensor.shape[2:]):
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}; expected (classes, channels)")
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # (K, C, 1, 1, 1) -> (K, C)
        if name in mapped:
            raise CheckpointError(f"{path}: {key} and {origin[name]} both map to {name}")
        mapped[name] = tensor
        origin[name] = key
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) have no {fmt} naming rule (refusing to drop weights silently): "
            + ", ".join(unknown[:6]) + (" ..." if len(unknown) > 6 else "")
            + (" (is this really a " + fmt + " ResNet file?)")
        )
    if not mapped:
        raise CheckpointError(f"{path}: no {fmt} weights found (is this a {fmt} file?)")
    return mapped, skipped, list(origin.values())


def _as_tensor(value: Any, key: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        return torch.from_numpy(np.array(value, copy=True))
    raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not an array")


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------


def _torch_load(path: Path, fmt: str) -> Any:
    return read_torch_file(path, what=f"{fmt} checkpoint")


def _numpy_global(name: str) -> Callable[[], Any]:
    def get() -> Any:
        core = getattr(np, "_core", None) or np.core  # numpy >= 2 has _core (core is a deprecated alias there)
        return getattr(core.multiarray, name)

    return get


# (module, name) -> getter. Everything a numpy pickle of {'blobs': {name: array}} needs (Python 2, or Python 3
# with protocol 2), nothing else.
_CAFFE2_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_global("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): _numpy_global("scalar"),
    ("numpy._core.multiarray", "scalar"): _numpy_global("scalar"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    # Python 3 pickles with protocol 2 spell bytes as _codecs.encode(text, "latin1"); only that codec is allowed.
    ("_codecs", "encode"): lambda: _latin1_encode,
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refused _codecs.encode with encoding {encoding!r} in a Caffe2 pickle (only latin1)")
    return text.encode("latin1")


class _Caffe2Unpickler(pickle.Unpickler):
    """Unpickler for Caffe2 weight files: numpy arrays, numbers, strings, dicts/lists/tuples; nothing else.

    `find_class` is the only way a pickle can reach code; it resolves the allow-listed numpy names and raises
    `CheckpointError` (naming the file and the refused global) for anything else, before it is called.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2 str -> latin1 (numpy's documented way)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        getter = _CAFFE2_SAFE_GLOBALS.get((module, name))
        if getter is None:
            raise CheckpointError(
                f"{self._path}: refused to load global {module}.{name} (a Caffe2 weight file holds only numpy "
                "arrays; this pickle would run other code)"
            )
        return getter()

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self._path}: refused a persistent reference in the pickle (not a Caffe2 weight file)")


def read_caffe2_pickle(path: str | Path) -> dict[str, Any]:
    """Read a Caffe2 `.pkl` ({'blobs': {...}} or the blobs dict itself) safely; returns name -> value."""
    path = Path(path)
    require_file(path, "checkpoint")
    try:
        with open(path, "rb") as f:
            obj = _Caffe2Unpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated file, not a pickle, bad array data
        raise CheckpointError(f"{path}: not a readable Caffe2 .pkl: {first_line(e)}") from None
    if isinstance(obj, dict) and "blobs" in obj and isinstance(obj["blobs"], dict):
        obj = obj["blobs"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a pickled dict {{'blobs': {{name: array}}}}, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _state_from_container(obj: Any, keys: tuple[str, ...], path: Path, fmt: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a {fmt} state dict (under {' or '.join(keys)}), "
                              f"got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        k = str(k)
        if k.startswith("module."):  # saved from DistributedDataParallel
            k = k[len("module."):]
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Completing the state dict and the config
# ----------------------------------------------------------------------------------------------------------------

_NL_KEY = re.compile(r"(res[2-5])\.nl\.(\d+)\.")
_BLOCK_KEY = re.compile(r"(res[2-5])\.blocks\.(\d+)\.")


def _bn_prefixes(sd: dict[str, torch.Tensor]) -> list[str]:
    """Module prefixes that are BatchNorms: they have `.weight` and either running stats or a BN-ish name."""
    out = []
    for k in sd:
        if k.endswith(".bias"):
            p = k[: -len(".bias")]
            leaf = p.rsplit(".", 1)[-1]
            if leaf in ("bn", "bn1", "bn2", "bn3") or p.endswith("downsample.1"):
                out.append(p)
    return out


def _fill_bn(sd: dict[str, torch.Tensor], report: list[str], *, frozen_ok: bool, path: Path) -> bool:
    """Add missing BN buffers: running stats of frozen (affine) layers, num_batches_tracked everywhere. Returns
    whether the file is a frozen-BN one (then the model is built with model.bn=frozen, so fine-tuning keeps those
    statistics fixed, as the source was trained)."""
    frozen = []
    for p in _bn_prefixes(sd):
        w = sd.get(p + ".weight")
        if w is None:
            raise CheckpointError(f"{path}: {p} has a bias but no scale")
        has_mean, has_var = p + ".running_mean" in sd, p + ".running_var" in sd
        if has_mean != has_var:
            raise CheckpointError(f"{path}: {p} has only one of running mean / variance")
        if not has_mean:
            if not frozen_ok:
                raise CheckpointError(f"{path}: {p} has no running statistics")
            # An affine layer y = s*x + b as BN: mean 0, and var = 1 - eps so that sqrt(var + eps) = 1; in float32
            # fl(1 - 1e-5) + 1e-5 == 1.0 exactly, so the BN output is exactly s*x + b (tested).
            sd[p + ".running_mean"] = torch.zeros_like(w)
            sd[p + ".running_var"] = torch.full_like(w, 1.0 - BN_EPS)
            frozen.append(p)
        if p + ".num_batches_tracked" not in sd:
            sd[p + ".num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if frozen:
        report.append(f"frozen-BN (affine) file: {len(frozen)} layers loaded as BatchNorm with running mean 0 and "
                      f"variance 1-eps (so sqrt(var+eps) = 1 and the layer is exactly y = s*x + b)")
    return bool(frozen)


def _placement(sd: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for k in sd:
        m = _NL_KEY.match(k)
        if m:
            out.setdefault(m[1], set()).add(int(m[2]))
    return {s: sorted(v) for s, v in sorted(out.items())}


def _stage_depths(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    counts = {}
    for k in sd:
        m = _BLOCK_KEY.match(k)
        if m:
            counts[m[1]] = max(counts.get(m[1], 0), int(m[2]) + 1)
    return tuple(counts.get(s, 0) for s in ("res2", "res3", "res4", "res5"))


def _nl_structure(sd: dict[str, torch.Tensor]) -> dict[str, bool]:
    keys = [k for k in sd if ".nl." in k]
    return dict(
        any=bool(keys),
        bn=any(".bn." in k for k in keys),
        theta=any(".theta." in k for k in keys),
        concat=any(".concat_project." in k for k in keys),
    )


def _fill_nl_bias(sd: dict[str, torch.Tensor], report: list[str]) -> None:
    """Convs that have no bias in the source (mmcv ConvModule before a norm) get a zero bias: same function."""
    filled = 0
    for k in list(sd):
        m = re.match(r"(res[2-5]\.nl\.\d+\.(?:theta|phi|g|out))\.weight\Z", k)
        if m and m[1] + ".bias" not in sd:
            sd[m[1] + ".bias"] = torch.zeros(sd[k].shape[0], dtype=sd[k].dtype)
            filled += 1
    if filled:
        report.append(f"{filled} NL conv(s) have no bias in the source: loaded as zero bias (same function)")


def _set(cfg: ModelConfig, changes: dict[str, Any], report: list[str], *, forced: Iterable[str] = ()) -> ModelConfig:
    """Apply option changes; an explicit user value is overridden only for `forced` keys (reported)."""
    forced = set(forced)
    final = {}
    for key, value in changes.items():
        current = getattr(cfg, key)
        if current is not None and current != value and key not in forced:
            report.append(f"keeping model.{key}={current!r} as given (the source's usual value is {value!r})")
            continue
        if current is not None and current != value:
            report.append(f"model.{key}: {current!r} -> {value!r} (what the source computes)")
        final[key] = value
    return dataclasses.replace(cfg, **final)


def _preset_args(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return PRESETS[name]


def _arch_hint(sd: dict[str, torch.Tensor], depths: tuple[int, ...], name: str) -> str:
    """Which architecture (c2d / i3d / i3d333) the file's temporal kernel sizes match, as a preset suggestion."""
    stem_kt = sd["stem.conv.weight"].shape[2] if "stem.conv.weight" in sd else None
    file_kts = []
    for s, n in zip(("res2", "res3", "res4", "res5"), depths):
        for i in range(n):
            a = sd.get(f"{s}.blocks.{i}.conv1.weight")
            b = sd.get(f"{s}.blocks.{i}.conv2.weight")
            file_kts.append((a.shape[2] if a is not None else None, b.shape[2] if b is not None else None))
    depth = next((d for d, ds in STAGE_DEPTHS.items() if ds == depths and d >= 50), None)
    for arch, spec in ARCHS.items():
        want = [kt for stage in temporal_kernels(arch, depths) for kt in stage]
        if spec["stem_kt"] == stem_kt and want == file_kts:
            suffix = re.sub(r"^[a-z0-9]+_r\d+", "", name)
            use = f": use {arch}_r{depth}{suffix}" if depth else ""
            return f"the file's temporal kernels are those of {arch}{use}"
    return f"the file's temporal kernels (stem {stem_kt}, blocks {file_kts[:4]}...) match no nlvid architecture"


def _check_against_model(sd: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    """Build the model `cfg` describes on the meta device and compare names and shapes (clear errors early)."""
    with torch.device("meta"):
        model = create_model(cfg.name, **model_kwargs(cfg))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    depths = _stage_depths(sd)
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + ", ".join(
            f"{k} file {tuple(sd[k].shape)} vs model {expected[k]}" for k in shapes[:3]))
    if missing:
        problems.append(f"{len(missing)} model key(s) not in the file: " + ", ".join(missing[:4]))
    if unexpected:
        problems.append(f"{len(unexpected)} file key(s) the model lacks: " + ", ".join(unexpected[:4]))
    hint = ""
    model_depths = tuple(len(getattr(model, s).blocks) for s in ("res2", "res3", "res4", "res5"))
    if depths != model_depths:
        hint = f"; the file has {depths} blocks per stage, {cfg.name} has {model_depths}"
    elif any(k.endswith("conv.weight") or ".conv" in k for k in shapes):
        hint = "; " + _arch_hint(sd, depths, cfg.name)
    raise CheckpointError(f"{path}: does not fit model {cfg.name}: " + "; ".join(problems) + hint)


def _finish(sd: dict[str, torch.Tensor], cfg: ModelConfig, report: list[str], path: Path, *,
            options: dict[str, Any], forced: Iterable[str]) -> ImportResult:
    """Common tail: class count, NL placement/norm, width, config changes, shape check, classes."""
    if "head.fc.weight" not in sd:
        raise CheckpointError(f"{path}: no classifier weights found")
    num_classes = int(sd["head.fc.weight"].shape[0])
    placement = _placement(sd)
    nl = _nl_structure(sd)
    changes: dict[str, Any] = {}
    if nl["any"]:
        changes["norm"] = "bn" if nl["bn"] else "none"
        changes.update(options)
    else:  # a baseline file: the NL options mean nothing
        changes.update({k: v for k, v in options.items() if k not in _NL_OPTION_KEYS})
    cfg = _set(cfg, changes, report, forced=set(forced) | {"norm"})
    preset = _preset_args(cfg.name)
    if cfg.nonlocal_blocks is not None and cfg.nonlocal_blocks != placement:
        report.append(f"model.nonlocal_blocks: {cfg.nonlocal_blocks} -> {placement} (the file's NL blocks)")
    elif placement != preset.get("nonlocal_blocks", {}):
        report.append(f"NL blocks from the file: {placement or 'none'} (preset {cfg.name} has "
                      f"{preset.get('nonlocal_blocks') or 'none'})")
    width = int(sd["stem.conv.weight"].shape[0]) if "stem.conv.weight" in sd else None
    extra: dict[str, Any] = {"nonlocal_blocks": placement, "num_classes": num_classes}
    if width is not None and width != (cfg.width or preset.get("width", 64)):
        extra["width"] = width
        report.append(f"model.width: {width} (from the file)")
    cfg = dataclasses.replace(cfg, **extra)
    _check_against_model(sd, cfg, path)
    classes = kinetics400_classes() if num_classes == 400 else None
    opts = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("layout", "stem_pool_padding", "instantiation", "scale",
                                                        "pool_position", "pool_size", "norm")
                     if getattr(cfg, k) is not None)
    report.append(f"model {cfg.name}: {num_classes} classes"
                  + (" (Kinetics-400 names attached)" if classes else "")
                  + f", NL blocks {placement or 'none'}, {opts}")
    return ImportResult(state_dict=sd, model_cfg=cfg, classes=classes, report=report)


_CLIP_SPEC = re.compile(r"(?<![0-9a-z])(8|16|32|64|128)x(1|2|4|8|16)(?![0-9])", re.IGNORECASE)


def source_data_settings(fmt: str, name: str) -> dict[str, Any]:
    """The `data.*` values a source used, as far as nlvid knows them from the format and the file name:
    num_frames / stride from '8x8', '32x2x1', '128x1' in the name; MMAction2 and torchvision (imagenet) files
    normalise with the ImageNet mean/std (Caffe2 / PySlowFast: 0.45 / 0.225, nlvid's default)."""
    out: dict[str, Any] = {}
    m = _CLIP_SPEC.search(name)
    if m is not None and fmt != "imagenet":
        out["num_frames"], out["stride"] = int(m[1]), int(m[2])
    if fmt in ("mmaction2", "imagenet"):
        out["mean"], out["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return out


def _loaded_line(fmt: str, path: Path, n: int, skipped: list[str], what: str = "") -> str:
    line = f"{fmt}: mapped {n} tensors from {path.name}"
    if skipped:
        line += f"; skipped {len(skipped)} bookkeeping entries ({what or ', '.join(skipped[:3])})"
    return line


# ----------------------------------------------------------------------------------------------------------------
# Importers
# ----------------------------------------------------------------------------------------------------------------

_NL_OPTION_KEYS = ("instantiation", "scale", "pool_size", "pool_position", "mode", "norm")
_NL_CONVENTION = {"instantiation": "embedded_gaussian", "scale": True, "pool_size": [1, 2, 2], "mode": "spacetime"}


def _check_softmax_family(cfg: ModelConfig, fmt: str) -> None:
    if cfg.instantiation not in (None, "embedded_gaussian", "dot_product"):
        raise ConfigError(f"model.instantiation={cfg.instantiation!r}: {fmt} NL blocks are embedded_gaussian "
                          "(softmax) or dot_product")


def import_pyslowfast(path: str | Path, model_cfg: ModelConfig) -> ImportResult:
    """PySlowFast `.pyth` ({"model_state": ...}) or its Caffe2-format model-zoo `.pkl` (e.g. I3D_NLN_8x8_R50.pkl).

    Options set: pool_position="input", scale on, stem_pool_padding=1, layout 8x8 (PySlowFast's only ResNet
    geometry); NL norm from the file. instantiation: embedded_gaussian ("softmax") unless model.instantiation says
    dot_product (the weights cannot tell).
    """
    path = Path(path)
    _check_softmax_family(model_cfg, "PySlowFast")
    report: list[str] = []
    if sniff_format(path) == "pickle":  # the model zoo's Caffe2-format files
        blobs = read_caffe2_pickle(path)
        sd, skipped, _ = _translate(blobs, CAFFE2_RULES, CAFFE2_SKIP, path, "Caffe2-format PySlowFast")
        report.append(_loaded_line("pyslowfast (Caffe2 .pkl)", path, len(sd), skipped, "*_momentum, lr, model_iter"))
        frozen_ok = True
    else:
        state = _state_from_container(_torch_load(path, "PySlowFast"), ("model_state",), path, "PySlowFast")
        sd, skipped, _ = _translate(state, PYSLOWFAST_RULES, None, path, "PySlowFast")
        report.append(_loaded_line("pyslowfast", path, len(sd), skipped))
        frozen_ok = False
    frozen = _fill_bn(sd, report, frozen_ok=frozen_ok, path=path)
    # PySlowFast's ResNets are the 8x8 geometry; its *_nopool architectures skip the temporal pool after res2
    nopool = "nopool" in path.name.lower() or model_cfg.layout == "8x8_nopool"
    layout = "8x8_nopool" if nopool else "8x8"
    if nopool:
        report.append("layout 8x8_nopool (PySlowFast c2d_nopool: no temporal pool after res2)")
    options = dict(_NL_CONVENTION, pool_position="input", stem_pool_padding=1, layout=layout)
    if frozen:
        options["bn"] = "frozen"
        if model_cfg.bn is None:
            report.append("model.bn: frozen (fine-tuning keeps the file's BN statistics fixed, as it was trained)")
    res = _finish(sd, model_cfg, report, path, options=options,
                  forced=("pool_position", "stem_pool_padding", "layout"))
    res.data = source_data_settings("pyslowfast", path.name)
    return res


_CAFFE2_LAYOUTS = ((re.compile(r"32x2|128x1"), "32x2"), (re.compile(r"8x8|32x4"), "8x8"))


def import_caffe2(path: str | Path, model_cfg: ModelConfig) -> ImportResult:
    """Official video-nonlocal-net `.pkl` (Python-2 pickle of {'blobs': {name: float32 array}}).

    Options set: pool_position="input", scale on, stem_pool_padding=0 (pool1 without padding, 55x55 at 224);
    layout from the file name (32x2 / 128x1 -> "32x2"; 8x8 / 32x4 -> "8x8"; otherwise the preset's);
    NL norm "none" for the frozen-BN files (no NL BN); frozen BN layers loaded exactly (see `_fill_bn`), and
    model.bn=frozen (unless model.bn is given) so that fine-tuning keeps their statistics fixed.
    """
    path = Path(path)
    _check_softmax_family(model_cfg, "Caffe2")
    report: list[str] = []
    blobs = read_caffe2_pickle(path)
    sd, skipped, _ = _translate(blobs, CAFFE2_RULES, CAFFE2_SKIP, path, "Caffe2")
    report.append(_loaded_line("caffe2", path, len(sd), skipped, "*_momentum, lr, model_iter"))
    frozen = _fill_bn(sd, report, frozen_ok=True, path=path)
    options: dict[str, Any] = dict(_NL_CONVENTION, pool_position="input", stem_pool_padding=0)
    if frozen:
        options["bn"] = "frozen"
        if model_cfg.bn is None:
            report.append("model.bn: frozen (fine-tuning keeps the file's BN statistics fixed, as it was trained)")
    forced = ["pool_position", "stem_pool_padding"]
    for pattern, layout in _CAFFE2_LAYOUTS:
        if pattern.search(path.name):
            options["layout"] = layout
            forced.append("layout")
            report.append(f"layout {layout} (from the file name)")
            break
    if frozen and _placement(sd).get("res3"):
        groups = _caffe2_res3_groups(path.name, options.get("layout", model_cfg.layout))
        if groups is None:
            report.append("note: the official frozen-BN models run the res3 NL blocks on groups of 4 frames at the "
                          "training clip length, which the file name does not say: set model.nonlocal_group "
                          "(e.g. {res3: 4} for 32-frame 8x8 or 128-frame 32x2 clips)")
        elif groups > 1:
            options["nonlocal_group"] = {"res3": groups}
            forced.append("nonlocal_group")
            report.append(f"model.nonlocal_group: {{res3: {groups}}} (the official frozen-BN models attend within "
                          "groups of 4 consecutive res3 frames)")
    res = _finish(sd, model_cfg, report, path, options=options, forced=forced)
    res.data = source_data_settings("caffe2", path.name)
    return res


# res3 frames per input frame of each layout (stem and pool1 temporal strides, pool2)
_RES3_FRAME_RATIO = {"8x8": 2, "32x2": 8, "mmaction2": 8, "8x8_nopool": 1}


def _caffe2_res3_groups(name: str, layout: str | None) -> int | None:
    """The official `add_nonlocal_group` group count: res3 frames / 4 at the training clip length (file name)."""
    m = _CLIP_SPEC.search(name)
    if m is None:
        return None
    t = int(m[1]) // _RES3_FRAME_RATIO.get(layout or "8x8", 2)
    return max(1, t // 4) if t % 4 == 0 or t < 4 else None


# MMAction2's I3D stem: conv1 stride (2, 2, 2), max-pool kernel (1, 3, 3) stride (2, 2, 2) padding (0, 1, 1).
_MMACTION2_STEM = dict(stem_stride=(2, 2, 2), pool1_kernel=(1, 3, 3), pool1_stride=(2, 2, 2))


def _mmaction2_layout() -> str | None:
    """An nlvid layout with MMAction2's stem geometry, if the backbone table has one."""
    for name, spec in LAYOUTS.items():
        if all(tuple(spec.get(k, ())) == v for k, v in _MMACTION2_STEM.items()):
            return name
    return None


def import_mmaction2(path: str | Path, model_cfg: ModelConfig) -> ImportResult:
    """MMAction2 `.pth` ({"state_dict": ...} or a plain state dict) of a ResNet3d recognizer (I3D / C2D, NL).

    Options set: pool_position="after" (mmcv pools phi(x), g(x)), pool_size (1,2,2) when sub_sample else none,
    scale off (MMAction2's NL configs; model.scale wins if given), instantiation from the structure (gaussian: no
    theta; concatenation: concat_project) or the file name (dot_product / embedded_gaussian), stem padding 1.
    """
    path = Path(path)
    report: list[str] = []
    state = _state_from_container(_torch_load(path, "MMAction2"), ("state_dict", "model"), path, "MMAction2")
    sd, skipped, origin = _translate(state, MMACTION2_RULES, MMACTION2_SKIP, path, "MMAction2")
    report.append(_loaded_line("mmaction2", path, len(sd), skipped))
    _fill_nl_bias(sd, report)
    _fill_bn(sd, report, frozen_ok=False, path=path)
    nl = _nl_structure(sd)
    options: dict[str, Any] = {"stem_pool_padding": 1, "mode": "spacetime"}
    forced = ["stem_pool_padding", "pool_position", "pool_size"]
    if nl["any"]:
        sub_sample = any(".non_local_block.g.0." in k for k in origin)
        options["pool_position"] = "after"
        options["pool_size"] = [1, 2, 2] if sub_sample else [1, 1, 1]
        options["scale"] = False
        name = path.name.replace("-", "_")
        if nl["concat"]:
            options["instantiation"] = "concatenation"
            forced.append("instantiation")
        elif not nl["theta"]:
            options["instantiation"] = "gaussian"
            forced.append("instantiation")
        elif "dot_product" in name:
            options["instantiation"] = "dot_product"
        elif "embedded_gaussian" in name:
            options["instantiation"] = "embedded_gaussian"
        else:
            options["instantiation"] = "embedded_gaussian"
            if model_cfg.instantiation is None:
                report.append("note: embedded_gaussian and dot_product have the same weights; assumed "
                              "embedded_gaussian (use --set model.instantiation=dot_product for a dot_product file)")
    layout = _mmaction2_layout()
    if layout is not None:
        options["layout"] = layout
    else:
        options["layout"] = "32x2"
        report.append("note: MMAction2's I3D stem max-pools 1x3x3 with temporal stride 2; nlvid's 32x2 layout pools "
                      "2x3x3 (max over frame pairs): the weights load exactly but logits differ slightly from "
                      "MMAction2's")
    forced.append("layout")
    res = _finish(sd, model_cfg, report, path, options=options, forced=forced)
    res.data = source_data_settings("mmaction2", path.name)
    return res


IMPORTERS: dict[str, Callable[[Path, ModelConfig], ImportResult]] = {
    "pyslowfast": import_pyslowfast,
    "caffe2": import_caffe2,
    "mmaction2": import_mmaction2,
}


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def to_pyslowfast_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nlvid names -> PySlowFast names (the same rule table, read backwards). Unknown names are an error."""
    out: dict[str, torch.Tensor] = {}
    missing = []
    for key, value in state_dict.items():
        for rule in PYSLOWFAST_RULES:
            name = rule.to_source(key)
            if name is not None:
                break
        else:
            missing.append(key)
            continue
        out[name] = value.detach().cpu().clone()
    if missing:
        raise CheckpointError(
            f"{len(missing)} parameter(s) have no PySlowFast equivalent (PySlowFast's Nonlocal has theta/phi/g/out "
            "and a BN; no gaussian/concatenation): " + ", ".join(missing[:5]))
    return out


def export_pyslowfast(model_state_dict: dict[str, torch.Tensor], path: str | Path, *,
                      model_cfg: ModelConfig | None = None) -> list[str]:
    """Write a PySlowFast-loadable `.pyth` ({"model_state": ...}; load it with TEST.CHECKPOINT_FILE_PATH or
    TRAIN.CHECKPOINT_FILE_PATH, CHECKPOINT_TYPE pytorch). No "epoch"/"optimizer_state": PySlowFast then loads only
    the weights. Returns report lines."""
    path = Path(path)
    sd = dict(model_state_dict)
    report: list[str] = []
    blocks = sorted({m[0] for k in sd if (m := _NL_KEY.match(k))})
    no_bn = []
    for prefix in blocks:  # e.g. "res3.nl.1."
        lacking = [c for c in ("theta", "phi", "g", "out") if prefix + c + ".weight" not in sd]
        if lacking:
            raise CheckpointError(f"{prefix.rstrip('.')} has no {'/'.join(lacking)}: no PySlowFast equivalent "
                                  "(PySlowFast's Nonlocal is embedded_gaussian or dot_product with theta/phi/g/out)")
        if prefix + "bn.weight" not in sd:  # norm="none": PySlowFast always has a BN; write an exact identity BN
            w = sd[prefix + "out.bias"]
            sd[prefix + "bn.weight"] = torch.ones_like(w)
            sd[prefix + "bn.bias"] = torch.zeros_like(w)
            sd[prefix + "bn.running_mean"] = torch.zeros_like(w)
            sd[prefix + "bn.running_var"] = torch.full_like(w, 1.0 - BN_EPS)
            sd[prefix + "bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
            no_bn.append(prefix.rstrip("."))
    state = to_pyslowfast_names(sd)
    atomic_save({"model_state": state}, path)
    report.insert(0, f"pyslowfast: wrote {len(state)} tensors to {path}")
    if no_bn:
        report.append(f"{len(no_bn)} NL block(s) without BN written with an identity BN (PySlowFast's Nonlocal "
                      "always has one): same function")
    if model_cfg is not None:
        differs = []
        if model_cfg.pool_position not in (None, "input"):
            differs.append(f"pool_position={model_cfg.pool_position} (PySlowFast pools x before phi/g)")
        if model_cfg.scale is False:
            differs.append("scale=false (PySlowFast scales theta.phi by dim_inner^-0.5)")
        if model_cfg.norm == "none":
            differs.append("norm=none (PySlowFast's Nonlocal always has a BN)")
        if model_cfg.stem_pool_padding == 0:
            differs.append("stem_pool_padding=0 (PySlowFast pads pool1 by 1)")
        if model_cfg.layout == "32x2":
            differs.append("layout 32x2 (PySlowFast's ResNet is the 8x8 geometry)")
        if differs:
            report.append("warning: PySlowFast will compute something different for: " + "; ".join(differs))
    return report


EXPORTERS: dict[str, Callable[..., list[str]]] = {"pyslowfast": export_pyslowfast}
