"""Small pieces shared by the commands: consoles and option types."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

# Results on stdout, progress/logs/errors on stderr.
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set optim.lr=0.1 (repeatable).", metavar="KEY=VALUE"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def not_available(command: str) -> None:
    from nlvid.errors import NlvidError

    raise NlvidError(f"`nlvid {command}` is not available yet in this version")
