"""Models: the Non-local block, C2D/I3D ResNet backbones, presets, summaries, weight loading and conversion, and the
registry of published weights (zoo) with its download cache (hub)."""

from nlvid.models.hub import pretrained_checkpoint, source_file
from nlvid.models.nonlocal_block import AttentionRecorder, NonLocalBlock
from nlvid.models.presets import create_model, list_models
from nlvid.models.resnet3d import ResNet3d
from nlvid.models.summary import summarize
from nlvid.models.weights import build_with_init, load_model, load_state_dict_checked, model_from_checkpoint
from nlvid.models.zoo import get_entry, list_entries

__all__ = [
    "AttentionRecorder",
    "NonLocalBlock",
    "ResNet3d",
    "build_with_init",
    "create_model",
    "get_entry",
    "list_entries",
    "list_models",
    "load_model",
    "load_state_dict_checked",
    "model_from_checkpoint",
    "pretrained_checkpoint",
    "source_file",
    "summarize",
]
