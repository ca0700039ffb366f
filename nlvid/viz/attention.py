"""Capture Non-local attention for a few chosen queries and map grid cells back to pixels of the original frames.

Shape legend used in this file:
    T, H, W     model input: frames and pixels of the clip tensor (1, 3, T, H, W)
    t, h, w     query grid = the NL block's input grid (res3 of an 8x8 C2D at 224 px: 4 x 28 x 28)
    t', h', w'  key grid = the block's max-pooled grid (pool (pt, ph, pw), 1x2x2 by default: 4 x 14 x 14)
    Nk          t' * h' * w' keys; Q queries

Mapping a cell back to pixels (`GridMap`), from tensor shapes only:
- query cell (t, h, w) covers input pixels [h*H/h, (h+1)*H/h) x [w*W/w, (w+1)*W/w) (strides of all the stages
  before the block collapse into H/h, W/w); its centre is (h + 0.5) * H/h;
- key cell (t', h', w') covers the query cells [h'*ph, (h'+1)*ph) (floor max-pooling), so its centre is
  (h' + 0.5) * ph * H/h: keys live on a coarser grid than queries;
- time: input frame i belongs to query cell floor((i + 0.5) * t / T) (temporal pooling in the stem/pool2 is an
  integer factor T/t) and to key cell (that cell) // pt;
- input pixels -> original pixels through the view's box (x0, y0, x1, y1) in the original frame:
  X = x0 + x * (x1 - x0) / W (the resize + crop applied for the model is undone); input frame i -> the video's
  frame `source_frames[i]`.

The model's input is made like eval/predict make theirs (`model_input`): `read_clip_indexed` picks the clip's
frames with `nlvid.data.sampling` and decodes them twice through `nlvid.data.decode.read_clips`, at the video's size
for the pictures and at the test short side for the model, and `nlvid.data.transforms.single_view` resizes, crops
and normalises. For the centre view and predict's single centred clip the model gets the same tensor.

Memory stays bounded on long clips and large frames: only query rows are computed, through
`AttentionRecorder.attention` (= `NonLocalBlock.attention_rows`), in chunks of at most `MAX_CHUNK_ELEMENTS`
weights; the full N x N' matrix is never formed here.

Display weights (`display_weights`): gaussian / embedded_gaussian / global_context rows are softmax rows (sum 1,
in [0, 1]) and are shown as they are (global_context's row is the same for every query: one map). dot_product and concatenation weights f/N' are not probabilities (dot products can be negative):
for display and ranking they are clamped at 0 and each row divided by its sum (a row that is all <= 0 stays 0).

Automatic query choice (`choose_queries`): every query cell in a temporal cell that has a shown frame is scored by
the concentration of its attention: the mass of its top-k display weights (k = --topk). Queries are taken greedily,
best score first, round-robin over temporal cells (the next query comes from the frame with the fewest queries so
far), and a chosen query suppresses the cells within `radius` cells (Chebyshev distance, same temporal cell;
radius = max(1, round(max(h, w) / 4))), so queries spread over frames and are not all in one spot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nlvid.data import probe
from nlvid.data.decode import read_clips
from nlvid.data.sampling import clip_indices, uniform_starts
from nlvid.data.transforms import VIEWS, Box, single_view, view_short_side
from nlvid.errors import ConfigError, NlvidError
from nlvid.models import AttentionRecorder
from nlvid.models.nonlocal_block import VARIANTS

PROBABILITY_INSTANTIATIONS = tuple(name for name, v in VARIANTS.items() if v.softmax)
MAX_CHUNK_ELEMENTS = 4_000_000  # weights per attention_rows call while scoring all query cells


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def nl_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """NL blocks of `model` by module name ("res3.nl.1"), in registration (= forward) order."""
    out = {}
    for name, m in model.named_modules():
        if name and hasattr(m, "attention_rows"):
            out[name] = m
    return out


def resolve_blocks(model: torch.nn.Module, block: str | None) -> list[str]:
    """--block -> block names. None: the first res3 block (the paper's Fig. 3), else the first NL block; "all"."""
    blocks = list(nl_blocks(model))
    if not blocks:
        raise ConfigError("this model has no Non-local blocks to visualise (a baseline preset?); use an _nl preset")
    if block is None:
        res3 = [b for b in blocks if b.startswith("res3.")]
        return [res3[0] if res3 else blocks[0]]
    if block == "all":
        return blocks
    if block not in blocks:
        raise ConfigError(f"block {block!r}: not an NL block of this model; its NL blocks: {', '.join(blocks)}, all",
                          key="block")
    return [block]


def block_instantiation(block: torch.nn.Module) -> str | None:
    inst = getattr(block, "instantiation", None)
    return str(inst) if inst is not None else None


def _as_triple(v: Any) -> tuple[int, int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v, v)
    try:
        t = tuple(int(x) for x in v)
    except TypeError:
        return None
    return t if len(t) == 3 else None


def key_pool_for(block: Any, query_grid: Sequence[int], key_grid: Sequence[int]) -> tuple[int, int, int]:
    """Query cells per key cell along (t, h, w): the block's pool size when it explains the key grid, else inferred."""
    cands = []
    kernel_for = getattr(block, "kernel_for", None)  # NonLocalBlock: pool size after mode masking and clipping
    if callable(kernel_for):
        cands.append(_as_triple(kernel_for(tuple(int(v) for v in query_grid))))
    cands.append(_as_triple(getattr(block, "pool_size", None)))
    pool = getattr(block, "pool", None)
    if pool is not None:
        cands.append(_as_triple(getattr(pool, "kernel_size", None)))
    for c in cands:
        if c is not None and all(p > 0 and q // p == k for q, p, k in zip(query_grid, c, key_grid)):
            return c
    # Floor pooling with kernel = stride p gives k = q // p; the smallest such p is q // k when it fits.
    out = []
    for q, k in zip(query_grid, key_grid):
        if k <= 0:
            raise NlvidError(f"empty key grid {tuple(key_grid)} for query grid {tuple(query_grid)}")
        p = max(1, q // k)
        while q // p > k:
            p += 1
        out.append(p)
    return tuple(out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Grid <-> pixels


@dataclass(frozen=True)
class GridMap:
    """Maps query/key grid cells of one NL block to frames and pixels of the original video (see module doc)."""

    input_shape: tuple[int, int, int]  # T, H, W of the model input
    query_grid: tuple[int, int, int]  # t, h, w
    key_grid: tuple[int, int, int]  # t', h', w'
    key_pool: tuple[int, int, int]  # query cells per key cell (pt, ph, pw)
    box: tuple[float, float, float, float]  # x0, y0, x1, y1: the original-frame region the input shows
    frame_size: tuple[int, int]  # W, H of the original frames
    source_frames: tuple[int, ...] = ()  # per input frame: index of the frame in the video

    # --- time
    def qt_of_frame(self, i: int) -> int:
        T, t = self.input_shape[0], self.query_grid[0]
        return min(t - 1, int(math.floor((i + 0.5) * t / T)))

    def kt_of_frame(self, i: int) -> int | None:
        kt = self.qt_of_frame(i) // self.key_pool[0]
        return kt if kt < self.key_grid[0] else None  # a trailing cell dropped by floor pooling has no key

    def frames_of_qt(self, t: int) -> list[int]:
        return [i for i in range(self.input_shape[0]) if self.qt_of_frame(i) == t]

    def frames_of_kt(self, kt: int) -> list[int]:
        return [i for i in range(self.input_shape[0]) if self.kt_of_frame(i) == kt]

    def source_frame(self, i: int) -> int:
        return int(self.source_frames[i]) if self.source_frames else int(i)

    # --- space: input -> original
    def _to_orig(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        _, H, W = self.input_shape
        return x0 + x * (x1 - x0) / W, y0 + y * (y1 - y0) / H

    def _cell_box(self, h: int, w: int, ph: int, pw: int) -> tuple[float, float, float, float]:
        _, H, W = self.input_shape
        _, gh, gw = self.query_grid
        sy, sx = H / gh, W / gw  # input pixels per query cell
        xa, ya = self._to_orig(w * pw * sx, h * ph * sy)
        xb, yb = self._to_orig((w + 1) * pw * sx, (h + 1) * ph * sy)
        return (xa, ya, xb, yb)

    def query_box(self, cell: Sequence[int]) -> tuple[float, float, float, float]:
        return self._cell_box(int(cell[1]), int(cell[2]), 1, 1)

    def key_box(self, cell: Sequence[int]) -> tuple[float, float, float, float]:
        return self._cell_box(int(cell[1]), int(cell[2]), self.key_pool[1], self.key_pool[2])

    def query_center(self, cell: Sequence[int]) -> tuple[float, float]:
        xa, ya, xb, yb = self.query_box(cell)
        return ((xa + xb) / 2, (ya + yb) / 2)

    def key_center(self, cell: Sequence[int]) -> tuple[float, float]:
        xa, ya, xb, yb = self.key_box(cell)
        return ((xa + xb) / 2, (ya + yb) / 2)

    # --- original -> grid
    def pixel_to_query(self, frame: int, x: float, y: float) -> tuple[int, int, int]:
        """Input frame index + original pixel (integer pixel = its centre) -> query cell. ConfigError if outside."""
        T, H, W = self.input_shape
        if not 0 <= frame < T:
            raise ConfigError(f"query frame {frame}: the clip has frames 0..{T - 1}", key="query")
        x0, y0, x1, y1 = self.box
        xi = (x + 0.5 - x0) * W / (x1 - x0)
        yi = (y + 0.5 - y0) * H / (y1 - y0)
        if not (0 <= xi < W and 0 <= yi < H):
            raise ConfigError(
                f"query pixel ({x:g}, {y:g}) is outside the region the model sees: x in [{x0:g}, {x1:g}), "
                f"y in [{y0:g}, {y1:g}) of the {self.frame_size[0]}x{self.frame_size[1]} frame", key="query"
            )
        _, gh, gw = self.query_grid
        return (self.qt_of_frame(frame), min(gh - 1, int(yi * gh / H)), min(gw - 1, int(xi * gw / W)))

    # --- centres on the model input, for distances (frames, input pixels)
    def query_centres(self) -> np.ndarray:
        """Every query cell's centre in flattened (t, h, w) order: (N, 3) float (frame, y, x) on the model input;
        frame in input-frame units (cell t covers frames [t*T/t_q, (t+1)*T/t_q)), y, x in input pixels."""
        return self._centres(self.query_grid, (1, 1, 1))

    def key_centres(self) -> np.ndarray:
        """Every key cell's centre in flattened (t', h', w') order: (Nk, 3) float (frame, y, x) on the model input;
        key cell t' spans query cells [t'*pt, (t'+1)*pt), so its centre sits at (t'*pt + pt/2) query cells."""
        return self._centres(self.key_grid, self.key_pool)

    def _centres(self, cells: Sequence[int], pool: Sequence[int]) -> np.ndarray:
        per_cell = np.array(self.input_shape, dtype=np.float64) / np.array(self.query_grid, dtype=np.float64)
        axes = [(np.arange(n) * p + p / 2) * s for n, p, s in zip(cells, pool, per_cell)]
        axes[0] = axes[0] - 0.5  # frames are indexed at their centres: cell [0, 2) of frames holds frames 0, 1
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (t, h, w, 3) -> (N, 3)

    def key_cells(self) -> np.ndarray:
        """All key cells in flattened (t', h', w') order: (Nk, 3)."""
        kt, kh, kw = self.key_grid
        return np.stack(np.meshgrid(np.arange(kt), np.arange(kh), np.arange(kw), indexing="ij"), -1).reshape(-1, 3)

    def key_heat_in_input(self, heat: np.ndarray) -> np.ndarray:
        """(h', w') key-cell values -> (h, w) query-grid map (each key cell repeated ph x pw; cells dropped by floor
        pooling stay 0); render.py resizes it over the view box."""
        _, gh, gw = self.query_grid
        _, ph, pw = self.key_pool
        up = np.kron(heat, np.ones((ph, pw), dtype=heat.dtype))  # (h'*ph, w'*pw)
        out = np.zeros((gh, gw), dtype=heat.dtype)
        out[: up.shape[0], : up.shape[1]] = up[:gh, :gw]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Weights


def display_weights(raw: torch.Tensor, instantiation: str | None) -> torch.Tensor:
    """(..., Nk) raw f/C(x) rows -> display weights in [0, 1] that sum to 1 per row (see module doc)."""
    raw = raw.float()
    if instantiation in PROBABILITY_INSTANTIATIONS:
        return raw
    w = raw.clamp_min(0)
    s = w.sum(-1, keepdim=True)
    return torch.where(s > 0, w / s.clamp_min(1e-30), torch.zeros_like(w))


def normalisation_note(instantiation: str | None) -> str:
    if instantiation in PROBABILITY_INSTANTIATIONS:
        return "softmax weights (rows sum to 1)"
    return f"{instantiation or 'raw'} f/N' weights: negatives -> 0, row / row sum"


def concentration(weights: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, Nk) display weights -> (Q,) mass of the top-k weights (1 = all attention on k keys)."""
    k = max(1, min(k, weights.shape[-1]))
    return weights.topk(k, dim=-1).values.sum(-1)


def choose_queries(
    scores: np.ndarray, n: int, *, radius: int | None = None, allowed_t: Sequence[int] | None = None
) -> list[tuple[int, int, int]]:
    """Greedy, round-robin over temporal cells, with non-maximum suppression (rule in the module doc).

    scores: (t, h, w) concentration per query cell; NaN or -inf = not a candidate.
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    s[~np.isfinite(s)] = -np.inf
    t, h, w = s.shape
    if allowed_t is not None:
        mask = np.ones(t, dtype=bool)
        mask[list(allowed_t)] = False
        s[mask] = -np.inf
    if radius is None:
        radius = max(1, round(max(h, w) / 4))
    counts = np.zeros(t, dtype=int)
    out: list[tuple[int, int, int]] = []
    while len(out) < n:
        alive = np.isfinite(s.reshape(t, -1)).any(1)
        if not alive.any():
            break
        least = counts[alive].min()
        rows = np.where(alive & (counts == least))[0]
        sub = np.full_like(s, -np.inf)
        sub[rows] = s[rows]
        qt, qh, qw = (int(v) for v in np.unravel_index(int(np.argmax(sub)), s.shape))
        out.append((qt, qh, qw))
        counts[qt] += 1
        s[qt, max(0, qh - radius) : qh + radius + 1, max(0, qw - radius) : qw + radius + 1] = -np.inf
    return out


# ----------------------------------------------------------------------------------------------------------------
# Capture


@dataclass
class KeyHit:
    cell: tuple[int, int, int]  # (t', h', w') on the key grid
    frames: list[int]  # input frames the key cell covers
    frame: int  # the frame it is drawn on (a shown frame, nearest the cell's centre)
    x: float
    y: float
    box: tuple[float, float, float, float]
    weight: float  # display weight
    raw: float  # raw f/C(x)

    def to_json(self, grid: GridMap) -> dict[str, Any]:
        return {
            "cell": list(self.cell),
            "frame": self.frame,
            "frames": self.frames,
            "source_frames": [grid.source_frame(i) for i in self.frames],
            "x": round(self.x, 2),
            "y": round(self.y, 2),
            "box": [round(v, 2) for v in self.box],
            "weight": round(self.weight, 6),
            "raw": round(self.raw, 6),
        }


@dataclass
class QueryAttention:
    cell: tuple[int, int, int]  # (t, h, w) on the query grid
    frame: int  # input frame the query is shown on
    x: float  # cell centre in original pixels
    y: float
    box: tuple[float, float, float, float]
    score: float  # top-k mass
    weights: np.ndarray  # (Nk,) display weights over the key grid, flattened (t', h', w')
    raw: np.ndarray  # (Nk,) raw weights
    keys: list[KeyHit]
    requested: tuple[int, float, float] | None = None  # --query as given

    def heat(self, grid: GridMap) -> np.ndarray:
        return self.weights.reshape(grid.key_grid)

    def to_json(self, grid: GridMap) -> dict[str, Any]:
        d = {
            "cell": list(self.cell),
            "frame": self.frame,
            "source_frame": grid.source_frame(self.frame),
            "frames": grid.frames_of_qt(self.cell[0]),
            "x": round(self.x, 2),
            "y": round(self.y, 2),
            "box": [round(v, 2) for v in self.box],
            "topk_mass": round(self.score, 6),
            "keys": [k.to_json(grid) for k in self.keys],
        }
        if self.requested is not None:
            d["requested"] = {"frame": self.requested[0], "x": self.requested[1], "y": self.requested[2]}
        return d


@dataclass
class BlockAttention:
    name: str
    instantiation: str | None
    grid: GridMap
    queries: list[QueryAttention]
    mean_weights: np.ndarray  # (Nk,) mean display weight received by each key over ALL query cells
    query_scores: np.ndarray  # (t, h, w) top-k mass of every query cell

    @property
    def normalisation(self) -> str:
        return normalisation_note(self.instantiation)

    @property
    def query_dependent(self) -> bool:
        """False for global_context: one map per group, the same for every query (drawn as one overlay)."""
        v = VARIANTS.get(self.instantiation or "")
        return v is None or v.query_dependent

    def to_json(self) -> dict[str, Any]:
        g = self.grid
        return {
            "block": self.name,
            "instantiation": self.instantiation,
            "weights": self.normalisation,
            "input_shape": list(g.input_shape),
            "query_grid": list(g.query_grid),
            "key_grid": list(g.key_grid),
            "key_pool": list(g.key_pool),
            "queries": [q.to_json(g) for q in self.queries],
        }


@dataclass
class ClipAttention:
    frames: np.ndarray  # uint8 (T, H, W, 3): the original frames the model saw
    shown: list[int]  # input frames shown in the figures
    blocks: list[BlockAttention]
    label: str
    prob: float
    view: str
    source_frames: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        T, H, W, _ = self.frames.shape
        return {
            **extra,
            "prediction": {"label": self.label, "prob": round(self.prob, 6), "from": f"one {self.view} view"},
            "clip": {
                "num_frames": int(T),
                "frame_size": [int(W), int(H)],
                "source_frames": list(self.source_frames),
                "timestamps": [round(t, 4) for t in self.timestamps],
                "shown_frames": list(self.shown),
                "view": self.view,
                "box": [round(v, 2) for v in self.blocks[0].grid.box] if self.blocks else None,
            },
            "blocks": [b.to_json() for b in self.blocks],
        }


def shown_frames(num_input_frames: int, n: int, extra: Sequence[int] = ()) -> list[int]:
    """n evenly spaced input frames (first and last included), plus any frames named by --query."""
    n = max(1, min(n, num_input_frames))
    base = np.linspace(0, num_input_frames - 1, n).round().astype(int).tolist() if n > 1 else [num_input_frames // 2]
    return sorted(set(int(i) for i in base) | set(int(i) for i in extra))


def _display_frame(frames: Sequence[int], shown: Sequence[int]) -> int:
    """The shown frame to draw a cell covering `frames` on: a shown frame inside it nearest its centre, else the
    shown frame nearest the centre."""
    centre = (frames[0] + frames[-1]) / 2 if frames else 0.0
    inside = [i for i in shown if i in frames]
    pool = inside or list(shown)
    return min(pool, key=lambda i: (abs(i - centre), i))


def model_input(
    frames: np.ndarray,
    *,
    view: str,
    short_side: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_size: int | None = None,
    model_frames: np.ndarray | None = None,
) -> tuple[torch.Tensor, Box]:
    """The model's input for one view of a clip -> (clip float32 (1, 3, T, h, w), box (x0, y0, x1, y1) of the
    region it shows, in the pixels of `frames`).

    frames: uint8 (T, H, W, 3) as the pictures show them. model_frames: the same frames decoded at the view's short
    side (`read_clip_indexed` with the view, as eval/predict decode theirs), or None to resize `frames` themselves.
    The view is `nlvid.data.transforms.single_view`: "full" (short side resized to `short_side`, no crop) or
    "center" (the centre crop_size crop of `nlvid.data.test_views`)."""
    if view not in VIEWS:
        raise ConfigError(f"view {view!r}: allowed: {', '.join(VIEWS)}", key="view")
    src = frames if model_frames is None else model_frames
    clip, (x0, y0, x1, y1) = single_view(src, view, short_side=short_side, crop_size=crop_size or short_side,
                                         mean=mean, std=std)
    sy, sx = frames.shape[1] / src.shape[1], frames.shape[2] / src.shape[2]  # model-frame pixels -> frames' pixels
    return clip, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def rows_fn(recorder: Any, name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int, int]]]:
    """`rows(cells (Q, 3) long) -> (raw weights (Q, Nk), key_grid)` of block `name` from an AttentionRecorder that
    saw the forward pass."""

    def rows(cells: torch.Tensor):
        w, kg = recorder.attention(name, cells)
        return w[0], tuple(int(v) for v in kg)  # (1, Q, Nk) -> (Q, Nk)

    return rows


def analyse_block(
    rows: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int, int]]],
    *,
    name: str,
    block: Any,
    input_shape: tuple[int, int, int],
    query_grid: tuple[int, int, int],
    box: tuple[float, float, float, float],
    frame_size: tuple[int, int],
    shown: Sequence[int],
    source_frames: Sequence[int] = (),
    queries: Sequence[tuple[int, float, float]] | None = None,
    num_queries: int = 4,
    topk: int = 20,
) -> BlockAttention:
    """Score every query cell in chunks, choose (or place) the queries, and collect their top-k keys in pixels.

    `rows(cells (Q, 3) long) -> (raw weights (Q, Nk), key_grid)` computes only the rows asked for.
    """
    inst = block_instantiation(block)
    t, h, w = query_grid
    # One cheap row first, to learn the key grid.
    probe_w, key_grid = rows(torch.zeros(1, 3, dtype=torch.long))
    nk = probe_w.shape[-1]
    grid = GridMap(
        input_shape=tuple(int(v) for v in input_shape),
        query_grid=tuple(int(v) for v in query_grid),
        key_grid=key_grid,
        key_pool=key_pool_for(block, query_grid, key_grid),
        box=tuple(float(v) for v in box),
        frame_size=(int(frame_size[0]), int(frame_size[1])),
        source_frames=tuple(int(v) for v in source_frames),
    )
    all_cells = torch.from_numpy(np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
                                 .reshape(-1, 3)).long()  # (t*h*w, 3) in flattened (t, h, w) order
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, nk))
    scores = torch.empty(all_cells.shape[0])
    colsum = torch.zeros(nk, dtype=torch.float64)
    for a in range(0, all_cells.shape[0], chunk):
        raw, _ = rows(all_cells[a : a + chunk])
        dw = display_weights(raw, inst)
        scores[a : a + chunk] = concentration(dw, topk)
        colsum += dw.sum(0).double()
    scores_thw = scores.view(t, h, w).numpy()
    mean_w = (colsum / all_cells.shape[0]).float().numpy()

    shown_t = sorted({grid.qt_of_frame(i) for i in shown})
    if queries:
        placed = [(grid.pixel_to_query(f, x, y), (f, x, y)) for f, x, y in queries]
    else:
        placed = [(c, None) for c in choose_queries(scores_thw, num_queries, allowed_t=shown_t)]
    out: list[QueryAttention] = []
    if placed:
        cells = torch.tensor([c for c, _ in placed], dtype=torch.long)
        raw, _ = rows(cells)
        dw = display_weights(raw, inst)
        key_cells = grid.key_cells()
        k = max(1, min(topk, nk))
        for qi, (cell, req) in enumerate(placed):
            vals, idx = dw[qi].topk(k)
            keys = []
            for v, j in zip(vals.tolist(), idx.tolist()):
                kc = tuple(int(c) for c in key_cells[j])
                frames = grid.frames_of_kt(kc[0])
                x, y = grid.key_center(kc)
                keys.append(KeyHit(kc, frames, _display_frame(frames, shown), x, y, grid.key_box(kc), v,
                                   float(raw[qi, j])))
            qframe = req[0] if req is not None else _display_frame(grid.frames_of_qt(cell[0]), shown)
            x, y = grid.query_center(cell)
            out.append(QueryAttention(tuple(int(c) for c in cell), int(qframe), x, y, grid.query_box(cell),
                                      float(concentration(dw[qi : qi + 1], topk)[0]), dw[qi].numpy().copy(),
                                      raw[qi].float().numpy().copy(), keys, req))
    return BlockAttention(name, inst, grid, out, mean_w, scores_thw)


