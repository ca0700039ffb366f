"""The consoles of the commands and the one way an error line is printed."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from nlvid.data import DatasetIndex

# Results on stdout, progress/logs/errors on stderr.
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)


class _StderrHandler(logging.Handler):
    """Log records of the core modules (e.g. a skipped video) as plain yellow lines on the stderr console."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(Text(self.format(record), style="yellow"), highlight=False, soft_wrap=True)


def log_to_stderr() -> None:
    """Show the `nlvid` loggers' warnings on stderr (once; DataLoader workers forked later inherit it)."""
    logger = logging.getLogger("nlvid")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr, one line; the message is plain text (a `[bold]` in a file name stays as is)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def format_scan_table(index: DatasetIndex, *, max_unreadable: int = 10) -> Group:
    """A rich renderable for stderr: clips and unreadable files per class, then the unreadable files."""
    title = Text(f"{index.source}" if index.source is not None else "dataset")
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("class", footer="total")
    table.add_column("clips", justify="right", footer=str(len(index.items)))
    table.add_column("unreadable", justify="right", footer=str(len(index.unreadable)))
    for c in index.classes:
        bad = index.unreadable_counts.get(c, 0)
        table.add_row(Text(c), str(index.counts.get(c, 0)), Text(str(bad), style="red") if bad else "0")
    parts: list[Any] = [table]
    for p, reason in index.unreadable[:max_unreadable]:
        parts.append(Text(f"unreadable, skipped: {p}: {reason}", style="yellow"))
    if len(index.unreadable) > max_unreadable:
        parts.append(Text(f"... and {len(index.unreadable) - max_unreadable} more unreadable files", style="yellow"))
    if index.ignored:
        parts.append(Text(f"ignored {len(index.ignored)} non-video file(s), e.g. {index.ignored[0]}", style="dim"))
    return Group(*parts)
