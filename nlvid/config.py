"""Experiment configuration: dataclass defaults, then a YAML file or preset, then `--set a.b=value` overrides.

Rules (nanoGPT's configurator, without exec): every key must exist in the dataclasses below and every value must
have the declared type; anything else is a `ConfigError` naming the key and what is allowed. A config is turned
into keyword arguments once, at the edge (`model_kwargs`), never handed to layers.

Config sources accepted wherever a config is asked for:
- a path to a YAML file;
- the name of a bundled config (`nlvid/configs/<name>.yaml`, shown to users as `sample_configs/`), e.g. `tiny`;
- a model preset name (`c2d_r50_nl5`, ...): the defaults with `model.name` set to it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlvid.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


# ------------------------------------------------------------------------------------------------ choices
# Every option with a fixed set of values is one str Enum here, at the bottom layer, so the config checks it on
# load, models/engine/data compare against it, and the CLI offers it as a choice: one list, one wording.


class Choice(str, enum.Enum):
    """A str Enum of allowed values: members compare equal to their plain strings (YAML and JSON keep strings)."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def check(cls, key: str, value: Any) -> str:
        """`value` as a plain str if allowed, else ConfigError "<key>: 'x' is not one of a, b, c"."""
        if isinstance(value, enum.Enum):
            value = value.value
        if not isinstance(value, str) or value not in cls.values():
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(cls.values())}")
        return value

    def __str__(self) -> str:
        return self.value


def _choice(name: str, *values: str) -> type[Choice]:
    """A Choice subclass with members NAME = "name" for each value (`Amp.BF16 == "bf16"`)."""
    return Choice(name, {v.upper(): v for v in values})  # type: ignore[return-value]


# The NL block: pairwise function f (paper 3.2); where keys/values are max-pooled (on the input, as the official
# code, or after phi/g, as the paper text and mmcv); which positions a query sees; output normalisation (BN with
# gamma zero-initialised, or none with W_z zero-initialised).
Instantiation = _choice("Instantiation", "gaussian", "embedded_gaussian", "dot_product", "concatenation", "global_context")
PoolPosition = _choice("PoolPosition", "input", "after")
Mode = _choice("Mode", "spacetime", "space", "time")
Norm = _choice("Norm", "bn", "none")
# Unreadable videos in a dataset: list them and leave them out, or stop.
OnError = _choice("OnError", "skip", "fail")
Optimizer = _choice("Optimizer", "sgd", "adamw")
Schedule = _choice("Schedule", "cosine", "step")
# Autocast dtype for training and evaluation; fp16 only on CUDA (with a grad scaler).
Amp = _choice("Amp", "none", "bf16", "fp16")
# The model's BatchNorms: batch statistics in training, or frozen ("affine") BN with fixed statistics.
BNMode = _choice("BNMode", "bn", "frozen")
# Activation checkpointing in training: nothing, each NL block, or the stem / every residual block (+ its NL block).
Checkpointing = _choice("Checkpointing", "off", "nonlocal", "stages")


@dataclass
class ModelConfig:
    name: str = "c2d_r50_nl5"  # a preset from nlvid.models.list_models()
    num_classes: int = 400
    # Everything below overrides the preset when not None.
    layout: str | None = None  # temporal layout: "8x8" (PySlowFast), "32x2" (paper / Caffe2), "mmaction2" (its I3D stem)
    width: int | None = None  # base width (64 for the paper's ResNets; small for tiny models)
    nonlocal_blocks: dict[str, list[int]] | None = None  # where NL blocks go: {res3: [1, 3], res4: [1, 3, 5]}
    instantiation: str | None = None  # gaussian | embedded_gaussian | dot_product | concatenation | global_context
    scale: bool | None = None  # (C/2)^-0.5 softmax scale for embedded_gaussian (official code: on)
    pool_size: list[int] | None = None  # key/value max-pool (t, h, w); [1, 1, 1] disables
    pool_position: str | None = None  # "input" (official code) or "after" (paper text / mmcv)
    mode: str | None = None  # spacetime | space | time
    norm: str | None = None  # "bn" (gamma zero-init) or "none" (W_z zero-init)
    stem_pool_padding: int | None = None  # pool1 spatial padding: 1 (PySlowFast, 56x56) or 0 (Caffe2, 55x55)
    nonlocal_group: dict[str, int] | None = None  # NL blocks attend within G groups of frames: {res3: 4} (PySlowFast)
    dropout: float = 0.5
    bn: str | None = None  # "bn" (batch statistics in training; None = this) or "frozen" (fixed statistics)


