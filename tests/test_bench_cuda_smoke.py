"""benchmarks/bench_cuda.py is the prepared script for issue #17's CUDA checks; no machine here has a GPU, so its
code runs here on CPU at toy sizes (`--device cpu --small`) to stay runnable for the session that gets one: every
section produces its rows, the JSON has them, and a missing CUDA device is a one-line error with exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cuda.py"


def test_every_section_runs_on_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "cuda.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--reps", "1", "--warmup", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## nonlocal" in proc.stdout and "## model" in proc.stdout and "## ddp" in proc.stdout
    res = json.loads(out.read_text())["results"]
    nl = res["nonlocal"]
    assert len(nl) == 3 * 4  # precisions x attention backends
    fp32 = [r for r in nl if r["precision"] == "fp32" and r["backend"] in ("auto", "math")]
    assert all("ms" in r and r["rel_diff_vs_fp32"] < 1e-4 for r in fp32), fp32
    assert any("error" in r for r in nl if r["backend"] == "efficient")  # no memory-efficient kernel on CPU: recorded
    model = res["model"]
    assert len(model) == 3 * 2  # precisions x input layouts
    assert all("train_ms" in r and r["infer_clips_per_s"] > 0 for r in model if r["precision"] == "fp32"), model
    assert "needs 2 GPUs" in res["ddp"][0]["error"]


def test_no_cuda_device_is_a_one_line_error():
    if torch.cuda.is_available():
        return  # on a GPU machine the default device is there
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "nonlocal"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "bench_cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu --small for a smoke run"]
