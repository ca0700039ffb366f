"""The training loop: SGD/AdamW, warmup + cosine/step LR stepped per iteration, label smoothing, gradient clipping
and accumulation, bf16/fp16 autocast, optional torch.compile, precise BN, DDP, checkpoints and exact resume.

`train` runs three stages, each a function of its own: setup (resume or fresh start and the config merge, device
and processes, datasets, model, optimizer/scheduler/scaler, run folder), `train_one_epoch` (micro-batches,
optimizer steps, step records, mid-epoch checkpoints) and `end_of_epoch` (precise BN, validation, the epoch
record, last.pt/best.pt). Where the run stands lives in a `RunState`; the optimiser, schedule, RNG-state and
precise-BN helpers are in `nlvid.engine.optim`.

Exact resume (the same weights, bit for bit on the CPU, as a run never interrupted): everything random is a
function of the seed and the position in the run, never of history:
- the item order of epoch e is `randperm` seeded with (seed, e) (`nlvid.data.sampling.epoch_order`);
- item i's augmentation in epoch e depends on (seed, e, i) (`VideoDataset.set_epoch`, the data layer's contract);
- the global torch RNG (dropout) is re-seeded before every micro-batch from (seed, epoch, batch, rank);
- a resumed run skips the batches of the epoch that the checkpoint already covers;
- model, optimizer, scheduler, grad scaler, step counters, the epoch's running sums and RNG states come from the
  checkpoint.
Checkpoints are written only at optimizer-step boundaries and never after a non-finite loss or gradient.

Nothing here prints: progress goes through `progress(event, **data)` (see `nlvid.cli.train` for the reporters).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from nlvid.checkpoint import load_checkpoint, save_checkpoint
from nlvid.config import Amp, Config, TrainConfig, config_from_dict, model_kwargs, test_data_kwargs, train_data_kwargs
from nlvid.data import VideoDataset, make_loader, resolve_splits, scan_dataset
from nlvid.data.sampling import epoch_order
from nlvid.engine import distributed as distr
from nlvid.engine.device import autocast_context, resolve_device
from nlvid.engine.evaluate import Progress, build_report, collect_scores, merge_scores
from nlvid.engine.optim import build_optimizer, build_scheduler, recompute_bn_stats, rng_state, set_rng_state, step_seed
from nlvid.engine.runs import MetricsLog, RunLock, require_tensorboard, write_run_info
from nlvid.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from nlvid.models import build_with_init, create_model, load_state_dict_checked


# Keys a resumed run may change (the rest comes from the run's stored config).
RESUME_MUTABLE = ("train.epochs", "train.log_every", "train.save_every", "train.device", "train.eval_every",
                  "data.num_workers", "train.checkpoint")  # checkpointing changes memory and time, not results


# ------------------------------------------------------------------------------------------ run objects


@dataclass
class EpochStats:
    """Sums over the micro-batches of (part of) an epoch in one process. Summed across processes, and stored in
    checkpoints as `epoch_sums`, as one float64 tensor of 4 slots in this field order (`to_tensor`/`from_tensor`)."""

    loss_sum: float = 0.0  # loss x clips
    correct: float = 0.0  # clips whose top-1 prediction is right
    clips: float = 0.0
    data_time: float = 0.0  # seconds spent waiting for the loader

    def add(self, other: EpochStats) -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.clips += other.clips
        self.data_time += other.data_time

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.correct, self.clips, self.data_time], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> EpochStats:
        loss_sum, correct, clips, data_time = (float(v) for v in t.tolist())
        return cls(loss_sum=loss_sum, correct=correct, clips=clips, data_time=data_time)

    def all_reduced(self, info: distr.DistInfo) -> EpochStats:
        """The sums over all processes (a copy; this process's sums when not distributed)."""
        return EpochStats.from_tensor(distr.all_reduce_sum(self.to_tensor(), info))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.clips, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.clips, 1)


