"""`nlvid export [CHECKPOINT] --format onnx|torchscript|exported-program --out FILE`: a deployable graph of a model.

The graph takes `clip` (B, 3, T, S, S) float32, batch dynamic, and returns `logits` (B, classes); the file carries
the class names and the test-time preprocessing (`nlvid.engine.export`, README "Export"). The result (the file, the
Non-local path it holds, the max difference to eager on a random clip) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nlvid.cli.common import err_console, out_console
from nlvid.cli.options import JsonOption, PretrainedOption, choice_metavar, choice_parser, resolve_checkpoint
from nlvid.config import Choice, test_data_kwargs
from nlvid.engine.export import FORMATS, check_export_target, export_model
from nlvid.models import load_model

# Built from the engine's registry (as options.py builds its choices), so a new format needs no CLI change.
GraphFormat = Choice("GraphFormat", {name.upper().replace("-", "_"): name for name in FORMATS})

# config key (or export_model parameter) -> the flag of `nlvid export` that sets it
KEY_FLAGS = {"format": "--format", "out": "--out"}

_PATHS = {"fast": "fast path (impl=auto, as nlvid predict runs them)",
          "explicit": "explicit path (impl=explicit: conv + bmm + softmax + bmm, the same outputs)",
          "fast+explicit": "fast path, some blocks through the explicit path"}


def _progress(event: str, **d: Any) -> None:
    if event == "export":
        nl = f", Non-local blocks: {d['nonlocal_impl']} path" if d["nonlocal_impl"] else ""
        err_console.print(f"exporting to {d['format']}{nl} ...", highlight=False, markup=False)
    elif event == "fallback":
        then = "retrying with impl=explicit" if d["retry"] else "exporting them with impl=explicit"
        err_console.print(f"Non-local blocks: {d['reason']}; {then}", style="yellow", highlight=False,
                          markup=False, soft_wrap=True)
    elif event == "check":
        err_console.print(f"checking the file against eager on a random clip (batch {d['batch']}) ...",
                          highlight=False, markup=False)


def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="nlvid checkpoint. Default: $NLVID_CHECKPOINT, else the newest best.pt under ./runs/.",
        show_default=False)] = None,
    format_: Annotated[GraphFormat, typer.Option(  # type: ignore[valid-type]
        "--format", metavar=choice_metavar(GraphFormat), parser=choice_parser(GraphFormat),
        help="onnx (needs the export extra: pip install 'nlvid\\[export]'), torchscript (torch.jit.trace) or exported-program "
             "(torch.export).")] = GraphFormat("onnx"),
    out: Annotated[Path, typer.Option("--out", "-o", show_default=False,
                                      help="The file to write (its folder must exist), e.g. model.onnx, model.pt "
                                           "(torchscript), model.pt2 (exported-program).")] = ...,  # type: ignore
    pretrained: PretrainedOption = None,
    json_: JsonOption = False,
) -> None:
    """Export a checkpoint to ONNX, TorchScript or a torch.export program (dynamic batch axis), check the file
    against the eager model on a random clip and print the max absolute difference of the logits.

    The graph takes clip (B, 3, T, S, S) float32, normalised as nlvid predict does, and returns logits
    (B, classes), before the softmax. The file carries the class names and the preprocessing as JSON under the
    key nlvid.json (README, "Export", says how to read it).

    Examples: nlvid export runs/tiny/best.pt --format onnx --out tiny.onnx

      nlvid export runs/tiny/best.pt --format torchscript --out tiny.pt --json
    """
    fmt = GraphFormat(format_).value
    path = resolve_checkpoint(checkpoint, pretrained=pretrained)
    check_export_target(out, format=fmt)  # before loading: a missing folder or onnx package fails at once
    model, classes, cfg = load_model(path, device="cpu")
    data = test_data_kwargs(cfg.data)
    result = export_model(model, classes, out, format=fmt, model_name=cfg.model.name, progress=_progress, **data)
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    c = result["check"]
    shape = " x ".join("B" if s is None else str(s) for s in result["input"])
    lines = [f"wrote {result['file']} ({fmt}, {result['bytes']:,} bytes)",
             f"input  clip    {shape} float32 (batch dynamic), metadata key {result['metadata_key']}",
             f"output logits  B x {result['output'][1]} (before softmax)"]
    if result["nonlocal_impl"]:
        note = f"; {result['fallback']}" if result["fallback"] else ""
        lines.append(f"Non-local blocks: {_PATHS.get(result['nonlocal_impl'], result['nonlocal_impl'])}{note}")
    lines.append(f"max abs difference vs eager: {c['max_abs_diff']:.3g} (random clip, batch {c['batch']}; "
                 f"max |logit| {c['max_abs_output']:.3g})")
    for line in lines:
        out_console.print(line, highlight=False, markup=False, soft_wrap=True)
