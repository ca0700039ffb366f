"""`nlvid visualize CLIP`: where a Non-local block looks, as pictures (PNG/GIF/MP4), a terminal view and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlvid.cli.common import err_console, out_console
from nlvid.cli.options import (CheckpointOption, DeviceOption, JsonOption, PretrainedOption, View, ViewOption,
                               out_option, resolve_checkpoint)
from nlvid.engine.device import resolve_device
from nlvid.errors import ConfigError
from nlvid.models import load_model
from nlvid.viz.attention import attend_clip, read_clip_indexed, resolve_blocks
from nlvid.viz.render import stats_table, terminal_renderable, write_outputs, write_stats
from nlvid.viz.stats import clip_file_stats, folder_stats, list_videos

# config key -> the flag of `nlvid visualize` that sets it
KEY_FLAGS = {"train.device": "--device", "block": "--block", "query": "--query", "view": "--view", "data": "--data"}


def parse_query(text: str) -> tuple[int, float, float]:
    """'T,X,Y' -> (frame index in the clip, x, y in original-frame pixels)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        return int(parts[0]), float(parts[1]), float(parts[2])
    except ValueError:
        raise ConfigError(f"--query {text!r}: expected T,X,Y (frame index in the clip, then pixel x, y in the "
                          f"original frame), e.g. --query 3,120,80") from None


def stats_command(model, cfg, *, clip: Path | None, data: Path | None, num_clips: int, block: str | None,
                  view: str, start: float | None, out: Path | None, json_: bool, device, checkpoint: Path) -> None:
    """`--stats`: the attention statistics of one clip or a folder's clips -> stats.json and PNGs, or JSON."""
    names = resolve_blocks(model, block or "all")
    d = cfg.data
    kw = dict(blocks=names, num_frames=d.num_frames, stride=d.stride, short_side=d.test_short_side, mean=d.mean,
              std=d.std, view=str(view), crop_size=d.test_crop_size, device=device)
    if data is not None:
        files = list_videos(data, num_clips)

        def progress(event: str, **e) -> None:
            if not json_:
                err_console.print(f"  clip {e['index'] + 1}/{e['total']}: {e['path']}", highlight=False)

        result = folder_stats(model, files, progress=progress, **kw)
    else:
        result = clip_file_stats(model, clip, start=start, **kw)
    report = result.to_json(checkpoint=str(checkpoint))
    if out is not None:
        paths = write_stats(result.blocks, out)
        for b, p in zip(report["blocks"], paths):
            b["png"] = p.name
        (Path(out) / "stats.json").write_text(json.dumps(report, indent=2))
        paths.append(Path(out) / "stats.json")
    if json_ or out is None:
        typer.echo(json.dumps(report, indent=2))
        return
    out_console.print(stats_table(result.blocks))
    out_console.print(f"wrote {len(paths)} files to {out}/: " + ", ".join(p.name for p in paths), highlight=False)


