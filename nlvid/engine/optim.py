"""The training loop's helpers that need no run state: parameter groups and optimizer, the LR schedule (warmup +
cosine or step decay, one value per optimizer step), RNG state for checkpoints, per-micro-batch seeds, precise BN.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from nlvid.config import Optimizer, Schedule
from nlvid.engine.device import autocast_context

# ------------------------------------------------------------------------------------------ optimiser, schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights of convs/linears get weight decay; BN parameters and every bias get none (paper)."""
    decay, no_decay = [], []
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, norm_types) or name.endswith("bias") or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, optimizer: str, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov only with momentum > 0) or AdamW over `param_groups`; ConfigError keyed optim.optimizer for
    any other name."""
    optimizer = Optimizer.check("config key 'optim.optimizer'", optimizer)
    groups = param_groups(model, weight_decay)
    if optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, start_factor: float, schedule: str,
              milestones: list[float], gamma: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup from `start_factor` to 1 over
    `warmup_steps`, then cosine to 0 at `total_steps`, or x`gamma` at each milestone (fractions of the run).
    ConfigError keyed optim.schedule for an unknown schedule."""
    schedule = Schedule.check("config key 'optim.schedule'", schedule)
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if schedule == Schedule.COSINE:
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    passed = sum(1 for m in milestones if step >= m * total_steps)
    return gamma**passed


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int,
                    warmup_epochs: float, start_factor: float, schedule: str, milestones: list[float],
                    gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step, following `lr_factor`; the warmup is `warmup_epochs` rounded
    to whole steps and ends at least one step before `total_steps`."""
    warmup = int(round(warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(0, total_steps - 1))

    def fn(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup, start_factor=start_factor,
                         schedule=schedule, milestones=list(milestones), gamma=gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ------------------------------------------------------------------------------------------ RNG state


def rng_state() -> dict[str, Any]:
    """torch / python / numpy (/ CUDA) RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA part only where CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The torch seed of one micro-batch (dropout masks): a function of the run position only."""
    return (int(seed) * 1_000_003 + epoch * 100_003 + batch * 101 + rank * 7_919 + 12345) % (2**63 - 1)


# ------------------------------------------------------------------------------------------ precise BN


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Any, *, num_batches: int, device: torch.device,
                       amp: str = "none") -> int:
    """Precise BN (official recipe): replace BN running statistics by their true average over `num_batches`
    training batches (train-mode forward, cumulative moving average). Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    used = 0
    try:
        for clips, *_ in batches:
            if used >= num_batches:
                break
            with autocast_context(device, amp):
                model(clips.to(device, non_blocking=True))
            used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return used
