"""`nlvid build MODEL_OR_CONFIG`: build a model, print its summary; optionally import weights and write a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from nlvid.checkpoint import save_checkpoint
from nlvid.cli.common import err_console, out_console
from nlvid.cli.options import (ExportOption, InitOption, JsonOption, LayoutOption, PretrainedOption, SetOption,
                               out_option, pretrained_init)
from nlvid.config import load_config
from nlvid.errors import ConfigError
from nlvid.models import build_with_init, list_models, summarize
from nlvid.models.convert import EXPORTERS
from nlvid.models.weights import init_data_settings
from nlvid.models.zoo import config_overrides, get_entry
from nlvid.models.summary import format_bytes, format_count

# config key -> the flag of `nlvid build` that sets it
KEY_FLAGS = {"model.layout": "--layout", "data.num_frames": "--frames", "data.crop_size": "--size",
             "model.num_classes": "--classes", "init": "--init", "pretrained": "--pretrained"}


def _table(name: str, summary: dict, classes: int):
    c, t, h, w = summary["input"]
    title = f"{name}  input {c}x{t}x{h}x{w}  ({classes} classes)"
    table = Table(title=title, title_justify="left",
                  caption="stage rows include their Non-local blocks (indented)" if summary["nonlocal"] else None,
                  caption_justify="left")
    table.add_column("layer")
    table.add_column("output (C x T x H x W)")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    nl_by_stage: dict[str, list[dict]] = {}
    for row in summary["nonlocal"]:
        nl_by_stage.setdefault(row["name"].split(".")[0], []).append(row)
    for st in summary["stages"]:
        table.add_row(st["name"], " x ".join(map(str, st["output"])), format_count(st["params"]),
                      format_count(st["macs"]))
        for row in nl_by_stage.get(st["name"], []):
            table.add_row(f"  {row['name']}", " x ".join(map(str, row["input"])), format_count(row["params"]),
                          format_count(row["macs"]), style="cyan")
    table.add_section()
    table.add_row("total", "", f"{summary['params']:,}", f"{summary['macs'] / 1e9:.2f} G", style="bold")
    tables = [table]
    if summary["nonlocal"]:
        nl = Table(title="Non-local blocks (attention per clip)", title_justify="left")
        for col, just in (("block", "left"), ("mode", "left"), ("queries N", "right"), ("keys N'", "right"),
                          ("key grid", "left"), ("attn fp32", "right")):
            nl.add_column(col, justify=just)  # type: ignore[arg-type]
        for row in summary["nonlocal"]:
            nl.add_row(row["name"], row["mode"], f"{row['queries']:,}", f"{row['keys']:,}",
                       " x ".join(map(str, row["key_grid"])), format_bytes(row["attention_bytes"]))
        total = sum(r["attention_bytes"] for r in summary["nonlocal"])
        nl.add_section()
        nl.add_row("total", "", "", "", "", format_bytes(total), style="bold")
        tables.append(nl)
    return tables


def build(
    model: Annotated[Optional[str], typer.Argument(help="Model preset: c2d_r{18,34,50,101}, i3d_r{50,101}, "
                                                        "i3d333_r{50,101}, each also with _nl1/_nl5/_nl10, or tiny; a "
                                                        "bundled config name (sample_configs/) or a YAML path. "
                                                        "Default with --pretrained: its preset.",
                                                   show_default=False)] = None,
    frames: Annotated[Optional[int], typer.Option("--frames", "-t", help="Clip length T. Default: the config's "
                                                  "data.num_frames (8).")] = None,
    size: Annotated[Optional[int], typer.Option("--size", "-s", help="Square crop size. Default: the config's "
                                                "data.crop_size (224).")] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", help="Number of classes. Default: the config's "
                                                   "model.num_classes (400), or the imported weights'.")] = None,
    layout: LayoutOption = None,
    set_: SetOption = None,
    init: InitOption = None,
    pretrained: PretrainedOption = None,
    export: ExportOption = None,
    out: Annotated[Optional[Path], out_option("Write an nlvid checkpoint (model, resolved config, class names).")]
    = None,
    json_: JsonOption = False,
) -> None:
    """Build a model and print its summary: per-stage output shapes, parameters, multiply-adds, Non-local blocks.

    Examples:

      nlvid build c2d_r50_nl5

      nlvid build c2d_r101 --layout 32x2 --frames 32 --json

      nlvid build i3d_r50_nl5 --init caffe2=i3d_nonlocal_8x8_r50.pkl --out i3d_nl5.pt

      nlvid build c2d_r50_nl5 --init imagenet=resnet50.pth --classes 10 --out c2d.pt

      nlvid build --pretrained pysf_i3d_r50_nl_8x8 --out i3d_nl.pt
    """
    entry = get_entry(pretrained) if pretrained else None
    if entry is not None and init is not None:
        raise ConfigError("give --init or --pretrained, not both")
    if model is None:
        if entry is None:
            raise ConfigError("missing argument MODEL (a preset, bundled config or YAML file; see --help)")
        model = entry.preset
    init_text = pretrained_init(entry.name) if entry is not None else (str(init) if init else None)
    # the source's architecture options and preprocessing first, so that --set and the flags below win
    overrides = config_overrides(entry) if entry is not None else []
    source_data = {} if entry is not None else init_data_settings(init_text)
    overrides += [f"data.{k}={json.dumps(v)}" for k, v in source_data.items()]
    overrides += list(set_ or [])
    if layout is not None:
        overrides.append(f"model.layout={layout.value}")
    if frames is not None:
        overrides.append(f"data.num_frames={frames}")
    if size is not None:
        overrides.append(f"data.crop_size={size}")
    if classes is not None and classes < 1:
        raise ConfigError(f"--classes {classes}: must be a positive integer")
    cfg = load_config(model, overrides, model_names=list_models())
    net, model_cfg, class_names, report = build_with_init(cfg.model, init_text, num_classes=classes)
    if source_data:
        report.append("data: " + ", ".join(f"{k}={v}" for k, v in source_data.items())
                      + " (the source's preprocessing; stored in the checkpoint's config unless --set says otherwise)")
    cfg.model = model_cfg
    T, S = cfg.data.num_frames, cfg.data.crop_size
    summary = summarize(net, (3, T, S, S))  # validates the clip against the strides first (ConfigError)
    for line in report:
        err_console.print(line, highlight=False, markup=False, soft_wrap=True)

    if export is not None:
        for line in EXPORTERS[export.format.value](net.state_dict(), export.path) or []:
            err_console.print(line, highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        names = class_names or [f"class_{i}" for i in range(model_cfg.num_classes)]
        save_checkpoint(out, model_state=net.state_dict(), config=cfg.to_dict(), classes=names)
        err_console.print(f"wrote {out} ({model_cfg.name}, {len(names)} classes)", highlight=False, markup=False)

    if json_:
        payload = {"model": model_cfg.name, "num_classes": model_cfg.num_classes,
                   "layout": getattr(net, "layout", None), **summary}
        typer.echo(json.dumps(payload, indent=2))
    else:
        for table in _table(model_cfg.name, summary, model_cfg.num_classes):
            out_console.print(table)
