"""Loading weights into ResNet3d: checked state-dict loading, ImageNet inflation, `--init FORMAT=PATH`.

- `load_state_dict_checked(model, state_dict)`: strict load that fails with ONE readable CheckpointError listing
  missing / unexpected / mis-shaped keys (counts plus the first few of each).
- `inflate_torchvision(model, tv_state)`: torchvision 2-D ResNet-18/34/50/101 weights into C2D / I3D: a k x k kernel
  becomes t x k x k by repeating it t times along time and dividing by t, so a static clip gives the 2-D network's
  response (exactly for C2D; for I3D up to the zero padding at the clip's first/last frames). NL blocks and the
  classifier keep their init (identity / normal 0.01).
- `build_with_init(model_cfg, init, num_classes=...)`: the one entry point for `--init FORMAT=PATH` used by
  `nlvid build` and `nlvid train`; `init_data_settings(init)`: the preprocessing (`data.*`) its source used. Formats: imagenet (torchvision .pth), nlvid (an nlvid checkpoint), and whatever
  `nlvid.models.convert.IMPORTERS` offers (pyslowfast, caffe2, mmaction2).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nlvid.checkpoint import load_checkpoint, read_torch_file
from nlvid.config import Config, ModelConfig, config_from_dict, model_kwargs
from nlvid.errors import CheckpointError, ConfigError
from nlvid.models.convert import IMPORTERS, source_data_settings
from nlvid.models.presets import create_model

_SHOW = 5  # keys shown per category in error messages


def _first(keys: list[str], n: int = _SHOW) -> str:
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _mismatch(groups: list[tuple[str, list[str]]]) -> str:
    """'3 missing (a, b, c); 1 unexpected (d)': the non-empty groups, counted, with their first keys."""
    return "; ".join(f"{len(keys)} {label} ({_first(keys)})" for label, keys in groups if keys)


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, Any], *,
                            ignore_missing: tuple[str, ...] = ()) -> None:
    """Strictly load `state_dict` into `model`; CheckpointError naming missing/unexpected/mis-shaped keys.

    `ignore_missing`: key prefixes that may be absent (they keep the model's current values), e.g. ("head.fc.",).
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"weights must be a state dict (name -> tensor), got {type(state_dict).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(ignore_missing)]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = []
    for k, v in state_dict.items():
        if k not in own:
            continue
        if not isinstance(v, torch.Tensor):
            bad_shape.append(f"{k} (not a tensor: {type(v).__name__})")
        elif tuple(v.shape) != tuple(own[k].shape):
            bad_shape.append(f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    if missing or unexpected or bad_shape:
        raise CheckpointError("state dict does not fit the model: " + _mismatch(
            [("missing", missing), ("unexpected", unexpected), ("with a different shape", bad_shape)]))
    model.load_state_dict(state_dict, strict=not ignore_missing)


# ----------------------------------------------------------------------------------------------------------------
# torchvision 2-D ResNet -> C2D / I3D
# ----------------------------------------------------------------------------------------------------------------


def torchvision_key(key: str) -> str | None:
    """torchvision ResNet key -> ResNet3d key (None for the 1000-class `fc`)."""
    if key.startswith("fc."):
        return None
    if key.startswith("conv1."):
        return "stem.conv." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "stem.bn." + key[len("bn1."):]
    if key.startswith("layer"):
        layer, rest = key.split(".", 1)  # "layer1", "0.conv1.weight"
        return f"res{int(layer[len('layer'):]) + 1}.blocks.{rest}"
    return key  # unknown: reported as unused


def _unwrap(state: Any) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or {"state_dict"/"model": ...}; strip DataParallel's "module." prefix."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError("not a torchvision ResNet state dict (expected a mapping of parameter names)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def inflate_torchvision(model: nn.Module, tv_state: dict[str, Any]) -> dict[str, Any]:
    """Copy torchvision 2-D ResNet weights into a C2D/I3D ResNet3d, inflating k x k kernels to t x k x k (/ t).

    Every backbone tensor of the model must be covered and every torchvision tensor (except `fc`) used, with
    matching shapes; otherwise CheckpointError (e.g. ResNet-50 weights into an R101 model). Returns a report:
    {"loaded": [keys], "inflated": [keys with t > 1], "kept_init": [model keys left at init: NL blocks, head],
     "skipped": [torchvision keys not used (fc)], "lines": [human-readable summary lines]}.
    """
    tv_state = _unwrap(tv_state)
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    inflated, skipped, unexpected, bad = [], [], [], []
    for key, value in tv_state.items():
        target = torchvision_key(key)
        if target is None:
            skipped.append(key)
            continue
        if target not in own:
            unexpected.append(key)
            continue
        want = own[target]
        value = torch.as_tensor(value)
        if value.dim() == 4 and want.dim() == 5:
            t = want.shape[2]
            # (O, I, k, k) -> (O, I, t, k, k), each time slice w / t: sums to the 2-D kernel over time
            value = value.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
            if t > 1:
                inflated.append(target)
        if tuple(value.shape) != tuple(want.shape):
            bad.append(f"{key} {tuple(value.shape)} vs {target} {tuple(want.shape)}")
            continue
        new[target] = value.to(want.dtype)
    backbone = [k for k in own if ".nl." not in k and not k.startswith("head.")]
    missing = [k for k in backbone if k not in new]
    if unexpected or bad or missing:
        depth = getattr(model, "depth", "?")
        raise CheckpointError(f"torchvision weights do not fit this ResNet-{depth} model: " + _mismatch(
            [("model tensors not covered", missing), ("torchvision tensors with no place in the model", unexpected),
             ("with a different shape", bad)]))
    merged = dict(own)
    merged.update(new)
    model.load_state_dict(merged, strict=True)
    kept = [k for k in own if k not in new]
    nl_tensors = sum(1 for k in kept if ".nl." in k)
    lines = [
        f"imagenet: loaded {len(new)} tensors from torchvision ({len(inflated)} kernels inflated in time, "
        f"repeated t times and divided by t)",
        f"imagenet: kept at init {len(kept)} tensors ({nl_tensors} in Non-local blocks: identity at init; "
        f"{len(kept) - nl_tensors} in the classifier / head); skipped {len(skipped)} ({_first(skipped, 2) or 'none'})",
    ]
    return {"loaded": sorted(new), "inflated": inflated, "kept_init": kept, "skipped": skipped, "lines": lines}


# ----------------------------------------------------------------------------------------------------------------
# --init FORMAT=PATH
# ----------------------------------------------------------------------------------------------------------------


def init_formats() -> list[str]:
    return ["imagenet", "nlvid", *sorted(IMPORTERS)]


def parse_init(init: str) -> tuple[str, Path]:
    """'imagenet=resnet50.pth' -> ('imagenet', Path); ConfigError naming the allowed formats."""
    formats = init_formats()
    if "=" not in init:
        raise ConfigError(f"init {init!r}: expected FORMAT=PATH, e.g. imagenet=resnet50.pth; "
                          f"formats: {', '.join(formats)}", key="init")
    fmt, path = init.split("=", 1)
    fmt = fmt.strip().lower()
    if fmt not in formats:
        raise ConfigError(f"init: unknown format {fmt!r}; allowed: {', '.join(formats)}", key="init")
    if not path:
        raise ConfigError(f"init {init!r}: missing PATH after '='", key="init")
    return fmt, Path(path)


def init_data_settings(init: str | None) -> dict[str, Any]:
    """The `data.*` values the source of `init` ("FORMAT=PATH") used, as far as nlvid knows them (frames x stride
    from a known file name, MMAction2's / torchvision's ImageNet mean/std); {} for None and nlvid checkpoints."""
    if init is None:
        return {}
    fmt, path = parse_init(init)
    return {} if fmt == "nlvid" else source_data_settings(fmt, path.name)


def _fit_classes(model_cfg, state_dict: dict[str, Any], classes: list[str] | None, num_classes: int | None,
                 report: list[str]):
    """Build the model for imported weights; re-initialise the classifier when the class count differs."""
    fc = state_dict.get("head.fc.weight")
    have = int(fc.shape[0]) if isinstance(fc, torch.Tensor) else None
    want = num_classes if num_classes is not None else (have if have is not None else model_cfg.num_classes)
    model_cfg.num_classes = want
    model = create_model(model_cfg.name, **model_kwargs(model_cfg))
    if have is not None and have != want:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.fc.")}
        load_state_dict_checked(model, state_dict, ignore_missing=("head.fc.",))
        report.append(f"classifier re-initialised: the weights have {have} classes, {want} requested "
                      f"(head.fc is new; everything else loaded)")
        classes = None
    else:
        load_state_dict_checked(model, state_dict)
        if classes is not None and len(classes) != want:
            classes = None
    return model, model_cfg, classes


def build_with_init(model_cfg, init: str | None = None, *, num_classes: int | None = None):
    """-> (model, model_cfg, classes_or_None, report_lines) for `init` = "FORMAT=PATH" (or None: fresh init).

    imagenet: torchvision 2-D ResNet weights inflated into the configured model (classifier at init);
    nlvid: an nlvid checkpoint (its stored model config is used); pyslowfast / caffe2 / mmaction2: the importers
    of `nlvid.models.convert` (they may adjust the model config, e.g. the layout the weights were trained with).
    When the weights' class count differs from `num_classes`, the classifier is re-initialised with a message.
    """
    model_cfg = copy.deepcopy(model_cfg)
    if init is None:
        if num_classes is not None:
            model_cfg.num_classes = num_classes
        return create_model(model_cfg.name, **model_kwargs(model_cfg)), model_cfg, None, []
    fmt, path = parse_init(init)
    report: list[str] = []
    if fmt == "imagenet":
        if num_classes is not None:
            model_cfg.num_classes = num_classes
        model = create_model(model_cfg.name, **model_kwargs(model_cfg))
        result = inflate_torchvision(model, read_torch_file(path, what="weights file"))
        return model, model_cfg, None, [f"{path}: " + result["lines"][0], *result["lines"][1:]]
    if fmt == "nlvid":
        ckpt = load_checkpoint(path)
        stored = config_from_dict(ckpt["config"]).model
        report.append(f"{path}: nlvid checkpoint of model {stored.name!r} ({len(ckpt['classes'])} classes)")
        try:
            model, model_cfg, classes = _fit_classes(stored, ckpt["model"], list(ckpt["classes"]), num_classes, report)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return model, model_cfg, classes, report
    importer = IMPORTERS[fmt]
    res = importer(path, model_cfg)
    report.extend(res.report or [])
    try:
        model, new_cfg, classes = _fit_classes(copy.deepcopy(res.model_cfg), res.state_dict,
                                               list(res.classes) if res.classes else None, num_classes, report)
    except CheckpointError as e:
        raise CheckpointError(f"{path} ({fmt}): {e}") from None
    return model, new_cfg, classes, report


# ----------------------------------------------------------------------------------------------------------------
# nlvid checkpoints -> models
# ----------------------------------------------------------------------------------------------------------------


def model_from_checkpoint(ckpt: dict[str, Any], *, path: str | Path = "<checkpoint>") -> nn.Module:
    """Build the model described by a checkpoint's config and load its weights (strict, with a key report)."""
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is not valid for this nlvid version: {e}") from None
    model = create_model(cfg.model.name, **model_kwargs(cfg.model))
    try:
        load_state_dict_checked(model, ckpt["model"])
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model.name!r}: {e}") from None
    return model


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, list[str], Config]:
    """-> (model in eval mode on `device`, class names, Config). The one way commands open a checkpoint."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path=path)
    model.to(device).eval()
    return model, list(ckpt["classes"]), config_from_dict(ckpt["config"])
