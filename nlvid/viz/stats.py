"""What a Non-local block's attention learned, as numbers: reach, query dependence and entropy, per block.

Every statistic is computed on display weights a_ij (`nlvid.viz.attention.display_weights`): softmax rows as they
are (gaussian, embedded_gaussian, global_context); dot_product and concatenation f/N' clamped at 0 and divided by
the row sum. Rows that are all <= 0 have no distribution and are left out (counted as `empty_rows`). i runs over
EVERY query cell of the block's input grid, j over the key grid; n' is the number of keys a query may see (t'h'w'
in spacetime mode, h'w' in space mode, t' in time mode).

Reach (how far attention goes), from the cell centres of `GridMap.query_centres` / `key_centres`:
    time   d_ij = |frame_i - frame_j| in frames of the model's input clip (multiply by the clip's stride for video
           frames); reach_i = sum_j a_ij d_ij; reported: the mean over queries, the histogram of attention mass
           over d (1-frame bins, mass per query), and the share of mass on keys MORE than 1 frame away.
    space  d_ij = Euclidean distance between the cell centres within the frame, in input pixels and as a fraction
           of the input width W; same mean, histogram (bins of 5% of W) and far share (d > 25% of W).
Query dependence (do different queries look at different keys?), within each group of queries that see the same
keys (all queries in spacetime mode, one frame in space mode, one (h, w) in time mode), averaged over groups
weighted by their queries:
    cosine_distance  the mean over pairs i != i' of 1 - cos(a_i, a_i'): GCNet's measure (Cao et al. 2019, sec. 3:
                     "the cosine distance between attention maps of different query positions"); computed exactly
                     in one pass from S = sum_i a_i/|a_i|: mean cos = (|S|^2 - n) / (n (n - 1)).
    jsd              the generalised Jensen-Shannon divergence of the rows, H(mean row) - mean_i H(a_i), in nats
                     (0 .. log n'; the mutual information between the query and the key it picks).
    unary_share      |m|^2 / mean_i |a_i|^2 with m the mean row: the share of the rows' energy (sum of squares) in
                     the part every query shares, a key's average attention (1: every row the same; 1/n' for one-hot
                     rows spread evenly over the keys).
Entropy: H_i = -sum_j a_ij log a_ij (nats, 0 log 0 = 0) against log n'; effective number of keys exp(H_i) against
n' (mean over queries, and a histogram of exp(H_i) / n').

A block's rows are computed in chunks of at most `STATS_CHUNK_ELEMENTS` weights (`rows(cells)` computes only the
rows asked for, `NonLocalBlock.attention_rows`), so the N x N' matrix is never held. Over several clips the
numbers are means over all queries of all clips (query dependence: per clip and group, then the weighted mean)
and the histograms are summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nlvid.data.dataset import VIDEO_EXTENSIONS
from nlvid.errors import ConfigError, DatasetError
from nlvid.models import AttentionRecorder
from nlvid.viz.attention import (
    GridMap,
    block_instantiation,
    display_weights,
    key_pool_for,
    model_input,
    nl_blocks,
    normalisation_note,
    read_clip_indexed,
    rows_fn,
)

STATS_CHUNK_ELEMENTS = 1 << 20  # weights per attention_rows call (a few (Q, Nk) float temporaries per chunk)
TIME_BIN = 1.0  # frames
SPACE_BIN = 0.05  # fraction of the input width
SPACE_MAX = 1.5  # last space bin: >= 1.45 W (a square frame's diagonal is 1.41 W)
FAR_FRAMES = 1.0  # "far in time": more than this many frames
FAR_WIDTH = 0.25  # "far in space": more than this fraction of the width
EFF_BINS = 20  # histogram of exp(H) / n'

Rows = Callable[[torch.Tensor], "tuple[torch.Tensor, tuple[int, int, int]]"]


def keys_per_query(mode: str, key_grid: Sequence[int]) -> int:
    """n': the keys one query may see in `mode` on the key grid (t', h', w')."""
    kt, kh, kw = (int(v) for v in key_grid)
    return {"space": kh * kw, "time": kt}.get(mode, kt * kh * kw)


def query_groups(mode: str, query_grid: Sequence[int]) -> np.ndarray:
    """(N,) group id of every query cell in flattened (t, h, w) order: queries of one group see the same keys."""
    t, h, w = (int(v) for v in query_grid)
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    if mode == "space":
        g = tt
    elif mode == "time":
        g = hh * w + ww
    else:
        g = np.zeros_like(tt)
    return g.reshape(-1)


def _entropy(a: torch.Tensor) -> torch.Tensor:
    """(..., n) rows summing to 1 (or 0) -> (...,) entropy in nats, 0 log 0 = 0."""
    return -(a * torch.log(a.clamp_min(1e-30))).sum(-1)


@dataclass
class Histogram:
    edges: list[float]  # bin edges (len = bins + 1); the last bin also holds everything beyond it
    mass: list[float]  # attention mass per bin, per query (sums to 1 over the bins)

    def to_json(self, scale: float | None = None) -> dict[str, Any]:
        d = {"edges": [round(e, 4) for e in self.edges], "mass": [round(m, 6) for m in self.mass]}
        if scale is not None:
            d["edges_px"] = [round(e * scale, 2) for e in self.edges]
        return d


@dataclass
class BlockStats:
    """The statistics of one block over `clips` clips (definitions in the module doc)."""

    name: str
    instantiation: str | None
    mode: str
    query_grid: tuple[int, int, int]
    key_grid: tuple[int, int, int]
    input_shape: tuple[int, int, int]  # T, H, W of the model input
    keys: int  # n'
    clips: int
    queries: int  # rows counted (all clips)
    empty_rows: int
    time_reach: float  # frames
    time_far_share: float
    time_hist: Histogram
    space_reach: float  # fraction of the width
    space_far_share: float
    space_hist: Histogram
    cosine_distance: float
    jsd: float
    unary_share: float
    entropy: float  # nats
    effective_keys: float
    effective_hist: Histogram  # over exp(H) / n'
    stride: int | None = None  # input frame -> video frames, when known

    @property
    def normalisation(self) -> str:
        return normalisation_note(self.instantiation)

    @property
    def width_px(self) -> int:
        return int(self.input_shape[2])

    def to_json(self) -> dict[str, Any]:
        W = self.width_px
        return {
            "block": self.name,
            "instantiation": self.instantiation,
            "mode": self.mode,
            "weights": self.normalisation,
            "clips": self.clips,
            "queries": self.queries,
            "empty_rows": self.empty_rows,
            "query_grid": list(self.query_grid),
            "key_grid": list(self.key_grid),
            "keys_per_query": self.keys,
            "input_shape": list(self.input_shape),
            "reach": {
                "time": {
                    "unit": "frames of the model input"
                    + (f" (x {self.stride} for video frames)" if self.stride else ""),
                    "mean": round(self.time_reach, 4),
                    "share_beyond_1_frame": round(self.time_far_share, 6),
                    "hist": self.time_hist.to_json(),
                },
                "space": {
                    "unit": f"fraction of the input width ({W} px); *_px: input pixels",
                    "mean": round(self.space_reach, 4),
                    "mean_px": round(self.space_reach * W, 2),
                    "share_beyond_25pct_width": round(self.space_far_share, 6),
                    "hist": self.space_hist.to_json(scale=W),
                },
            },
            "query_dependence": {
                "cosine_distance": round(self.cosine_distance, 6),
                "cosine_distance_is": "GCNet's measure: mean over query pairs of 1 - cos(row_i, row_i')",
                "jsd": round(self.jsd, 6),
                "jsd_is": "generalised Jensen-Shannon divergence of the rows, H(mean row) - mean H(row), nats",
                "unary_share": round(self.unary_share, 6),
                "unary_share_is": "|mean row|^2 / mean |row|^2: the part a key's average attention explains",
                "within": {"spacetime": "all queries", "space": "one frame", "time": "one (h, w)"}.get(self.mode),
            },
            "entropy": {
                "mean_nats": round(self.entropy, 6),
                "max_nats": round(math.log(self.keys), 6) if self.keys > 0 else 0.0,
                "effective_keys": round(self.effective_keys, 4),
                "keys": self.keys,
                "effective_fraction": round(self.effective_keys / max(1, self.keys), 6),
                "hist_effective_fraction": self.effective_hist.to_json(),
            },
        }


class StatsAccumulator:
    """Running sums for one block over one or more clips: `add(cells, weights)` per chunk of display-weight rows,
    `end_clip()` after each clip's rows, `result()` at the end. Histogram edges are fixed in frames / fractions of
    the width, so clips of different sizes add up."""

    def __init__(self, name: str, *, instantiation: str | None, mode: str, num_frames: int,
                 stride: int | None = None) -> None:
        self.name, self.instantiation, self.mode, self.stride = name, instantiation, mode, stride
        n_t = max(1, int(math.ceil(num_frames / TIME_BIN)))
        self.time_edges = torch.arange(n_t + 1, dtype=torch.float64) * TIME_BIN
        n_s = int(round(SPACE_MAX / SPACE_BIN))
        self.space_edges = torch.arange(n_s + 1, dtype=torch.float64) * SPACE_BIN
        self.eff_edges = torch.linspace(0, 1, EFF_BINS + 1, dtype=torch.float64)
        self.time_mass = torch.zeros(n_t, dtype=torch.float64)
        self.space_mass = torch.zeros(n_s, dtype=torch.float64)
        self.eff_count = torch.zeros(EFF_BINS, dtype=torch.float64)
        self.sums = dict.fromkeys(("time", "time_far", "space", "space_far", "entropy", "eff"), 0.0)
        self.rows = self.empty = self.clips = 0
        self.dep = dict.fromkeys(("cos", "jsd", "unary", "n"), 0.0)
        self.geometry: tuple | None = None
        self._clip: dict[str, Any] | None = None

    def begin_clip(self, grid: GridMap) -> None:
        """Geometry of the next clip's block: centres, groups, n'."""
        q = torch.from_numpy(grid.query_centres())  # (N, 3) frame, y, x
        k = torch.from_numpy(grid.key_centres())  # (Nk, 3)
        n_keys = keys_per_query(self.mode, grid.key_grid)
        groups = torch.from_numpy(query_groups(self.mode, grid.query_grid)).long()  # (N,)
        G, Nk = int(groups.max()) + 1, k.shape[0]
        W = float(grid.input_shape[2])
        self.geometry = (tuple(grid.query_grid), tuple(grid.key_grid), tuple(grid.input_shape), n_keys)
        self._clip = {
            "q": q, "k": k, "W": W, "n_keys": n_keys, "groups": groups, "Nq": q.shape[0],
            "unit_sum": torch.zeros(G, Nk, dtype=torch.float64),  # sum of rows / |row|
            "row_sum": torch.zeros(G, Nk, dtype=torch.float64),  # sum of rows
            "sq_sum": torch.zeros(G, dtype=torch.float64),  # sum of |row|^2
            "h_sum": torch.zeros(G, dtype=torch.float64),  # sum of row entropies
            "count": torch.zeros(G, dtype=torch.float64),
        }

    def add(self, cells: torch.Tensor, weights: torch.Tensor) -> None:
        """cells (Q, 3) long query cells (t, h, w); weights (Q, Nk) display weights over the key grid."""
        c = self._clip
        if c is None:
            raise ValueError("StatsAccumulator.add before begin_clip")
        a = weights.double()
        keep = a.sum(-1) > 0
        self.empty += int((~keep).sum())
        if not keep.any():
            return
        a, cells = a[keep], cells[keep]
        _, gh, gw = (int(v) for v in self.geometry[0])
        flat = (cells[:, 0] * gh + cells[:, 1]) * gw + cells[:, 2]  # (Q,) flattened (t, h, w) index
        q = c["q"][flat]  # (Q, 3)
        k = c["k"]
        dt = (q[:, None, 0] - k[None, :, 0]).abs()  # (Q, 1) - (1, Nk) -> (Q, Nk) frames
        ds = torch.hypot(q[:, None, 1] - k[None, :, 1], q[:, None, 2] - k[None, :, 2]) / c["W"]  # (Q, Nk)
        s = self.sums
        s["time"] += float((a * dt).sum())
        s["time_far"] += float((a * (dt > FAR_FRAMES + 1e-9)).sum())
        s["space"] += float((a * ds).sum())
        s["space_far"] += float((a * (ds > FAR_WIDTH + 1e-9)).sum())
        nt, ns = len(self.time_mass), len(self.space_mass)
        it = torch.bucketize(dt + 1e-9, self.time_edges, right=True).sub_(1).clamp_(0, nt - 1)  # (Q, Nk) bin index
        is_ = torch.bucketize(ds + 1e-9, self.space_edges, right=True).sub_(1).clamp_(0, ns - 1)
        self.time_mass += torch.bincount(it.flatten(), weights=a.flatten(), minlength=nt)
        self.space_mass += torch.bincount(is_.flatten(), weights=a.flatten(), minlength=ns)
        h = _entropy(a)  # (Q,)
        eff = torch.exp(h)
        s["entropy"] += float(h.sum())
        s["eff"] += float(eff.sum())
        frac = (eff / max(1, c["n_keys"])).clamp(0, 1)
        ie = torch.bucketize(frac, self.eff_edges, right=True).sub_(1).clamp_(0, EFF_BINS - 1)
        self.eff_count += torch.bincount(ie, minlength=EFF_BINS).double()
        self.rows += a.shape[0]
        g = c["groups"][flat]  # (Q,)
        norm = a.norm(dim=-1, keepdim=True)  # (Q, 1)
        c["unit_sum"].index_add_(0, g, a / norm)
        c["row_sum"].index_add_(0, g, a)
        c["sq_sum"].index_add_(0, g, (a * a).sum(-1))
        c["h_sum"].index_add_(0, g, h)
        c["count"].index_add_(0, g, torch.ones_like(h))

    def end_clip(self) -> None:
        """Close the clip: per-group query dependence, weighted by the group's queries."""
        c = self._clip
        if c is None:
            return
        n = c["count"]
        ok = n > 0
        if ok.any():
            n_ok = n[ok]
            pairs = n_ok > 1
            S2 = (c["unit_sum"][ok] ** 2).sum(-1)  # |sum_i u_i|^2 per group
            mean_cos = torch.where(pairs, (S2 - n_ok) / (n_ok * (n_ok - 1)).clamp_min(1), torch.ones_like(n_ok))
            m = c["row_sum"][ok] / n_ok[:, None]  # (G, Nk) mean row
            jsd = (_entropy(m) - c["h_sum"][ok] / n_ok).clamp_min(0)
            unary = ((m * m).sum(-1) / (c["sq_sum"][ok] / n_ok).clamp_min(1e-30)).clamp(0, 1)
            self.dep["cos"] += float(((1 - mean_cos).clamp_min(0) * n_ok).sum())
            self.dep["jsd"] += float((jsd * n_ok).sum())
            self.dep["unary"] += float((unary * n_ok).sum())
            self.dep["n"] += float(n_ok.sum())
        self.clips += 1
        self._clip = None

    def result(self) -> BlockStats:
        if self.geometry is None:
            raise ValueError("StatsAccumulator.result before any clip")
        qg, kg, shape, n_keys = self.geometry
        R = max(1, self.rows)
        s, d = self.sums, self.dep
        dn = max(1.0, d["n"])
        return BlockStats(
            name=self.name, instantiation=self.instantiation, mode=self.mode, query_grid=qg, key_grid=kg,
            input_shape=shape, keys=n_keys, clips=self.clips, queries=self.rows, empty_rows=self.empty,
            time_reach=s["time"] / R, time_far_share=s["time_far"] / R,
            time_hist=Histogram(self.time_edges.tolist(), (self.time_mass / R).tolist()),
            space_reach=s["space"] / R, space_far_share=s["space_far"] / R,
            space_hist=Histogram(self.space_edges.tolist(), (self.space_mass / R).tolist()),
            cosine_distance=d["cos"] / dn, jsd=d["jsd"] / dn, unary_share=d["unary"] / dn,
            entropy=s["entropy"] / R, effective_keys=s["eff"] / R,
            effective_hist=Histogram(self.eff_edges.tolist(), (self.eff_count / R).tolist()),
            stride=self.stride,
        )


