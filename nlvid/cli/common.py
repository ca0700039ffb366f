"""Small pieces shared by the commands: consoles and option types."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from nlvid.errors import CheckpointError

# Results on stdout, progress/logs/errors on stderr.
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set optim.lr=0.1 (repeatable).", metavar="KEY=VALUE"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]

CHECKPOINT_ENV = "NLVID_CHECKPOINT"


def resolve_checkpoint(path: str | Path | None, *, runs: str | Path = "runs") -> Path:
    """The checkpoint a command uses: --checkpoint, else $NLVID_CHECKPOINT, else the newest `best.pt` under
    ./runs/; else a CheckpointError saying how to get one."""
    if path:
        return Path(path)
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        return Path(env)
    runs = Path(runs)
    found = sorted(runs.rglob("best.pt"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if found:
        return found[-1]
    raise CheckpointError(
        f"no checkpoint given: pass --checkpoint FILE, set {CHECKPOINT_ENV}, or create one with "
        f"`nlvid train DATA --config tiny --out runs/NAME` (writes runs/NAME/best.pt) or "
        f"`nlvid build PRESET --init FORMAT=FILE --out model.pt`"
    )
