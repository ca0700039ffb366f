"""Where the trained attention looks: for every trained NL run of an `experiments/table2.py` output folder, how
often a query on one deciding object puts its top-10 keys on the other object, against chance
(`nlvid.viz.attention.localization_score` on the held-out clips), for the trained network and for the same network
at its initialisation (same seed), per NL block.

    .venv/bin/python experiments/localisation.py runs/table2        # after experiments/table2.py --out runs/table2

Reads OUT/runs/*/last.pt (runs stopped before their last epoch are skipped) and the synthetic data folder
OUT/data-*; prints a markdown table.
About 5 s per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def describe(model_cfg) -> str:
    inst = model_cfg.instantiation or "embedded_gaussian"
    mode = model_cfg.mode or "spacetime"
    blocks = model_cfg.nonlocal_blocks
    where = "res3 + res4" if blocks is None else " + ".join(sorted(blocks))
    return f"{inst}, {mode}, {where}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the --out folder of experiments/table2.py")
    ap.add_argument("--topk", type=int, default=10)
    args = ap.parse_args()

    import torch

    from nlvid.config import model_kwargs
    from nlvid.checkpoint import load_checkpoint
    from nlvid.models import load_model
    from nlvid.models import create_model
    from nlvid.viz import attention as A

    datas = sorted(args.out.glob("data-*"))
    if len(datas) != 1:
        sys.exit(f"error: expected one data-* folder in {args.out}, found {len(datas)}")
    runs = sorted(p for p in (args.out / "runs").glob("*") if (p / "last.pt").exists())
    groups: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    seen: set[tuple[str, int]] = set()
    for run in runs:
        epoch = load_checkpoint(run / "last.pt")["epoch"]
        model, _, cfg = load_model(run / "last.pt")
        blocks = list(A.nl_blocks(model))
        if not blocks or (describe(cfg.model), cfg.train.seed) in seen:
            continue  # the baseline, or the same network and seed trained under another row's name
        if epoch < cfg.train.epochs:
            print(f"{run.name}: skipped, stopped at epoch {epoch} of {cfg.train.epochs}", file=sys.stderr)
            continue
        seen.add((describe(cfg.model), cfg.train.seed))
        torch.manual_seed(cfg.train.seed)  # the engine seeds like this before building the network
        init = create_model(cfg.model.name, **model_kwargs(cfg.model))
        d = cfg.data
        kw = dict(num_frames=d.num_frames, stride=d.stride, short_side=d.test_short_side, mean=d.mean, std=d.std,
                  topk=args.topk)
        for block in blocks:
            s = A.localization_score(model, datas[0], block=block, **kw)["ratio"]
            s0 = A.localization_score(init, datas[0], block=block, **kw)["ratio"]
            groups.setdefault((describe(cfg.model), block), []).append((cfg.train.seed, s, s0))
            print(f"{run.name} {block}: trained {s:.2f}x, init {s0:.2f}x", file=sys.stderr, flush=True)

    print(f"\nTop-{args.topk} keys of a query on one deciding object that land on the other object, x chance "
          f"(held-out clips of {datas[0].name}); trained vs the same network at init\n")
    print("| model (instantiation, mode, NL stages) | block | trained | init | seeds: trained / init |")
    print("|---|---|---|---|---|")
    for (name, block), rs in sorted(groups.items()):
        rs.sort()
        per = ", ".join(f"{s:.2f} / {s0:.2f}" for _, s, s0 in rs)
        print(f"| {name} | {block} | {statistics.mean(r[1] for r in rs):.2f} | "
              f"{statistics.mean(r[2] for r in rs):.2f} | {per} |")


if __name__ == "__main__":
    main()
