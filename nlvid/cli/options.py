"""Options that several commands share, declared once here, and the typed choices of the CLI.

Short flags mean one thing in every command, the way timm / PySlowFast / mmaction2 users read them:

    -c  --config       a YAML file, bundled config or preset (`train`; timm's `train.py -c/--config`)
    -o  --out          where a command writes its files
    -b  --batch-size   clips or views per forward pass (timm's `-b`)
    -k  --topk         labels per video (predict), keys per query (visualize)
    -h  --help

and, in one command each: `-t --frames` and `-s --size` (build), `-n --queries` and `-q --query` (visualize).
`--checkpoint` has no short form: `-c` is the config (timm's validate.py / inference.py spell `--checkpoint` out
too; mmaction2 and PySlowFast take the checkpoint positionally or as a config key).

Options with a fixed set of values are `nlvid.config.Choice` enums (`View`, `Layout`, `InitFormat`, `ExportFormat`)
parsed by `choice_parser`, so that a bad value is a usage error of one line, "'x' is not one of a, b", that
`nlvid.cli.main` prints with exit code 2. `--device` stays a string: `cuda:N` is an open set, and
`nlvid.engine.device.resolve_device` checks it (a ConfigError keyed `train.device`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from nlvid.cli.common import err_console
from nlvid.config import Choice
from nlvid.data.transforms import VIEWS
from nlvid.errors import CheckpointError, ConfigError
from nlvid.models.convert import EXPORTERS
from nlvid.models.hub import pretrained_checkpoint, source_file
from nlvid.models.zoo import get_entry
from nlvid.models.resnet3d import LAYOUTS
from nlvid.models.weights import init_formats

C = TypeVar("C", bound=Choice)


# ------------------------------------------------------------------------------------------ choices


# Built from the registries they name, so that a new view, layout or weight format needs no CLI change.
View = Choice("View", {name: name for name in VIEWS})
Layout = Choice("Layout", {name: name for name in LAYOUTS})
InitFormat = Choice("InitFormat", {name: name for name in init_formats()})
ExportFormat = Choice("ExportFormat", {name: name for name in sorted(EXPORTERS)})


def choice_metavar(choices: type[Choice]) -> str:
    return "<" + "|".join(choices.values()) + ">"


def choice_parser(choices: type[C]) -> Callable[[Any], C]:
    """A Typer `parser` for a Choice option: the member, or a usage error "'x' is not one of a, b".

    Typer checks a plain Enum annotation itself, but words the error "Value error, 'x' is not one of 'a', 'b'.";
    this parser keeps the wording of `Choice.check` (config errors read the same)."""

    def parse(value: Any) -> C:
        if isinstance(value, choices):
            return value
        if value not in choices.values():
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices.values())}")
        return choices(value)

    return parse


@dataclass(frozen=True)
class FormatPath:
    """A `FORMAT=PATH` option value (`--init`, `--export`); `str()` gives it back as text."""

    format: Choice
    path: Path

    def __str__(self) -> str:
        return f"{self.format.value}={self.path}"


def format_path_parser(formats: type[Choice], *, example: str, metavar: str) -> Callable[[Any], FormatPath]:
    """A Typer `parser` for FORMAT=PATH: FORMAT one of `formats` (case-insensitive), PATH not empty."""

    def parse(value: Any) -> FormatPath:
        if isinstance(value, FormatPath):
            return value
        fmt, sep, path = str(value).partition("=")
        allowed = ", ".join(formats.values())
        if not sep:
            raise typer.BadParameter(f"{value!r}: expected {metavar}, e.g. {example}; formats: {allowed}")
        fmt = fmt.strip().lower()
        if fmt not in formats.values():
            raise typer.BadParameter(f"unknown format {fmt!r}; allowed: {allowed}")
        if not path:
            raise typer.BadParameter(f"{value!r}: missing {metavar.split('=')[1]} after '='")
        return FormatPath(formats(fmt), Path(path))

    return parse


# ------------------------------------------------------------------------------------------ shared options


CheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="nlvid checkpoint. Default: $NLVID_CHECKPOINT, else the newest best.pt "
                 "under ./runs/.", show_default=False),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda if available, else cpu), cpu, cuda or "
                                           "cuda:N.")]
InitOption = Annotated[
    Optional[FormatPath],
    typer.Option("--init", metavar="FORMAT=PATH", show_default=False,
                 parser=format_path_parser(InitFormat, example="imagenet=resnet50.pth", metavar="FORMAT=PATH"),
                 help="Initial weights: imagenet=torchvision.pth (2-D ResNet, inflated), nlvid=checkpoint.pt, "
                 "pyslowfast=, caffe2=, mmaction2= (their checkpoint files)."),
]
ExportOption = Annotated[
    Optional[FormatPath],
    typer.Option("--export", metavar="FORMAT=FILE", show_default=False,
                 parser=format_path_parser(ExportFormat, example="pyslowfast=model.pyth", metavar="FORMAT=FILE"),
                 help="Also write the weights in another format, e.g. pyslowfast=model.pyth."),
]
LayoutOption = Annotated[
    Optional[Layout],  # type: ignore[valid-type]
    typer.Option("--layout", metavar=choice_metavar(Layout), parser=choice_parser(Layout), show_default=False,
                 help="Temporal layout: 8x8 (PySlowFast, default) or 32x2 (paper / Caffe2), mmaction2 (its I3D "
                 "stem)."),
]
ViewOption = Annotated[
    View,
    typer.Option("--view", metavar=choice_metavar(View), parser=choice_parser(View),
                 help="full: the whole frame, short side resized (no crop); center: the centre crop used by "
                 "eval/predict."),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set optim.lr=0.1 (repeatable).", metavar="KEY=VALUE"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
PretrainedOption = Annotated[
    Optional[str],
    typer.Option("--pretrained", metavar="NAME", show_default=False,
                 help="Published weights by name (`nlvid models` lists them): downloaded, verified and converted "
                 "once into ~/.cache/nlvid ($NLVID_HOME), with the source's preprocessing."),
]


def out_option(help: str) -> Any:
    """`--out/-o PATH`; each command says what it writes there."""
    return typer.Option("--out", "-o", help=help, show_default=False)


# ------------------------------------------------------------------------------------------ checkpoint lookup


CHECKPOINT_ENV = "NLVID_CHECKPOINT"


class DownloadReporter:
    """Renders `nlvid.models.hub` progress on stderr: the licence line, a download bar, retries, the import report."""

    def __init__(self, console=None):
        self.console = console or err_console
        self.bar: Progress | None = None
        self.task = None

    def _line(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, highlight=False, markup=False, soft_wrap=True)

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __call__(self, event: str, **d: Any) -> None:
        if event == "notice":
            self._line(d["text"], "bold")
        elif event == "download":
            self._stop()
            self._line(f"downloading {d['url']}" + (f" (resuming at {d['done']:,} bytes)" if d["done"] else ""))
            self.bar = Progress(TextColumn("  "), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=d["total"], completed=d["done"])
        elif event == "bytes" and self.bar is not None:
            self.bar.update(self.task, completed=d["done"], total=d["total"])
        elif event == "retry":
            self._stop()
            self._line(f"download interrupted ({d['error']}); retrying in {d['wait']:g} s", "yellow")
        elif event == "mirror":
            self._stop()
            self._line(f"trying the next mirror {d['url']} ({d['error']})", "yellow")
        elif event == "downloaded":
            self._stop()
        elif event == "verify":
            self._line("verifying the file (SHA-256, strict import)")
        elif event == "report":
            for line in d["lines"]:
                self._line(line, "dim")
        elif event == "converted":
            self._line(f"cached {d['path']}")


def pretrained_path(name: str) -> Path:
    """The converted checkpoint of `--pretrained NAME` (downloading and converting it on first use)."""
    reporter = DownloadReporter()
    try:
        return pretrained_checkpoint(name, progress=reporter)
    finally:
        reporter._stop()


def pretrained_init(name: str) -> str:
    """`--pretrained NAME` as an `--init` value: nlvid=<converted checkpoint> for a video classifier,
    imagenet=<verified torchvision file> for an ImageNet backbone (downloaded on first use)."""
    entry = get_entry(name)
    if entry.is_classifier:
        return f"nlvid={pretrained_path(entry.name)}"
    reporter = DownloadReporter()
    try:
        return f"imagenet={source_file(entry, progress=reporter)}"
    finally:
        reporter._stop()


def resolve_checkpoint(path: str | Path | None, *, runs: str | Path = "runs", pretrained: str | None = None) -> Path:
    """The checkpoint a command uses: --checkpoint, else --pretrained NAME (the cached conversion of a published
    file), else $NLVID_CHECKPOINT, else the newest `best.pt` under ./runs/; else a CheckpointError saying how to
    get one."""
    if path and pretrained:
        raise ConfigError("give --checkpoint or --pretrained, not both")
    if pretrained:
        return pretrained_path(pretrained)
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
        f"no checkpoint given: pass --checkpoint FILE or --pretrained NAME (`nlvid models`), set {CHECKPOINT_ENV}, "
        f"or create one with "
        f"`nlvid train DATA --config tiny --out runs/NAME` (writes runs/NAME/best.pt) or "
        f"`nlvid build PRESET --init FORMAT=FILE --out model.pt`"
    )
