"""Watching a run: the records behind curves.png and TensorBoard survive a kill and a resume unchanged, the picture
has every panel's data, `nlvid runs` reports every kind of run folder (finished, interrupted, running, broken,
half-written) without failing, and one process owns a run folder at a time (the lock).

`synthetic_data` is the session fixture of conftest.py; FAST is in engine_settings.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nlvid.config import load_config
from nlvid.engine.runs import (
    CURVES_FILE,
    LOCK_FILE,
    RunLock,
    lock_is_held,
    read_curves,
    read_lock_owner,
    summarize_run,
)
from nlvid.engine.train import train
from nlvid.errors import TrainingError

from cli_helpers import run_cli  # tests/cli_helpers.py
from engine_settings import FAST  # tests/engine_settings.py

ROOT = Path(__file__).resolve().parents[1]
# 12 training clips, batch 2: 6 steps per epoch; last.pt every 2 steps
RUN = FAST + ["train.epochs=2", "train.batch_size=2", "train.save_every=2", "train.seed=5", "train.tensorboard=true"]
KILL_DURING_STEP = 10  # after the checkpoint of step 8; steps 9 and 10 are logged, then lost
TIMING = ("time", "clips_per_s", "data_time", "data_fraction")  # measured, so never equal between two runs


class Killed(Exception):
    pass


def _reaped_pid() -> int:
    """The pid of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def runs_dir(synthetic_data, tmp_path_factory) -> Path:
    """runs/ref: 2 epochs straight through; runs/cut: the same run stopped during step 10 (its last.pt is from
    step 8, the killed process logged step 9 and 10 to metrics.jsonl and TensorBoard and left its lock behind),
    then resumed to the end."""
    root = tmp_path_factory.mktemp("watch") / "runs"
    train(load_config("tiny", RUN), data=synthetic_data, out=root / "ref")

    def kill(model, loss, step):
        if step + 1 == KILL_DURING_STEP:
            raise Killed

    cut = root / "cut"
    with pytest.raises(Killed):
        train(load_config("tiny", RUN), data=synthetic_data, out=cut, hooks={"after_backward": kill})
    logged = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == KILL_DURING_STEP - 1  # records after the checkpoint exist before the resume
    # a SIGKILL'ed trainer leaves its lock file (the kernel drops the flock itself)
    (cut / LOCK_FILE).write_text(json.dumps({"pid": _reaped_pid(), "host": "elsewhere", "started": "earlier"}))
    messages = []
    res = train(None, data=synthetic_data, out=cut, resume=True,
                progress=lambda ev, **d: messages.append(d.get("text", "")) if ev == "message" else None)
    assert res["resumed"] and res["steps"] == 12
    assert any("taking over the stale lock" in m and "elsewhere" in m for m in messages), messages
    assert not (cut / LOCK_FILE).exists()  # released at the end
    return root


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_kill_and_resume_gives_the_same_curves(runs_dir):
    ref, cut = read_curves(runs_dir / "ref"), read_curves(runs_dir / "cut")
    assert [r["step"] for r in ref.steps] == list(range(1, 13))
    assert [r["step"] for r in cut.steps] == [r["step"] for r in ref.steps]  # nothing missing, nothing twice
    assert _without_timing(cut.steps) == _without_timing(ref.steps)
    assert _without_timing(cut.epochs) == _without_timing(ref.epochs)
    assert cut.epoch_ends == ref.epoch_ends == [(6, 1), (12, 2)]
    assert cut.best == ref.best and ref.best is not None
    for key in TIMING:  # throughput etc. are there for every step, with their own values
        assert cut.series("step", key)[0] == ref.series("step", key)[0]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(run_dir: Path) -> list[int]:
    """The steps of every scalar event in every event file (what was written, before TensorBoard's purge)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        steps += [e.step for e in EventFileLoader(str(f)).Load() if e.HasField("summary")]
    return steps


def test_tensorboard_has_the_records_and_a_resume_continues_them(runs_dir):
    pytest.importorskip("tensorboard")
    ref, cut = _scalars(runs_dir / "ref"), _scalars(runs_dir / "cut")
    records = read_curves(runs_dir / "ref")
    assert set(ref) == {f"step/{k}" for k in ("loss", "acc", "lr", "grad_norm", *TIMING)} | {
        f"epoch/{k}" for k in ("train_loss", "train_acc", "lr", "val_top1", "val_top5", "val_clip_top1",
                               "val_mean_class_acc", "best")}
    xs, ys = records.series("step", "loss")
    assert [s for s, _ in ref["step/loss"]] == xs and [v for _, v in ref["step/loss"]] == pytest.approx(ys)
    assert set(cut) == set(ref)
    for tag in ref:
        assert [s for s, _ in cut[tag]] == [s for s, _ in ref[tag]], tag  # no step twice, none missing
        if tag.split("/")[1] not in TIMING:
            assert [v for _, v in cut[tag]] == [v for _, v in ref[tag]], tag
    raw = _raw_steps(runs_dir / "cut")
    assert raw.count(KILL_DURING_STEP - 1) > raw.count(1)  # step 9 was written twice: the purge is what hides it


def test_curves_picture_has_every_panel(runs_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from nlvid.viz.curves import PANELS, curves_figure, render_curves_png

    curves = read_curves(runs_dir / "cut")
    fig = curves_figure([curves], title="cut")
    axes = {ax.get_label(): ax for ax in fig.axes if ax.get_label() in PANELS}
    assert list(axes) == list(PANELS)

    def line(panel, what):
        found = [ln for ln in axes[panel].lines if ln.get_label() == f"cut: {what}"]
        assert len(found) == 1, (panel, what, [ln.get_label() for ln in axes[panel].lines])
        return [float(v) for v in found[0].get_xdata()], [float(v) for v in found[0].get_ydata()]

    def check(panel, what, kind, key, scale=1.0):
        xs, ys = line(panel, what)
        want_x, want_y = curves.series(kind, key)
        assert xs == want_x and len(xs) > 0, (panel, what)
        assert ys == pytest.approx([scale * v for v in want_y]), (panel, what)

    check("loss", "step loss", "step", "loss")
    check("loss", "epoch loss", "epoch", "train_loss")
    check("top1", "step train acc", "step", "acc", 100)
    check("top1", "epoch train acc", "epoch", "train_acc", 100)
    check("top1", "val top-1", "epoch", "val_top1", 100)
    check("lr", "lr", "step", "lr")
    check("throughput", "clips/s", "step", "clips_per_s")
    xs, ys = line("top1", "best")
    assert xs == [curves.best["step"]] and ys == pytest.approx([100 * curves.best["val_top1"]])
    for ax in axes.values():  # epoch ends are marked in every panel
        marked = {ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == ":"}
        assert marked == {6, 12}
    assert all(ax.get_title(loc="left") for ax in axes.values()) and axes["lr"].get_ylabel()

    png = render_curves_png([curves], tmp_path / "c.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1200, 750)
    assert png.stat().st_size < 200_000
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left


def test_runs_table_reports_every_kind_of_run_folder(runs_dir, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "ref", root / "finished")
    # interrupted: a last.pt, one epoch of two done, nobody holds the lock
    shutil.copytree(runs_dir / "ref", root / "interrupted")
    m = root / "interrupted" / "metrics.jsonl"
    m.write_text("".join(x + "\n" for x in m.read_text().splitlines() if json.loads(x)["step"] <= 8))
    # broken: unreadable config, truncated checkpoint, a line cut by a kill
    shutil.copytree(runs_dir / "ref", root / "broken")
    (root / "broken" / "config.yaml").write_text("model: [unclosed\n")
    last = root / "broken" / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    with (root / "broken" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "ep')
    # half-written: stopped before its first checkpoint
    (root / "half").mkdir()
    shutil.copy(runs_dir / "ref" / "config.yaml", root / "half")
    (root / "half" / "metrics.jsonl").write_text('{"kind": "step", "epoch": 1, "step": 1, "loss": 1.4}\n{"kin')
    (root / "not_a_run").mkdir()  # no run files: not listed
    (root / "not_a_run" / "notes.txt").write_text("hello")

    code, out, err = run_cli(["runs", str(root), "--json"], capsys)
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(rows) == {"finished", "interrupted", "broken", "half"}
    fin = rows["finished"]
    assert fin["state"] == "finished" and fin["model"] == "tiny" and fin["epochs_done"] == fin["epochs_planned"] == 2
    ref = read_curves(runs_dir / "ref")
    best_val = max(r["val_top1"] for r in ref.epochs)
    assert fin["best_val_top1"] == best_val
    assert fin["best_val_epoch"] == next(r["epoch"] for r in ref.epochs if r["val_top1"] == best_val)
    assert fin["data"] and Path(fin["data"]).is_dir() and fin["last_checkpoint"] and fin["has_curves_png"] is False
    assert rows["interrupted"]["state"] == "interrupted" and rows["interrupted"]["epochs_done"] == 1
    assert rows["broken"]["state"] == "broken"
    assert any(p.startswith("config.yaml: unreadable") for p in rows["broken"]["problems"])
    assert any(p.startswith("last.pt: truncated or corrupt") for p in rows["broken"]["problems"])
    assert rows["half"]["state"] == "no checkpoint" and rows["half"]["steps"] == 1
    assert "1 unreadable line(s)" in rows["half"]["problems"][0]

    code, out, err = run_cli(["runs", str(root)], capsys)
    assert code == 0, err
    for word in ("finished", "interrupted", "broken", "no checkpoint", "2/2", "1/2", "config.yaml: unreadable"):
        assert word in out, word

    code, out, err = run_cli(["runs", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere: no such folder" in err and len(err.strip().splitlines()) == 1


def test_runs_plot_overlays_several_runs(runs_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "both.png"
    code, out, err = run_cli(["runs", str(runs_dir / "ref"), str(runs_dir / "cut"), "--plot", str(png)], capsys)
    assert code == 0, err
    assert png.stat().st_size > 10_000 and f"curves: {png} (2 run(s))" in out


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that owns `run_dir` (as a running `nlvid train` would) until it is killed."""
    code = ("import sys, time; from nlvid.engine.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_owner_per_run_folder(synthetic_data, tmp_path, capsys):
    run = tmp_path / "run"
    proc = _hold_lock(run)
    try:
        assert lock_is_held(run) and read_lock_owner(run).pid == proc.pid
        with pytest.raises(TrainingError, match=rf"run folder .* is in use: pid {proc.pid} on \S+ since"):
            train(load_config("tiny", RUN), data=synthetic_data, out=run)
        code, out, err = run_cli(["train", str(synthetic_data), "--out", str(run), "--set", "train.epochs=1"], capsys)
        assert code == 1 and f"pid {proc.pid}" in err and "(--out)" in err
        assert len(err.strip().splitlines()) == 1, err
        row = summarize_run(run)
        assert row.state == "running" and f"pid {proc.pid}" in row.owner
    finally:
        proc.kill()
        proc.wait()
    # the owner died without letting go: its lock file stays, stale
    assert (run / LOCK_FILE).exists() and not lock_is_held(run)
    row = summarize_run(run)
    assert row.state == "no checkpoint" and row.owner.startswith(f"stale lock of pid {proc.pid}")
    messages = []
    with RunLock(run, progress=lambda ev, **d: messages.append(d["text"])):
        assert read_lock_owner(run).pid == os.getpid() and lock_is_held(run)
    assert len(messages) == 1 and f"taking over the stale lock of pid {proc.pid}" in messages[0]
    assert not (run / LOCK_FILE).exists()


def test_a_dead_owners_children_are_waited_for(tmp_path):
    """A killed trainer's DataLoader workers share its flock until they notice and exit: the next owner waits."""
    run = tmp_path / "run"
    code = ("import os, sys, time; from nlvid.engine.runs import RunLock; RunLock(sys.argv[1]).acquire()\n"
            "if os.fork() == 0:\n"
            "    null = os.open(os.devnull, os.O_WRONLY); os.dup2(null, 1); os.dup2(null, 2)  # run() returns now\n"
            "    time.sleep(3); os._exit(0)\n"
            "print('locked', flush=True); os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.stdout.strip() == "locked" and lock_is_held(run), proc.stderr
    owner = read_lock_owner(run)
    messages = []
    with RunLock(run, progress=lambda ev, **d: messages.append(d["text"])):
        pass
    assert f"pid {owner.pid}" in messages[0] and "has exited; waiting" in messages[0]
    assert "taking over the stale lock" in messages[1]


def test_a_failed_start_leaves_no_folder_and_no_lock(tmp_path):
    with pytest.raises(Exception):
        train(load_config("tiny", FAST), data=tmp_path / "no_such_data", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_curves_png_is_redrawn_by_the_cli_at_every_epoch(synthetic_data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    sets = sum((["--set", s] for s in FAST + ["train.epochs=1", "train.batch_size=6"]), [])
    code, out, err = run_cli(["train", str(synthetic_data), "--config", "tiny", "--out", str(run), *sets], capsys)
    assert code == 0, err
    assert (run / CURVES_FILE).stat().st_size > 10_000 and f"curves: {run / CURVES_FILE}" in out
    assert json.loads((run / "run.json").read_text())["data"] == str(synthetic_data.resolve())


@pytest.mark.slow
def test_sigkill_then_resume_with_the_cli(synthetic_data, tmp_path):
    """The real thing: `nlvid train` SIGKILL'ed after a mid-epoch checkpoint is `interrupted` in `nlvid runs` (its
    lock file left, nobody holding it); run again, it resumes and ends with the records, TensorBoard scalars and a
    curves.png of the same run uninterrupted (also a CLI process: the thread count changes the last bits)."""
    import signal
    import time

    import torch

    run, ref_run = tmp_path / "killed", tmp_path / "ref"

    def train_args(out):
        return [sys.executable, "-m", "nlvid", "train", str(synthetic_data), "--config", "tiny", "--out", str(out),
                *sum((["--set", s] for s in RUN), [])]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ref_log = (tmp_path / "ref.log").open("w")
    ref_proc = subprocess.Popen(train_args(ref_run), stdout=subprocess.DEVNULL, stderr=ref_log, env=env, cwd=ROOT)
    args = train_args(run)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        try:
            ck = torch.load(run / "last.pt", weights_only=True)
        except Exception:
            ck = None
        if ck is not None and ck["batches_done"] > 0 and ck["epoch"] == 1:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before a mid-epoch checkpoint of epoch 2 was seen"
    row = summarize_run(run)
    assert row.state == "interrupted" and row.epochs_done == 1 and row.owner.startswith(f"stale lock of pid {proc.pid}")

    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "taking over the stale lock" in res.stderr
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_log.close()
    ref, got = read_curves(ref_run), read_curves(run)
    assert _without_timing(got.steps) == _without_timing(ref.steps)
    assert _without_timing(got.epochs) == _without_timing(ref.epochs)
    if importlib.util.find_spec("tensorboard"):
        a, b = _scalars(ref_run), _scalars(run)
        assert set(a) == set(b)
        for tag in a:
            assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
            if tag.split("/")[1] not in TIMING:
                assert [v for _, v in b[tag]] == [v for _, v in a[tag]], tag
    assert summarize_run(run).state == "finished"
    if importlib.util.find_spec("matplotlib"):
        assert (run / CURVES_FILE).stat().st_size > 10_000
