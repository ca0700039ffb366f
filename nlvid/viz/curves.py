"""Training curves as a PNG: loss, train / validation top-1, learning rate and throughput against optimizer steps,
epochs marked, the best epoch highlighted; one run (`curves.png` in a run folder) or several overlaid
(`nlvid runs A B --plot out.png`).

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no GUI backend, no global state). matplotlib is
the `plot` extra (`pip install 'nlvid[plot]'`); without it `require_matplotlib` raises a one-line NlvidError, and
`nlvid train` says once that it draws no picture and trains on. The curves come from
`nlvid.engine.runs.read_curves` (the one reader of metrics.jsonl); this module only needs their shape
(`CurvesLike`). Pictures are written atomically (a temp file renamed over the old one).
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from nlvid.errors import NlvidError

# the four panels: key -> (title, y-axis label)
PANELS = {
    "loss": ("training loss", "cross-entropy"),
    "top1": ("top-1 accuracy", "%"),
    "lr": ("learning rate", "lr (at each step)"),
    "throughput": ("training throughput", "clips / s"),
}
STEP_AXIS = "optimizer step"
MAX_EPOCH_LABELS = 12


class CurvesLike(Protocol):
    """What a picture needs of a run's records (`nlvid.engine.runs.Curves` is one)."""

    name: str
    best: dict[str, Any] | None

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]: ...

    @property
    def epoch_ends(self) -> list[tuple[int, int]]: ...


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    if not plotting_available():
        raise NlvidError("drawing curves needs matplotlib: pip install 'nlvid[plot]'")


