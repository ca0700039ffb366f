"""`nlvid eval CHECKPOINT DATA_DIR`: multi-view testing (clips x crops, softmax averaged per video)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from nlvid.cli.common import err_console, format_scan_table, out_console
from nlvid.cli.options import DeviceOption, JsonOption, PretrainedOption, out_option, resolve_checkpoint
from nlvid.engine.evaluate import evaluate_checkpoint, public_report, write_report
from nlvid.errors import ConfigError
from nlvid.viz.confusion import render_confusion_png

# config key -> the flag of `nlvid eval` that sets it
KEY_FLAGS = {"data.num_clips": "--clips", "data.num_crops": "--crops", "data.num_workers": "--workers",
             "train.device": "--device"}


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def report_tables(report: dict[str, Any]):
    summary = Table(title=f"{report['num_videos']} videos, {report['num_clips']} clips x {report['num_crops']} "
                          f"crops per video", title_justify="left")
    for col in ("video top-1", f"video top-{report['topk']}", "clip top-1", "mean class acc"):
        summary.add_column(col, justify="right")
    summary.add_row(pct(report["top1"]), pct(report["top5"]), pct(report["clip_top1"]),
                    pct(report["mean_class_accuracy"]))
    per = Table(title="per class", title_justify="left")
    per.add_column("class")
    per.add_column("videos", justify="right")
    per.add_column("accuracy", justify="right")
    for name, r in report["per_class"].items():
        if r["num_videos"]:
            per.add_row(escape(name), str(r["num_videos"]), pct(r["accuracy"]))
    return summary, per


def evaluate(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="An nlvid checkpoint (best.pt / last.pt); left out "
                                                         "with --pretrained.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Argument(help="Videos: folder per class, a root with val/ (evaluated), "
                                                        "or an annotation list.", show_default=False)] = None,
    clips: Annotated[Optional[int], typer.Option("--clips", help="Clips per video (default: the checkpoint's "
                                                 "config, 10 for the paper protocol).")] = None,
    crops: Annotated[Optional[int], typer.Option("--crops", help="Spatial crops per clip: 1 or 3.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Clips per forward pass.")] = None,
    out: Annotated[Optional[Path], out_option("Where predictions.csv, confusion.png and report.json go. Default: "
                                              "<checkpoint dir>/eval-<name>.")] = None,
    device: DeviceOption = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", help="Data loading processes.")] = None,
    json_: JsonOption = False,
    pretrained: PretrainedOption = None,
) -> None:
    """Evaluate a checkpoint: video top-1/top-5, clip accuracy, mean class accuracy, per-class accuracy.

    Examples: nlvid eval runs/tiny/best.pt my_videos/ --clips 10 --crops 3 --json

      nlvid eval --pretrained pysf_i3d_r50_nl_8x8 kinetics400/val
    """
    if pretrained is not None:  # the only positional is DATA
        if data is not None:
            raise ConfigError("with --pretrained NAME give only DATA (the checkpoint is the converted NAME)")
        checkpoint, data = None, checkpoint
        if out is None:
            out = Path(f"eval-{pretrained}")
    if data is None:
        raise ConfigError("missing argument DATA (the videos to evaluate): nlvid eval CHECKPOINT DATA, or "
                          "nlvid eval --pretrained NAME DATA")
    checkpoint = resolve_checkpoint(checkpoint, pretrained=pretrained)

    def progress(event: str, **d: Any) -> None:
        if event == "scan" and not json_:
            err_console.print(format_scan_table(d["index"]))
        elif event == "eval_start":
            err_console.print(f"evaluating {d['num_videos']} videos x {d['views']} views ...", highlight=False)

    report = evaluate_checkpoint(checkpoint, data, clips=clips, crops=crops, batch_size=batch_size,
                                 num_workers=workers, device=device, out=out, progress=progress)
    out_dir = Path(report["out_dir"])
    report["confusion_png"] = str(render_confusion_png(report["confusion_matrix"], report["classes"],
                                                       out_dir / "confusion.png"))
    write_report(report, out_dir / "report.json")
    for note in report["notes"]:
        err_console.print(note, highlight=False, markup=False)
    if json_:
        typer.echo(json.dumps(public_report(report), indent=2))
        return
    for table in report_tables(report):
        out_console.print(table)
    out_console.print(f"predictions: {report['predictions_file']}", highlight=False, markup=False)
    out_console.print(f"confusion matrix: {report['confusion_png']}", highlight=False, markup=False)
