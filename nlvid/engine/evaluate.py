"""Evaluation: multi-view testing (clips x crops), softmax scores averaged per video, clip and video accuracy,
per-class accuracy, confusion matrix (PNG drawn with PIL), predictions file.

Plain functions; nothing here prints. `progress(event, **data)` callbacks report progress when given.
Shapes: B videos per batch, V views per video (num_clips * num_crops), K classes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nlvid.config import test_data_kwargs
from nlvid.data import VideoDataset, make_loader, resolve_splits, scan_dataset
from nlvid.engine.device import autocast_context, resolve_device
from nlvid.errors import CheckpointError, ConfigError, DatasetError, NlvidError
from nlvid.models import load_model

# The one shape of progress callbacks in nlvid.engine: `progress(event, **data)`, e.g. progress("eval_step",
# done=3, total=10); a callback ignores the events it does not know.
# Every engine loop reports through one callback shape: progress(event, **data); the CLI renders the events.
Progress = Callable[..., None]


# --------------------------------------------------------------------------------------------- core maths


def require_finite(logits: torch.Tensor, where: str) -> torch.Tensor:
    """`logits` unchanged, or an NlvidError: scores computed from NaN/inf are never reported as results."""
    if not bool(torch.isfinite(logits).all()):
        raise NlvidError(f"{where}: the model's outputs are not finite (NaN or infinity); its weights or the input "
                         f"overflow (try without train.amp / autocast)")
    return logits


def average_views(view_logits: torch.Tensor) -> torch.Tensor:
    """(B, V, K) logits of V views per video -> (B, K) video scores: the mean of the per-view softmax (paper 5)."""
    return F.softmax(view_logits.float(), dim=-1).mean(dim=1)


@torch.no_grad()
def collect_scores(
    model: torch.nn.Module,
    loader: Any,
    *,
    device: torch.device | str = "cpu",
    amp: str = "none",
    chunk: int = 16,
    label_map: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run `model` over a loader of test items `(views (B, V, 3, T, S, S), label (B,), index (B,))`.

    Returns {"indices": (N,) int64, "labels": (N,) int64 (model class space), "scores": (N, K) float32 video scores,
    "view_correct": int, "view_total": int}. `label_map[data_label] -> model class` when the data's classes are a
    subset of the model's. The forward pass runs `chunk` views at a time (memory stays bounded for 30 views).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    idx_all, lab_all, score_all = [], [], []
    view_correct = view_total = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    try:
        for bi, (views, labels, index) in enumerate(loader):
            b, v = views.shape[:2]
            flat = views.reshape(b * v, *views.shape[2:])  # (B, V, 3, T, S, S) -> (B*V, 3, T, S, S)
            logits = []
            for s in range(0, flat.shape[0], max(1, chunk)):
                x = flat[s : s + chunk].to(device, non_blocking=True)
                with autocast_context(device, amp):
                    logits.append(require_finite(model(x).float().cpu(), f"batch {bi}"))
            view_logits = torch.cat(logits).reshape(b, v, -1)  # (B*V, K) -> (B, V, K)
            labels = torch.as_tensor(labels, dtype=torch.long)
            if label_map is not None:
                labels = torch.as_tensor([label_map[int(y)] for y in labels], dtype=torch.long)
            view_correct += int((view_logits.argmax(-1) == labels[:, None]).sum())
            view_total += b * v
            score_all.append(average_views(view_logits))
            lab_all.append(labels)
            idx_all.append(torch.as_tensor(index, dtype=torch.long))
            if progress is not None:
                progress("eval_step", done=bi + 1, total=total)
    finally:
        model.train(was_training)
    if not score_all:
        return {"indices": torch.zeros(0, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long),
                "scores": torch.zeros(0, 0), "view_correct": 0, "view_total": 0}
    return {
        "indices": torch.cat(idx_all),
        "labels": torch.cat(lab_all),
        "scores": torch.cat(score_all),
        "view_correct": view_correct,
        "view_total": view_total,
    }


def merge_scores(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine `collect_scores` results of several processes; duplicates (DDP padding) are dropped by index."""
    idx = torch.cat([p["indices"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts if p["scores"].numel()] or [torch.zeros(0, 0)])
    keep: dict[int, int] = {}
    for pos, i in enumerate(idx.tolist()):
        keep.setdefault(i, pos)
    order = sorted(keep)
    sel = torch.as_tensor([keep[i] for i in order], dtype=torch.long)
    return {
        "indices": idx[sel],
        "labels": labels[sel],
        "scores": scores[sel] if scores.numel() else scores,
        "view_correct": sum(p["view_correct"] for p in parts),
        "view_total": sum(p["view_total"] for p in parts),
    }


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """(K, K) counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for y, p in zip(labels, preds):
        cm[int(y), int(p)] += 1
    return cm


def build_report(
    scores: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    *,
    indices: torch.Tensor | None = None,
    paths: Sequence[str] | None = None,
    view_correct: int = 0,
    view_total: int = 0,
) -> dict[str, Any]:
    """Accuracy report from video scores (N, K) and true labels (N,) in the model's class space."""
    n, k = len(labels), len(classes)
    if n == 0:
        raise ConfigError("nothing to evaluate: the dataset has no readable videos")
    scores = scores.float()
    labels = labels.long()
    topk = min(5, k)
    top = scores.topk(topk, dim=1).indices  # (N, topk)
    preds = top[:, 0]
    correct1 = preds == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    cm = confusion_matrix(labels.tolist(), preds.tolist(), k)
    per_class: dict[str, dict[str, Any]] = {}
    accs = []
    for c, name in enumerate(classes):
        count = int(cm[c].sum())
        acc = float(cm[c, c] / count) if count else None
        if acc is not None:
            accs.append(acc)
        per_class[name] = {"accuracy": acc, "num_videos": count, "correct": int(cm[c, c])}
    predictions = []
    for row in range(n):
        item = int(indices[row]) if indices is not None else row
        predictions.append({
            "index": item,
            "path": str(paths[item]) if paths is not None else None,
            "label": classes[int(labels[row])],
            "pred": classes[int(preds[row])],
            "score": float(scores[row, preds[row]]),
            "correct": bool(correct1[row]),
            "top5": [classes[int(j)] for j in top[row]],
            "top5_scores": [round(float(scores[row, j]), 6) for j in top[row]],
        })
    return {
        "top1": float(correct1.float().mean()),
        "top5": float(correct5.float().mean()),
        "topk": topk,
        "clip_top1": float(view_correct / view_total) if view_total else None,
        "mean_class_accuracy": float(np.mean(accs)) if accs else 0.0,
        "num_videos": n,
        "num_views": int(view_total // n) if view_total else None,
        "num_classes": k,
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "predictions": predictions,
    }


def evaluate(
    model: torch.nn.Module,
    data: Any,
    classes: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    amp: str = "none",
    label_map: Sequence[int] | None = None,
    paths: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on `data` (a test-mode VideoDataset, or any iterable of `(views, labels, index)` batches).

    `batch_size` is in clips (views); videos are loaded a few at a time so that one batch holds about that many
    views. Returns the report of `build_report` (keys top1, top5, clip_top1, mean_class_accuracy, num_videos,
    per_class, confusion_matrix, predictions).
    """
    loader = data
    if isinstance(data, torch.utils.data.Dataset):
        views = max(1, int(getattr(data, "num_clips", 1)) * int(getattr(data, "num_crops", 1)))
        loader = make_loader(data, batch_size=max(1, batch_size // views), shuffle=False,
                             num_workers=num_workers, seed=0)
        if paths is None and hasattr(data, "items"):
            paths = [str(p) for p, _ in data.items]
    res = collect_scores(model, loader, device=device, amp=amp, chunk=batch_size, label_map=label_map,
                         progress=progress)
    return build_report(res["scores"], res["labels"], classes, indices=res["indices"], paths=paths,
                        view_correct=res["view_correct"], view_total=res["view_total"])


# ------------------------------------------------------------------------------------------ class mapping


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str], *, checkpoint: str = "checkpoint",
                  data: str = "data") -> tuple[list[int] | None, str | None]:
    """Map data labels onto the model's classes by name. -> (label_map or None if identical, note or None).

    Raises CheckpointError when some data class is unknown to the model (the checkpoint was trained on other
    classes)."""
    model_classes, data_classes = list(model_classes), list(data_classes)
    if model_classes == data_classes:
        return None, None
    pos = {name: i for i, name in enumerate(model_classes)}
    missing = [c for c in data_classes if c not in pos]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        have = ", ".join(model_classes[:8]) + (" ..." if len(model_classes) > 8 else "")
        raise CheckpointError(
            f"{checkpoint}: classes do not match {data}: {len(missing)} of the data's {len(data_classes)} classes "
            f"are unknown to the checkpoint ({shown}); the checkpoint's {len(model_classes)} classes: {have}"
        )
    note = None
    if len(data_classes) < len(model_classes):
        note = (f"the data has {len(data_classes)} of the checkpoint's {len(model_classes)} classes; "
                f"labels mapped by class name")
    else:
        note = "the data lists the checkpoint's classes in another order; labels mapped by class name"
    return [pos[c] for c in data_classes], note


# ------------------------------------------------------------------------------------------ outputs


def write_predictions(report: dict[str, Any], path: str | Path) -> Path:
    """One CSV row per video: path, label, prediction, its score, correct, top-5 (classes separated by '|')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "pred", "score", "correct", "top5", "top5_scores"])
        for p in report["predictions"]:
            w.writerow([p["path"], p["label"], p["pred"], f"{p['score']:.6f}", int(p["correct"]),
                        "|".join(p["top5"]), "|".join(f"{s:.6f}" for s in p["top5_scores"])])
    return path


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the per-video list (what `nlvid eval --json` prints; predictions go to a file)."""
    return {k: v for k, v in report.items() if k != "predictions"}


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """`public_report(report)` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(public_report(report), indent=2))
    return path