def add_block_rows(acc: StatsAccumulator, rows: Rows, grid: GridMap) -> None:
    """One clip of one block into `acc`: every query cell's row, `STATS_CHUNK_ELEMENTS` weights at a time."""
    t, h, w = grid.query_grid
    nk = int(np.prod(grid.key_grid))
    cells = torch.from_numpy(np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
                             .reshape(-1, 3)).long()  # (t*h*w, 3) in flattened (t, h, w) order
    chunk = max(1, STATS_CHUNK_ELEMENTS // max(1, nk))
    acc.begin_clip(grid)
    for a in range(0, cells.shape[0], chunk):
        raw, _ = rows(cells[a : a + chunk])
        acc.add(cells[a : a + chunk], display_weights(raw, acc.instantiation))
    acc.end_clip()


def weights_stats(weights: torch.Tensor, grid: GridMap, *, mode: str = "spacetime", name: str = "block",
                  instantiation: str | None = "embedded_gaussian") -> BlockStats:
    """Statistics of a full (N, Nk) weight matrix (rows in flattened (t, h, w) query order) on `grid`: for checks
    on hand-made attention; a model's blocks go through `clip_stats` / `folder_stats` (rows in chunks)."""

    def rows(cells: torch.Tensor):
        _, gh, gw = grid.query_grid
        return weights[(cells[:, 0] * gh + cells[:, 1]) * gw + cells[:, 2]], grid.key_grid

    acc = StatsAccumulator(name, instantiation=instantiation, mode=mode, num_frames=grid.input_shape[0])
    add_block_rows(acc, rows, grid)
    return acc.result()


def _block_grid(module: torch.nn.Module, rows: Rows, x: torch.Tensor, clip_shape: Sequence[int]) -> GridMap:
    qgrid = tuple(int(v) for v in x.shape[-3:])
    _, kgrid = rows(torch.zeros(1, 3, dtype=torch.long))
    T, H, W = (int(v) for v in clip_shape)
    return GridMap((T, H, W), qgrid, tuple(kgrid), key_pool_for(module, qgrid, kgrid), (0.0, 0.0, float(W),
                   float(H)), (W, H))


def clip_stats(model: torch.nn.Module, clip: torch.Tensor, accumulators: dict[str, StatsAccumulator],
               device: str | torch.device = "cpu") -> None:
    """One forward pass of `clip` (1, 3, T, H, W); every block named in `accumulators` adds its rows."""
    model.eval()
    with torch.no_grad(), AttentionRecorder(model, blocks=list(accumulators)) as rec:
        model(clip.to(device))
        modules = nl_blocks(model)
        for name, acc in accumulators.items():
            rows = rows_fn(rec, name)
            grid = _block_grid(modules[name], rows, rec.inputs[name], clip.shape[-3:])
            add_block_rows(acc, rows, grid)


def new_accumulators(model: torch.nn.Module, blocks: Sequence[str], *, num_frames: int,
                     stride: int | None = None) -> dict[str, StatsAccumulator]:
    modules = nl_blocks(model)
    return {b: StatsAccumulator(b, instantiation=block_instantiation(modules[b]),
                                mode=str(getattr(modules[b], "mode", "spacetime")), num_frames=num_frames,
                                stride=stride) for b in blocks}


def list_videos(root: str | Path, num_clips: int | None = None) -> list[Path]:
    """Video files under `root` (recursive, sorted); `num_clips` of them evenly spread over that order (so a
    folder of class folders gives every class its share), or all."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder of videos", key="data")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DatasetError(f"{root}: no videos found (extensions: {', '.join(sorted(VIDEO_EXTENSIONS))})")
    if num_clips is not None and num_clips < len(files):
        idx = np.linspace(0, len(files) - 1, max(1, num_clips)).round().astype(int)
        files = [files[i] for i in sorted(set(idx.tolist()))]
    return files


@dataclass
class FolderStats:
    blocks: list[BlockStats]
    files: list[str] = field(default_factory=list)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {**extra, "clips": self.files, "blocks": [b.to_json() for b in self.blocks]}


def _one_clip(model, path, accs, *, num_frames, stride, short_side, mean, std, view, crop_size, device,
              start: float | None = None) -> None:
    decoded = read_clip_indexed(path, num_frames=num_frames, stride=stride, start=start, view=view,
                                short_side=short_side, crop_size=crop_size)
    clip, _ = model_input(decoded.frames, view=view, short_side=short_side, crop_size=crop_size, mean=mean, std=std,
                          model_frames=decoded.model_frames)
    clip_stats(model, clip, accs, device=device)


def clip_file_stats(model: torch.nn.Module, path: str | Path, *, blocks: Sequence[str], num_frames: int,
                    stride: int, short_side: int, mean: Sequence[float], std: Sequence[float], view: str = "full",
                    crop_size: int | None = None, device: str | torch.device = "cpu",
                    start: float | None = None) -> FolderStats:
    """The statistics of `blocks` on one clip of the video `path` (the clip `nlvid visualize` shows: centred,
    or from `start` seconds)."""
    accs = new_accumulators(model, blocks, num_frames=num_frames, stride=stride)
    _one_clip(model, path, accs, num_frames=num_frames, stride=stride, short_side=short_side, mean=mean, std=std,
              view=view, crop_size=crop_size, device=device, start=start)
    return FolderStats([a.result() for a in accs.values()], [str(path)])


def folder_stats(
    model: torch.nn.Module,
    files: Sequence[str | Path],
    *,
    blocks: Sequence[str],
    num_frames: int,
    stride: int,
    short_side: int,
    mean: Sequence[float],
    std: Sequence[float],
    view: str = "full",
    crop_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[..., None] | None = None,
) -> FolderStats:
    """The statistics of `blocks` over the clips of `files`: each video's centred clip, decoded and viewed as
    `nlvid visualize` does (`read_clip_indexed`, `model_input`). progress("clip", index=, total=, path=)."""
    accs = new_accumulators(model, blocks, num_frames=num_frames, stride=stride)
    for i, path in enumerate(files):
        if progress is not None:
            progress("clip", index=i, total=len(files), path=str(path))
        _one_clip(model, path, accs, num_frames=num_frames, stride=stride, short_side=short_side, mean=mean,
                  std=std, view=view, crop_size=crop_size, device=device)
    return FolderStats([a.result() for a in accs.values()], [str(f) for f in files])
