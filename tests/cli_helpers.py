"""Run the nlvid CLI in-process and capture what it printed (shared by the CLI tests)."""


def run_cli(argv, capsys):
    """-> (exit code, stdout, stderr) of `nlvid ARGV`."""
    from nlvid.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
