"""`nlvid synth DIR`: write the synthetic long-range video dataset (real H.264 files, train/ + val/)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nlvid.cli.common import err_console, out_console
from nlvid.cli.options import JsonOption
from nlvid.data.synthetic import class_names, write_synthetic


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write (train/<class>/*.mp4, val/<class>/*.mp4, "
                                             "annotations.json).", metavar="DIR")],
    classes: Annotated[int, typer.Option("--classes", help="Number of classes: 2, 4 or 6.")] = 4,
    clips_per_class: Annotated[int, typer.Option("--clips-per-class", help="Clips per class (a quarter go to val/).",
                                                 min=1)] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same files).")] = 0,
    json_out: JsonOption = False,
) -> None:
    """Write a small real-video dataset whose labels need relating two objects far apart in space and time.

    Example: nlvid synth data/synth --classes 4 --clips-per-class 50
    """
    class_names(classes)  # validate before the progress bar starts
    t0 = time.perf_counter()
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("clips", total=classes * clips_per_class)
        summary = write_synthetic(out, classes=classes, clips_per_class=clips_per_class, seed=seed,
                                  progress=lambda done, total: bar.update(task, completed=done))
    elapsed = time.perf_counter() - t0
    if json_out:
        out_console.print_json(json.dumps({**summary, "seconds": round(elapsed, 2)}))
        return
    out_console.print(
        f"wrote {summary['train'] + summary['val']} clips ({summary['train']} train, {summary['val']} val, "
        f"{len(summary['classes'])} classes, {summary['num_frames']} frames of {summary['size'][1]}x"
        f"{summary['size'][0]} at {summary['fps']} fps) to {out} in {elapsed:.1f}s",
        highlight=False, markup=False,
    )
