"""The quickstart demo (`bash run.sh demo`): every nlvid command once, end to end, on the default data.

    synthetic long-range dataset -> train the tiny NL model (its curves.png redrawn every epoch) -> list the runs
    -> evaluate (multi-view) -> predict a real clip -> visualise the attention hotspots -> print where everything
    is and what the numbers mean.

It runs the real CLI (`python -m nlvid ...`) so each step is exactly what a user would type; the commands are
echoed on stderr. `--fast` shrinks the data and the training budget (used by CI to test the demo itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository (scripts/..)
REAL_CLIP = ROOT.parent / "shared" / "data" / "videos" / "arm_wrestling_demo.mp4"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run(args: list[str], *, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "nlvid", *args]
    _say(f"\n$ nlvid {' '.join(shlex.quote(a) for a in args)}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        _say(f"[demo] step failed (exit {proc.returncode}): nlvid {' '.join(args)}")
        sys.exit(proc.returncode)
    return proc.stdout or ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="run.sh demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where the demo writes (default: demo_out/)")
    parser.add_argument("--fast", action="store_true", help="tiny data and budget (CI smoke run of the demo)")
    parser.add_argument("--clip", default=str(REAL_CLIP), help="real clip for predict (default: a Kinetics clip)")
    opts = parser.parse_args(argv)

    out = Path(opts.out).resolve()
    data, run, viz = out / "data", out / "run", out / "viz"
    t0 = time.time()
    per_class = "6" if opts.fast else "60"
    train_extra = ["--set", "train.epochs=1"] if opts.fast else []

    if not (data / "annotations.json").exists():
        _run(["synth", str(data), "--classes", "4", "--clips-per-class", per_class, "--seed", "0"])
    else:
        _say(f"[demo] reusing the synthetic dataset in {data}")
    _run(["train", str(data), "--config", "tiny", "--out", str(run), *train_extra])
    _run(["runs", str(out)])  # the demo's folder as `nlvid runs` sees it: one finished run
    curves = run / "curves.png"
    if not curves.exists():
        _say(f"[demo] {curves} was not drawn (matplotlib missing? pip install 'nlvid[plot]')")
    ckpt = run / "best.pt"
    report = json.loads(_run(["eval", str(ckpt), str(data), "--json", "--out", str(run / "eval")], capture=True))

    clip = Path(opts.clip)
    predict_args = ["predict", str(clip), "--checkpoint", str(ckpt), "--topk", "3"]
    if clip.exists():
        _run(predict_args)
    else:
        _say(f"[demo] {clip} not found; skipping the real-clip prediction")
    val_clip = sorted((data / "val").rglob("*.mp4"))[0]
    _run(["visualize", str(val_clip), "--checkpoint", str(ckpt), "--out", str(viz)])

    pngs = sorted(p.name for p in viz.glob("*.png"))
    print(
        "\n".join(
            [
                "",
                f"nlvid demo finished in {time.time() - t0:.0f} s",
                f"  data         {data}  (synthetic long-range dataset: the label depends on two objects far apart",
                "               in space and time; the C2D baseline without NL blocks stays at chance on it)",
                f"  run folder   {run}  (config.yaml, metrics.jsonl, last.pt, best.pt)",
                f"  curves       {curves if curves.exists() else 'not drawn (needs matplotlib)'}  (loss, top-1, "
                "learning rate, throughput per step; best epoch starred)",
                f"  evaluation   video top-1 {report['top1']:.1%}, "
                f"mean class accuracy {report['mean_class_accuracy']:.1%} over {report['num_videos']} held-out videos",
                f"               (chance is {1 / len(report['per_class']):.0%}; "
                f"confusion matrix and predictions in {run / 'eval'})",
                f"  attention    {viz}  ({', '.join(pngs[:3])}{' ...' if len(pngs) > 3 else ''}; hotspots.json)",
                "               each picture: the query (green ring) and its top keys across frames, heat = weight",
                "",
                "Next: train on your own folder of videos with `nlvid train path/to/videos --config tiny` (see README).",
            ]
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