def visualize(
    clip: Annotated[Optional[Path], typer.Argument(help="A video file (not needed with --data).",
                                                   show_default=False)] = None,
    checkpoint: CheckpointOption = None,
    pretrained: PretrainedOption = None,
    block: Annotated[Optional[str], typer.Option("--block", help="NL block, e.g. res3.nl.1; 'all' for every "
                                                 "block. Default: the first res3 block (the paper's Fig. 3), "
                                                 "else the first NL block.", show_default=False)] = None,
    queries: Annotated[int, typer.Option("--queries", "-n", min=1, help="How many queries to choose "
                                         "automatically (most concentrated attention, spread over frames).")] = 4,
    query: Annotated[Optional[list[str]], typer.Option("--query", "-q", help="A query T,X,Y: frame index in the "
                                                       "clip, pixel x, y in the original frame (repeatable; "
                                                       "replaces the automatic choice).", show_default=False)] = None,
    topk: Annotated[int, typer.Option("--topk", "-k", min=1, help="Keys per query.")] = 20,
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames shown (evenly spaced).")] = 4,
    out: Annotated[Optional[Path], out_option("Folder for PNGs, GIFs and hotspots.json.")] = None,
    mp4: Annotated[bool, typer.Option("--mp4", help="Also write an MP4 per query.")] = False,
    terminal: Annotated[Optional[bool], typer.Option("--terminal/--no-terminal", help="Draw in the terminal "
                                                     "(default when stdout is a terminal and no --out).",
                                                     show_default=False)] = None,
    start: Annotated[Optional[float], typer.Option("--start", help="Clip start in seconds (default: the clip "
                                                   "centred in the video).", show_default=False)] = None,
    view: ViewOption = View("full"),
    device: DeviceOption = "auto",
    json_: JsonOption = False,
    stats: Annotated[bool, typer.Option("--stats", help="Measure what the attention learned instead of drawing "
                                        "queries: reach in frames and pixels, query dependence, entropy; "
                                        "stats.json and <block>_stats.png per block (every NL block unless "
                                        "--block).")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="With --stats: measure over the videos of this "
                                                 "folder (recursive) instead of CLIP.", show_default=False)] = None,
    num_clips: Annotated[int, typer.Option("--num-clips", min=1, help="With --data: how many videos, evenly "
                                           "spread over the folder's sorted list.")] = 16,
) -> None:
    """Show where a Non-local block's queries attend: arrows to the top-k keys and heat overlays (PNG per query),
    an animated GIF (and MP4) over the clip, a summary image and hotspots.json; or a terminal rendering.

    With --stats: what the attention learned, as numbers (reach in frames and pixels, query dependence, entropy)
    over CLIP or over --num-clips videos of --data DIR: stats.json and <block>_stats.png per block.

    Example: nlvid visualize clip.mp4 --checkpoint runs/tiny/best.pt --out viz/
    """
    placed = [parse_query(q) for q in query] if query else None
    if (clip is None) == (data is None):
        raise ConfigError("give one video: CLIP, or --data DIR (with --stats) for a folder of videos")
    path = resolve_checkpoint(checkpoint, pretrained=pretrained)
    dev = resolve_device(device)
    model, classes, cfg = load_model(path, device=dev)
    if stats or data is not None:
        return stats_command(model, cfg, clip=clip, data=data, num_clips=num_clips, block=block, view=view,
                             start=start, out=out, json_=json_, device=dev, checkpoint=path)
    names = resolve_blocks(model, block)
    d = cfg.data
    decoded = read_clip_indexed(clip, num_frames=d.num_frames, stride=d.stride, start=start, view=view,
                                short_side=d.test_short_side, crop_size=d.test_crop_size)
    result = attend_clip(
        model, decoded.frames, classes=classes, blocks=names, short_side=d.test_short_side,
        crop_size=d.test_crop_size, mean=d.mean, std=d.std, view=view, num_shown=frames, queries=placed,
        num_queries=queries, topk=topk, source_frames=decoded.source_frames, timestamps=decoded.timestamps,
        model_frames=decoded.model_frames, device=dev,
    )
    report = result.to_json(file=str(clip), checkpoint=str(path))
    if terminal is None:
        terminal = out is None and sys.stdout.isatty() and not json_
    if out is not None:
        written = write_outputs(result, out, mp4=mp4)
        for b in report["blocks"]:
            files = written.blocks[b["block"]]
            for q, names in zip(b["queries"], files.queries):
                q.update(names)
            b["summary_png"] = files.summary_png
        hot = Path(out) / "hotspots.json"
        hot.write_text(json.dumps(report, indent=2))
        paths = [*written.paths, hot]
        if not json_:
            out_console.print(f"wrote {len(paths)} files to {out}/:", highlight=False)
            for p in paths:
                out_console.print(f"  {p.name}", highlight=False)
    if terminal:
        out_console.print(terminal_renderable(result, width=out_console.width))
    if json_ or (out is None and not terminal):
        if out is None and not json_:
            err_console.print("no --out and stdout is not a terminal: printing hotspots JSON (use --out DIR for "
                              "pictures, --terminal to draw here)", highlight=False)
        typer.echo(json.dumps(report, indent=2))
