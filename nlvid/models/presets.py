"""Named models: C2D / I3D ResNets with 0, 1, 5 or 10 Non-local blocks, plus `tiny`.

A preset is a one-line dict of `ResNet3d` arguments. Name scheme: `{arch}_r{depth}[_nl{1,5,10}]`:
    c2d_r18/34/50/101      C2D (every kernel 1xkxk)
    i3d_r50/101            I3D_3x1x1 (the paper's NL I3D; official inflation pattern)
    i3d333_r50/101         I3D_3x3x3 (paper Table 2e)
    _nl1 / _nl5 / _nl10    NL placements of the paper (Table 2c), see `NL_PLACEMENTS`
    tiny                   an NL C2D that trains on a 2-core CPU in seconds at 8 frames x 64 px

R18/R34 placements (not in the paper; the same rules applied to their stage depths):
    R34 has R50's stage depths (3, 4, 6, 3): identical placements.
    R18 (2, 2, 2, 2) has only 4 blocks in res3+res4: nl1 = res4 after block 0 (the block before the last one);
    nl5 = every other block from index 1 (res3 [1], res4 [1]: 2 blocks); nl10 = every block of res3/res4 (4 blocks).
R101 nl10 (the paper says "the corresponding residual blocks" without listing them): every block of res3 and six
evenly spaced res4 blocks that include the official nl5 ones: res4 [3, 6, 10, 13, 17, 20].
"""

from __future__ import annotations

from typing import Any

from nlvid.config import BNMode, Checkpointing, Choice, Instantiation, Mode, Norm, PoolPosition
from nlvid.errors import ConfigError
from nlvid.models.resnet3d import LAYOUTS, ResNet3d

# depth -> NL placement name -> {stage: [block indices]} (0-based, the NL block follows that block)
NL_PLACEMENTS: dict[int, dict[str, dict[str, list[int]]]] = {
    18: {"nl1": {"res4": [0]}, "nl5": {"res3": [1], "res4": [1]}, "nl10": {"res3": [0, 1], "res4": [0, 1]}},
    34: {"nl1": {"res4": [4]}, "nl5": {"res3": [1, 3], "res4": [1, 3, 5]},
         "nl10": {"res3": [0, 1, 2, 3], "res4": [0, 1, 2, 3, 4, 5]}},
    50: {"nl1": {"res4": [4]}, "nl5": {"res3": [1, 3], "res4": [1, 3, 5]},
         "nl10": {"res3": [0, 1, 2, 3], "res4": [0, 1, 2, 3, 4, 5]}},
    101: {"nl1": {"res4": [21]}, "nl5": {"res3": [1, 3], "res4": [6, 13, 20]},
          "nl10": {"res3": [0, 1, 2, 3], "res4": [3, 6, 10, 13, 17, 20]}},
}

# Baselines: one line each. NL variants are derived below from NL_PLACEMENTS.
_BASES: dict[str, dict[str, Any]] = {
    "c2d_r18": dict(arch="c2d", depth=18),
    "c2d_r34": dict(arch="c2d", depth=34),
    "c2d_r50": dict(arch="c2d", depth=50),
    "c2d_r101": dict(arch="c2d", depth=101),
    "i3d_r50": dict(arch="i3d", depth=50),
    "i3d_r101": dict(arch="i3d", depth=101),
    "i3d333_r50": dict(arch="i3d333", depth=50),
    "i3d333_r101": dict(arch="i3d333", depth=101),
}

PRESETS: dict[str, dict[str, Any]] = {}
for _name, _base in _BASES.items():
    PRESETS[_name] = dict(_base, nonlocal_blocks={})
    for _nl, _place in NL_PLACEMENTS[_base["depth"]].items():
        PRESETS[f"{_name}_{_nl}"] = dict(_base, nonlocal_blocks=_place)
# tiny: basic blocks, one per stage, width 16, NL after res3/res4's block (T = 4 there with 8 input frames).
PRESETS["tiny"] = dict(arch="c2d", depth=18, stage_depths=(1, 1, 1, 1), width=16,
                       nonlocal_blocks={"res3": [0], "res4": [0]})

# Checked here as well as in each NonLocalBlock so that a preset without NL blocks still refuses a bad value.
NL_CHOICES: dict[str, type[Choice]] = {
    "instantiation": Instantiation,
    "pool_position": PoolPosition,
    "mode": Mode,
    "norm": Norm,
}


def list_models() -> list[str]:
    """Sorted preset names."""
    return sorted(PRESETS)


def _check_nl_option(key: str, value: Any) -> Any:
    if key in NL_CHOICES:
        value = NL_CHOICES[key].check(f"model.{key}", value)
    elif key == "scale":
        if not isinstance(value, bool):
            raise ConfigError(f"model.scale: expected true or false, got {value!r}")
    elif key == "pool_size":
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
            raise ConfigError(f"model.pool_size: expected 3 positive integers (t, h, w), got {value!r}")
        value = tuple(value)
    return value


def create_model(name: str, *, num_classes: int = 400, layout: str | None = None, width: int | None = None,
                 nonlocal_blocks: dict[str, list[int]] | None = None, instantiation: str | None = None,
                 scale: bool | None = None, pool_size: tuple[int, int, int] | None = None,
                 pool_position: str | None = None, mode: str | None = None, norm: str | None = None,
                 stem_pool_padding: int | None = None, dropout: float = 0.5,
                 nonlocal_group: dict[str, int] | None = None, bn: str | None = None,
                 checkpoint: str = "off") -> ResNet3d:
    """Build a preset; every keyword that is not None overrides it (these are `nlvid.config.ModelConfig`'s fields,
    plus `checkpoint`, the training-time activation checkpointing of `ResNet3d.set_checkpointing`, which
    `nlvid.engine.train` sets from train.checkpoint).

    `nonlocal_blocks={}` gives the preset's baseline (no NL blocks). Unknown names/values raise ConfigError.
    """
    bn = BNMode.check("model.bn", "bn" if bn is None else bn)
    checkpoint = Checkpointing.check("train.checkpoint", checkpoint)
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    args = dict(PRESETS[name])
    if layout is not None:
        if layout not in LAYOUTS:
            raise ConfigError(f"model.layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
        args["layout"] = layout
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"model.width: expected a positive integer, got {width!r}")
        args["width"] = width
    if nonlocal_blocks is not None:
        args["nonlocal_blocks"] = nonlocal_blocks
    if stem_pool_padding is not None:
        args["stem_pool_padding"] = stem_pool_padding
    if nonlocal_group is not None:
        args["nonlocal_group"] = nonlocal_group
    nl_kwargs = {}
    for key, value in dict(instantiation=instantiation, scale=scale, pool_size=pool_size,
                           pool_position=pool_position, mode=mode, norm=norm).items():
        if value is not None:
            nl_kwargs[key] = _check_nl_option(key, value)
    return ResNet3d(**args, nonlocal_kwargs=nl_kwargs, num_classes=num_classes, dropout=dropout, bn=bn,
                    checkpoint=checkpoint)
