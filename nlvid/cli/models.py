"""`nlvid models`: the published weights `--pretrained NAME` can use (registry `nlvid.models.zoo`), with cache state."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from nlvid.cli.common import out_console
from nlvid.cli.options import JsonOption
from nlvid.models.hub import cache_state, converted_path, nlvid_home, source_path
from nlvid.models.zoo import clip_spec, describe_arch, list_entries

KEY_FLAGS: dict[str, str] = {}


def _acc(e) -> str:
    if e.top1 is None:
        return "-"
    return f"{e.top1} / {e.top5}" + (" (IN-1k)" if e.dataset != "Kinetics-400" else "")


def _row(e) -> dict[str, Any]:
    d = e.to_dict()
    d.update(architecture=describe_arch(e), clip=clip_spec(e), cached=cache_state(e), path=str(source_path(e)),
             checkpoint=str(converted_path(e)) if e.is_classifier else None)
    return d


def models(
    filter_: Annotated[Optional[str], typer.Argument(help="Only names containing this text.", show_default=False,
                                                     metavar="FILTER")] = None,
    json_: JsonOption = False,
) -> None:
    """List the published weights that --pretrained NAME downloads, verifies, converts and caches.

    Example: nlvid predict clip.mp4 --pretrained pysf_i3d_r50_nl_8x8
    """
    entries = [e for e in list_entries() if not filter_ or filter_.lower() in e.name.lower()]
    if json_:
        typer.echo(json.dumps([_row(e) for e in entries], indent=2))
        return
    table = Table(title=f"pretrained weights ({len(entries)}); cache {nlvid_home()}", title_justify="left")
    for col, just in (("name", "left"), ("architecture", "left"), ("clip", "left"), ("top-1 / top-5", "right"),
                      ("size", "right"), ("licence", "left"), ("cached", "left")):
        table.add_column(col, justify=just, no_wrap=col in ("name", "clip", "cached"))  # type: ignore[arg-type]
    for e in entries:
        state = cache_state(e)
        table.add_row(e.name, describe_arch(e), clip_spec(e), _acc(e), f"{e.size_mb:.0f} MB" if e.size_mb else "?",
                      e.license, {"no": "-"}.get(state, state))
    # one row per line: piped output gets a wide console instead of the 80 columns rich assumes off a terminal
    console = out_console if out_console.is_terminal else Console(width=170, soft_wrap=True)
    console.print(table)