def curves_figure(runs: Sequence[CurvesLike], *, title: str | None = None) -> Any:
    """A matplotlib Figure of 2 x 2 panels (PANELS; `figure.axes` in that order, each with the panel key as its
    `get_label()`). One run: its step and epoch series, epoch ends as dotted lines (numbered on the top axis),
    the best epoch as a gold line and a star. Several runs: one colour per run, named in a legend."""
    require_matplotlib()
    # optional heavy dependency (the `plot` extra): imported only when a picture is drawn
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(12, 7.5), dpi=100, layout="constrained")
    grid = fig.subplots(2, 2, sharex=True)
    axes = dict(zip(PANELS, grid.flat))
    for key, ax in axes.items():
        ax.set_label(key)
        ax.set_title(PANELS[key][0], fontsize=12, loc="left")
        ax.set_ylabel(PANELS[key][1])
        ax.grid(True, alpha=0.25)
    for ax in grid[1]:
        ax.set_xlabel(STEP_AXIS)
    axes["lr"].yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))

    single = len(runs) == 1
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, c in zip(runs, colours):
        _draw_run(axes, run, colour=c, single=single)
    if single and runs:
        _mark_epochs(axes, runs[0])
        _mark_best(axes, runs[0], colour="goldenrod", band=True)
    else:
        for run, c in zip(runs, colours):
            _mark_best(axes, run, colour=c, band=False)

    for key, ax in axes.items():
        if not ax.lines:
            ax.text(0.5, 0.5, "no records yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    axes["top1"].set_ylim(-2, 102)
    # which line is which: the series styles (grey), and the runs' colours when several are overlaid
    style = [Line2D([], [], color="gray", alpha=0.5, lw=1, label="train, per logged step"),
             Line2D([], [], color="gray", marker="o", ms=4, ls="--", label="train, epoch"),
             Line2D([], [], color="gray", marker="s", ms=5, lw=2, label="validation top-1 (video)"),
             Line2D([], [], color="goldenrod" if single else "gray", marker="*", ms=12, ls="none",
                    label="best epoch (best.pt)")]
    # outside the panels, so that no legend ever covers a curve
    fig.legend(handles=style, loc="outside lower center", ncols=len(style), fontsize=9, frameon=False)
    if not single and runs:
        fig.legend(handles=[Line2D([], [], color=c, lw=2.5, label=r.name) for r, c in zip(runs, colours)],
                   loc="outside upper center", ncols=min(len(runs), 3), fontsize=9, frameon=False)
    fig.suptitle(title or (runs[0].name if single and runs else "training curves"), fontsize=13)
    return fig


def _draw_run(axes: dict[str, Any], run: CurvesLike, *, colour: str, single: bool) -> None:
    name = run.name
    x, y = run.series("step", "loss")
    if x:
        axes["loss"].plot(x, y, color=colour, alpha=0.5, lw=1, label=f"{name}: step loss")
    x, y = run.series("epoch", "train_loss")
    if x:
        axes["loss"].plot(x, y, color=colour, marker="o", ms=4, ls="--", lw=1.5, label=f"{name}: epoch loss")
    x, y = run.series("step", "acc")
    if x:
        axes["top1"].plot(x, _pct(y), color=colour, alpha=0.35, lw=1, label=f"{name}: step train acc")
    x, y = run.series("epoch", "train_acc")
    if x:
        axes["top1"].plot(x, _pct(y), color=colour, marker="o", ms=4, ls="--", lw=1.5,
                          label=f"{name}: epoch train acc")
    x, y = run.series("epoch", "val_top1")
    if x:
        axes["top1"].plot(x, _pct(y), color=colour, marker="s", ms=5, lw=2, label=f"{name}: val top-1")
    x, y = run.series("step", "lr")
    if x:
        axes["lr"].plot(x, y, color=colour, lw=1.5, label=f"{name}: lr")
    x, y = run.series("step", "clips_per_s")
    if x:
        axes["throughput"].plot(x, y, color=colour, lw=1, marker="." if len(x) < 40 else None,
                                label=f"{name}: clips/s")
    if single and x:
        axes["throughput"].set_ylim(bottom=0)


def _mark_epochs(axes: dict[str, Any], run: CurvesLike) -> None:
    """Dotted lines at the epochs' last steps; the top panels number them on a top axis (at most
    MAX_EPOCH_LABELS labels, so that they never overlap)."""
    ends = run.epoch_ends
    if not ends:
        return
    for ax in axes.values():
        for step, _ in ends:
            ax.axvline(step, color="gray", lw=0.6, ls=":", zorder=0)
    n = len(ends)
    every = max(1, math.ceil(n / MAX_EPOCH_LABELS))  # epochs are equally long: every k-th epoch is labelled
    idx = list(range(every - 1, n, every))
    if idx[-1] != n - 1:  # the last epoch always; it replaces a labelled neighbour that would sit too close
        if n - 1 - idx[-1] < every / 2:
            idx[-1] = n - 1
        else:
            idx.append(n - 1)
    shown = [ends[i] for i in idx]
    for key in ("loss", "top1"):
        top = axes[key].secondary_xaxis("top")
        top.set_xticks([s for s, _ in shown], labels=[str(e) for _, e in shown], fontsize=8)
        top.tick_params(length=2, pad=1)
        top.set_xlabel("end of epoch", fontsize=8, labelpad=4)


def _mark_best(axes: dict[str, Any], run: CurvesLike, *, colour: str, band: bool) -> None:
    """The epoch best.pt holds: a star on its value in the top-1 panel (validation top-1, or the epoch's train
    accuracy without validation), with its value and epoch; with `band`, a gold line through every panel."""
    best = run.best
    if not best:
        return
    step, epoch = int(best["step"]), int(best["epoch"])
    last_step = max([s for s, _ in run.epoch_ends] + run.series("step", "loss")[0] + [step])
    value = best.get("val_top1", best.get("train_acc"))
    if band:
        for ax in axes.values():
            ax.axvline(step, color=colour, lw=2.5, alpha=0.35, zorder=0)
    if isinstance(value, (int, float)):
        ax = axes["top1"]
        ax.plot([step], [100 * value], marker="*", ms=16, color=colour, markeredgecolor="black", mew=0.6,
                ls="none", zorder=5, label=f"{run.name}: best")
        what = "val" if "val_top1" in best else "train"
        # the label grows towards the middle of the panel, never out of it
        ax.annotate(f"best {what} {100 * value:.1f}% (epoch {epoch})", (step, 100 * value), xytext=(0, 10),
                    textcoords="offset points", ha="left" if step < last_step / 2 else "right", fontsize=9,
                    color="black",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=colour, alpha=0.85))


def _pct(values: list[float]) -> list[float]:
    return [100 * v for v in values]


def render_curves_png(runs: Sequence[CurvesLike], path: str | Path, *, title: str | None = None) -> Path:
    """Draw `curves_figure(runs)` and write it to `path` atomically (a temp file beside it, renamed over it)."""
    fig = curves_figure(runs, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100, pil_kwargs={"optimize": True})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a picture is for everyone who may read the run folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
