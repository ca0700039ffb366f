"""Models: the Non-local block, C2D/I3D ResNet backbones, presets, summaries, weight loading and conversion."""

from nlvid.models.nonlocal_block import AttentionRecorder, NonLocalBlock
from nlvid.models.presets import create_model, list_models
from nlvid.models.resnet3d import ResNet3d
from nlvid.models.summary import summarize
from nlvid.models.weights import build_with_init, load_model, load_state_dict_checked, model_from_checkpoint

__all__ = [
    "AttentionRecorder",
    "NonLocalBlock",
    "ResNet3d",
    "build_with_init",
    "create_model",
    "list_models",
    "load_model",
    "load_state_dict_checked",
    "model_from_checkpoint",
    "summarize",
]
