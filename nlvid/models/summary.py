"""Model summary: parameters, multiply-adds, per-stage output shapes and the Non-local blocks' attention sizes.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode` at batch 1 (FLOPs / 2 = multiply-adds; only
convolutions, matmuls and attention count, like the paper's numbers). The count runs on a 'meta' copy of the model,
so even R101 at 32x224x224 is summarised in well under a second without computing anything.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nlvid.errors import ConfigError

SECTIONS = ("stem", "res2", "pool2", "res3", "res4", "res5", "head")
DEFAULT_NL_POOL = (1, 2, 2)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _nl_settings(model: nn.Module, block: nn.Module) -> tuple[tuple[int, int, int], str]:
    """(key/value pool size (t, h, w), mode) of an NL block: its own attributes, else what the model passed."""
    kwargs = getattr(model, "nonlocal_kwargs", {}) or {}
    pool = getattr(block, "pool_size", None)
    if pool is None:
        pool = kwargs.get("pool_size", DEFAULT_NL_POOL)
    if isinstance(pool, int):
        pool = (pool,) * 3
    pool = tuple(int(p) for p in pool)
    mode = getattr(block, "mode", None) or kwargs.get("mode", "spacetime")
    return pool, str(mode)  # type: ignore[return-value]


def summarize(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Summarise a ResNet3d for one clip of `input_shape` = (3, T, H, W) or (B, 3, T, H, W) (batch is set to 1).

    Returns {"input": [3, T, H, W], "params": int, "macs": int, "stages": [{"name", "output", "params", "macs"}],
    "nonlocal": [{"name", "input", "queries", "keys", "key_grid", "mode", "attention_bytes", "params", "macs"}]}.
    `keys` is the number of key positions each query attends to (N' for spacetime; H'W' for space; T' for time);
    `attention_bytes` = maps x keys x 4, the fp32 attention of one clip, where maps = queries for the pairwise
    instantiations and one map per group for global_context (1 in spacetime mode, T in space, H*W in time).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 5:
        shape = shape[1:]
    if len(shape) != 4 or shape[0] != 3:
        raise ConfigError(f"input shape {tuple(input_shape)}: expected (3, T, H, W)")
    if hasattr(model, "check_input"):
        model.check_input(shape)  # ConfigError naming the problem, before any tensor is made

    meta = copy.deepcopy(model).to("meta").eval()
    outputs: dict[str, list[int]] = {}
    nl_inputs: dict[str, list[int]] = {}
    hooks = []
    for name in SECTIONS:
        mod = getattr(meta, name, None)
        if mod is not None:
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, name=name: outputs.__setitem__(name, list(out.shape[1:]))))
    for mname, mod in meta.named_modules():
        if ".nl." in mname and mname.count(".") == 2:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, mname=mname: nl_inputs.__setitem__(mname, list(a[0].shape[1:]))))
    x = torch.zeros((1, *shape), device="meta")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta(x)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(meta).__name__

    def macs_of(path: str) -> int:
        return int(sum(counts.get(f"{root}.{path}", {}).values()) // 2)

    stages = []
    for name in SECTIONS:
        mod = getattr(model, name, None)
        if mod is None or name not in outputs:
            continue
        stages.append({"name": name, "output": outputs[name], "params": _params(mod), "macs": macs_of(name)})

    nonlocal_rows = []
    for mname, mod in model.named_modules():
        if mname not in nl_inputs:
            continue
        c, t, h, w = nl_inputs[mname]
        pool, mode = _nl_settings(model, mod)
        if hasattr(mod, "kernel_for"):
            pool = tuple(mod.kernel_for((t, h, w)))  # mode masking and min(pool, axis size), as the block does
        kt, kh, kw = (t // pool[0], h // pool[1], w // pool[2])
        queries = t * h * w
        keys = {"spacetime": kt * kh * kw, "space": kh * kw, "time": kt}.get(mode, kt * kh * kw)
        maps = queries
        if not getattr(getattr(mod, "variant", None), "query_dependent", True):  # global_context: one map a group
            maps = {"spacetime": 1, "space": t, "time": h * w}.get(mode, 1)
        nonlocal_rows.append({
            "name": mname, "input": [c, t, h, w], "queries": queries, "keys": keys, "key_grid": [kt, kh, kw],
            "mode": mode, "attention_bytes": maps * keys * 4, "params": _params(mod), "macs": macs_of(mname),
        })

    return {
        "input": list(shape),
        "params": _params(model),
        "macs": int(counter.get_total_flops() // 2),
        "stages": stages,
        "nonlocal": nonlocal_rows,
    }


def format_count(n: float) -> str:
    """1234567 -> '1.23M'; 3.4e10 -> '34.0G'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.1f}{unit}"
    return str(int(n))


def format_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"