def attend_clip(
    model: torch.nn.Module,
    frames: np.ndarray,
    *,
    classes: Sequence[str],
    blocks: Sequence[str],
    short_side: int,
    mean: Sequence[float],
    std: Sequence[float],
    view: str = "full",
    crop_size: int | None = None,
    num_shown: int = 4,
    queries: Sequence[tuple[int, float, float]] | None = None,
    num_queries: int = 4,
    topk: int = 20,
    source_frames: Sequence[int] = (),
    timestamps: Sequence[float] = (),
    model_frames: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> ClipAttention:
    """One forward pass over one view of `frames` (uint8 (T, H, W, 3)), then attention of the chosen queries of
    each block in `blocks`. The model's input is `model_input` (view "full" or "center"; from `model_frames` when
    given: the same frames decoded at the view's short side, see `read_clip_indexed`)."""
    clip, box = model_input(frames, view=view, short_side=short_side, crop_size=crop_size, mean=mean, std=std,
                            model_frames=model_frames)
    T, H, W, _ = frames.shape
    shown = shown_frames(T, num_shown, [q[0] for q in queries or ()])
    modules = nl_blocks(model)
    model.eval()
    out_blocks = []
    with torch.no_grad(), AttentionRecorder(model, blocks=list(blocks)) as rec:
        logits = model(clip.to(device))
        probs = logits.float().softmax(-1)[0].cpu()
        for name in blocks:
            x = rec.inputs[name]
            out_blocks.append(
                analyse_block(
                    rows_fn(rec, name),
                    name=name,
                    block=modules[name],
                    input_shape=tuple(clip.shape[-3:]),
                    query_grid=tuple(x.shape[-3:]),
                    box=box,
                    frame_size=(W, H),
                    shown=shown,
                    source_frames=source_frames,
                    queries=queries,
                    num_queries=num_queries,
                    topk=topk,
                )
            )
    p, c = probs.max(0)
    label = classes[int(c)] if int(c) < len(classes) else str(int(c))
    return ClipAttention(frames, shown, out_blocks, label, float(p), view, list(source_frames), list(timestamps))


# ----------------------------------------------------------------------------------------------------------------
# Decoding with known source-frame indices


@dataclass(frozen=True)
class IndexedClip:
    """One clip, its frames known by their index in the video."""

    frames: np.ndarray  # uint8 (T, H, W, 3) at the video's size: what the pictures show
    model_frames: np.ndarray | None  # uint8 (T, h, w, 3): the same frames decoded at the model's short side
    source_frames: list[int]  # per frame: its index in the video
    timestamps: list[float]  # per frame: seconds from the first frame


def read_clip_indexed(
    path: str | Path,
    *,
    num_frames: int,
    stride: int,
    start: float | None = None,
    view: str | None = None,
    short_side: int | None = None,
    crop_size: int | None = None,
) -> IndexedClip:
    """One clip of `num_frames` frames every `stride` frames, picked and decoded like eval/predict pick and decode
    theirs: centred in the video when `start` (seconds) is None (`uniform_starts` with one clip: the clip
    `nlvid.engine.predict` takes with num_clips=1), frame indices by `clip_indices` (looping for short videos),
    decoded by `read_clips`, so every frame is known by its index in the video.

    The frames are decoded at the video's size for the pictures and, when `view` is given, once more for the
    model with the short side resized during decoding to `view_short_side(view, short_side, crop_size)`, as
    eval/predict decode theirs."""
    fps = probe(path).fps
    picked: list[np.ndarray] = []

    def starts(total: int) -> list[int]:
        if start is None:
            first = uniform_starts(total, num_frames=num_frames, stride=stride, num_clips=1)[0]
        else:
            first = int(round(float(start) * fps))
        picked.append(clip_indices(first, num_frames=num_frames, stride=stride, total=total))
        return [first]

    (frames,) = read_clips(path, starts, num_frames=num_frames, stride=stride)
    model_frames = None
    if view is not None:
        if short_side is None:
            raise ValueError("read_clip_indexed: view needs short_side")
        decode_side = view_short_side(view, short_side, crop_size or short_side)
        (model_frames,) = read_clips(path, starts, num_frames=num_frames, stride=stride, short_side=decode_side)
    idx = [int(i) for i in picked[0]]
    return IndexedClip(np.asarray(frames), model_frames, idx, [i / fps for i in idx])