@dataclass
class DataConfig:
    num_frames: int = 8
    stride: int = 8
    train_short_side: list[int] = field(default_factory=lambda: [256, 320])  # random in [min, max]
    crop_size: int = 224
    test_short_side: int = 256
    test_crop_size: int = 256
    num_clips: int = 10  # test clips per video
    num_crops: int = 3  # test spatial crops per clip (1 or 3)
    flip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])
    num_workers: int = 2
    on_error: str = "skip"  # unreadable videos: "skip" (listed, then left out) or "fail"


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # never applied to BN and bias parameters
    schedule: str = "cosine"  # cosine | step
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.1
    milestones: list[float] = field(default_factory=lambda: [0.375, 0.75])  # step schedule, fractions of the run
    gamma: float = 0.1
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0  # 0 disables


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # per process
    accum_steps: int = 1
    amp: str = "none"  # none | bf16 | fp16 (fp16 only on CUDA, with a grad scaler)
    compile: bool = False
    precise_bn_batches: int = 0  # 0 disables; the official recipe uses 200
    sync_bn: bool = False
    save_every: int = 0  # also checkpoint every N steps inside an epoch; 0 = at epoch ends only
    log_every: int = 10
    eval_every: int = 1  # epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tensorboard: bool = False  # also write TensorBoard event files (run folder/tensorboard/; the `tensorboard` extra)
    checkpoint: str = "off"  # activation checkpointing: off | nonlocal | stages (less memory, ~1 extra forward)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Values with a fixed set of choices; checked after every merge. `model.layout` is checked by
