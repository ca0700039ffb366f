"""Dataset scan at scale: `scan_dataset` on a folder of N videos, first scan vs cached scan, against the targets.

The folder (built in a temp dir, removed afterwards unless --keep): `--classes` class folders holding `--files`
hard links, round-robin over the clips in ../shared/data/videos (10 s Kinetics clips, HMDB/UCF AVIs, MKVs, a
rotated MOV, the damaged MP4), one truncated file in 1000 (unreadable: the skip path). Hard links, not symbolic
links: the scan keys its cache by resolved path, so symbolic links to 14 clips would be probed 14 times, not N.
Hard links share size and mtime with their source, which is all the cache checks.

Timed, in one process, in this order:
  first     no cache: every file is opened and probed (threads), the cache is written
  cached    the same folder again: one stat per file, no video opened
  changed   1% of the files replaced by fresh copies (new mtime) and 0.5% deleted: only those are probed again
Each line gives wall time, files/s and the CPU seconds of the process (all threads; `uptime` load is printed too:
on a shared machine the wall time of the first scan is what is left of 2 cores, the CPU time is the cost).

--cache-only N: time the cached scan of N files (e.g. 240000, Kinetics-400 scale) without probing them first: the
cache is written from the probe records of the distinct source clips (a hard link has its source's size, mtime
and metadata, so the records are exactly what a first scan would have written).

Targets (10,000 files, 2 cores): first scan < 60 s, cached scan < 2 s.

Run:  .venv/bin/python benchmarks/bench_scan.py [--files 10000] [--classes 100] [--workers W] [--cache-only N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "videos"
FIRST_TARGET_S, CACHED_TARGET_S, TARGET_FILES = 60.0, 2.0, 10_000


def build(root: Path, n_files: int, n_classes: int) -> dict[str, Path]:
    """The class folders of hard links; returns {link path: source clip}. The sources are copied once into the
    temp dir (a hard link into the read-only shared folder is not what a dataset looks like)."""
    src = root.parent / "sources"
    src.mkdir(parents=True)
    clips = []
    for p in sorted(VIDEOS.iterdir()):
        if p.suffix.lower() in {".mp4", ".avi", ".mkv", ".mov", ".webm"}:
            clips.append(Path(shutil.copy2(p, src / p.name)))
    if not clips:
        sys.exit(f"no clips in {VIDEOS}")
    broken = src / "truncated.mp4"
    data = (VIDEOS / "R6llTwEh07w.mp4").read_bytes() if (VIDEOS / "R6llTwEh07w.mp4").exists() else b"x" * 1000
    broken.write_bytes(data[: len(data) // 3])  # no moov atom: unreadable
    for c in range(n_classes):
        (root / f"class_{c:03d}").mkdir(parents=True)
    links = {}
    for i in range(n_files):
        s = broken if i % 1000 == 999 else clips[i % len(clips)]
        link = root / f"class_{i % n_classes:03d}" / f"v{i:07d}{s.suffix}"
        os.link(s, link)
        links[str(link)] = s
    return links


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def progress_printer(every: int):
    state = {"last": -1}

    def progress(done: int, total: int) -> None:
        step = done // every
        if step != state["last"] and (done % every == 0 or done == total):
            state["last"] = step
            print(f"  progress {done}/{total}", file=sys.stderr, flush=True)

    return progress


def row(name: str, n: int, wall: float, cpu: float, probed: int, target: float | None) -> str:
    verdict = "" if target is None else (" **met**" if wall < target else " missed")
    tgt = "" if target is None else f"< {target:.0f} s"
    per = f"{1e3 * cpu / probed:.2f}" if probed else "-"
    return (f"| {name} | {n} | {probed} | {wall:.2f} | {n / wall:,.0f} | {cpu:.2f} | {per} "
            f"| {tgt}{verdict} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=TARGET_FILES)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=None, help="probe threads (default: scan_dataset's)")
    ap.add_argument("--cache-only", type=int, default=None, metavar="N",
                    help="only time the cached scan of N files, cache written from the source clips' records")
    ap.add_argument("--keep", type=Path, default=None, help="build the folder here and keep it")
    args = ap.parse_args()

    os.environ.setdefault("NLVID_CACHE_DIR", tempfile.mkdtemp(prefix="nlvid-bench-cache-"))
    from nlvid.data import scan_dataset
    from nlvid.data.dataset import CACHE_NAME, _probe_record

    n = args.cache_only or args.files
    tmp = Path(tempfile.mkdtemp(prefix="nlvid-bench-scan-")) if args.keep is None else args.keep
    root = tmp / "data"
    try:
        t0 = time.perf_counter()
        links = build(root, n, args.classes)
        sources = sorted(set(links.values()))
        print(f"# scan_dataset at scale: {n:,} files in {args.classes} class folders (hard links to {len(sources)} "
              f"clips), {os.cpu_count()} cores, workers {args.workers or 'default'}\n")
        print(f"built in {time.perf_counter() - t0:.1f} s; load average before: {load()}\n")
        print("| scan | files | probed | wall s | files/s | CPU s | CPU ms per probed file | target |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        if args.cache_only:
            recs = {s: _probe_record(s) for s in sources}
            files = {os.path.realpath(link): recs[s] for link, s in links.items()}
            (root / CACHE_NAME).write_text(json.dumps({"version": 1, "files": files}, separators=(",", ":")))
            index, wall, cpu = timed(lambda: scan_dataset(root, workers=args.workers))
            assert index.probed == 0, index.probed
            print(row("cached", n, wall, cpu, 0, CACHED_TARGET_S * n / TARGET_FILES))
            print(f"\n(target scaled from {CACHED_TARGET_S:.0f} s per {TARGET_FILES:,} files; "
                  f"load average after: {load()})")
            return

        prog = progress_printer(max(1000, n // 10))
        first, wall1, cpu1 = timed(lambda: scan_dataset(root, workers=args.workers, progress=prog))
        assert first.probed == n and len(first.items) + len(first.unreadable) == n
        load1 = load()
        print(row("first (probe all)", n, wall1, cpu1, first.probed, FIRST_TARGET_S if n == TARGET_FILES else None))
        again, wall2, cpu2 = timed(lambda: scan_dataset(root, workers=args.workers))
        assert again.probed == 0 and again.items == first.items
        print(row("cached", n, wall2, cpu2, 0, CACHED_TARGET_S if n == TARGET_FILES else None))

        paths = [p for p, _ in first.items]
        changed = paths[::100]
        deleted = paths[50::200]
        for p in changed:
            p.unlink()
            shutil.copyfile(links[str(p)], p)  # new inode, new mtime
        for p in deleted:
            p.unlink()
        third, wall3, cpu3 = timed(lambda: scan_dataset(root, workers=args.workers))
        assert third.probed == len(changed), (third.probed, len(changed))
        assert len(third.items) + len(third.unreadable) == n - len(deleted)
        print(row("1% changed, 0.5% deleted", n - len(deleted), wall3, cpu3, third.probed, None))

        print(f"\nunreadable (skipped, listed in the index): {len(first.unreadable)}; "
              f"load average after the first scan: {load1}, at the end: {load()}")
        print(f"first scan: {1e3 * cpu1 / n:.2f} ms CPU per file; on 2 idle cores at least {cpu1 / 2:.1f} s "
              f"(CPU time / 2), serial {cpu1:.1f} s")
        if n == TARGET_FILES:
            first_ok = "met" if wall1 < FIRST_TARGET_S else "MISSED"
            cached_ok = "met" if wall2 < CACHED_TARGET_S else "MISSED"
            print(f"targets at 10k files: first {wall1:.1f} s vs < {FIRST_TARGET_S:.0f} s ({first_ok}), "
                  f"cached {wall2:.2f} s vs < {CACHED_TARGET_S:.0f} s ({cached_ok})")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
