"""`nlvid predict CLIP [CLIP ...]`: top-k labels per video (multi-view averaged), a table or JSON on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nlvid.cli.common import err_console, out_console, print_error
from nlvid.cli.options import CheckpointOption, DeviceOption, JsonOption, PretrainedOption, resolve_checkpoint
from nlvid.config import test_data_kwargs
from nlvid.engine.device import resolve_device
from nlvid.engine.predict import predict_files
from nlvid.models import load_model

# config key (or predict_files parameter) -> the flag of `nlvid predict` that sets it
KEY_FLAGS = {"data.num_clips": "--clips", "data.num_crops": "--crops", "segments": "--segments",
             "train.device": "--device"}


def _table(result: dict[str, Any]):
    t = Table(title=escape(result["file"]), title_justify="left")
    t.add_column("rank", justify="right")
    t.add_column("label")
    t.add_column("probability", justify="right")
    for i, r in enumerate(result["top"], 1):
        t.add_row(str(i), escape(r["label"]), f"{r['prob']:.4f}")
    return t


def _timeline(result: dict[str, Any]):
    t = Table(title=f"{escape(result['file'])}: per window", title_justify="left")
    for col, j in (("start s", "right"), ("end s", "right"), ("top label", "left"), ("prob", "right")):
        t.add_column(col, justify=j)
    for s in result["segments"]:
        t.add_row(f"{s['start']:.2f}", f"{s['end']:.2f}", escape(s["label"]), f"{s['prob']:.4f}")
    return t


def predict(
    clips: Annotated[list[Path], typer.Argument(help="Video files.", show_default=False)],
    checkpoint: CheckpointOption = None,
    pretrained: PretrainedOption = None,
    topk: Annotated[int, typer.Option("--topk", "-k", min=1, help="Labels shown per video.")] = 5,
    num_clips: Annotated[Optional[int], typer.Option("--clips", min=1, help="Clips per video, evenly spaced "
                                                     "(default: the checkpoint's data.num_clips).")] = None,
    num_crops: Annotated[Optional[int], typer.Option("--crops", min=1, help="Spatial crops per clip "
                                                     "(default: the checkpoint's data.num_crops).")] = None,
    segments: Annotated[Optional[float], typer.Option("--segments", help="Also give a timeline: the top label "
                                                      "of every window of this many seconds.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Views per forward pass.")] = 8,
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding threads.")] = 2,
    json_: JsonOption = False,
) -> None:
    """Predict the top labels of each video. Errors name the file on stderr; the others are still predicted
    (exit code 1 if any failed).

    Examples: nlvid predict a.mp4 b.mkv --checkpoint runs/tiny/best.pt --json

      nlvid predict clip.mp4 --pretrained pysf_i3d_r50_nl_8x8
    """
    path = resolve_checkpoint(checkpoint, pretrained=pretrained)
    dev = resolve_device(device)
    model, classes, cfg = load_model(path, device=dev)
    settings = test_data_kwargs(cfg.data, num_clips=num_clips, num_crops=num_crops)

    def run(progress=None):
        return predict_files(model, classes, clips, topk=topk, segments=segments, batch_size=batch_size,
                             device=dev, workers=workers, progress=progress, **settings)

    if len(clips) > 1:
        with Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=err_console, transient=True) as bar:
            task = bar.add_task("", total=len(clips))

            def progress(event: str, **d: Any) -> None:
                if event == "file":
                    bar.update(task, completed=d["done"], description=escape(Path(d["file"]).name))

            results = run(progress)
    else:
        results = run()

    failed = [r for r in results if "error" in r]
    for r in failed:
        print_error(f"{r['file']}: {r['error']}")
    if json_:
        typer.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                continue
            out_console.print(_table(r))
            if "segments" in r:
                out_console.print(_timeline(r))
    if failed:
        raise typer.Exit(1)
