"""The training loop: SGD/AdamW, warmup + cosine/step LR stepped per iteration, label smoothing, gradient clipping
and accumulation, bf16/fp16 autocast, optional torch.compile, precise BN, DDP, checkpoints and exact resume.

Exact resume (the same weights, bit for bit on the CPU, as a run never interrupted): everything random is a
function of the seed and the position in the run, never of history:
- the item order of epoch e is `randperm` seeded with (seed, e) (`distributed.epoch_order`);
- item i's augmentation in epoch e depends on (seed, e, i) (`VideoDataset.set_epoch`, the data layer's contract);
- the global torch RNG (dropout) is re-seeded before every micro-batch from (seed, epoch, batch, rank);
- a resumed run skips the batches of the epoch that the checkpoint already covers;
- model, optimizer, scheduler, grad scaler, step counters and RNG states come from the checkpoint.
Checkpoints are written only at optimizer-step boundaries and never after a non-finite loss or gradient.

Nothing here prints: progress goes through `progress(event, **data)` (see `nlvid.cli.train` for the reporters).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from nlvid.checkpoint import load_checkpoint, save_checkpoint
from nlvid.config import Config, config_from_dict, model_kwargs, test_data_kwargs, train_data_kwargs
from nlvid.data import VideoDataset, make_loader, resolve_splits, scan_dataset
from nlvid.engine import distributed as distr
from nlvid.engine.device import autocast_context, resolve_device
from nlvid.engine.evaluate import build_report, collect_scores, merge_scores
from nlvid.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from nlvid.models import build_with_init, create_model, load_state_dict_checked

Progress = Callable[..., None]

# Keys a resumed run may change (the rest comes from the run's stored config).
RESUME_MUTABLE = ("train.epochs", "train.log_every", "train.save_every", "train.device", "train.eval_every",
                  "data.num_workers")


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
    groups = param_groups(model, weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ConfigError(f"config key 'optim.optimizer': {optimizer!r} is not one of sgd, adamw")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, start_factor: float, schedule: str,
              milestones: list[float], gamma: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup from `start_factor` to 1 over
    `warmup_steps`, then cosine to 0 at `total_steps`, or x`gamma` at each milestone (fractions of the run)."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        passed = sum(1 for m in milestones if step >= m * total_steps)
        return gamma**passed
    raise ConfigError(f"config key 'optim.schedule': {schedule!r} is not one of cosine, step")


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int,
                    warmup_epochs: float, start_factor: float, schedule: str, milestones: list[float],
                    gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
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


# ------------------------------------------------------------------------------------------ helpers


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int, epoch: int, batches_done: int) -> None:
    """On resume, drop metric records written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) > step:
            continue
        if rec.get("kind") == "epoch" and rec.get("epoch", 0) >= epoch:
            continue  # an epoch record whose checkpoint was not written
        keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _cfg_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k in ("model", "data", "optim", "train"):
            out += _cfg_diff(va, vb, f"{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _scan(source: Any, *, classes: list[str] | None, on_error: str, progress: Progress, split: str, main: bool):
    index = scan_dataset(source, classes=classes, on_error=on_error)
    if main:
        progress("scan", split=split, index=index)
    return index


def _noop(event: str, **data: Any) -> None:
    pass


# ------------------------------------------------------------------------------------------ train


def train(
    cfg: Config | None,
    *,
    data: str | Path,
    val: str | Path | list | None = None,
    out: str | Path,
    resume: bool = False,
    init: str | None = None,
    progress: Progress | None = None,
    hooks: dict[str, Callable[..., Any]] | None = None,
) -> dict[str, Any]:
    """Train a model on `data` (folder per class, a root with train/ and val/, or an annotation list).

    Writes into `out`: config.yaml, classes.txt, metrics.jsonl, last.pt, best.pt. Resumes when `resume` is set or
    `out/last.pt` exists (then `cfg` may be None: the run's stored config is used; of a given `cfg` only the keys
    in RESUME_MUTABLE are taken). `init` = "FORMAT=PATH" initial weights (nlvid.models.build_with_init).
    `progress`: a callback `fn(event, **data)` (the CLI's reporter prints it on stderr); None = silent.
    `hooks` (tests): {"after_backward": fn(model, loss, step)}.
    Returns {best_acc, best_metric, best_epoch, last_path, best_path, run_dir, epochs, steps, final: {...}}.
    """
    progress = progress or _noop
    hooks = hooks or {}
    out = Path(out)
    last_path, best_path = out / "last.pt", out / "best.pt"

    # ---------------------------------------------------------------- resume or fresh
    ckpt = None
    if resume or last_path.exists():
        if not last_path.exists():
            raise ConfigError(f"--resume: {out} has no last.pt to resume from")
        ckpt = load_checkpoint(last_path)
        stored = config_from_dict(ckpt["config"])
        if cfg is not None:
            new, old = cfg.to_dict(), stored.to_dict()
            changed = _cfg_diff(old, new)
            for key in changed:
                if key in RESUME_MUTABLE:
                    section, name = key.split(".")
                    setattr(getattr(stored, section), name, getattr(getattr(cfg, section), name))
            ignored = [k for k in changed if k not in RESUME_MUTABLE and k != "model.num_classes"]
            if ignored:
                progress("message", text=f"resuming: the run's stored config wins for {', '.join(ignored)} "
                                          f"(only {', '.join(RESUME_MUTABLE)} may change on resume)")
        cfg = stored
    elif cfg is None:
        raise ConfigError("no config given and nothing to resume")
    tc, oc, dc = cfg.train, cfg.optim, cfg.data

    # ---------------------------------------------------------------- device, processes
    device = resolve_device(tc.device)
    dist_env = distr.env_info()
    if dist_env.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_env.local_rank)
    if tc.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp 'fp16' needs a CUDA device (it uses a grad scaler); use train.amp=bf16 on the CPU")
    if tc.sync_bn and device.type != "cuda" and dist_env.enabled:
        raise ConfigError("train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); set train.sync_bn=false")
    if tc.accum_steps < 1 or tc.batch_size < 1:
        raise ConfigError("train.batch_size and train.accum_steps must be >= 1")
    info = distr.init_distributed(device)
    main = info.is_main
    if not main:
        progress = _noop
    if device.type == "cpu" and info.enabled:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---------------------------------------------------------------- data
    train_src, val_src = resolve_splits(data, val)
    stored_classes = list(ckpt["classes"]) if ckpt is not None else None
    tindex = _scan(train_src, classes=stored_classes, on_error=dc.on_error, progress=progress, split="train",
                   main=main)
    classes = list(tindex.classes)
    if not tindex.items:
        raise DatasetError(f"{train_src}: no readable training videos")
    vindex = None
    if val_src is not None:
        vindex = _scan(val_src, classes=classes, on_error=dc.on_error, progress=progress, split="val", main=main)
        if not vindex.items:
            progress("message", text=f"{val_src}: no readable validation videos; choosing best.pt by train accuracy")
            vindex = None
    if ckpt is None and cfg.model.num_classes != len(classes):
        cfg.model.num_classes = len(classes)

    train_ds = VideoDataset(tindex.items, train=True, **train_data_kwargs(dc), on_error=dc.on_error, seed=tc.seed)
    val_ds = None
    if vindex is not None:
        val_ds = VideoDataset(vindex.items, train=False, **test_data_kwargs(dc), on_error=dc.on_error, seed=tc.seed)

    # ---------------------------------------------------------------- model
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    init_lines: list[str] = []
    if ckpt is None and init:
        model, new_model_cfg, init_classes, init_lines = build_with_init(cfg.model, init, num_classes=len(classes))
        cfg.model = new_model_cfg
        cfg.model.num_classes = len(classes)
    else:
        model = create_model(cfg.model.name, **model_kwargs(cfg.model))
    if ckpt is not None:
        try:
            load_state_dict_checked(model, ckpt["model"])
        except (CheckpointError, ConfigError) as e:
            raise CheckpointError(f"{last_path}: cannot resume: {e}") from None
    model.to(device)
    if tc.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    core = model  # the module whose state_dict is saved
    optimizer = build_optimizer(core, optimizer=oc.optimizer, lr=oc.lr, momentum=oc.momentum,
                                nesterov=oc.nesterov, weight_decay=oc.weight_decay)

    # ---------------------------------------------------------------- steps, schedule
    n_items = len(train_ds)
    batches_per_epoch = len(distr.shard_batches(
        distr.epoch_order(n_items, seed=tc.seed, epoch=0, world_size=info.world_size),
        batch_size=tc.batch_size, world_size=info.world_size, rank=info.rank))
    steps_per_epoch = math.ceil(batches_per_epoch / tc.accum_steps)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = build_scheduler(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=oc.warmup_epochs, start_factor=oc.warmup_start_factor,
                                schedule=oc.schedule, milestones=oc.milestones, gamma=oc.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=(tc.amp == "fp16"))

    start_epoch, start_batch, step = 0, 0, 0
    best = {"acc": -1.0, "epoch": None, "metric": None}
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{last_path}: optimizer/scheduler state does not fit this run ({e})") from None
        start_epoch, start_batch, step = int(ckpt["epoch"]), int(ckpt.get("batches_done", 0)), int(ckpt["step"])
        best.update(ckpt.get("best") or {})
        if ckpt.get("rng") is not None:
            set_rng_state(ckpt["rng"])
        # the LambdaLR closure knows the (possibly extended) total; recompute the current LR from it
        for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
            g["lr"] = base * scheduler.lr_lambdas[0](step)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        train_model = torch.compile(train_model)

    criterion = nn.CrossEntropyLoss(label_smoothing=oc.label_smoothing)
    metric_name = "val_top1" if val_ds is not None else "train_acc"

    # ---------------------------------------------------------------- run folder
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
        if ckpt is not None:
            _truncate_metrics(metrics_path, step, start_epoch, start_batch)
        else:
            metrics_path.write_text("")
    distr.barrier(info)

    def check_finite(where: str) -> None:
        # a finite loss can still be followed by an update that breaks the weights: never save those
        bad = [n for n, p in _unwrap(core).named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(
                f"weights are not finite at step {step} ({where}; e.g. {', '.join(bad[:3])}); stopped without "
                f"saving; last good checkpoint: {last_path if last_path.exists() else 'none yet'} "
                f"(try a lower optim.lr or optim.clip_grad_norm)")

    def save(path: Path, *, epoch: int, batches_done: int, full: bool = True, metrics: dict | None = None):
        if not main:
            return
        extra: dict[str, Any] = {"batches_done": batches_done, "best": dict(best), "metrics": metrics or {},
                                 "epoch_sums": sums.clone() if batches_done else torch.zeros(4, dtype=torch.float64)}
        if full:
            extra.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), rng=rng_state())
        save_checkpoint(path, model_state=_unwrap(core).state_dict(), config=cfg.to_dict(), classes=classes,
                        epoch=epoch, step=step, **extra)

    progress("start", run_dir=str(out), resumed=ckpt is not None, start_epoch=start_epoch, start_batch=start_batch,
             step=step, epochs=tc.epochs, steps_per_epoch=steps_per_epoch, batches_per_epoch=batches_per_epoch,
             total_steps=total_steps, num_train=n_items, num_val=len(val_ds) if val_ds is not None else 0,
             device=str(device), world_size=info.world_size,
             global_batch=tc.batch_size * info.world_size * tc.accum_steps,
             metric=metric_name, classes=classes, init=init_lines, model=cfg.model.name)

    workers = dc.num_workers
    sums = torch.zeros(4, dtype=torch.float64)
    # one loader for the whole run (persistent workers); its sampler yields this rank's remaining items of the epoch
    sampler = _EpochShard(n_items, seed=tc.seed, batch_size=tc.batch_size, world_size=info.world_size,
                          rank=info.rank)
    loader = make_loader(train_ds, batch_size=tc.batch_size, shuffle=False, num_workers=workers, seed=tc.seed,
                         sampler=sampler)
    last_epoch_record: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, tc.epochs):
            first = start_batch if epoch == start_epoch else 0
            train_ds.set_epoch(epoch)  # the loader's sampler reads it: (index, epoch) pairs reach the workers
            sampler.skip = first
            batches = sampler.batches(epoch)
            progress("epoch_start", epoch=epoch, batches=len(batches), first_batch=first, step=step)
            train_model.train()
            # running sums over the epoch (this process); reduced across processes at log points
            sums = torch.zeros(4, dtype=torch.float64)  # loss*n, correct, n, data_time
            if first > 0 and ckpt is not None and ckpt.get("epoch_sums") is not None:
                sums += ckpt["epoch_sums"]  # the part of this epoch done before the resume
            window = torch.zeros(4, dtype=torch.float64)
            window_t0 = time.perf_counter()
            t_end = time.perf_counter()
            nb = len(batches)
            for bi, (clips, labels, _index) in enumerate(loader, start=first):
                t_data = time.perf_counter() - t_end
                group_start = (bi // tc.accum_steps) * tc.accum_steps
                group_len = min(tc.accum_steps, nb - group_start)
                last_in_group = bi == group_start + group_len - 1
                torch.manual_seed(step_seed(tc.seed, epoch, bi, info.rank))
                clips = clips.to(device, non_blocking=True)
                labels = torch.as_tensor(labels, dtype=torch.long).to(device, non_blocking=True)
                sync = nullcontext() if (last_in_group or not info.enabled) else train_model.no_sync()
                with sync:
                    with autocast_context(device, tc.amp):
                        logits = train_model(clips)
                    loss = criterion(logits.float(), labels)
                    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
                    distr.all_reduce_sum(bad, info)
                    if bad.item() > 0:
                        raise TrainingError(
                            f"loss is {loss.item()} at step {step + 1} (epoch {epoch + 1}, batch {bi + 1}); "
                            f"stopped without saving; last good checkpoint: "
                            f"{last_path if last_path.exists() else 'none yet'} (try a lower optim.lr)")
                    scaler.scale(loss / group_len).backward()
                if "after_backward" in hooks:
                    hooks["after_backward"](model=_unwrap(core), loss=loss, step=step)
                n = labels.shape[0]
                correct = (logits.detach().argmax(-1) == labels).sum().item()
                rec = torch.tensor([loss.item() * n, correct, n, t_data], dtype=torch.float64)
                sums += rec
                window += rec
                if not last_in_group:
                    t_end = time.perf_counter()
                    continue
                # -------- optimizer step
                scaler.unscale_(optimizer)
                max_norm = oc.clip_grad_norm if oc.clip_grad_norm > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(core.parameters(), max_norm)
                if not torch.isfinite(gnorm) and tc.amp != "fp16":
                    raise TrainingError(
                        f"gradient norm is {gnorm.item()} at step {step + 1} (epoch {epoch + 1}, batch {bi + 1}); "
                        f"stopped without saving; last good checkpoint: "
                        f"{last_path if last_path.exists() else 'none yet'} (try a lower optim.lr or "
                        f"optim.clip_grad_norm)")
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                done_batches = bi + 1
                end_of_epoch = done_batches == nb
                log_now = tc.log_every > 0 and step % tc.log_every == 0
                if log_now or end_of_epoch:
                    w = distr.all_reduce_sum(window.clone(), info)
                    dt = time.perf_counter() - window_t0
                    record = {
                        "kind": "step", "epoch": epoch + 1, "step": step, "batch": done_batches, "batches": nb,
                        "loss": w[0].item() / max(w[2].item(), 1), "acc": w[1].item() / max(w[2].item(), 1),
                        "lr": lr, "grad_norm": float(gnorm), "clips_per_s": w[2].item() / max(dt, 1e-9),
                        "data_time": w[3].item() / info.world_size, "time": dt,
                        "data_fraction": (w[3].item() / info.world_size) / max(dt, 1e-9),
                    }
                    if main and log_now:
                        _write_jsonl(metrics_path, record)
                    progress("step", record=record, log=log_now)
                    window.zero_()
                    window_t0 = time.perf_counter()
                else:
                    progress("step", record={"epoch": epoch + 1, "step": step, "batch": done_batches,
                                             "batches": nb, "loss": loss.item(), "lr": lr}, log=False)
                if tc.save_every > 0 and step % tc.save_every == 0 and not end_of_epoch:
                    check_finite(f"epoch {epoch + 1}, batch {done_batches}")
                    save(last_path, epoch=epoch, batches_done=done_batches)
                    progress("checkpoint", path=str(last_path), step=step)
                t_end = time.perf_counter()

            # -------- end of epoch: precise BN, evaluation, checkpoints
            check_finite(f"end of epoch {epoch + 1}")
            tot = distr.all_reduce_sum(sums.clone(), info)
            train_loss = tot[0].item() / max(tot[2].item(), 1)
            train_acc = tot[1].item() / max(tot[2].item(), 1)
            if tc.precise_bn_batches > 0:
                pbn_order = distr.epoch_order(n_items, seed=tc.seed + 7, epoch=epoch, world_size=info.world_size)
                pbn = distr.shard_batches(pbn_order, batch_size=tc.batch_size, world_size=info.world_size,
                                          rank=info.rank)[: tc.precise_bn_batches]
                pbn_loader = make_loader(train_ds, batch_size=tc.batch_size, shuffle=False, num_workers=workers,
                                         seed=tc.seed, sampler=[i for b in pbn for i in b])
                used = recompute_bn_stats(_unwrap(core), pbn_loader, num_batches=tc.precise_bn_batches,
                                          device=device, amp=tc.amp)
                distr.average_buffers(_unwrap(core), info)
                progress("message", text=f"precise BN: statistics recomputed over {used} batches")
            val_report = None
            is_last = epoch + 1 == tc.epochs
            if val_ds is not None and (is_last or (epoch + 1) % max(1, tc.eval_every) == 0):
                val_report = _evaluate_split(_unwrap(core), val_ds, classes, device=device, amp=tc.amp,
                                             batch_size=tc.batch_size, workers=workers, info=info,
                                             progress=progress)
            acc = val_report["top1"] if val_report is not None else (train_acc if val_ds is None else None)
            record = {"kind": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                      "train_acc": train_acc, "lr": optimizer.param_groups[0]["lr"]}
            if val_report is not None:
                record.update(val_top1=val_report["top1"], val_top5=val_report["top5"],
                              val_clip_top1=val_report["clip_top1"],
                              val_mean_class_acc=val_report["mean_class_accuracy"])
            improved = acc is not None and acc > best["acc"]
            if improved:
                best.update(acc=acc, epoch=epoch + 1, metric=metric_name)
            record["best"] = best["acc"]
            record["is_best"] = improved
            if main:
                _write_jsonl(metrics_path, record)
            save(last_path, epoch=epoch + 1, batches_done=0, metrics=record)
            if improved:
                save(best_path, epoch=epoch + 1, batches_done=0, full=False, metrics=record)
            last_epoch_record = record
            progress("epoch", record=record, metric=metric_name)
            distr.barrier(info)
            start_batch = 0
    finally:
        if info.enabled:
            distr.shutdown()

    result = {
        "run_dir": str(out),
        "best_acc": best["acc"] if best["acc"] >= 0 else None,
        "best_metric": metric_name,
        "best_epoch": best["epoch"],
        "last_path": str(last_path),
        "best_path": str(best_path) if best_path.exists() or not main else None,
        "metrics_path": str(metrics_path),
        "epochs": tc.epochs,
        "steps": step,
        "final": last_epoch_record,
        "resumed": ckpt is not None,
    }
    progress("end", result=result)
    return result


class _EpochShard:
    """Index sampler of one process: epoch e's order (seed, e), this rank's contiguous slices of the global batches
    (`distributed.shard_batches`), minus the first `skip` batches (resume). `set_epoch` is called by the loader."""

    def __init__(self, n: int, *, seed: int, batch_size: int, world_size: int, rank: int):
        self.n, self.seed, self.batch_size, self.world_size, self.rank = n, seed, batch_size, world_size, rank
        self.epoch, self.skip = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        order = distr.epoch_order(self.n, seed=self.seed, epoch=epoch, world_size=self.world_size)
        return distr.shard_batches(order, batch_size=self.batch_size, world_size=self.world_size, rank=self.rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _flat(self) -> list[int]:
        return [i for b in self.batches(self.epoch)[self.skip:] for i in b]

    def __iter__(self):
        return iter(self._flat())

    def __len__(self) -> int:
        return len(self._flat())


def _evaluate_split(model, dataset, classes, *, device, amp, batch_size, workers, info, progress):
    """Multi-view validation; under DDP each process takes a slice of the videos and the scores are gathered."""
    n = len(dataset)
    views = max(1, dataset.num_clips * dataset.num_crops) if hasattr(dataset, "num_clips") else 1
    mine = list(range(info.rank, n, info.world_size)) if info.enabled else list(range(n))
    loader = make_loader(dataset, batch_size=max(1, batch_size // views), shuffle=False, num_workers=workers,
                         seed=0, sampler=mine)
    progress("eval_start", num_videos=n, views=views)
    part = collect_scores(model, loader, device=device, amp=amp, chunk=batch_size, progress=progress)
    parts = distr.all_gather_objects(part, info)
    res = merge_scores(parts)
    return build_report(res["scores"], res["labels"], classes, indices=res["indices"],
                        view_correct=res["view_correct"], view_total=res["view_total"])