@dataclass
class RunState:
    """Where the run stands; checkpoints store it. `epoch` epochs are finished and `batches_done` batches of the
    next one are trained (0 at an epoch boundary); `stats` are this process's sums over those batches."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0  # optimizer steps taken
    best: dict[str, Any] = field(default_factory=lambda: {"acc": -1.0, "epoch": None, "metric": None})
    stats: EpochStats = field(default_factory=EpochStats)


@dataclass(frozen=True)
class RunPaths:
    """The files of a run folder."""

    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def last_good(self) -> str:
        """What an error message names as the checkpoint to go back to."""
        return str(self.last) if self.last.exists() else "none yet"


@dataclass(frozen=True)
class RunContext:
    """What stays fixed during a run. `progress` is silent in every process but the main one."""

    cfg: Config
    classes: list[str]
    device: torch.device
    info: distr.DistInfo
    paths: RunPaths
    progress: Progress
    metric: str  # what best.pt is chosen by: "val_top1", or "train_acc" without validation data
    records: MetricsLog  # metrics.jsonl (+ TensorBoard); writes in the main process only


@dataclass
class Learner:
    """The modules and optimisation objects of a run."""

    model: nn.Module  # the plain module: its state_dict is saved, its gradients clipped
    train_model: nn.Module  # `model` under DDP and/or torch.compile: what the training forward pass calls
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


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

    Writes into `out`: config.yaml, classes.txt, run.json, metrics.jsonl, last.pt, best.pt, and tensorboard/ when
    train.tensorboard. The main process owns `out` while it trains (`nlvid.engine.runs.RunLock`: a TrainingError
    names the owner of a folder in use; a stale lock is taken over). Resumes when `resume` is set or
    `out/last.pt` exists (then `cfg` may be None: the run's stored config is used; of a given `cfg` only the keys
    in RESUME_MUTABLE are taken). `init` = "FORMAT=PATH" initial weights (nlvid.models.build_with_init).
    `progress`: a callback `fn(event, **data)` (the CLI's reporter prints it on stderr); None = silent.
    `hooks` (tests): {"after_backward": fn(model, loss, step)}.
    Returns {best_acc, best_metric, best_epoch, last_path, best_path, run_dir, epochs, steps, final: {...}}.
    """
    progress = progress or _noop
    paths = RunPaths(Path(out))
    with RunLock(paths.out, progress=progress, enabled=distr.env_info().is_main):
        return _train_locked(cfg, data=data, val=val, paths=paths, resume=resume, init=init, progress=progress,
                             hooks=hooks)


