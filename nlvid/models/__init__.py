"""Models: the Non-local block, C2D/I3D ResNet backbones, presets, summaries and weight conversion.

Public names are imported lazily (so `import nlvid.models` is cheap and each module can be developed alone):
    NonLocalBlock, AttentionRecorder            nlvid.models.nonlocal_block
    create_model, list_models                   nlvid.models.presets
    ResNet3d                                    nlvid.models.resnet3d
    load_state_dict_checked, build_with_init    nlvid.models.weights
    summarize                                   nlvid.models.summary
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NonLocalBlock": "nlvid.models.nonlocal_block",
    "AttentionRecorder": "nlvid.models.nonlocal_block",
    "create_model": "nlvid.models.presets",
    "list_models": "nlvid.models.presets",
    "ResNet3d": "nlvid.models.resnet3d",
    "load_state_dict_checked": "nlvid.models.weights",
    "build_with_init": "nlvid.models.weights",
    "summarize": "nlvid.models.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nlvid.models' has no attribute {name!r}")
