"""`nlvid predict CLIP [CLIP ...]`: top-k labels per video (multi-view averaged), a table or JSON on stdout.

With `--window SECONDS` the streaming predictor runs instead (`nlvid.engine.stream`): overlapping windows scored
while the source is decoded forward once, in memory that does not grow with the video; sources may then also be
stream URLs, `-` (stdin), a FIFO or a capture device (`nlvid.data.stream.parse_source`), one after another. Output:
one JSON line per window and a summary line with `--json` (else a live panel on stderr when it is a terminal, and
the timeline and whole-video tables on stdout at the end); `--out DIR` writes timeline.json, timeline.csv and
timeline.png; `--out-video` an annotated MP4. Ctrl-C stops, writes what was asked, and exits with 130.

`--segments S` is kept as it was (the one-shot path: the whole-video multi-view answer plus one centred clip per
window [kS, (k+1)S)); `--window S --stride S` gives the same windows and the same clips with the streaming
predictor (single crop by default).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from nlvid.cli.common import err_console, out_console, print_error
from nlvid.cli.options import (CheckpointOption, DeviceOption, JsonOption, PretrainedOption, out_option,
                               resolve_checkpoint)
from nlvid.config import test_data_kwargs
from nlvid.data.stream import DEFAULT_OPEN_TIMEOUT, SAMPLINGS
from nlvid.engine.device import resolve_device
from nlvid.engine.predict import predict_files
from nlvid.engine.stream import FrameOut, StreamPredictor, StreamStatus, WindowResult, write_timeline
from nlvid.errors import ConfigError, NlvidError, OutputError
from nlvid.models import load_model
from nlvid.viz.annotate import AnnotatedVideoWriter, attention_heat
from nlvid.viz.timeline import render_timeline_png

# config key (or predict_files / StreamPredictor parameter) -> the flag of `nlvid predict` that sets it
KEY_FLAGS = {"data.num_clips": "--clips", "data.num_crops": "--crops", "segments": "--segments",
             "train.device": "--device", "window": "--window", "step": "--stride", "smooth": "--smooth",
             "sampling": "--sampling", "source": "--input-format", "batch_size": "--batch-size"}
INTERRUPTED_EXIT = 130  # Ctrl-C: the outputs asked for are written, the exit code says the run was cut short


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




# ------------------------------------------------------------------------------------------ streaming (--window)


def _labels(top: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(t["label"], float(t["prob"])) for t in top]


def _safe_name(source: str) -> str:
    name = Path(source).stem if "://" not in source and source != "-" else source
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "stdin"


def _window_row(sp: StreamPredictor, r: WindowResult) -> dict[str, Any]:
    return {"type": "window", "source": sp.spec.name, **r.to_json(), "dropped": r.dropped}


def _summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"{escape(summary['source'])}: whole video ({summary['windows']} windows)", title_justify="left")
    t.add_column("rank", justify="right")
    t.add_column("label")
    t.add_column("probability", justify="right")
    for i, r in enumerate(summary["top"], 1):
        t.add_row(str(i), escape(r["label"]), f"{r['prob']:.4f}")
    return t


def _window_table(sp: StreamPredictor) -> Table:
    t = Table(title=f"{escape(sp.spec.name)}: per window", title_justify="left")
    for col, j in (("start s", "right"), ("end s", "right"), ("top label", "left"), ("prob", "right")):
        t.add_column(col, justify=j)
    for r in sp.timeline:
        t.add_row(f"{r.start:.2f}", f"{r.end:.2f}", escape(r.top[0]["label"]), f"{r.top[0]['prob']:.4f}")
    return t


class _Panel:
    """The live view on stderr: a progress bar (frames/s, ETA for a file, elapsed for a stream) and the current top
    labels. A no-op when stderr is not a terminal."""

    def __init__(self, sp: StreamPredictor, enabled: bool):
        self.enabled = enabled
        self.sp = sp
        self.labels: list[dict[str, Any]] = []
        self.window: tuple[float, float] | None = None
        if not enabled:
            return
        duration = None if sp.live else sp.info.duration
        timing = TimeRemainingColumn() if duration else TimeElapsedColumn()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.fields[pos]}"), TextColumn("{task.fields[rate]} frames/s"),
                            TextColumn("{task.fields[drops]}"), timing, console=err_console)
        self.task = self.bar.add_task(escape(Path(sp.spec.name).name if sp.spec.kind == "file" else sp.spec.name),
                                      total=duration, pos="", rate="0", drops="")
        self.live = Live(self._render(), console=err_console, refresh_per_second=4, transient=True)

    def _render(self):
        t = Table(box=None, show_header=False, pad_edge=False)
        t.add_column("label")
        t.add_column("bar")
        t.add_column("prob", justify="right")
        for r in self.labels:
            n = int(round(float(r["prob"]) * 30))
            t.add_row(escape(r["label"]), "[green]" + "█" * n + "[/]" + "[dim]" + "·" * (30 - n) + "[/]",
                      f"{float(r['prob']):.3f}")
        head = (f"window {self.window[0]:.1f}-{self.window[1]:.1f} s" if self.window else "waiting for the first "
                "window")
        return Group(self.bar, f"[bold]{head}[/]", t)

    def __enter__(self):
        if self.enabled:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.live.__exit__(*exc)

    def status(self, s: StreamStatus) -> None:
        if not self.enabled:
            return
        drops = f"{s.dropped} dropped" if s.dropped else ""
        pos = f"{s.position:.1f}/{s.duration:.1f} s" if s.duration else f"{s.position:.1f} s"
        self.bar.update(self.task, completed=min(s.position, s.duration) if s.duration else s.position, pos=pos,
                        rate=f"{s.frames_per_s:.0f}", drops=drops)

    def window_done(self, r: WindowResult) -> None:
        if self.enabled:
            self.labels, self.window = r.top, (r.start, r.end)
            self.live.update(self._render())


def _check_video_out(out_video: Path) -> None:
    """Fail before decoding: the folder must exist, the path must not be a folder."""
    if out_video.is_dir():
        raise OutputError(f"{out_video}: is a folder; give a file name for --out-video")
    if not out_video.parent.is_dir():
        raise OutputError(f"{out_video}: cannot write video (folder {out_video.parent} does not exist)")


def _stream_one(source: str, *, model, classes, cfg_kwargs: dict[str, Any], out_dir: Path | None,
                out_video: Path | None, attention: bool, json_: bool, topk: int) -> tuple[StreamPredictor, bool]:
    """Run one source; returns (predictor, interrupted). Outputs are written even after Ctrl-C or a broken
    stream (timeline so far)."""
    sp = StreamPredictor(model, classes, source, keep_frames=out_video is not None, keep_clips=attention,
                         topk=topk, **cfg_kwargs)
    interrupted = False
    writer: AnnotatedVideoWriter | None = None
    labels: list[tuple[str, float]] | None = None
    heat: np.ndarray | None = None
    panel = _Panel(sp, enabled=err_console.is_terminal)
    try:
        with panel:
            for ev in sp:
                if isinstance(ev, WindowResult):
                    labels = _labels(ev.top)
                    if attention and ev.clip is not None:
                        maps = attention_heat(model, ev.clip, frame_size=sp.full_size, box=ev.box)  # (T, H, W)
                        heat = maps.mean(0)
                        peak = float(heat.max())
                        heat = heat / peak if peak > 0 else heat
                    if json_:
                        typer.echo(json.dumps(_window_row(sp, ev)))
                        sys.stdout.flush()
                    panel.window_done(ev)
                elif isinstance(ev, FrameOut):
                    if writer is None:
                        rate = sp.info.rate if sp.info.rate is not None else sp.info.fps
                        writer = AnnotatedVideoWriter(out_video, fps=rate, width=ev.rgb.shape[1],
                                                      height=ev.rgb.shape[0])
                    writer.write(ev.rgb, labels=labels, heat=heat)
                elif isinstance(ev, StreamStatus):
                    panel.status(ev)
    except KeyboardInterrupt:
        interrupted = True
        sp.stop()
    finally:
        sp.close()
        if writer is not None:
            writer.close()
    interrupted = interrupted or sp.interrupted
    if out_dir is not None:
        write_timeline(sp, out_dir, topk=topk)
        if sp.timeline:
            probs = np.stack([r.probs.numpy() for r in sp.timeline])  # (N, C), smoothed like the rows
            render_timeline_png([r.start for r in sp.timeline], [r.end for r in sp.timeline], probs, classes,
                                path=out_dir / "timeline.png", top=min(5, len(classes)),
                                thumbnails=sp.thumbnails(),
                                title=f"{Path(sp.spec.name).name if sp.spec.kind == 'file' else sp.spec.name}: "
                                      f"window {sp.window:g} s, stride {sp.step:g} s")
    return sp, interrupted


def _predict_stream(sources: list[str], *, model, classes, cfg, num_crops, window, stride, smooth, sampling,
                    batch_size, dev, input_format, timeout, out, out_video, attention, json_, topk) -> None:
    if out_video is not None:
        if len(sources) > 1:
            raise ConfigError("--out-video takes one source (give one video, or run once per video)",
                              key="out_video")
        _check_video_out(out_video)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: is a file; --out takes a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create folder ({e.strerror or e.__class__.__name__})") from None
    kw = test_data_kwargs(cfg.data, num_crops=num_crops if num_crops is not None else 1)
    kw.update(window=window, step=stride if stride is not None else window, smooth=smooth, sampling=sampling,
              batch_size=batch_size, device=dev, input_format=input_format, open_timeout=timeout,
              read_timeout=timeout)
    failed = 0
    for source in sources:
        where = None if out is None else (out if len(sources) == 1 else out / _safe_name(source))
        try:
            sp, interrupted = _stream_one(source, model=model, classes=classes, cfg_kwargs=kw, out_dir=where,
                                          out_video=out_video, attention=attention, json_=json_, topk=topk)
        except ConfigError:
            raise
        except NlvidError as e:
            if len(sources) == 1:
                raise
            print_error(str(e))
            failed += 1
            continue
        summary = sp.summary()
        if json_:
            typer.echo(json.dumps({"type": "summary", **summary}))
        else:
            if sp.timeline:
                out_console.print(_window_table(sp))
                out_console.print(_summary_table(summary))
        written = f"; written to {where}" if where is not None else ""
        if sp.dropped:
            err_console.print(f"{sp.dropped} window(s) dropped: the model could not keep up with the live source "
                              f"(the newest window wins)", style="yellow", highlight=False)
        if sp.error is not None:
            print_error(f"{sp.error}; kept the {len(sp.timeline)} window(s) scored before{written}")
            failed += 1
        elif interrupted:
            print_error(f"{sp.spec.name}: interrupted (Ctrl-C) at {sp.position:.1f} s; kept the "
                        f"{len(sp.timeline)} window(s) scored{written}")
            raise typer.Exit(INTERRUPTED_EXIT)
        elif sp.live:
            err_console.print(f"{sp.spec.name}: stream ended at {sp.position:.1f} s ({len(sp.timeline)} windows)",
                              highlight=False)
        if not sp.timeline and sp.error is None:
            print_error(f"{sp.spec.name}: no window was scored (the video is empty?)")
            failed += 1
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ the command


def predict(
    clips: Annotated[list[str], typer.Argument(
        help="Video files. With --window also stream URLs (rtsp://, http://, udp://, rtmp://, tcp://...), '-' for "
        "stdin, a FIFO, or a camera (/dev/video0, avfoundation:0, dshow:video=NAME).", show_default=False)],
    checkpoint: CheckpointOption = None,
    pretrained: PretrainedOption = None,
    topk: Annotated[int, typer.Option("--topk", "-k", min=1, help="Labels shown per video (per window).")] = 5,
    num_clips: Annotated[Optional[int], typer.Option("--clips", min=1, help="Clips per video, evenly spaced "
                                                     "(default: the checkpoint's data.num_clips).")] = None,
    num_crops: Annotated[Optional[int], typer.Option("--crops", min=1, help="Spatial crops per clip "
                                                     "(default: the checkpoint's data.num_crops; 1 with "
                                                     "--window).")] = None,
    segments: Annotated[Optional[float], typer.Option("--segments", help="Also give a timeline: the top label "
                                                      "of every window of this many seconds.")] = None,
    window: Annotated[Optional[float], typer.Option("--window", help="Stream: score overlapping windows of this "
                                                    "many seconds while decoding once (bounded memory; also for "
                                                    "streams, pipes and cameras).", show_default=False)] = None,
    stride: Annotated[Optional[float], typer.Option("--stride", help="Seconds between window starts (default: "
                                                    "--window).", show_default=False)] = None,
    smooth: Annotated[int, typer.Option("--smooth", min=1, help="Moving average of the window probabilities "
                                        "over this many windows.")] = 1,
    sampling: Annotated[str, typer.Option("--sampling", help="Frames of a window's clip: centred (the "
                                          "checkpoint's frames x stride, centred) or spread (evenly over the "
                                          "window).")] = "centred",
    out: Annotated[Optional[Path], out_option("With --window: folder for timeline.json, timeline.csv and "
                                              "timeline.png.")] = None,
    out_video: Annotated[Optional[Path], typer.Option("--out-video", help="With --window: write the video with "
                                                      "the current top labels overlaid (H.264 MP4).",
                                                      show_default=False)] = None,
    attention: Annotated[bool, typer.Option("--attention", help="With --out-video: also overlay where the first "
                                            "res3 Non-local block attends.")] = False,
    input_format: Annotated[Optional[str], typer.Option("--input-format", help="FFmpeg input format of the "
                                                        "source (v4l2, avfoundation, dshow, mpegts, ...).",
                                                        show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds a stream may take to open or stay "
                                           "silent before it counts as broken.")] = DEFAULT_OPEN_TIMEOUT,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Views (windows with --window) per "
                                            "forward pass.")] = 8,
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding threads.")] = 2,
    json_: JsonOption = False,
) -> None:
    """Predict the top labels of each video. Errors name the file on stderr; the others are still predicted
    (exit code 1 if any failed).

    Examples: nlvid predict a.mp4 b.mkv --checkpoint runs/tiny/best.pt --json

      nlvid predict clip.mp4 --pretrained pysf_i3d_r50_nl_8x8

      nlvid predict long.mp4 --window 2 --stride 1 --out timeline/ --out-video annotated.mp4

      nlvid predict rtsp://camera.local/stream --window 2 --stride 1 --json
    """
    if window is None:
        for flag, value in (("--stride", stride), ("--out", out), ("--out-video", out_video),
                            ("--input-format", input_format), ("--smooth", smooth != 1 or None),
                            ("--attention", attention or None)):
            if value is not None:
                raise ConfigError(f"{flag} needs --window SECONDS (the streaming predictor)")
    else:
        if segments is not None:
            raise ConfigError("--segments and --window are two ways to cut windows: give one "
                              "(--window S --stride S = --segments S, streamed)")
        if num_clips is not None:
            raise ConfigError("--clips has no effect with --window (each window is one clip)")
        if attention and out_video is None:
            raise ConfigError("--attention draws on the annotated video: give --out-video too")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"--sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    path = resolve_checkpoint(checkpoint, pretrained=pretrained)
    dev = resolve_device(device)
    model, classes, cfg = load_model(path, device=dev)
    if window is not None:
        _predict_stream(list(clips), model=model, classes=classes, cfg=cfg, num_crops=num_crops, window=window,
                        stride=stride, smooth=smooth, sampling=sampling, batch_size=batch_size, dev=dev,
                        input_format=input_format, timeout=timeout, out=out, out_video=out_video,
                        attention=attention, json_=json_, topk=topk)
        return
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
