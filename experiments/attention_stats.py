"""What the NL (and Global Context) blocks of the small Table 2 learned: for every finished run of an
`experiments/table2.py` output folder, the attention statistics of `nlvid.viz.stats` (reach in frames and pixels,
query dependence, effective keys) on held-out clips, for the trained network and for the same network at its
initialisation (same seed), per block; mean over the runs of one model, with the per-seed values.

    .venv/bin/python experiments/attention_stats.py runs/table2                  # after table2.py --out runs/table2
    .venv/bin/python experiments/attention_stats.py runs/table2 --png docs/attention_stats_res3.png

Reads OUT/runs/*/last.pt (runs stopped before their last epoch are skipped) and OUT/data-*/val; prints a markdown
table. About 2 s per run and block on 2 CPU cores at --num-clips 16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from PIL import Image

from localisation import finished_runs  # experiments/localisation.py (this script's folder is on sys.path)
from nlvid.viz.attention import nl_blocks
from nlvid.viz.render import stats_figure
from nlvid.viz.stats import BlockStats, folder_stats, list_videos

COLUMNS = ("reach t (frames)", "> 1 frame", "reach xy (% W)", "> 25% W", "cos dist", "JSD", "unary",
           "eff. keys / n'")


def describe(model_cfg) -> str:
    inst = model_cfg.instantiation or "embedded_gaussian"
    mode = model_cfg.mode or "spacetime"
    return f"{inst}, {mode}"


def numbers(s: BlockStats) -> tuple[float, ...]:
    return (s.time_reach, 100 * s.time_far_share, 100 * s.space_reach, 100 * s.space_far_share, s.cosine_distance,
            s.jsd, s.unary_share, s.effective_keys / max(1, s.keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the --out folder of experiments/table2.py")
    ap.add_argument("--num-clips", type=int, default=16, help="held-out clips per run (evenly over the classes)")
    ap.add_argument("--png", type=Path, default=None, help="write res3's stats picture of the first trained "
                    "embedded-gaussian run to this file")
    args = ap.parse_args()

    datas = sorted(args.out.glob("data-*"))
    if len(datas) != 1:
        sys.exit(f"error: expected one data-* folder in {args.out}, found {len(datas)}")
    files = list_videos(datas[0] / "val", args.num_clips)
    rows: dict[tuple[str, str], list[tuple[int, tuple, tuple]]] = {}
    pictured = False
    for run, model, init, cfg in finished_runs(args.out, key=describe):
        blocks = list(nl_blocks(model))
        d = cfg.data
        kw = dict(blocks=blocks, num_frames=d.num_frames, stride=d.stride, short_side=d.test_short_side,
                  mean=d.mean, std=d.std, crop_size=d.test_crop_size)
        trained = folder_stats(model, files, **kw).blocks
        at_init = folder_stats(init, files, **kw).blocks
        for s, s0 in zip(trained, at_init):
            rows.setdefault((describe(cfg.model), s.name), []).append((cfg.train.seed, numbers(s), numbers(s0)))
            print(f"{run.name} {s.name}: reach {s.time_reach:.2f} frames (init {s0.time_reach:.2f}), cos dist "
                  f"{s.cosine_distance:.3f} (init {s0.cosine_distance:.3f})", file=sys.stderr, flush=True)
        if args.png is not None and not pictured and cfg.model.instantiation in (None, "embedded_gaussian"):
            res3 = next(s for s in trained if s.name.startswith("res3."))
            args.png.parent.mkdir(parents=True, exist_ok=True)
            stats_figure(res3).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(args.png, optimize=True)
            print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KB)", file=sys.stderr)
            pictured = True

    print(f"\nAttention statistics of the trained blocks vs the same networks at init, on {len(files)} held-out "
          f"clips of {datas[0].name} (8 frames x 64 px; `nlvid.viz.stats`; mean over seeds, trained / init)\n")
    print("| model (instantiation, mode) | block | seeds | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for (name, block), rs in sorted(rows.items()):
        cells = []
        for c in range(len(COLUMNS)):
            t = statistics.mean(r[1][c] for r in rs)
            i = statistics.mean(r[2][c] for r in rs)
            fmt = "{:.0f}" if "%" in COLUMNS[c] or c in (1, 3) else "{:.2f}" if c == 0 else "{:.3f}"
            cells.append(f"{fmt.format(t)} / {fmt.format(i)}")
        print(f"| {name} | {block} | {len(rs)} | " + " | ".join(cells) + " |")
    per = {k: ", ".join(f"s{r[0]}: {r[1][0]:.2f}/{r[1][4]:.3f}" for r in sorted(v)) for k, v in rows.items()}
    print("\nper seed, trained (reach t / cos dist): " + "; ".join(f"{k[0]} {k[1]}: {v}" for k, v in per.items()))


if __name__ == "__main__":
    main()
