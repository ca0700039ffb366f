"""The `nlvid` command line: thin commands over importable functions.

Each command lives in its own module (`nlvid/cli/<command>.py`) and is registered here; options that several
commands share are declared once in `nlvid/cli/options.py`. Results go to stdout, progress and errors to stderr.
Exit codes: 0 ok, 1 runtime error, 2 usage/config error. `main()` prints every usage error and every `NlvidError`
as one line (`NLVID_DEBUG=1` shows the traceback instead); when an error names a config key that the running
command sets with a flag (the command module's `KEY_FLAGS`), the line ends with that flag.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import torch
import typer

from nlvid import __version__
from nlvid.cli import build, evaluate, export, models, predict, runs, synth, train, visualize
from nlvid.cli.common import log_to_stderr, print_error
from nlvid.engine.device import reuse_freed_memory
from nlvid.errors import NlvidError

app = typer.Typer(
    name="nlvid",
    help="Video classification with Non-local neural networks (Wang et al., CVPR 2018).\n\n"
    "Examples:\n\n"
    "  nlvid build c2d_r50_nl5 --frames 8 --size 224\n\n"
    "  nlvid train my_videos/ --config tiny --out runs/tiny\n\n"
    "  nlvid visualize clip.mp4 --checkpoint runs/tiny/best.pt --out viz/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("build")(build.build)
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("visualize")(visualize.visualize)
app.command("synth")(synth.synth)
app.command("models")(models.models)
app.command("runs")(runs.runs)
app.command("export")(export.export)

# command -> {config key: the flag of that command that sets it}; main() names the flag after an error keyed so
KEY_FLAGS: dict[str, dict[str, str]] = {
    "build": build.KEY_FLAGS,
    "train": train.KEY_FLAGS,
    "eval": evaluate.KEY_FLAGS,
    "predict": predict.KEY_FLAGS,
    "visualize": visualize.KEY_FLAGS,
    "export": export.KEY_FLAGS,
}


def version_text() -> str:
    return f"nlvid {__version__} (torch {torch.__version__})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()  # options of `nlvid` itself, before the command
def _global_options(
    version: Annotated[bool, typer.Option("--version", help="Print the nlvid and torch versions.",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    pass


def with_flag(message: str, key: str | None, command: str | None) -> str:
    """`message` plus " (--flag)" when `key` is set by a flag of `command` that the message does not name yet."""
    flag = KEY_FLAGS.get(command or "", {}).get(key or "")
    return f"{message} ({flag})" if flag and flag not in message else message


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs one command and exits with its code (0 ok, 1 runtime, 2 usage/config)."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in args if not a.startswith("-")), None)
    log_to_stderr()
    if argv is None:  # the `nlvid` executable, a process of its own (not a caller that imported nlvid)
        reuse_freed_memory()
    try:
        code = app(args=args, prog_name="nlvid", standalone_mode=False)
    except typer.TyperException as e:  # usage errors: unknown option, bad or missing value, missing argument
        if os.environ.get("NLVID_DEBUG") == "1":
            raise
        message = e.format_message().strip()
        ctx = getattr(e, "ctx", None)
        if message and ctx is not None:
            message += f" (see '{ctx.command_path} --help')"
        if message:  # empty when typer printed the help instead (`nlvid` without arguments)
            print_error(message)
        sys.exit(e.exit_code)
    except NlvidError as e:
        if os.environ.get("NLVID_DEBUG") == "1":
            raise
        print_error(with_flag(str(e), e.key, command))
        sys.exit(e.exit_code)
    except OSError as e:  # an output the command could not write (disk full, read-only, a file where a folder is)
        if os.environ.get("NLVID_DEBUG") == "1":
            raise
        where = e.filename if e.filename is not None else "output"
        print_error(f"{where}: {e.strerror or e.__class__.__name__}")
        sys.exit(1)
    except typer.Abort:
        print_error("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
