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


# Environment settings that mean the user already chose how malloc behaves (nlvid then leaves it alone).
_MALLOC_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning large blocks to the kernel; True if set.

    By default glibc serves every block above its mmap threshold (adaptive, at most 32 MiB) with a fresh mmap and
    unmaps it on free, so on the CPU each large activation of each training step or forward pass is page-faulted in
    and zeroed by the kernel again. With both thresholds at 2 GiB the freed blocks stay in the heap and are reused:
    `benchmarks/bench_model.py` measured the R50-NL5 training steps 8-27% faster (I3D 2.41 -> 2.03 s at 2x8x224,
    C2D 6.34 -> 4.61 s at 1x32x224) and inference 8-23% faster on a 2-core CPU, for 4-16% more peak resident
    memory in a 4-step I3D run (fragmentation; the process also keeps its peak until it exits). The same effect as preloading jemalloc or tcmalloc, which
    PyTorch's CPU performance guide recommends.

    Process-wide, so only the `nlvid` executable calls it (importing nlvid changes nothing). Skipped where the choice
    is the user's or does not apply: not glibc (macOS, Windows, musl), NLVID_MALLOC=system, any MALLOC_*_ tunable or
    a malloc GLIBC_TUNABLES setting in the environment, or another allocator in LD_PRELOAD."""
    import ctypes
    import os
    import platform

    if os.environ.get("NLVID_MALLOC", "").lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(k) for k in _MALLOC_CHOICES) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    limit = 2**31 - 1  # mallopt takes an int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