# ------------------------------------------------------------------------------------------ checkpoint + folder


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    clips: int | None = None,
    crops: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    amp: str | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`nlvid eval`: load a checkpoint, pick the split (DATA/val if it exists), check classes, multi-view test,
    write `predictions.csv` into `out`. Returns the report (with `notes`, `out_dir`, `predictions_file`); the
    caller draws the confusion matrix (`nlvid.viz.confusion`) and saves the report (`write_report`)."""
    checkpoint = Path(checkpoint)
    dev = resolve_device(device)
    model, model_classes, cfg = load_model(checkpoint, device=dev)
    d = cfg.data
    clips = d.num_clips if clips is None else clips
    crops = d.num_crops if crops is None else crops
    if clips < 1:
        raise ConfigError(f"clips must be >= 1, got {clips}", key="data.num_clips")
    if crops not in (1, 3):
        raise ConfigError(f"crops must be 1 or 3, got {crops}", key="data.num_crops")
    train_src, val_src = resolve_splits(data)
    source = val_src if val_src is not None else train_src
    notes = []
    if val_src is not None:
        notes.append(f"evaluating the validation split {val_src}")
    index = scan_dataset(source, on_error=d.on_error)
    if progress is not None:
        progress("scan", split="eval", index=index)
    label_map, note = match_classes(model_classes, index.classes, checkpoint=str(checkpoint), data=str(source))
    if note:
        notes.append(note)
    if not index.items:
        raise DatasetError(f"{source}: no readable videos to evaluate")
    ds = VideoDataset(index.items, train=False, **test_data_kwargs(d, num_clips=clips, num_crops=crops),
                      on_error=d.on_error, seed=cfg.train.seed)
    if progress is not None:
        progress("eval_start", num_videos=len(ds), views=clips * crops)
    report = evaluate(
        model, ds, model_classes, device=dev, batch_size=batch_size or max(cfg.train.batch_size, clips * crops),
        num_workers=d.num_workers if num_workers is None else num_workers,
        amp=cfg.train.amp if amp is None else amp, label_map=label_map,
        paths=[str(p) for p, _ in index.items], progress=progress,
    )
    out_dir = Path(out) if out is not None else checkpoint.parent / f"eval-{checkpoint.stem}"
    report["checkpoint"] = str(checkpoint)
    report["data"] = str(source)
    report["num_clips"], report["num_crops"] = clips, crops
    report["notes"] = notes
    report["unreadable"] = [[str(p), r] for p, r in getattr(index, "unreadable", [])]
    report["out_dir"] = str(out_dir)
    report["predictions_file"] = str(write_predictions(report, out_dir / "predictions.csv"))
    return report
