"""Devices and autocast: the one place that turns a device name or an amp setting into torch objects."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from nlvid.config import Amp
from nlvid.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' checked (ConfigError keyed 'train.device')."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available; use cpu (or auto)",
                          key="train.device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N", key="train.device") from None


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager:
    """torch.autocast for amp 'bf16' / 'fp16' (CUDA only), a no-op for 'none'."""
    amp = Amp.check("config key 'train.amp'", amp)
    if amp == Amp.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp == Amp.FP16:
        if device.type != "cuda":
            raise ConfigError("train.amp 'fp16' needs a CUDA device; use 'bf16' (or 'none') on the CPU",
                              key="train.amp")
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()