def _train_locked(cfg: Config | None, *, data: str | Path, val: str | Path | list | None, paths: RunPaths,
                  resume: bool, init: str | None, progress: Progress,
                  hooks: dict[str, Callable[..., Any]] | None) -> dict[str, Any]:
    """`train` once the run folder's lock is held."""
    cfg, ckpt = _resume_or_fresh(cfg, paths, resume=resume, progress=progress)
    tc = cfg.train
    if tc.tensorboard and distr.env_info().is_main:
        require_tensorboard()  # before the scan and the model: a missing package is a config error, found early
    device, info = _setup_processes(tc)
    if not info.is_main:
        progress = _noop
    stored_classes = None if ckpt is None else ckpt["classes"]
    classes, train_ds, val_ds = _build_datasets(cfg, data, val, stored_classes=stored_classes, progress=progress,
                                                info=info)
    model, init_lines = _build_model(cfg, classes, ckpt=ckpt, init=init, device=device, info=info, paths=paths)
    sampler = _EpochShard(len(train_ds), seed=tc.seed, batch_size=tc.batch_size, world_size=info.world_size,
                          rank=info.rank)
    batches_per_epoch = len(sampler.batches(0))
    steps_per_epoch = math.ceil(batches_per_epoch / tc.accum_steps)
    optimizer, scheduler, scaler = _build_optimization(model, cfg, steps_per_epoch=steps_per_epoch)
    state = RunState() if ckpt is None else _restore_state(ckpt, optimizer, scheduler, scaler, paths=paths)
    learner = Learner(model=model, train_model=_wrap(model, device, info, compile=tc.compile),
                      criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
                      optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    run = RunContext(cfg=cfg, classes=classes, device=device, info=info, paths=paths, progress=progress,
                     metric="val_top1" if val_ds is not None else "train_acc",
                     records=MetricsLog(paths.out, tensorboard=tc.tensorboard, enabled=info.is_main))
    try:  # from here on the records are open: closed (TensorBoard flushed) however the run ends
        _prepare_run_folder(run, state, resumed=ckpt is not None, data=data, val=val)
        progress("start", run_dir=str(paths.out), resumed=ckpt is not None, start_epoch=state.epoch,
                 start_batch=state.batches_done, step=state.step, epochs=tc.epochs,
                 steps_per_epoch=steps_per_epoch, batches_per_epoch=batches_per_epoch,
                 total_steps=steps_per_epoch * tc.epochs, num_train=len(train_ds),
                 num_val=len(val_ds) if val_ds is not None else 0, device=str(device), world_size=info.world_size,
                 global_batch=tc.batch_size * info.world_size * tc.accum_steps,
                 metric=run.metric, classes=classes, init=init_lines, model=cfg.model.name)

        # one loader for the whole run (persistent workers); its sampler yields this rank's remaining items of the
        # epoch
        loader = make_loader(train_ds, batch_size=tc.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                             seed=tc.seed, sampler=sampler)
        last_record: dict[str, Any] = {}
        while state.epoch < tc.epochs:
            train_ds.set_epoch(state.epoch)  # the loader's sampler reads it: (index, epoch) pairs reach the workers
            sampler.skip = state.batches_done
            num_batches = len(sampler.batches(state.epoch))
            progress("epoch_start", epoch=state.epoch, batches=num_batches, first_batch=state.batches_done,
                     step=state.step)
            train_one_epoch(learner, loader, state, run, num_batches=num_batches, hooks=hooks or {})
            last_record = end_of_epoch(learner, state, run, train_ds=train_ds, val_ds=val_ds)
    finally:
        run.records.close()
        if info.enabled:
            distr.shutdown()

    result = _result(run, state, last_record, resumed=ckpt is not None)
    progress("end", result=result)
    return result


def _result(run: RunContext, state: RunState, last_record: dict[str, Any], *, resumed: bool) -> dict[str, Any]:
    """What `train` returns (see there)."""
    paths = run.paths
    return {
        "run_dir": str(paths.out),
        "best_acc": state.best["acc"] if state.best["acc"] >= 0 else None,
        "best_metric": run.metric,
        "best_epoch": state.best["epoch"],
        "last_path": str(paths.last),
        "best_path": str(paths.best) if paths.best.exists() or not run.info.is_main else None,
        "metrics_path": str(paths.metrics),
        "epochs": run.cfg.train.epochs,
        "steps": state.step,
        "final": last_record,
        "resumed": resumed,
    }


# ------------------------------------------------------------------------------------------ setup


def _resume_or_fresh(cfg: Config | None, paths: RunPaths, *, resume: bool,
                     progress: Progress) -> tuple[Config, dict[str, Any] | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run). A run resumes when `resume` is
    set or paths.last exists; it then keeps its stored config, except the RESUME_MUTABLE keys of a given `cfg`."""
    if not (resume or paths.last.exists()):
        if cfg is None:
            raise ConfigError("no config given and nothing to resume")
        return cfg, None
    if not paths.last.exists():
        raise ConfigError(f"resume=True but {paths.out} has no last.pt to resume from")
    ckpt = load_checkpoint(paths.last)
    stored = config_from_dict(ckpt["config"])
    if cfg is not None:
        changed = _cfg_diff(stored.to_dict(), cfg.to_dict())
        for key in changed:
            if key in RESUME_MUTABLE:
                section, name = key.split(".")
                setattr(getattr(stored, section), name, getattr(getattr(cfg, section), name))
        ignored = [k for k in changed if k not in RESUME_MUTABLE and k != "model.num_classes"]
        if ignored:
            progress("message", text=f"resuming: the run's stored config wins for {', '.join(ignored)} "
                                      f"(only {', '.join(RESUME_MUTABLE)} may change on resume)")
    return stored, ckpt


def _setup_processes(tc: TrainConfig) -> tuple[torch.device, distr.DistInfo]:
    """The training device (under torchrun on CUDA: this process's local rank) and this process's place in the
    process group, joined here. ConfigError for settings the device cannot run."""
    device = resolve_device(tc.device)
    dist_env = distr.env_info()
    if dist_env.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_env.local_rank)
    if tc.amp == Amp.FP16 and device.type != "cuda":
        raise ConfigError("train.amp 'fp16' needs a CUDA device (it uses a grad scaler); use train.amp=bf16 on the CPU")
    if tc.sync_bn and device.type != "cuda" and dist_env.enabled:
        raise ConfigError("train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); set train.sync_bn=false")
    if tc.accum_steps < 1 or tc.batch_size < 1:
        raise ConfigError("train.batch_size and train.accum_steps must be >= 1")
    if tc.compile and tc.checkpoint != "off":
        raise ConfigError(f"train.checkpoint={tc.checkpoint} does not work with train.compile (torch.compile's "
                          "recomputation would update BN statistics twice); set one of them off",
                          key="train.checkpoint")
    if device.type == "cpu":
        # Flush denormal floats to zero (FTZ/DAZ): a loss driven towards 0 can fill backward with denormals, which
        # x86 CPUs compute many times slower (issue #17). It reaches this thread and the threads started after it,
        # so in `nlvid train` it is set before the first parallel torch op creates the OpenMP workers.
        torch.set_flush_denormal(True)
    info = distr.init_distributed(device)
    if device.type == "cpu" and info.enabled:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, info


def _build_datasets(cfg: Config, data: str | Path, val: Any, *, stored_classes: list[str] | None,
                    progress: Progress, info: distr.DistInfo) -> tuple[list[str], VideoDataset, VideoDataset | None]:
    """Scan the splits and build (classes, training dataset, validation dataset or None). A resumed run keeps
    its `stored_classes`; a fresh one takes the classes found and sets model.num_classes to their count."""
    dc, seed = cfg.data, cfg.train.seed
    train_src, val_src = resolve_splits(data, val)
    tindex = _scan(train_src, classes=None if stored_classes is None else list(stored_classes),
                   on_error=dc.on_error, progress=progress, split="train", info=info)
    classes = list(tindex.classes)
    if not tindex.items:
        raise DatasetError(f"{train_src}: no readable training videos")
    vindex = None
    if val_src is not None:
        vindex = _scan(val_src, classes=classes, on_error=dc.on_error, progress=progress, split="val", info=info)
        if not vindex.items:
            progress("message", text=f"{val_src}: no readable validation videos; choosing best.pt by train accuracy")
            vindex = None
    if stored_classes is None and cfg.model.num_classes != len(classes):
        cfg.model.num_classes = len(classes)
    train_ds = VideoDataset(tindex.items, train=True, **train_data_kwargs(dc), on_error=dc.on_error, seed=seed)
    val_ds = None
    if vindex is not None:
        val_ds = VideoDataset(vindex.items, train=False, **test_data_kwargs(dc), on_error=dc.on_error, seed=seed)
    return classes, train_ds, val_ds


def _build_model(cfg: Config, classes: list[str], *, ckpt: dict[str, Any] | None, init: str | None,
                 device: torch.device, info: distr.DistInfo, paths: RunPaths) -> tuple[nn.Module, list[str]]:
    """Seed the global RNGs from train.seed, then build the model: the checkpoint's weights on resume, `init`'s
    on a fresh run that has one (cfg.model becomes the initialised model's), else a fresh initialisation.
    Returns the model on `device` (with SyncBatchNorm under DDP when train.sync_bn: a model.bn=frozen model has no
    batch statistics to synchronise and is left as it is), activation checkpointing set from train.checkpoint, and
    `init`'s report lines."""
    seed = cfg.train.seed
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    init_lines: list[str] = []
    if ckpt is None and init:
        model, new_model_cfg, _init_classes, init_lines = build_with_init(cfg.model, init, num_classes=len(classes))
        cfg.model = new_model_cfg
        cfg.model.num_classes = len(classes)
    else:
        model = create_model(cfg.model.name, **model_kwargs(cfg.model))
    d = cfg.data  # clips the strides cannot take are a ConfigError now, not a crash in the first step
    model.check_input((1, 3, d.num_frames, d.crop_size, d.crop_size))
    model.check_input((1, 3, d.num_frames, d.test_crop_size, d.test_crop_size))
    if ckpt is not None:
        try:
            load_state_dict_checked(model, ckpt["model"])
        except (CheckpointError, ConfigError) as e:
            raise CheckpointError(f"{paths.last}: cannot resume: {e}") from None
    model.to(device)
    if cfg.train.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.set_checkpointing(cfg.train.checkpoint)
    return model, init_lines


def _build_optimization(model: nn.Module, cfg: Config, *, steps_per_epoch: int
                        ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler]:
    """Optimizer, per-step LR schedule over train.epochs x `steps_per_epoch` steps, and the grad scaler (enabled
    for fp16 only)."""
    oc = cfg.optim
    optimizer = build_optimizer(model, optimizer=oc.optimizer, lr=oc.lr, momentum=oc.momentum,
                                nesterov=oc.nesterov, weight_decay=oc.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=steps_per_epoch * cfg.train.epochs,
                                steps_per_epoch=steps_per_epoch, warmup_epochs=oc.warmup_epochs,
                                start_factor=oc.warmup_start_factor, schedule=oc.schedule,
                                milestones=oc.milestones, gamma=oc.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=(cfg.train.amp == Amp.FP16))
    return optimizer, scheduler, scaler


def _restore_state(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler, *,
                   paths: RunPaths) -> RunState:
    """Load the optimizer, scheduler and scaler states and the RNG states of a resumed run; return where it
    stands (with the running sums of a partly trained epoch). The LR is recomputed for the restored step from
    the schedule built for this run (train.epochs may have changed)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{paths.last}: optimizer/scheduler state does not fit this run ({e})") from None
    state = RunState(epoch=int(ckpt["epoch"]), batches_done=int(ckpt.get("batches_done", 0)), step=int(ckpt["step"]))
    state.best.update(ckpt.get("best") or {})
    if state.batches_done > 0 and ckpt.get("epoch_sums") is not None:
        state.stats = EpochStats.from_tensor(ckpt["epoch_sums"])  # the part of this epoch done before the resume
    if ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * scheduler.lr_lambdas[0](state.step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return state


def _wrap(model: nn.Module, device: torch.device, info: distr.DistInfo, *, compile: bool) -> nn.Module:
    """`model` as the training forward pass calls it: under DDP when distributed, then torch.compile'd if asked."""
    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        train_model = torch.compile(train_model)
    return train_model


def _prepare_run_folder(run: RunContext, state: RunState, *, resumed: bool, data: str | Path,
                        val: str | Path | list | None) -> None:
    """Main process: write config.yaml, classes.txt and run.json (the data's location, for `nlvid runs`); start
    the records (metrics.jsonl, TensorBoard), or on resume cut them back to what the checkpoint covers. Every
    process waits for it."""
    if run.info.is_main:
        out = run.paths.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(run.cfg.to_yaml())
        (out / "classes.txt").write_text("".join(c + "\n" for c in run.classes))
        write_run_info(out, data=str(Path(data).resolve()),
                       val=str(Path(val).resolve()) if isinstance(val, (str, Path)) else None)
        run.records.start(resume_step=state.step if resumed else None)
    distr.barrier(run.info)


# ------------------------------------------------------------------------------------------ one epoch


def train_one_epoch(learner: Learner, loader: Any, state: RunState, run: RunContext, *, num_batches: int,
                    hooks: dict[str, Callable[..., Any]]) -> None:
    """Train epoch `state.epoch` from batch `state.batches_done` to its end (`loader` yields those batches,
    `num_batches` counts the whole epoch). One optimizer step per train.accum_steps micro-batches (the epoch's
    last group may be shorter); a step record every train.log_every steps and at the epoch's last step; last.pt
    every train.save_every steps within the epoch. Advances `state` and adds to `state.stats`."""
    tc, epoch = run.cfg.train, state.epoch
    learner.train_model.train()
    window, window_t0 = EpochStats(), time.perf_counter()  # the sums since the last step record
    t_end = time.perf_counter()
    for bi, (clips, labels, _index) in enumerate(loader, start=state.batches_done):
        t_data = time.perf_counter() - t_end
        group_start = (bi // tc.accum_steps) * tc.accum_steps
        group_len = min(tc.accum_steps, num_batches - group_start)
        last_in_group = bi == group_start + group_len - 1
        where = f"step {state.step + 1} (epoch {epoch + 1}, batch {bi + 1})"
        torch.manual_seed(step_seed(tc.seed, epoch, bi, run.info.rank))
        loss, batch = _micro_batch(learner, clips, labels, run, group_len=group_len, sync=last_in_group,
                                   where=where)
        batch.data_time = t_data
        if "after_backward" in hooks:
            hooks["after_backward"](model=learner.model, loss=loss, step=state.step)
        state.stats.add(batch)
        window.add(batch)
        if last_in_group:
            lr, gnorm = _optimizer_step(learner, run, where=where)
            state.step += 1
            state.batches_done = bi + 1
            end_of_epoch = state.batches_done == num_batches
            log_now = tc.log_every > 0 and state.step % tc.log_every == 0
            if log_now or end_of_epoch:
                _report_window(run, state, window, window_t0, lr=lr, grad_norm=float(gnorm), log=log_now,
                               num_batches=num_batches)
                window, window_t0 = EpochStats(), time.perf_counter()
            else:
                run.progress("step", record={"epoch": epoch + 1, "step": state.step, "batch": state.batches_done,
                                             "batches": num_batches, "loss": loss.item(), "lr": lr}, log=False)
            if tc.save_every > 0 and state.step % tc.save_every == 0 and not end_of_epoch:
                check_finite(learner.model, run, state.step, f"epoch {epoch + 1}, batch {state.batches_done}")
                save_run(run.paths.last, learner, state, run)
                run.progress("checkpoint", path=str(run.paths.last), step=state.step)
        t_end = time.perf_counter()


def _micro_batch(learner: Learner, clips: torch.Tensor, labels: Any, run: RunContext, *, group_len: int,
                 sync: bool, where: str) -> tuple[torch.Tensor, EpochStats]:
    """Forward and backward of one micro-batch. The loss is divided by `group_len` (the micro-batches of this
    optimizer step), so a group's gradients add up to its mean; under DDP the gradients are all-reduced only when
    `sync`. TrainingError when the loss is not finite in any process. Returns the loss and the batch's sums
    (without data time)."""
    device, info = run.device, run.info
    clips = clips.to(device, non_blocking=True)
    labels = torch.as_tensor(labels, dtype=torch.long).to(device, non_blocking=True)
    model = learner.train_model
    with nullcontext() if (sync or not info.enabled) else model.no_sync():
        with autocast_context(device, run.cfg.train.amp):
            logits = model(clips)
        loss = learner.criterion(logits.float(), labels)
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
        distr.all_reduce_sum(bad, info)
        if bad.item() > 0:
            raise TrainingError(_stopped(f"loss is {loss.item()} at {where}", run.paths, "a lower optim.lr"))
        learner.scaler.scale(loss / group_len).backward()
    n = labels.shape[0]
    correct = (logits.detach().argmax(-1) == labels).sum().item()
    return loss, EpochStats(loss_sum=loss.item() * n, correct=float(correct), clips=float(n))


def _optimizer_step(learner: Learner, run: RunContext, *, where: str) -> tuple[float, torch.Tensor]:
    """Unscale (fp16), clip the gradient norm to optim.clip_grad_norm (0: measure only), step, zero the
    gradients, advance the LR schedule. TrainingError on a non-finite gradient norm (under fp16 the grad scaler
    skips such a step instead). Returns the LR the step used and the gradient norm."""
    clip = run.cfg.optim.clip_grad_norm
    learner.scaler.unscale_(learner.optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(learner.model.parameters(), clip if clip > 0 else float("inf"))
    if not torch.isfinite(gnorm) and run.cfg.train.amp != Amp.FP16:
        raise TrainingError(_stopped(f"gradient norm is {gnorm.item()} at {where}", run.paths,
                                     "a lower optim.lr or optim.clip_grad_norm"))
    lr = learner.optimizer.param_groups[0]["lr"]
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scheduler.step()
    return lr, gnorm


def _report_window(run: RunContext, state: RunState, window: EpochStats, window_t0: float, *, lr: float,
                   grad_norm: float, log: bool, num_batches: int) -> None:
    """The step record of `state.step`: means over the micro-batches since the last record, summed over all
    processes (every process must call this). Goes to `progress`, and to metrics.jsonl when `log`."""
    w = window.all_reduced(run.info)
    dt = time.perf_counter() - window_t0
    data_time = w.data_time / run.info.world_size
    record = {
        "kind": "step", "epoch": state.epoch + 1, "step": state.step, "batch": state.batches_done,
        "batches": num_batches, "loss": w.loss, "acc": w.accuracy, "lr": lr, "grad_norm": grad_norm,
        "clips_per_s": w.clips / max(dt, 1e-9), "data_time": data_time, "time": dt,
        "data_fraction": data_time / max(dt, 1e-9),
    }
    if run.info.is_main and log:
        run.records.write(record)
    run.progress("step", record=record, log=log)


# ------------------------------------------------------------------------------------------ end of epoch


def end_of_epoch(learner: Learner, state: RunState, run: RunContext, *, train_ds: VideoDataset,
                 val_ds: VideoDataset | None) -> dict[str, Any]:
    """After the last step of epoch `state.epoch`: check the weights, precise BN (train.precise_bn_batches),
    validation (every train.eval_every epochs and after the last), the epoch record (metrics.jsonl and
    `progress`), last.pt, and best.pt when the metric improved. Moves `state` to the next epoch's start and
    returns the record."""
    tc, info, epoch = run.cfg.train, run.info, state.epoch
    check_finite(learner.model, run, state.step, f"end of epoch {epoch + 1}")
    totals = state.stats.all_reduced(info)
    if tc.precise_bn_batches > 0:
        _precise_bn(learner.model, train_ds, run, epoch=epoch)
    val_report = None
    if val_ds is not None and (epoch + 1 == tc.epochs or (epoch + 1) % max(1, tc.eval_every) == 0):
        val_report = _evaluate_split(learner.model, val_ds, run)
    record = {"kind": "epoch", "epoch": epoch + 1, "step": state.step, "train_loss": totals.loss,
              "train_acc": totals.accuracy, "lr": learner.optimizer.param_groups[0]["lr"]}
    if val_report is not None:
        record.update(val_top1=val_report["top1"], val_top5=val_report["top5"],
                      val_clip_top1=val_report["clip_top1"], val_mean_class_acc=val_report["mean_class_accuracy"])
    acc = val_report["top1"] if val_report is not None else (totals.accuracy if val_ds is None else None)
    improved = acc is not None and acc > state.best["acc"]
    if improved:
        state.best.update(acc=acc, epoch=epoch + 1, metric=run.metric)
    record["best"] = state.best["acc"]
    record["is_best"] = improved
    state.epoch, state.batches_done, state.stats = epoch + 1, 0, EpochStats()
    if info.is_main:
        run.records.write(record)
    save_run(run.paths.last, learner, state, run, metrics=record)
    if improved:
        save_run(run.paths.best, learner, state, run, full=False, metrics=record)
    run.progress("epoch", record=record, metric=run.metric)
    distr.barrier(info)
    return record


def _precise_bn(model: nn.Module, train_ds: VideoDataset, run: RunContext, *, epoch: int) -> None:
    """Recompute BN statistics over train.precise_bn_batches training batches (an order of their own, seeded
    with train.seed + 7 and the epoch) and average them over processes."""
    tc, info = run.cfg.train, run.info
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        run.progress("message", text="precise BN: nothing to recompute (model.bn=frozen: fixed statistics)")
        return
    order = epoch_order(len(train_ds), seed=tc.seed + 7, epoch=epoch, world_size=info.world_size)
    batches = distr.shard_batches(order, batch_size=tc.batch_size, world_size=info.world_size,
                                  rank=info.rank)[: tc.precise_bn_batches]
    loader = make_loader(train_ds, batch_size=tc.batch_size, shuffle=False, num_workers=run.cfg.data.num_workers,
                         seed=tc.seed, sampler=[i for b in batches for i in b])
    used = recompute_bn_stats(model, loader, num_batches=tc.precise_bn_batches, device=run.device, amp=tc.amp)
    distr.average_buffers(model, info)
    run.progress("message", text=f"precise BN: statistics recomputed over {used} batches")


def _evaluate_split(model: nn.Module, dataset: VideoDataset, run: RunContext) -> dict[str, Any]:
    """Multi-view validation; under DDP each process takes a slice of the videos and the scores are gathered."""
    info, batch_size = run.info, run.cfg.train.batch_size
    n = len(dataset)
    views = max(1, dataset.num_clips * dataset.num_crops) if hasattr(dataset, "num_clips") else 1
    mine = list(range(info.rank, n, info.world_size)) if info.enabled else list(range(n))
    loader = make_loader(dataset, batch_size=max(1, batch_size // views), shuffle=False,
                         num_workers=run.cfg.data.num_workers, seed=0, sampler=mine)
    run.progress("eval_start", num_videos=n, views=views)
    part = collect_scores(model, loader, device=run.device, amp=run.cfg.train.amp, chunk=batch_size,
                          progress=run.progress)
    parts = distr.all_gather_objects(part, info)
    res = merge_scores(parts)
    return build_report(res["scores"], res["labels"], run.classes, indices=res["indices"],
                        view_correct=res["view_correct"], view_total=res["view_total"])


# ------------------------------------------------------------------------------------------ checkpoints


def check_finite(model: nn.Module, run: RunContext, step: int, where: str) -> None:
    """TrainingError if any parameter is not finite: a finite loss can still be followed by an update that breaks
    the weights, and those are never saved."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(_stopped(f"weights are not finite at step {step} ({where}; e.g. {', '.join(bad[:3])})",
                                     run.paths, "a lower optim.lr or optim.clip_grad_norm"))


def save_run(path: Path, learner: Learner, state: RunState, run: RunContext, *, full: bool = True,
             metrics: dict[str, Any] | None = None) -> None:
    """Main process: write a checkpoint of `state` (model, position, best result, the epoch's running sums when
    mid-epoch); `full` adds what exact resume needs (optimizer, scheduler, grad scaler, RNG states)."""
    if not run.info.is_main:
        return
    sums = state.stats if state.batches_done else EpochStats()
    extra: dict[str, Any] = {"batches_done": state.batches_done, "best": dict(state.best), "metrics": metrics or {},
                             "epoch_sums": sums.to_tensor()}
    if full:
        extra.update(optimizer=learner.optimizer.state_dict(), scheduler=learner.scheduler.state_dict(),
                     scaler=learner.scaler.state_dict(), rng=rng_state())
    save_checkpoint(path, model_state=learner.model.state_dict(), config=run.cfg.to_dict(), classes=run.classes,
                    epoch=state.epoch, step=state.step, **extra)


def _stopped(what: str, paths: RunPaths, hint: str) -> str:
    """The message of a run stopped by a non-finite value."""
    return f"{what}; stopped without saving; last good checkpoint: {paths.last_good()} (try {hint})"


# ------------------------------------------------------------------------------------------ helpers


class _EpochShard:
    """Index sampler of one process: epoch e's order (seed, e), this rank's contiguous slices of the global batches
    (`distributed.shard_batches`), minus the first `skip` batches (resume). `set_epoch` is called by the loader."""

    def __init__(self, n: int, *, seed: int, batch_size: int, world_size: int, rank: int):
        self.n, self.seed, self.batch_size, self.world_size, self.rank = n, seed, batch_size, world_size, rank
        self.epoch, self.skip = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        order = epoch_order(self.n, seed=self.seed, epoch=epoch, world_size=self.world_size)
        return distr.shard_batches(order, batch_size=self.batch_size, world_size=self.world_size, rank=self.rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _flat(self) -> list[int]:
        return [i for b in self.batches(self.epoch)[self.skip:] for i in b]

    def __iter__(self):
        return iter(self._flat())

    def __len__(self) -> int:
        return len(self._flat())


def _cfg_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (sections compared key by key)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k in ("model", "data", "optim", "train"):
            out += _cfg_diff(va, vb, f"{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _scan(source: Any, *, classes: list[str] | None, on_error: str, progress: Progress, split: str,
          info: distr.DistInfo):
    """Index one split. Under DDP rank 0 scans first (probing each new file once and filling the scan cache) and
    the other ranks scan after a barrier, reading the cache instead of probing every file N times at once."""
    def files(done: int, total: int) -> None:
        progress("scan_progress", split=split, done=done, total=total)

    index = None
    if info.is_main:
        index = scan_dataset(source, classes=classes, on_error=on_error, progress=files)
        progress("scan", split=split, index=index)
    distr.barrier(info)
    if index is None:
        index = scan_dataset(source, classes=classes, on_error=on_error)
    return index


def _noop(event: str, **data: Any) -> None:
    pass
