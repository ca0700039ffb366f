"""Training: schedule, sharding, checkpoints (atomic, RNG state, weights_only), a real tiny run (loss goes down,
run folder), NaN handling, exact resume after SIGKILL, CLI exit codes.

Session fixtures `synthetic_data` and `trained_run` live in conftest.py; FAST / FIT in engine_settings.py."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nlvid.config import load_config
from nlvid.engine import distributed as distr
from nlvid.checkpoint import load_checkpoint, save_checkpoint
from nlvid.engine.optim import (
    build_optimizer,
    lr_factor,
    param_groups,
    recompute_bn_stats,
    rng_state,
    set_rng_state,
)
from nlvid.engine.train import train
from nlvid.errors import ConfigError, TrainingError

from engine_settings import FAST, FIT  # tests/engine_settings.py

ROOT = Path(__file__).resolve().parents[1]

def _nlvid(*args, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "nlvid", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kw.pop("cwd", ROOT), **kw)


# ------------------------------------------------------------------------------------------ pure pieces


def test_lr_schedule_warmup_cosine_and_step():
    kw = dict(total_steps=100, warmup_steps=10, start_factor=0.1, milestones=[0.5, 0.75], gamma=0.1)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(5, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(49, schedule="step", **kw) == 1.0
    assert lr_factor(50, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_factor(80, schedule="step", **kw) == pytest.approx(0.01)


def test_sharding_gives_the_global_batches_of_one_process():
    order = distr.epoch_order(22, seed=3, epoch=1, world_size=2)
    assert order == distr.epoch_order(22, seed=3, epoch=1, world_size=2)
    assert order != distr.epoch_order(22, seed=3, epoch=2, world_size=2)
    assert sorted(order) == list(range(22))
    single = distr.shard_batches(order, batch_size=8, world_size=1)
    r0 = distr.shard_batches(order, batch_size=4, world_size=2, rank=0)
    r1 = distr.shard_batches(order, batch_size=4, world_size=2, rank=1)
    assert len(r0) == len(r1) == len(single) == 3
    for g, a, b in zip(single, r0, r1):
        assert a + b == g and len(a) == len(b)
    odd = distr.epoch_order(7, seed=0, epoch=0, world_size=2)  # padded to a multiple of the world size
    assert len(odd) == 8 and set(odd) == set(range(7))


def test_no_weight_decay_on_bn_and_bias():
    nn = torch.nn
    m = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(m, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[3].weight)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert opt.param_groups[0]["nesterov"] is True


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    want = (torch.rand(3), random.random(), np.random.normal(size=2))
    save_checkpoint(tmp_path / "c.pt", model_state={}, config={}, classes=[], rng=state)
    loaded = load_checkpoint(tmp_path / "c.pt")  # weights_only=True load
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    set_rng_state(loaded["rng"])
    got = (torch.rand(3), random.random(), np.random.normal(size=2))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and np.array_equal(want[2], got[2])


def test_atomic_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model_state={"w": torch.ones(2)}, config={}, classes=["a"], step=1)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")  # part of the new file reaches the disk, then the process dies
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model_state={"w": torch.zeros(2)}, config={}, classes=["a"], step=2)
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_precise_bn_recovers_the_true_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(2)
    data = [(torch.randn(4, 2, 2, 3, 3) * 3 + 1,) for _ in range(5)]
    used = recompute_bn_stats(bn, data, num_batches=4, device=torch.device("cpu"))
    allx = torch.cat([d[0] for d in data[:4]]).transpose(0, 1).reshape(2, -1)
    assert used == 4
    assert torch.allclose(bn.running_mean, allx.mean(1), atol=1e-5)
    # per-batch unbiased variances averaged (what the official precise BN computes), close to the pooled one
    assert torch.allclose(bn.running_var, allx.var(1), rtol=0.1)
    assert bn.momentum == 0.1


def test_fp16_on_cpu_is_a_config_error(tmp_path):
    cfg = load_config("tiny", ["train.amp=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(cfg, data=tmp_path, out=tmp_path / "run", progress=None)


# ------------------------------------------------------------------------------------------ real runs


def test_run_folder_and_loss_goes_down(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "classes.txt", "metrics.jsonl", "last.pt", "best.pt"} <= names
    recs = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(epochs) == 8
    for key in ("loss", "acc", "lr", "clips_per_s", "data_time", "grad_norm"):
        assert key in steps[0]
    assert "val_top1" in epochs[-1]
    first = np.mean([r["loss"] for r in steps[:3]])
    last = np.mean([r["loss"] for r in steps[-3:]])
    assert last < 0.75 * first, (first, last)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    ck = load_checkpoint(trained_run / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config", "classes", "version"):
        assert key in ck
    assert ck["epoch"] == 8 and ck["batches_done"] == 0
    assert ck["classes"] == (trained_run / "classes.txt").read_text().split()
    best = load_checkpoint(trained_run / "best.pt")
    assert best["best"]["metric"] == "val_top1"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("tiny", FAST + ["train.epochs=2", "train.batch_size=4", "train.save_every=1",
                                      "optim.warmup_epochs=0"])
    calls = []

    def poison(model, loss, step):  # during step 2 the weights go bad (as a huge update would make them)
        calls.append(step)
        if step == 1:
            with torch.no_grad():
                model.head.fc.weight.fill_(float("nan"))

    # the broken state of step 2 is never saved: caught before its checkpoint
    with pytest.raises(TrainingError, match=r"not finite at step 2 .*last good checkpoint: .*last.pt"):
        train(cfg, data=synthetic_data, out=out, progress=None, hooks={"after_backward": poison})
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 1
    # without a checkpoint in between, the NaN loss of the next step stops the run
    cfg.train.save_every = 0
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 .*last good checkpoint: none yet"):
        train(cfg, data=synthetic_data, out=tmp_path / "run2", progress=None, hooks={"after_backward": poison})
    assert not (tmp_path / "run2" / "last.pt").exists()
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_cli_exit_codes(synthetic_data, tmp_path):
    r = _nlvid("train", synthetic_data, "--config", "tiny", "--set", "optim.nope=1", "--out", tmp_path / "a")
    assert r.returncode == 2 and "optim.nope" in r.stderr
    r = _nlvid("train", tmp_path / "does_not_exist", "--config", "tiny", "--out", tmp_path / "b")
    assert r.returncode == 1 and "does_not_exist" in r.stderr
    r = _nlvid("train", synthetic_data, "--config", "tiny", "--set", "optim.lr=1.0e+10", "--set", "train.epochs=4",
               "--set", "optim.warmup_epochs=0", *sum((["--set", s] for s in FAST), []), "--out", tmp_path / "c")
    assert r.returncode == 1 and "stopped without saving" in r.stderr, r.stderr[-2000:]


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(synthetic_data, tmp_path):
    args = ["train", synthetic_data, "--config", "tiny", "--set", "train.epochs=2", "--set", "train.batch_size=2",
            "--set", "train.save_every=3", "--set", "train.seed=5", *sum((["--set", s] for s in FAST), [])]
    ref = _nlvid(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "nlvid", *map(str, args), "--out", str(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                ck = torch.load(last, weights_only=True)
            except Exception:
                ck = None
            if ck is not None and ck["batches_done"] > 0:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = (ck["epoch"], ck["batches_done"], ck["step"])
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run finished before a mid-epoch checkpoint was seen"
    resumed_from = load_checkpoint(last)
    assert resumed_from["batches_done"] > 0  # the newest checkpoint is a mid-epoch one
    res = _nlvid(*args, "--out", tmp_path / "cut")  # re-running into the run folder resumes
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resum" in res.stderr
    a, b = _weights(tmp_path / "ref" / "last.pt"), _weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r.get("loss", r.get("train_loss")) for r in ra] == [r.get("loss", r.get("train_loss")) for r in rb]


def test_options_run_together_init_bf16_precise_bn_step_schedule(trained_run, synthetic_data, tmp_path):
    """Fine-tune from a checkpoint (--init nlvid=...) with bf16 autocast, precise BN, step decay, label smoothing,
    gradient clipping and accumulation, no validation split (best.pt by train accuracy)."""
    cfg = load_config("tiny", FAST + ["train.epochs=1", "train.batch_size=3", "train.accum_steps=2", "train.amp=bf16",
                                      "train.precise_bn_batches=2", "optim.schedule=step", "optim.label_smoothing=0.1",
                                      "optim.clip_grad_norm=1.0", "optim.warmup_epochs=0"])
    messages = []
    res = train(cfg, data=synthetic_data / "train", out=tmp_path / "ft", init=f"nlvid={trained_run / 'best.pt'}",
                progress=lambda ev, **d: messages.append((ev, d)))
    assert res["best_metric"] == "train_acc" and res["steps"] == 2  # 12 clips / 3 = 4 batches = 2 steps
    assert any(ev == "message" and "precise BN" in d["text"] for ev, d in messages)
    start = next(d for ev, d in messages if ev == "start")
    assert start["init"] and start["metric"] == "train_acc"
    rec = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["grad_norm"] > 0 and math.isfinite(rec["loss"])


def test_reporters_render_progress_and_tables():
    import io

    from rich.console import Console

    from nlvid.cli.train import LineReporter, RichReporter

    for cls, tty in ((LineReporter, False), (RichReporter, True)):
        buf = io.StringIO()
        rep = cls(Console(file=buf, force_terminal=tty, width=100))
        rep("start", run_dir="r", resumed=True, start_epoch=0, start_batch=2, step=2, epochs=1, steps_per_epoch=4,
            batches_per_epoch=4, total_steps=4, num_train=16, num_val=0, device="cpu", world_size=1, global_batch=4,
            metric="train_acc", classes=["a", "b"], init=[], model="tiny")
        rep("epoch_start", epoch=0, batches=4, first_batch=2, step=2)
        rec = {"kind": "step", "epoch": 1, "step": 4, "batch": 4, "batches": 4, "loss": 0.5, "acc": 0.75,
               "lr": 0.01, "clips_per_s": 10.0, "data_fraction": 0.1}
        rep("step", record=rec, log=True)
        rep("epoch", record={"epoch": 1, "step": 4, "train_loss": 0.5, "train_acc": 0.75, "lr": 0.0, "best": 0.75,
                             "is_best": True}, metric="train_acc")
        rep("end", result={})
        text = buf.getvalue()
        assert "resuming r from epoch 1, batch 2" in text and "TRAIN accuracy" in text
        assert "75.0%" in text


def test_reporters_show_a_first_scan_and_stay_quiet_for_a_cached_one():
    import io

    from rich.console import Console

    from nlvid.cli.train import LineReporter, RichReporter

    for cls, tty in ((LineReporter, False), (RichReporter, True)):
        buf = io.StringIO()
        rep = cls(Console(file=buf, force_terminal=tty, width=100))
        rep("scan_progress", split="val", done=40, total=40)  # all cached: nothing to show
        assert "scanning" not in buf.getvalue()
        for done in range(0, 101):
            rep("scan_progress", split="train", done=done, total=100)
        text = buf.getvalue()
        assert "scanning train" in text and "scanning val" not in text
        if cls is LineReporter:  # a line per tenth: 0, 10, ..., 100 files
            assert text.count("scanning train:") == 11 and "100/100 files probed" in text