# `nlvid.models.create_model` against the layout tables it owns (variants are data there).
CHOICES: dict[str, type[Choice]] = {
    "model.instantiation": Instantiation,
    "model.pool_position": PoolPosition,
    "model.mode": Mode,
    "model.norm": Norm,
    "data.on_error": OnError,
    "optim.optimizer": Optimizer,
    "optim.schedule": Schedule,
    "train.amp": Amp,
    "model.bn": BNMode,
    "train.checkpoint": Checkpointing,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"config key '{key}': None is not allowed")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e10 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {_coerce(f"{key} key", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover (a bug in this file)


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict into dataclass `obj` in place, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.")
        else:
            choice = CHOICES.get(full)
            if choice is not None and isinstance(value, bool):
                # YAML 1.1 reads a bare `off` as false: that is the choice "off"; any other bool is not a choice
                if value is False and "off" in choice.values():
                    value = "off"
                else:
                    choice.check(f"config key '{full}'", value)  # raises, listing the allowed values
            setattr(obj, key, _coerce(full, value, hints[key]))


def _check_choices(cfg: Config) -> None:
    for dotted, choice in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            choice.check(f"config key '{dotted}'", value)


# ------------------------------------------------------------------------------------------------ value ranges
# key -> (lowest, highest) allowed, inclusive; None = unbounded. Every number must also be finite. Checked after
# every merge (files, --set, configs stored in checkpoints), so a value out of range never reaches a layer.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "model.num_classes": (1, 100_000),
    "model.width": (1, 1024),
    "model.dropout": (0.0, 0.99),
    "model.stem_pool_padding": (0, 1),
    "data.num_frames": (1, 1024),
    "data.stride": (1, 64),
    "data.train_short_side": (1, 4096),
    "data.crop_size": (1, 2048),
    "data.test_short_side": (1, 4096),
    "data.test_crop_size": (1, 2048),
    "data.num_clips": (1, 1000),
    "data.num_crops": (1, 3),
    "data.std": (1e-6, None),
    "data.num_workers": (0, 256),
    "optim.lr": (0.0, None),
    "optim.momentum": (0.0, 1.0),
    "optim.weight_decay": (0.0, None),
    "optim.warmup_epochs": (0.0, None),
    "optim.warmup_start_factor": (0.0, 1.0),
    "optim.milestones": (0.0, 1.0),
    "optim.gamma": (0.0, None),
    "optim.label_smoothing": (0.0, 0.99),
    "optim.clip_grad_norm": (0.0, None),
    "train.epochs": (1, 1_000_000),
    "train.batch_size": (1, 65_536),
    "train.accum_steps": (1, 65_536),
    "train.precise_bn_batches": (0, 1_000_000),
    "train.save_every": (0, None),
    "train.log_every": (0, None),
    "train.eval_every": (1, None),
    "train.seed": (0, 2**63 - 1),
}
# key -> the number of entries a list must have
LENGTHS: dict[str, int] = {"data.train_short_side": 2, "data.mean": 3, "data.std": 3, "model.pool_size": 3}
# Input tensors larger than this share of the machine's memory are refused before anything is allocated.
MEMORY_SHARE = 0.5


def _check_number(key: str, value: Any) -> None:
    lo, hi = RANGES.get(key, (None, None))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': {value!r} is not a finite number", key=key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise ConfigError(f"config key '{key}': {value!r} is out of range (allowed: {allowed})", key=key)


def _check_values(cfg: Config) -> None:
    """Finite numbers in their ranges, lists of the right length, clips whose input fits in memory."""
    for section in ("model", "data", "optim", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            key, value = f"{section}.{f.name}", getattr(getattr(cfg, section), f.name)
            if isinstance(value, list):
                if key in LENGTHS and len(value) != LENGTHS[key]:
                    raise ConfigError(f"config key '{key}': expected {LENGTHS[key]} values, got {len(value)} "
                                      f"({value!r})", key=key)
                for v in value:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        _check_number(key, v)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                _check_number(key, value)
    d = cfg.data
    if d.num_crops not in (1, 3):
        raise ConfigError(f"config key 'data.num_crops': {d.num_crops} is not one of 1, 3", key="data.num_crops")
    if d.train_short_side[0] > d.train_short_side[1]:
        raise ConfigError(f"config key 'data.train_short_side': {d.train_short_side} is not [min, max]",
                          key="data.train_short_side")
    check_input_memory(views=cfg.train.batch_size, num_frames=d.num_frames, size=d.crop_size, what="a training batch",
                       key="train.batch_size")
    check_input_memory(views=d.num_clips * d.num_crops, num_frames=d.num_frames, size=d.test_crop_size,
                       what="one video's test views", key="data.num_clips")


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 0


def check_input_memory(*, views: int, num_frames: int, size: int, what: str, key: str) -> None:
    """ConfigError when `views` float32 clips of (3, num_frames, size, size) alone exceed MEMORY_SHARE of memory."""
    need = views * 3 * num_frames * size * size * 4
    have = machine_memory()
    if have and need > MEMORY_SHARE * have:
        raise ConfigError(
            f"{what} would need {need / 2**30:.1f} GiB for its input alone ({views} clips of 3 x {num_frames} x "
            f"{size} x {size} float32), more than half of this machine's {have / 2**30:.0f} GiB; use fewer or "
            f"smaller clips", key=key)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.1' -> ('optim.lr', 0.1). Values are parsed as YAML (numbers, true/false, lists, mappings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections (model, data, optim, train)")
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                model_names: typing.Collection[str] = ()) -> Config:
    """Resolve a config: defaults <- (YAML file | bundled config | model preset) <- `--set` overrides.

    A `source` that is neither a file nor a bundled config is taken as a model preset name; `model_names`
    (`nlvid.models.list_models()`, passed in because models sit above this layer) lets an unknown name fail here
    with the list of configs. Without it the name is checked when the model is built.
    """
    cfg = Config()
    if source is not None:
        src = str(source)
        path = Path(src)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.exists():
                raise ConfigError(f"config file {src} does not exist")
            _merge(cfg, read_yaml(path))
        elif (CONFIG_DIR / f"{src}.yaml").exists():
            _merge(cfg, read_yaml(CONFIG_DIR / f"{src}.yaml"))
        else:
            if model_names and src not in model_names:
                raise ConfigError(
                    f"unknown config or model {src!r}; bundled configs: {', '.join(bundled_configs())}; "
                    f"models: see `nlvid build --help` (e.g. c2d_r50_nl5, i3d_r50_nl5, tiny)"
                )
            cfg.model.name = src
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data)
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def model_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments for `nlvid.models.create_model(model_cfg.name, **kwargs)`; None means preset default."""
    out = {}
    for f in dataclasses.fields(model_cfg):
        if f.name == "name":
            continue
        value = getattr(model_cfg, f.name)
        if value is None:
            continue
        if f.name == "pool_size":
            value = tuple(value)
        out[f.name] = value
    return out


def train_data_kwargs(data: DataConfig) -> dict[str, Any]:
    """The keyword arguments of a training `nlvid.data.VideoDataset` (train=True) from the data section."""
    return dict(num_frames=data.num_frames, stride=data.stride, train_short_side=tuple(data.train_short_side),
                crop_size=data.crop_size, flip=data.flip, mean=tuple(data.mean), std=tuple(data.std))


def test_data_kwargs(data: DataConfig, *, num_clips: int | None = None, num_crops: int | None = None
                     ) -> dict[str, Any]:
    """The test-time preprocessing of eval, predict and visualize from the data section (clips/crops overridable,
    checked like the config): the keyword arguments of a test `VideoDataset` and of `predict_files`."""
    if num_clips is not None or num_crops is not None:
        checked = Config(data=dataclasses.replace(data, num_clips=data.num_clips if num_clips is None else num_clips,
                                                  num_crops=data.num_crops if num_crops is None else num_crops))
        _check_values(checked)
    return dict(num_frames=data.num_frames, stride=data.stride, test_short_side=data.test_short_side,
                test_crop_size=data.test_crop_size,
                num_clips=data.num_clips if num_clips is None else num_clips,
                num_crops=data.num_crops if num_crops is None else num_crops,
                mean=tuple(data.mean), std=tuple(data.std))
