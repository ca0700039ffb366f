"""The consoles of the commands and the one way an error line is printed."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

# Results on stdout, progress/logs/errors on stderr.
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr, one line; the message is plain text (a `[bold]` in a file name stays as is)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
