"""The `nlvid` command line: thin commands over importable functions.

Each command lives in its own module (`nlvid/cli/<command>.py`) and is registered here. Results go to stdout,
progress and errors to stderr. Exit codes: 0 ok, 1 runtime error, 2 usage/config error. `main()` maps every
`NlvidError` to a one-line message; `NLVID_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

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


def _register() -> None:
    # Imported here so `import nlvid.cli` stays cheap and each command module owns its options.
    from nlvid.cli import build, evaluate, predict, synth, train, visualize

    app.command("build")(build.build)
    app.command("train")(train.train)
    app.command("eval")(evaluate.evaluate)
    app.command("predict")(predict.predict)
    app.command("visualize")(visualize.visualize)
    app.command("synth")(synth.synth)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="nlvid")
    except NlvidError as e:
        if os.environ.get("NLVID_DEBUG") == "1":
            raise
        from nlvid.cli.common import err_console

        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
