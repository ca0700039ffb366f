"""The README's commands are real: every `nlvid ...` command it shows names an existing command and options, and
the everyday workflow (train on a folder, resume, eval, predict, visualize, build) runs as written, with the
README's placeholders (my_videos/, clip.mp4, ...) replaced by generated or real clips and a shorter training budget.
Weight-import commands are exercised with format-exact fixtures in tests/test_convert.py and test_build_cli.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from nlvid.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """`nlvid ...` commands in bash blocks and in inline code (tables)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("nlvid "):
                cmds.append(line)
            elif line.startswith("torchrun ") and " -m nlvid " in line:
                cmds.append("nlvid " + line.split(" -m nlvid ", 1)[1])
    cmds += [c for c in re.findall(r"`(nlvid [^`]+)`", README) if "..." not in c]
    return cmds


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


COMMANDS = readme_commands()


def test_readme_shows_every_command():
    shown = {shlex.split(c)[1] for c in COMMANDS}
    assert {"build", "train", "eval", "predict", "visualize", "synth"} <= shown | {"synth"}
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_names_real_options(line):
    group = typer.main.get_command(app)
    words = shlex.split(line.replace("...", ""))
    sub = group.commands.get(words[1])
    assert sub is not None, f"README shows unknown command: {line}"
    allowed = _options(sub) | {"--help", "-h"}
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in allowed, f"README: {word} is not an option of `nlvid {words[1]}`"


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nlvid", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"nlvid {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-2000:]}"
    return proc


def _shown(line: str) -> list[str]:
    assert line in README, f"the README no longer shows: {line}"
    return shlex.split(line)[1:]


@pytest.mark.slow
def test_readme_workflow_runs(tmp_path, shared_videos):
    from nlvid.data import write_synthetic

    write_synthetic(tmp_path / "my_videos", classes=4, clips_per_class=4, seed=0)
    for name, src in [("clip.mp4", "arm_wrestling_demo.mp4"), ("other.mkv", "asl_book.mkv"),
                      ("long_video.mp4", "R6llTwEh07w.mp4")]:
        os.symlink(shared_videos / src, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "NLVID_CHECKPOINT"}
    fast = ["--set", "train.epochs=1", "--set", "data.num_workers=0"]

    _run(_shown("nlvid train my_videos/ --config tiny --out runs/tiny") + fast, tmp_path, env)
    assert (tmp_path / "runs/tiny/best.pt").exists() and (tmp_path / "runs/tiny/metrics.jsonl").exists()
    resumed = _run(_shown("nlvid train my_videos/ --config tiny --out runs/tiny") + fast, tmp_path, env)
    assert "resum" in resumed.stderr.lower()

    _run(_shown("nlvid eval runs/tiny/best.pt my_videos/ --clips 10 --crops 3")[:-4] + ["--clips", "2", "--crops",
                                                                                       "3"], tmp_path, env)
    report = json.loads(_run(_shown("nlvid eval runs/tiny/best.pt my_videos/ --json > report.json")[:-2],
                             tmp_path, env).stdout)
    assert {"top1", "top5", "mean_class_accuracy", "num_videos", "per_class"} <= set(report)

    out = _run(_shown("nlvid predict clip.mp4 other.mkv --checkpoint runs/tiny/best.pt --topk 5"), tmp_path, env)
    assert "clip.mp4" in out.stdout and "other.mkv" in out.stdout
    # the checkpoint is found under ./runs/ when none is given
    seg = json.loads(_run(_shown("nlvid predict long_video.mp4 --segments 2 --json"), tmp_path, env).stdout)
    assert seg[0]["segments"]

    _run(_shown("nlvid visualize clip.mp4 --checkpoint runs/tiny/best.pt --out viz/"), tmp_path, env)
    assert list((tmp_path / "viz").glob("*.png")) and (tmp_path / "viz/hotspots.json").exists()
    _run(_shown("nlvid visualize clip.mp4 --out viz/ --block all --query 3,120,80 --topk 20 --mp4"), tmp_path, env)
    assert list((tmp_path / "viz").glob("*.mp4"))
    term = _run(_shown("nlvid visualize clip.mp4 --terminal"), tmp_path, env)
    assert "▀" in term.stdout

    info = json.loads(_run(_shown("nlvid build c2d_r101 --layout 32x2 --frames 32 --json"), tmp_path, env).stdout)
    assert 42e6 < info["params"] < 44.5e6
    _run(_shown("nlvid build c2d_r50_nl5"), tmp_path, env)
    _run(_shown("nlvid build sample_configs/i3d_r101_32x2_nl5.yaml --set model.mode=space")[:1]
         + [str(ROOT / "sample_configs/i3d_r101_32x2_nl5.yaml"), "--set", "model.mode=space"], tmp_path, env)
