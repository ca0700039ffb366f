"""Where the trained attention looks: for every trained NL run of an `experiments/table2.py` output folder, how
often a query on one deciding object puts its top-10 keys on the other object, against chance
(`localization_score` below, on the held-out clips), for the trained network and for the same network at its
initialisation (same seed), per NL block.

    .venv/bin/python experiments/localisation.py runs/table2        # after experiments/table2.py --out runs/table2

Reads OUT/runs/*/last.pt (runs stopped before their last epoch are skipped) and the synthetic data folder
OUT/data-*; prints a markdown table.
About 5 s per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nlvid.checkpoint import load_checkpoint
from nlvid.config import model_kwargs
from nlvid.errors import NlvidError
from nlvid.models import AttentionRecorder, create_model, load_model
from nlvid.viz.attention import (
    GridMap,
    block_instantiation,
    display_weights,
    key_pool_for,
    model_input,
    nl_blocks,
    read_clip_indexed,
    resolve_blocks,
    rows_fn,
)


def _overlap_fraction(box: Sequence[float], obj: Sequence[float]) -> float:
    """Area of box inside obj / area of box."""
    ix = max(0.0, min(box[2], obj[2]) - max(box[0], obj[0]))
    iy = max(0.0, min(box[3], obj[3]) - max(box[1], obj[1]))
    area = max(1e-9, (box[2] - box[0]) * (box[3] - box[1]))
    return ix * iy / area


def _frames_overlap(frames: Sequence[int], grid: GridMap, span: Sequence[int]) -> bool:
    return any(span[0] <= grid.source_frame(i) <= span[1] for i in frames)


def localization_score(
    model: torch.nn.Module,
    root: str | Path,
    *,
    split: str = "val",
    block: str | None = None,
    num_frames: int,
    stride: int,
    short_side: int,
    mean: Sequence[float],
    std: Sequence[float],
    topk: int = 20,
    max_clips: int | None = None,
) -> dict[str, Any]:
    """How often a query on one decisive object attends to the other object, against chance.

    For every clip of `split` in `root/annotations.json` (written by `nlvid.data.write_synthetic`) with at least two
    objects: decode the clip as `nlvid visualize` does (full view), and for every query cell whose centre lies
    inside an object's box in a frame where that object is visible, take its top-k keys (display weights).
    hit = mean over those keys of the key cell's area fraction inside ANOTHER object's box (when the key's frames
    overlap that object's frames); chance = the same fraction averaged over all key cells. Returns
    {"hit_rate", "chance_rate", "ratio", "num_queries", "num_clips", "block", "topk"}.
    """
    root = Path(root)
    ann = json.loads((root / "annotations.json").read_text())
    clips = [(rel, c) for rel, c in sorted(ann["clips"].items()) if rel.startswith(split + "/")]
    clips = [(rel, c) for rel, c in clips if len(c.get("objects", [])) >= 2]
    if max_clips is not None:
        clips = clips[:max_clips]
    if not clips:
        raise NlvidError(f"{root / 'annotations.json'}: no {split} clips with two or more objects")
    name = resolve_blocks(model, block)[0]
    module = nl_blocks(model)[name]
    inst = block_instantiation(module)
    hit_sum = chance_sum = 0.0
    n_q = 0
    model.eval()
    for rel, info in clips:
        decoded = read_clip_indexed(root / rel, num_frames=num_frames, stride=stride, view="full",
                                    short_side=short_side)
        T, H, W, _ = decoded.frames.shape
        clip, box = model_input(decoded.frames, view="full", short_side=short_side, mean=mean, std=std,
                                model_frames=decoded.model_frames)
        with torch.no_grad(), AttentionRecorder(model, blocks=[name]) as rec:
            model(clip)
            qgrid = tuple(rec.inputs[name].shape[-3:])
            rows = rows_fn(rec, name)
            _, kgrid = rows(torch.zeros(1, 3, dtype=torch.long))
            grid = GridMap(tuple(clip.shape[-3:]), qgrid, kgrid, key_pool_for(module, qgrid, kgrid), box, (W, H),
                           tuple(decoded.source_frames))
            key_cells = grid.key_cells()
            objs = info["objects"]
            # membership[o][j]: area fraction of key j inside object o (0 when no frame overlaps)
            member = np.zeros((len(objs), len(key_cells)))
            for o, ob in enumerate(objs):
                for j, kc in enumerate(key_cells):
                    if _frames_overlap(grid.frames_of_kt(int(kc[0])), grid, ob["frames"]):
                        member[o, j] = _overlap_fraction(grid.key_box(kc), ob["box"])
            for o, ob in enumerate(objs):
                others = [p for p in range(len(objs)) if p != o]
                other_member = member[others].max(0)  # (Nk,)
                cells = []
                for ti in range(qgrid[0]):
                    if not _frames_overlap(grid.frames_of_qt(ti), grid, ob["frames"]):
                        continue
                    for hi in range(qgrid[1]):
                        for wi in range(qgrid[2]):
                            cx, cy = grid.query_center((ti, hi, wi))
                            bx = ob["box"]
                            if bx[0] <= cx < bx[2] and bx[1] <= cy < bx[3]:
                                cells.append((ti, hi, wi))
                if not cells:
                    continue
                raw, _ = rows(torch.tensor(cells, dtype=torch.long))
                dw = display_weights(raw, inst)
                idx = dw.topk(max(1, min(topk, dw.shape[-1])), dim=-1).indices.numpy()  # (Q, k)
                hit_sum += float(other_member[idx].mean(1).sum())
                chance_sum += float(other_member.mean()) * len(cells)
                n_q += len(cells)
    hit = hit_sum / max(1, n_q)
    chance = chance_sum / max(1, n_q)
    return {
        "hit_rate": hit,
        "chance_rate": chance,
        "ratio": hit / chance if chance > 0 else float("nan"),
        "num_queries": n_q,
        "num_clips": len(clips),
        "block": name,
        "topk": topk,
    }


def describe(model_cfg) -> str:
    inst = model_cfg.instantiation or "embedded_gaussian"
    mode = model_cfg.mode or "spacetime"
    blocks = model_cfg.nonlocal_blocks
    where = "res3 + res4" if blocks is None else " + ".join(sorted(blocks))
    return f"{inst}, {mode}, {where}"


def finished_runs(out: Path, *, key=describe):
    """The NL runs of a table2 --out folder that finished their epochs, once per (key(model config), seed), each
    with the same network at its initialisation: yields (run folder, trained model, init model, config)."""
    seen: set[tuple[str, int]] = set()
    for run in sorted(p for p in (out / "runs").glob("*") if (p / "last.pt").exists()):
        epoch = load_checkpoint(run / "last.pt")["epoch"]
        model, _, cfg = load_model(run / "last.pt")
        if not list(nl_blocks(model)) or (key(cfg.model), cfg.train.seed) in seen:
            continue  # the baseline, or the same network and seed trained under another row's name
        if epoch < cfg.train.epochs:
            print(f"{run.name}: skipped, stopped at epoch {epoch} of {cfg.train.epochs}", file=sys.stderr)
            continue
        seen.add((key(cfg.model), cfg.train.seed))
        torch.manual_seed(cfg.train.seed)  # the engine seeds like this before building the network
        yield run, model, create_model(cfg.model.name, **model_kwargs(cfg.model)), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the --out folder of experiments/table2.py")
    ap.add_argument("--topk", type=int, default=10)
    args = ap.parse_args()

    datas = sorted(args.out.glob("data-*"))
    if len(datas) != 1:
        sys.exit(f"error: expected one data-* folder in {args.out}, found {len(datas)}")
    groups: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for run, model, init, cfg in finished_runs(args.out):
        blocks = list(nl_blocks(model))
        d = cfg.data
        kw = dict(num_frames=d.num_frames, stride=d.stride, short_side=d.test_short_side, mean=d.mean, std=d.std,
                  topk=args.topk)
        for block in blocks:
            s = localization_score(model, datas[0], block=block, **kw)["ratio"]
            s0 = localization_score(init, datas[0], block=block, **kw)["ratio"]
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
