"""`nlvid runs [DIR...]`: a table of run folders (model, data, epochs, best validation top-1, last checkpoint,
state); `--json`; `--plot out.png` overlays their training curves. Also the one way a run's curves.png is drawn
(`draw_run_curves`, called by `nlvid train`'s reporter at every epoch end)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from nlvid.cli.common import err_console, out_console
from nlvid.cli.options import JsonOption
from nlvid.engine.runs import CURVES_FILE, RunSummary, list_runs, read_curves
from nlvid.errors import NlvidError
from nlvid.viz.curves import render_curves_png, require_matplotlib

DEFAULT_DIR = Path("runs")


def draw_run_curves(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Read `run_dir`'s records and (re)write its curves.png atomically; returns the picture's path."""
    run_dir = Path(run_dir)
    return render_curves_png([read_curves(run_dir)], run_dir / CURVES_FILE, title=title)


def _short_path(path: str | None) -> str:
    """`path` relative to the working folder when it lies below it, else as stored."""
    if not path:
        return "-"
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


STATE_STYLE = {"running": "bold green", "finished": "cyan", "interrupted": "yellow", "broken": "bold red",
               "no checkpoint": "red"}


def runs_table(rows: list[RunSummary]) -> Group:
    """The table (one row per run; runs that share a folder are named by their own folder's name) and, below it,
    a line per note: who holds or left the lock, and what could not be read."""
    parents = {str(Path(r.path).parent) for r in rows}
    by_name = len(parents) == 1
    t = Table(title=f"runs in {_short_path(parents.pop())}" if by_name else "runs", title_justify="left",
              caption="best val@1: best validation video top-1 (epoch); last ckpt: when last.pt was written",
              caption_justify="left")
    for col, justify in (("run", "left"), ("model", "left"), ("data", "left"), ("epochs", "right"),
                         ("best val@1", "right"), ("last ckpt", "left"), ("state", "left")):
        t.add_column(col, justify=justify, overflow="fold", no_wrap=col not in ("run", "data"))
    notes: list[Text] = []
    for r in rows:
        name = Path(r.path).name if by_name else _short_path(r.path)
        planned = "?" if r.epochs_planned is None else str(r.epochs_planned)
        best = "-" if r.best_val_top1 is None else f"{_pct(r.best_val_top1)} ({r.best_val_epoch})"
        stamp = r.last_checkpoint[5:16] if r.last_checkpoint else "-"  # MM-DD HH:MM; --json has all of it
        t.add_row(Text(name), Text(r.model or "-"), Text(_short_path(r.data)), f"{r.epochs_done}/{planned}", best,
                  stamp, Text(r.state, style=STATE_STYLE.get(r.state, "")))
        for note in ([r.owner] if r.owner else []) + r.problems:
            notes.append(Text(f"{name}: {note}", style="red" if r.state == "broken" else "dim"))
    return Group(t, *notes)


def runs(
    dirs: Annotated[Optional[list[Path]], typer.Argument(
        help="Run folders, or folders that hold run folders (one level down). Default: runs/.",
        show_default=False, metavar="DIR")] = None,
    json_out: JsonOption = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the runs' curves overlaid into this PNG "
                                                 "(needs matplotlib: the `plot` extra).", show_default=False)] = None,
) -> None:
    """List training runs: model, data, epochs done / planned, best validation top-1, last checkpoint, state.

    States: running (its lock is held), finished, interrupted (epochs left, nobody training), no checkpoint, broken.

    Example: nlvid runs runs/a runs/b --plot curves.png
    """
    if plot is not None:
        require_matplotlib()  # before the table: a missing package fails fast, with nothing half done
    rows = list_runs(dirs or [DEFAULT_DIR])
    where = ", ".join(str(d) for d in (dirs or [DEFAULT_DIR]))
    if json_out:
        out_console.print_json(json.dumps([r.to_dict() for r in rows]))
    elif rows:
        out_console.print(runs_table(rows))
    if not rows:
        err_console.print(f"no run folders in {where}", highlight=False, markup=False)
    if plot is None:
        return
    curves = [read_curves(r.path, name=r.path) for r in rows]
    drawn = [c for c in curves if c.steps or c.epochs]
    for c in curves:
        if not (c.steps or c.epochs):
            err_console.print(f"{c.name}: no records to plot; left out", highlight=False, markup=False)
    if not drawn:
        raise NlvidError(f"nothing to plot: no run in {where} has records (metrics.jsonl)")
    render_curves_png(drawn, plot, title=f"training curves of {len(drawn)} run(s)")
    (err_console if json_out else out_console).print(f"curves: {plot} ({len(drawn)} run(s))", highlight=False,
                                                      markup=False)
