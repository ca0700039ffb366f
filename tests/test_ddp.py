"""DDP: `torchrun --nproc_per_node 2 -m nlvid train` (gloo, CPU) against one process with the same global batch.

Why the comparison is exact: with per-process batch B, process r takes the r-th contiguous slice of each global
batch of 2B (nlvid.engine.distributed.shard_batches). One process with batch B and accum_steps=2 runs exactly those
slices as micro-batches, so every BatchNorm normalises over the same B clips, and DDP's mean of the two gradients
equals the accumulated sum of the two half-weighted gradients. With one thread per process (torchrun; and
OMP_NUM_THREADS=1 for the single run) the float operations are the same too, so all PARAMETERS come out bit-equal
(measured: torch.equal on every parameter). What legitimately differs: BN running statistics (DDP keeps rank 0's,
updated from its slice only; the single run updates them from both micro-batches), so buffers are not compared.
One process with batch 2B (no accumulation) is NOT equal: its BN statistics cover 2B clips (SyncBatchNorm would
make DDP match that one, but torch has no CPU kernel for it). Dropout is off (masks are drawn per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlvid.checkpoint import load_checkpoint

from engine_settings import FAST  # tests/engine_settings.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(synthetic_data, tmp_path):
    common = ["train", str(synthetic_data), "--config", "tiny", "--set", "train.epochs=2", "--set", "model.dropout=0.0",
              "--set", "train.batch_size=2", "--set", "train.device=cpu", *sum((["--set", s] for s in FAST), [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "nlvid", *common, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stderr and ddp.stdout.count("run folder:") == 1  # only rank 0 prints
    one = subprocess.run([sys.executable, "-m", "nlvid", *common, "--set", "train.accum_steps=2",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "one" / "last.pt")
    assert a["step"] == b["step"] > 0
    params = [k for k, v in a["model"].items() if "running_" not in k and "num_batches_tracked" not in k]
    assert len(params) > 10
    for k in params:
        assert torch.equal(a["model"][k], b["model"][k]), k
