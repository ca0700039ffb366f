"""The Non-local block (Wang et al., CVPR 2018) and a recorder for its attention maps.

    y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j);      z = BN(W_z y) + x        (no ReLU after the add)

Shape legend (used in the comments on every reshape below):
    B  batch                      C   input channels (dim_in)        C'  inner width (dim_inner, default C/2)
    D  width of the dot product: C' (embedded_gaussian, dot_product, concatenation) or C (gaussian: x itself)
    T, H, W  the input grid        t', h', w'  the pooled key grid   N = T*H*W queries,  N' = t'*h'*w' keys
    G  attention groups: B (spacetime), B*T (space), B*H*W (time)
    n, n'  queries / keys per group: (N, N') spacetime, (H*W, h'*w') space, (T, t') time
    Q  number of requested query rows (attention_rows)

Instantiations (f, C(x)):
    gaussian            exp(s * x_i . x_j)            softmax over keys; no theta/phi (keys = pooled x), g embedded;
                                                      s = C^-0.5 when scale=True, 1 when scale=False (paper), or a float
    embedded_gaussian   exp(s * theta_i . phi_j)      softmax over keys; s = C'^-0.5 when scale=True (official code,
                                                      default), 1 when False (MMAction2 configs), or a float
    dot_product         theta_i . phi_j               C(x) = n' (keys per group after pooling), never 1/sqrt(d)
    concatenation       ReLU(w_f . [theta_i, phi_j])  C(x) = n'; w_f = `concat_project`, an nn.Linear(2C', 1,
                                                      bias=False): the first C' weights act on theta, the last C'
                                                      on phi, so f_ij = ReLU(w1 . theta_i + w2 . phi_j)
    global_context      exp(w_k . x_j)                softmax over keys; the same row for every query (GCNet, Cao et al.
                                                      2019): one map per group from `mask`, a 1x1x1 conv C -> 1

Global context (GCNet's block in the NL family): a_j = softmax_j(mask(x)_j) is one attention map per group (per
sample in spacetime mode), the pooled context y = sum_j a_j g(x_j) (C') is transformed by LayerNorm over C' (`ln`,
LayerNorm([C', 1, 1, 1])) and ReLU, then W_z (`out`, C' -> C) and added to every position of the group:
    z_i = x_i + out(ReLU(LN(sum_j a_j g(x_j))))
g is GCNet's first transform conv (C -> C/r): since sum_j a_j = 1, g(sum_j a_j x_j) = sum_j a_j g(x_j), so pooling
x with the attention first and then applying g (GCNet's order, what the fast path does) is the same number. Its
defaults come from the `VARIANTS` table: C' = C/4 (GCNet's r = 4; pass dim_inner for r = 16) and norm "none" (`out`
zero-initialised, as GCNet and timm do), so the block is the identity at init like every other instantiation.
norm="bn" is refused: a BN after W_z would see one constant per sample and group, normalised over the batch alone
(ill-conditioned at small batches, and not GCNet). LayerNorm over C' needs C' >= 2 to mean anything (C' = 2 gives
+-1 whatever the input): keep C' well above that.

Pooling: keys/values come from a max-pool (kernel = stride = pool_size, no padding, remainders dropped as in
PySlowFast's MaxPool3d). pool_position="input" pools x before phi/g (official Caffe2 / PySlowFast, default);
"after" pools phi(x) and g(x) (paper text, mmcv). For gaussian "phi" is the identity so its keys are always pool(x).
The effective kernel per axis is min(pool_size[axis], size of that axis): an axis of size 1 is never pooled.

Dimensionality: one block takes (B, C, L), (B, C, H, W) and (B, C, T, H, W). 1-D input is viewed as (B, C, 1, 1, L)
(the sequence sits on the w axis, so pool_size[2] pools it), 2-D as (B, C, 1, H, W). Query cells of attention_rows
are always (t, h, w) on that 5-D view: (0, 0, l) for 1-D, (0, h, w) for 2-D.

Modes (paper Table 2d):
    spacetime  every query attends to every key (default).
    space      a query at frame t attends to keys of its own frame only. Temporal pooling is disabled (kernel t = 1,
               so the key grid keeps all T frames); spatial pooling applies. Computed by folding T into the batch.
    time       a query at (h, w) attends to keys at the same (h, w) in every frame. Spatial pooling is disabled
               (kernel h = w = 1); temporal pooling applies. Computed by folding H, W into the batch.
    Pooling then grouping equals grouping then pooling (max-pool is per channel and per cell), so both paths pool
    once on the full grid and then group; n' is the per-group key count used by dot_product/concatenation.

Grid mapping for attention_rows / AttentionRecorder: queries are cells (t, h, w) of the block-input grid; keys are
the cells (t', h', w') of the pooled grid `key_grid`, flattened in (t', h', w') order; key (t', h', w') covers input
cells t'*kt .. t'*kt+kt-1 (same for h, w), i.e. in pixels a key spans kt x kh x kw input cells.

Implementations (`impl`): "explicit" = conv3d + bmm + softmax + bmm, the reference (global_context too: its one
row broadcast to an n x n' matrix, then LN/ReLU per position); "fast" = token-layout matmuls,
`scaled_dot_product_attention` for the gaussians with contiguous (G, 1, n, D) tensors, theta (phi^T g) / n' for
dot_product (never forms the n x n' matrix; in spacetime mode
further collapsed to one per-sample C x C matrix applied to x, see _dot_collapses), a query-chunked custom autograd function for concatenation (memory bounded
in training too), global_context as one (G, C') context vector per group broadcast onto its positions, BN folded
into W_z in eval mode. "auto" = fast. Both give the same numbers (fp32, <= 1e-4).
The fast path supports first-order gradients only (concatenation uses a custom autograd function); for double
backward use impl="explicit". Inputs may be contiguous or channels_last_3d; a channels-last input keeps that layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nlvid.config import Choice, Instantiation, Mode, Norm, PoolPosition
from nlvid.errors import ConfigError
from nlvid.models.onednn import conv1x1_uses_onednn, gemm_nt


class Impl(Choice):
    """Which code path computes the block: the fused fast path when it applies (auto), or always one of them."""

    AUTO = "auto"
    EXPLICIT = "explicit"
    FAST = "fast"


@dataclass(frozen=True)
class Variant:
    """What an instantiation is made of (the block's code branches on these properties, not on names).

    embeds: theta/phi 1x1x1 convs (gaussian uses x itself; global_context has `mask` instead).
    softmax: rows are softmax probabilities (else raw f / n').
    scalable: a softmax temperature applies (`scale`).
    query_dependent: rows differ between queries (False: one map per group, global_context).
    reduction: default C / C'.  norm: default output normalisation; norms: the ones allowed."""

    embeds: bool
    softmax: bool
    scalable: bool
    query_dependent: bool = True
    reduction: int = 2
    norm: str = "bn"
    norms: tuple[str, ...] = ("bn", "none")


VARIANTS: dict[str, Variant] = {
    "gaussian": Variant(embeds=False, softmax=True, scalable=True),
    "embedded_gaussian": Variant(embeds=True, softmax=True, scalable=True),
    "dot_product": Variant(embeds=True, softmax=False, scalable=False),
    "concatenation": Variant(embeds=True, softmax=False, scalable=False),
    "global_context": Variant(embeds=False, softmax=True, scalable=False, query_dependent=False, reduction=4,
                              norm="none", norms=("none",)),
}


# Concatenation chunks queries so one chunk's (G, rows, n') affinity stays below this many floats (64 MiB fp32).
_CONCAT_CHUNK_ELEMS = 1 << 24


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"NonLocalBlock: {name}={value!r} is not allowed; use a positive integer")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------------------------


def _tokens(x5: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C) as a view when x5 is contiguous or channels_last_3d (a copy otherwise)."""
    B, C = x5.shape[:2]
    if x5.is_contiguous():
        return x5.flatten(2).transpose(1, 2)  # (B, C, T, H, W) -> (B, C, N) -> (B, N, C), strided view
    return x5.permute(0, 2, 3, 4, 1).reshape(B, -1, C)  # (B, C, T, H, W) -> (B, T, H, W, C) -> (B, N, C)


def _linear_tokens(xt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 conv applied to tokens: (B, N, C) -> contiguous (B, N, C'), without copying a transposed input.

    weight (C', C, 1, 1, 1) as stored by Conv3d, bias (C',)."""
    weight = weight.flatten(1)  # (C', C, 1, 1, 1) -> (C', C)
    if xt.is_contiguous():
        return F.linear(xt, weight, bias)  # (B, N, C) -> (B, N, C')
    B = xt.shape[0]
    # xt is a per-batch transposed view (strides (C*N, 1, N)); BLAS reads it as is.
    return torch.baddbmm(bias.view(1, 1, -1), xt, weight.t().expand(B, -1, -1))  # (B, N, C')


def _conv_tokens(x5: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 conv of a channels_last_3d map, returned as tokens: (B, C, T, H, W) -> contiguous (B, N, C').

    weight (C', C, 1, 1, 1), bias (C',). The same product as _linear_tokens, run by oneDNN's convolution (why:
    nlvid.models.onednn; (2, 1024, 4, 14, 14) -> 512 took 4.7 ms vs 9.7 ms), backward included. The output is
    channels_last_3d, so its tokens are a view. A contiguous x5 goes through _linear_tokens instead (a transposed
    view BLAS reads as is; converting it would copy and keep a second x), and so does any x whose 1x1 conv torch
    would not give to oneDNN (one thread and a small batch: `conv1x1_uses_onednn`)."""
    if not (_is_channels_last(x5) and conv1x1_uses_onednn(x5)):
        return _linear_tokens(_tokens(x5), weight, bias)  # (B, N, C) -> (B, N, C')
    return _tokens(F.conv3d(x5, weight, bias))  # (B, C', T, H, W) channels-last -> (B, N, C') view


def _is_channels_last(x5: torch.Tensor) -> bool:
    """Whether a (B, C, T, H, W) tensor is laid out (B, T, H, W, C) in memory (and not also plainly contiguous)."""
    return not x5.is_contiguous() and x5.is_contiguous(memory_format=torch.channels_last_3d)


def _pool_tokens(t: torch.Tensor, grid: tuple[int, int, int], kernel: tuple[int, int, int]) -> torch.Tensor:
    """Max-pool tokens on their grid: (B, N, D) -> (B, N', D), using the channels-last pooling kernel."""
    if kernel == (1, 1, 1):
        return t
    B, _, D = t.shape
    T, H, W = grid
    cl = t.view(B, T, H, W, D).permute(0, 4, 1, 2, 3)  # (B, N, D) -> (B, T, H, W, D) -> (B, D, T, H, W) channels-last
    pooled = F.max_pool3d(cl, kernel, kernel)  # (B, D, t', h', w')
    return pooled.permute(0, 2, 3, 4, 1).reshape(B, -1, D)  # (B, D, t', h', w') -> (B, t', h', w', D) -> (B, N', D)


class _MaxPoolChannelsLast(torch.autograd.Function):
    """Exact max_pool3d (kernel = stride, no padding) computed on a channels-last copy (the fast CPU kernel).

    Only the int64 indices are kept for backward (not the copy), and backward is max_unpool3d: with non-overlapping
    windows, scattering each pooled gradient to its argmax cell is exactly max-pool's backward."""

    @staticmethod
    def forward(ctx, x5, kernel):
        x_cl = x5.contiguous(memory_format=torch.channels_last_3d)  # (B, C, T, H, W), channels innermost
        out, idx = torch.ops.aten.max_pool3d_with_indices(x_cl, kernel, kernel)  # (B, C, t', h', w') x 2
        ctx.save_for_backward(idx)
        ctx.kernel, ctx.size = kernel, tuple(x5.shape[2:])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        return F.max_unpool3d(grad_out, idx, ctx.kernel, ctx.kernel, output_size=ctx.size), None  # (B, C, T, H, W)


def _pool5(x5: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Max-pool a (B, C, T, H, W) map, kernel = stride, no padding, returning a channels-last result.

    Measured on 2 cores, (2, 512, T, 28, 28), kernel (1, 2, 2): max_pool3d on the contiguous map ~100 ms (T=8);
    channels-last copy + channels-last max_pool3d ~25 ms (T=8). Forward + backward at T=16: max_pool2d over a
    (B, C*T, H, W) view 107 ms, _MaxPoolChannelsLast 78 ms. Same values and same argmax either way."""
    if kernel == (1, 1, 1):
        return x5
    if torch.is_grad_enabled() and x5.requires_grad:
        return _MaxPoolChannelsLast.apply(x5, list(kernel))
    x_cl = x5.contiguous(memory_format=torch.channels_last_3d)  # (B, C, T, H, W), channels innermost
    return F.max_pool3d(x_cl, kernel, kernel)


# _SoftmaxAttention takes this many query rows at a time (fewer when keys are many): the (rows, n') score block
# stays a few MiB. Measured at (1, 12544, 3136, 256) fwd+bwd: 128 rows 654 ms, 256 678, 512 543, 1024 676.
_ATTENTION_ROWS = 512
# ... and is used only when a group has at least this many scores (n * n'): below it SDPA's one call is as good.
_ONEDNN_ATTENTION_MIN_SCORES = 1 << 16


class _SoftmaxAttention(torch.autograd.Function):
    """y = softmax(s * q k^T) v per group, with every product run by oneDNN (`gemm_nt`), in blocks of query rows.

    The same numbers as F.scaled_dot_product_attention (fp32, ~1e-6), faster where oneDNN outruns the BLAS that
    torch's CPU attention kernel calls (nlvid.models.onednn). Measured fwd+bwd, (G, n, n', D): (2, 3136, 784, 256)
    SDPA 114 ms vs 84; (1, 12544, 3136, 256) 905 vs 543-633; (2, 784, 196, 512) 15 vs 10; forward alone 31 vs 19
    and 245 vs 191 ms. Like flash attention it keeps only q, k, v for backward (never the n x n' matrix): backward
    recomputes each block's probabilities. q (G, n, D), k (G, n', D), v (G, n', C') contiguous; first-order only."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        G, n, _ = q.shape
        y = q.new_empty(G, n, v.shape[2])  # (G, n, C')
        blocks = _row_blocks(n, k.shape[1])
        for g in range(G):
            ks = k[g] * scale  # (n', D)
            vt = v[g].t().contiguous()  # (C', n')
            for r in blocks:
                p = torch.softmax(gemm_nt(q[g, r], ks), dim=-1)  # (rows, D) @ (n', D)^T -> (rows, n')
                y[g, r] = gemm_nt(p, vt)  # (rows, n') @ (C', n')^T -> (rows, C')
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        dy = dy.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        blocks = _row_blocks(q.shape[1], k.shape[1])
        for g in range(q.shape[0]):
            ks = k[g] * scale  # (n', D)
            kst = ks.t().contiguous()  # (D, n')
            for r in blocks:
                qr, dyr = q[g, r], dy[g, r]  # (rows, D), (rows, C')
                p = torch.softmax(gemm_nt(qr, ks), dim=-1)  # recomputed (rows, n')
                dp = gemm_nt(dyr, v[g])  # (rows, C') @ (n', C')^T -> (rows, n')
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - rowsum(dp * p)), (rows, n')
                dq[g, r] = gemm_nt(ds, kst)  # (rows, n') @ (D, n')^T -> (rows, D)
                dk[g] += gemm_nt(ds.t().contiguous(), qr.t().contiguous())  # (n', rows) @ (D, rows)^T -> (n', D)
                dv[g] += gemm_nt(p.t().contiguous(), dyr.t().contiguous())  # (n', rows) @ (C', rows)^T -> (n', C')
            dk[g] *= scale
        return dq, dk, dv, None


def _row_blocks(n: int, n_keys: int) -> list[slice]:
    """Query-row blocks of near-equal size for _SoftmaxAttention (no small tail block)."""
    rows = max(16, min(_ATTENTION_ROWS, (1 << 22) // max(1, n_keys)))
    count = -(-n // rows)
    size = -(-n // count)
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _onednn_attention_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether _SoftmaxAttention is the faster choice: where oneDNN runs 1x1 convs at all (fp32 CPU, not while
    compiling, tracing or exporting: `conv1x1_uses_onednn`), with more than one thread (gemm_nt's convs have a batch
    of 1, which torch gives oneDNN only then), and few groups with enough work each (the groups are a Python loop;
    space/time modes can have thousands)."""
    return (
        conv1x1_uses_onednn(q)
        and torch.get_num_threads() > 1
        and q.shape[0] <= 64
        and q.shape[1] * k.shape[1] >= _ONEDNN_ATTENTION_MIN_SCORES
    )


class _ConcatAttention(torch.autograd.Function):
    """y[g, i] = sum_j ReLU(a[g, i] + b[g, j]) / n' * v[g, j], computed in query chunks; backward recomputes the
    affinity chunk by chunk, so neither pass holds more than one (G, rows, n') block."""

    @staticmethod
    def forward(ctx, a, b, v, chunk: int):  # a (G, n), b (G, n'), v (G, n', C')
        n_keys = b.shape[1]
        y = torch.empty(a.shape[0], a.shape[1], v.shape[2], dtype=v.dtype, device=v.device)  # (G, n, C')
        for s in range(0, a.shape[1], chunk):
            f = torch.relu(a[:, s : s + chunk, None] + b[:, None, :])  # (G, rows, 1) + (G, 1, n') -> (G, rows, n')
            torch.bmm(f, v, out=y[:, s : s + chunk])
            y[:, s : s + chunk] /= n_keys
        ctx.save_for_backward(a, b, v)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (G, n, C')
        a, b, v = ctx.saved_tensors
        n_keys = b.shape[1]
        da = torch.empty_like(a)
        db = torch.zeros_like(b)
        dv = torch.zeros_like(v)
        dy = dy / n_keys
        for s in range(0, a.shape[1], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            pre = a[:, sl, None] + b[:, None, :]  # (G, rows, n')
            dv.baddbmm_(torch.relu(pre).transpose(1, 2), dy[:, sl])  # (G, n', rows) @ (G, rows, C') -> (G, n', C')
            df = torch.bmm(dy[:, sl], v.transpose(1, 2))  # (G, rows, C') @ (G, C', n') -> (G, rows, n')
            df.mul_(pre > 0)
            da[:, sl] = df.sum(2)
            db += df.sum(1)
        return da, db, dv, None


# ----------------------------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------------------------


class NonLocalBlock(nn.Module):
    """Non-local block; identity at init. See the module docstring for the math, shapes, modes and pooling.

    Args (keywords after dim_inner):
        dim_in: input channels C.  dim_inner: C'.
        instantiation: gaussian | embedded_gaussian (default) | dot_product | concatenation | global_context.
        dim_inner default: C // VARIANTS[instantiation].reduction (C/2; C/4 for global_context).
        scale: gaussians only: True (default: D^-0.5 with D the dot-product width), False (no scale), or a float.
        pool_size: (t, h, w) max-pool for keys/values; (1, 1, 1) or None disables.
        pool_position: "input" (pool x before phi/g, default) or "after" (pool phi(x), g(x)).
        mode: spacetime (default) | space | time.
        norm: "bn" (BatchNorm3d `bn` after W_z, gamma zero-init) or "none" (W_z = `out` zero-init); None: the
            instantiation's default ("bn"; global_context allows only "none", as GCNet).
        impl: auto | explicit | fast.
    Submodules: theta, phi (absent for gaussian), g, out: Conv3d 1x1x1 with bias (weights (C', C, 1, 1, 1) and
    (C, C', 1, 1, 1), as PySlowFast's conv_theta/phi/g/out); bn: BatchNorm3d(C) when norm="bn";
    concat_project: Linear(2C', 1, bias=False) for concatenation; global_context: mask Conv3d(C, 1), g, ln
    LayerNorm([C', 1, 1, 1]) (weight/bias (C', 1, 1, 1)), out.
    """

    def __init__(
        self,
        dim_in: int,
        dim_inner: int | None = None,
        *,
        instantiation: str = "embedded_gaussian",
        scale: bool | float | None = True,
        pool_size: Iterable[int] | None = (1, 2, 2),
        pool_position: str = "input",
        mode: str = "spacetime",
        norm: str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.dim_in = _positive_int("dim_in", dim_in)
        self.instantiation = Instantiation.check("NonLocalBlock instantiation", instantiation)
        self.variant = VARIANTS[self.instantiation]
        r = self.variant.reduction
        self.dim_inner = _positive_int("dim_inner", dim_in // r if dim_inner is None and dim_in >= r else dim_inner)
        self.pool_position = PoolPosition.check("NonLocalBlock pool_position", pool_position)
        self.mode = Mode.check("NonLocalBlock mode", mode)
        self.norm = Norm.check("NonLocalBlock norm", self.variant.norm if norm is None else norm)
        if self.norm not in self.variant.norms:
            raise ConfigError(
                f"NonLocalBlock: norm={self.norm!r} is not allowed for instantiation={self.instantiation}; use "
                f"{' or '.join(self.variant.norms)} (it normalises inside its bottleneck with LayerNorm; a BN after "
                "W_z would normalise one constant per sample over the batch)"
            )
        self.impl = Impl.check("NonLocalBlock impl", impl)
        if pool_size is None:
            pool_size = (1, 1, 1)
        try:
            ps = tuple(pool_size)
        except TypeError:
            ps = ()
        if len(ps) != 3 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ps):
            raise ConfigError(
                f"NonLocalBlock: pool_size={pool_size!r} is not allowed; use three positive integers (t, h, w), "
                "e.g. (1, 2, 2); (1, 1, 1) disables pooling"
            )
        self.pool_size: tuple[int, int, int] = ps  # type: ignore[assignment]
        if scale is None:
            scale = True
        gaussian_like = self.variant.scalable
        if isinstance(scale, bool):
            self.scale: bool | float = scale
        elif isinstance(scale, (int, float)) and scale > 0 and gaussian_like:
            self.scale = float(scale)
        else:
            raise ConfigError(
                f"NonLocalBlock: scale={scale!r} is not allowed for instantiation={self.instantiation}; use True or "
                "False" + (" or a positive float" if gaussian_like else f" ({self.instantiation} is never scaled)")
            )

        C, Ci = self.dim_in, self.dim_inner
        if self.variant.embeds:
            self.theta = nn.Conv3d(C, Ci, kernel_size=1)
            self.phi = nn.Conv3d(C, Ci, kernel_size=1)
        if not self.variant.query_dependent:
            self.mask = nn.Conv3d(C, 1, kernel_size=1)  # GCNet's conv_mask: one attention logit per position
        self.g = nn.Conv3d(C, Ci, kernel_size=1)
        if self.instantiation == "concatenation":
            self.concat_project = nn.Linear(2 * Ci, 1, bias=False)
        if not self.variant.query_dependent:
            self.ln = nn.LayerNorm([Ci, 1, 1, 1])  # GCNet's LayerNorm([C/r, 1, 1]) in the 3-D layout
        self.out = nn.Conv3d(Ci, C, kernel_size=1)
        if self.norm == "bn":
            self.bn = nn.BatchNorm3d(C)
        self.reset_parameters()

    # -- init --------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Make the block the identity: zero the BN gamma (and beta), or W_z (`out`) when norm="none"."""
        if self.norm == "bn":
            self.bn.reset_parameters()
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        else:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    init_weights = reset_parameters

    def extra_repr(self) -> str:
        return (
            f"dim_in={self.dim_in}, dim_inner={self.dim_inner}, instantiation={self.instantiation}, "
            f"scale={self.scale}, pool_size={self.pool_size}, pool_position={self.pool_position}, mode={self.mode}, "
            f"norm={self.norm}, impl={self.impl}"
        )

    # -- small helpers -------------------------------------------------------------------------------------------
    @property
    def scale_value(self) -> float:
        """The softmax temperature the gaussians use (1.0 for the other instantiations, which ignore it)."""
        if not self.variant.scalable or self.scale is False:
            return 1.0
        if self.scale is True:
            width = self.dim_in if self.instantiation == "gaussian" else self.dim_inner
            return width**-0.5
        return float(self.scale)

    def kernel_for(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """Effective pool kernel on an input grid (T, H, W): mode masking, then min(pool, size) per axis."""
        kt, kh, kw = self.pool_size
        if self.mode == "space":
            kt = 1
        elif self.mode == "time":
            kh = kw = 1
        T, H, W = grid
        return (min(kt, T), min(kh, H), min(kw, W))

    def _as5d(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.unsqueeze(2).unsqueeze(2)  # (B, C, L) -> (B, C, 1, 1, L)
        if x.dim() == 4:
            return x.unsqueeze(2)  # (B, C, H, W) -> (B, C, 1, H, W)
        if x.dim() == 5:
            return x
        raise ConfigError(
            f"NonLocalBlock: input of shape {tuple(x.shape)} is not allowed; use (B, C, L), (B, C, H, W) or "
            "(B, C, T, H, W)"
        )

    def _check_channels(self, x5: torch.Tensor) -> None:
        if x5.shape[1] != self.dim_in:
            raise ConfigError(f"NonLocalBlock: input has {x5.shape[1]} channels, the block was built for {self.dim_in}")

    def _concat_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.concat_project.weight[0]  # (1, 2C') -> (2C',)
        return w[: self.dim_inner], w[self.dim_inner :]  # w1 acts on theta_i, w2 on phi_j

    def _context_transform(self, y: torch.Tensor) -> torch.Tensor:
        """global_context's bottleneck middle: LayerNorm over the last axis (C') with `ln`'s (C', 1, 1, 1) affine
        parameters, then ReLU; (..., C') -> (..., C')."""
        ln = self.ln
        return torch.relu(F.layer_norm(y, (self.dim_inner,), ln.weight.flatten(), ln.bias.flatten(), ln.eps))

    def _bn_folded_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_z and its bias with an eval-mode BN folded in: (C, C'), (C,)."""
        weight = self.out.weight.flatten(1)  # (C, C', 1, 1, 1) -> (C, C')
        bias = self.out.bias
        if self.norm == "bn" and not self.bn.training:
            bn = self.bn
            s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
            weight = weight * s[:, None]
            bias = (bias - bn.running_mean) * s + bn.bias
        return weight, bias

    def _bn_needs_batch_stats(self) -> bool:
        # eval-mode BN with running statistics is an affine map and gets folded into W_z (fast path)
        return self.norm == "bn" and (self.bn.training or self.bn.running_var is None)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x5 = self._as5d(x)
        self._check_channels(x5)
        if self.impl == "explicit":
            z5 = self._forward_explicit(x5)
        else:
            z5 = self._forward_fast(x5)
        return z5.view(x.shape) if x.dim() != 5 else z5  # (B, C, 1, 1, L) -> (B, C, L); (B, C, 1, H, W) -> (B, C, H, W)

    # The explicit reference: conv3d, max_pool3d, bmm, softmax, bmm.
    def _key_conv(self) -> nn.Module | None:
        """The 1x1x1 conv that makes keys: phi, global_context's mask (C -> 1), or None (gaussian: keys = x)."""
        if self.variant.embeds:
            return self.phi
        return None if self.variant.query_dependent else self.mask

    def _embed_explicit(self, x5: torch.Tensor):
        """Returns theta (B, D, T, H, W), phi (B, D, t', h', w'), g (B, C', t', h', w').

        global_context: theta is x itself (only its grid is used: every query gets the same row), phi the mask
        logits (B, 1, t', h', w')."""
        kernel = self.kernel_for(tuple(x5.shape[2:]))
        key_conv = self._key_conv()

        def pool(t):
            return F.max_pool3d(t, kernel, kernel) if kernel != (1, 1, 1) else t

        theta = self.theta(x5) if self.variant.embeds else x5
        if self.pool_position == "input" or key_conv is None:
            xp = pool(x5)
            phi = xp if key_conv is None else key_conv(xp)
        else:
            phi = pool(key_conv(x5))
        g = self.g(pool(x5)) if self.pool_position == "input" else pool(self.g(x5))
        return theta, phi, g

    def _group(self, t: torch.Tensor) -> torch.Tensor:
        """(B, D, T, H, W) -> (G, n, D) for the block's mode."""
        B, D, T, H, W = t.shape
        if self.mode == "spacetime":
            return t.flatten(2).transpose(1, 2)  # (B, D, T, H, W) -> (B, D, N) -> (B, N, D)
        if self.mode == "space":
            return t.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, D)  # -> (B, T, H, W, D) -> (B*T, H*W, D)
        return t.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, D)  # -> (B, H, W, T, D) -> (B*H*W, T, D)

    def _ungroup(self, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """(G, n, C') -> (B, C', T, H, W); inverse of _group."""
        B, T, H, W = shape
        D = y.shape[-1]
        if self.mode == "spacetime":
            return y.transpose(1, 2).reshape(B, D, T, H, W)  # (B, N, C') -> (B, C', N) -> (B, C', T, H, W)
        if self.mode == "space":
            return y.view(B, T, H, W, D).permute(0, 4, 1, 2, 3)  # (B*T, H*W, C') -> (B, T, H, W, C') -> (B, C', T, H, W)
        return y.view(B, H, W, T, D).permute(0, 4, 3, 1, 2)  # (B*H*W, T, C') -> (B, H, W, T, C') -> (B, C', T, H, W)

    def _affinity_explicit(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """f / C(x) as a full matrix: q (G, n, D), k (G, n', D) -> (G, n, n'). global_context: k (G, n', 1) logits,
        the one softmax row repeated for every query (q gives only n)."""
        n_keys = k.shape[1]
        if not self.variant.query_dependent:
            a = torch.softmax(k[..., 0], dim=-1)  # (G, n', 1) -> (G, n')
            return a[:, None, :].expand(-1, q.shape[1], -1)  # (G, 1, n') -> (G, n, n')
        if self.instantiation == "concatenation":
            w1, w2 = self._concat_weights()
            a = q @ w1  # (G, n, C') @ (C',) -> (G, n)
            b = k @ w2  # (G, n', C') @ (C',) -> (G, n')
            return torch.relu(a[:, :, None] + b[:, None, :]) / n_keys  # (G, n, 1) + (G, 1, n') -> (G, n, n')
        s = torch.bmm(q, k.transpose(1, 2))  # (G, n, D) @ (G, D, n') -> (G, n, n')
        if self.instantiation == "dot_product":
            return s / n_keys
        return torch.softmax(s * self.scale_value, dim=-1)

    def _forward_explicit(self, x5: torch.Tensor) -> torch.Tensor:
        B, _, T, H, W = x5.shape
        theta, phi, g = self._embed_explicit(x5)
        q, k, v = self._group(theta), self._group(phi), self._group(g)  # (G, n, D), (G, n', D), (G, n', C')
        y = torch.bmm(self._affinity_explicit(q, k), v)  # (G, n, n') @ (G, n', C') -> (G, n, C')
        if not self.variant.query_dependent:
            y = self._context_transform(y)  # (G, n, C'), LayerNorm over C' then ReLU at every position
        p = self.out(self._ungroup(y, (B, T, H, W)))  # (B, C', T, H, W) -> (B, C, T, H, W)
        if self.norm == "bn":
            p = self.bn(p)
        return x5 + p

    # The fast path: tokens (B, N, D) with D innermost all the way through; no N x N' matrix unless needed.
    def _embed_fast(self, x5: torch.Tensor, with_q: bool = True):
        """Returns tokens q (B, N, D), k (B, N', D), v (B, N', C'), all contiguous, and the pooled grid.

        phi and g share their input (pooled x for "input", x for "after"), so they run as ONE matmul with the two
        weights concatenated at forward time ((2C', C), cheap); the state dict keeps separate phi/g parameters."""
        grid = tuple(x5.shape[2:])
        kernel = self.kernel_for(grid)
        pgrid = tuple(s // k for s, k in zip(grid, kernel))
        Ci = self.dim_inner
        if self.instantiation == "gaussian":
            q = _tokens(x5).contiguous()  # (B, N, C): x itself is the query
            xp5 = _pool5(x5, kernel)  # (B, C, t', h', w') channels-last
            k = _tokens(xp5).contiguous()  # (B, N', C): pooled x itself is the key
            if self.pool_position == "input":
                v = _conv_tokens(xp5, self.g.weight, self.g.bias)  # (B, N', C')
            else:
                v = _pool_tokens(_conv_tokens(x5, self.g.weight, self.g.bias), grid, kernel)  # (B, N', C')
            return q, k, v, pgrid
        q = _conv_tokens(x5, self.theta.weight, self.theta.bias) if with_q else None  # (B, N, C')
        w_pg = torch.cat([self.phi.weight, self.g.weight])  # (2C', C, 1, 1, 1)
        b_pg = torch.cat([self.phi.bias, self.g.bias])  # (2C',)
        if self.pool_position == "input":
            pg = _conv_tokens(_pool5(x5, kernel), w_pg, b_pg)  # (B, C, t', h', w') -> (B, N', 2C')
        else:
            pg = _pool_tokens(_conv_tokens(x5, w_pg, b_pg), grid, kernel)  # (B, N, 2C') -> (B, N', 2C')
        return q, pg[..., :Ci].contiguous(), pg[..., Ci:].contiguous(), pgrid  # (B, N', C') each

    def _group_tokens(self, t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, D) contiguous -> (G, n, D) contiguous."""
        B, _, D = t.shape
        T, H, W = grid
        if self.mode == "spacetime":
            return t
        if self.mode == "space":
            return t.view(B * T, H * W, D)  # (B, N, D) -> (B*T, H*W, D), a view
        # (B, N, D) -> (B, T, H*W, D) -> (B, H*W, T, D) -> (B*H*W, T, D)
        return t.view(B, T, H * W, D).transpose(1, 2).reshape(B * H * W, T, D)

    def _ungroup_tokens(self, y: torch.Tensor, B: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """(G, n, C') -> (B, N, C') contiguous."""
        T, H, W = grid
        D = y.shape[-1]
        if self.mode == "time":
            # (B*H*W, T, C') -> (B, H*W, T, C') -> (B, T, H*W, C') -> (B, N, C')
            return y.view(B, H * W, T, D).transpose(1, 2).reshape(B, T * H * W, D)
        return y.reshape(B, T * H * W, D)  # (G, n, C') -> (B, N, C'), a view

    def _attend_fast(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (G, n, D), k (G, n', D), v (G, n', C') contiguous -> y (G, n, C')."""
        n_keys = k.shape[1]
        if self.instantiation in ("gaussian", "embedded_gaussian"):
            if _onednn_attention_applies(q, k):
                return _SoftmaxAttention.apply(q, k, v, self.scale_value)  # (G, n, C')
            y = F.scaled_dot_product_attention(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=self.scale_value
            )  # (G, 1, n, D) x (G, 1, n', D) x (G, 1, n', C') -> (G, 1, n, C')
            return y.squeeze(1)
        if self.instantiation == "dot_product":
            kv = torch.bmm(k.transpose(1, 2), v)  # (G, D, n') @ (G, n', C') -> (G, D, C')
            return torch.bmm(q, kv.div_(n_keys) if not kv.requires_grad else kv / n_keys)  # (G, n, C')
        w1, w2 = self._concat_weights()
        a = q @ w1  # (G, n, C') @ (C',) -> (G, n)
        b = k @ w2  # (G, n', C') @ (C',) -> (G, n')
        G, n = a.shape
        chunk = max(1, min(n, _CONCAT_CHUNK_ELEMS // max(1, G * n_keys)))
        return _ConcatAttention.apply(a, b, v, chunk)

    def _dot_collapses(self) -> bool:
        """dot_product/spacetime is linear in theta: W_z (theta (phi^T g) / N') = A_b x + c_b with a per-sample
        C x C matrix A_b = W_z (phi^T g / N')^T W_theta. One C x C matmul over N replaces theta (C -> C'), the
        C' x C' product and W_z (C' -> C) whenever C^2 <= C' (2C + C') (true for the default C' = C/2)."""
        C, Ci = self.dim_in, self.dim_inner
        return self.instantiation == "dot_product" and self.mode == "spacetime" and C * C <= Ci * (2 * C + Ci)

    def _forward_global_context(self, x5: torch.Tensor) -> torch.Tensor:
        """global_context, fast: one softmax map and one context vector per group, transformed once, added to the
        group's positions by broadcasting (no n x n' matrix, no per-position transform)."""
        B, C, T, H, W = x5.shape
        grid = (T, H, W)
        kernel = self.kernel_for(grid)
        pgrid = tuple(s // k for s, k in zip(grid, kernel))
        if self.pool_position == "input":
            xpt = _tokens(_pool5(x5, kernel)).contiguous()  # (B, N', C)
            logits = _linear_tokens(xpt, self.mask.weight, self.mask.bias)  # (B, N', 1)
            values = xpt  # g is applied after the attention sum (g linear, rows sum to 1)
        else:
            xt = _tokens(x5)  # (B, N, C)
            logits = _pool_tokens(_linear_tokens(xt, self.mask.weight, self.mask.bias), grid, kernel)  # (B, N', 1)
            values = _pool_tokens(_linear_tokens(xt, self.g.weight, self.g.bias), grid, kernel)  # (B, N', C')
        a = torch.softmax(self._group_tokens(logits, pgrid), dim=1)  # (G, n', 1), softmax over the group's keys
        ctx = torch.bmm(a.transpose(1, 2), self._group_tokens(values, pgrid))  # (G, 1, n') @ (G, n', D) -> (G, 1, D)
        if self.pool_position == "input":
            ctx = F.linear(ctx, self.g.weight.flatten(1), self.g.bias)  # (G, 1, C) -> (G, 1, C')
        d = F.linear(self._context_transform(ctx), self.out.weight.flatten(1), self.out.bias)  # (G, 1, C') -> (G, 1, C)
        if self.mode == "spacetime":
            d = d.view(B, C, 1, 1, 1)  # (B, 1, C) -> (B, C, 1, 1, 1)
        elif self.mode == "space":
            d = d.view(B, T, C).permute(0, 2, 1)[..., None, None]  # (B*T, 1, C) -> (B, T, C) -> (B, C, T, 1, 1)
        else:
            d = d.view(B, H, W, C).permute(0, 3, 1, 2)[:, :, None]  # (B*H*W, 1, C) -> (B, H, W, C) -> (B, C, 1, H, W)
        return x5 + d

    def _forward_fast(self, x5: torch.Tensor) -> torch.Tensor:
        if not self.variant.query_dependent:
            return self._forward_global_context(x5)
        B, C, T, H, W = x5.shape
        grid = (T, H, W)
        train_bn = self._bn_needs_batch_stats()
        weight, bias = (self.out.weight.flatten(1), self.out.bias) if train_bn else self._bn_folded_out()
        channels_last = _is_channels_last(x5)
        if self._dot_collapses():
            _, k, v, _ = self._embed_fast(x5, with_q=False)  # (B, N', C') x 2
            kv = torch.bmm(k.transpose(1, 2), v) / k.shape[1]  # (B, C', N') @ (B, N', C') -> (B, C', C')
            wz_kv = torch.matmul(weight, kv.transpose(1, 2))  # (C, C') @ (B, C', C') -> (B, C, C')
            A = torch.matmul(wz_kv, self.theta.weight.flatten(1))  # (B, C, C') @ (C', C) -> (B, C, C)
            c = torch.matmul(wz_kv, self.theta.bias) + bias  # (B, C, C') @ (C',) -> (B, C)
            if channels_last:
                xt = _tokens(x5)  # (B, N, C), contiguous view
                p = torch.baddbmm(c[:, None, :], xt, A.transpose(1, 2))  # (B, N, C) @ (B, C, C) -> (B, N, C)
                p = p.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B, N, C) -> (B, T, H, W, C) -> (B, C, T, H, W)
            else:
                p = torch.baddbmm(c[:, :, None], A, _tokens(x5).transpose(1, 2))  # (B, C, C) @ (B, C, N)
                p = p.view(B, C, T, H, W)  # (B, C, N) -> (B, C, T, H, W)
            if train_bn:
                p = self.bn(p)
            return p.add_(x5)
        q, k, v, pgrid = self._embed_fast(x5)
        y = self._attend_fast(self._group_tokens(q, grid), self._group_tokens(k, pgrid), self._group_tokens(v, pgrid))
        y = self._ungroup_tokens(y, B, grid)  # (B, N, C')
        y5 = y.reshape(B, T, H, W, -1).permute(0, 4, 1, 2, 3)  # (B, N, C') -> (B, T, H, W, C') -> (B, C', T, H, W) cl
        if channels_last and conv1x1_uses_onednn(y5):
            p = F.conv3d(y5, weight.view(C, -1, 1, 1, 1), bias)  # W_z, (B, C, T, H, W) channels-last (_conv_tokens)
        elif channels_last:
            p = F.linear(y, weight, bias)  # (B, N, C') -> (B, N, C)
            p = p.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B, N, C) -> (B, T, H, W, C) -> (B, C, T, H, W) cl
        else:
            # W_z @ y^T: (B, C, C') @ (B, C', N) -> (B, C, N); y^T is a transposed view BLAS reads directly
            p = torch.baddbmm(bias.view(1, -1, 1), weight.expand(B, -1, -1), y.transpose(1, 2))
            p = p.view(B, C, T, H, W)  # (B, C, N) -> (B, C, T, H, W)
        if train_bn:
            p = self.bn(p)
        # p is a fresh tensor that no backward needs (BN saves its input, the conv/baddbmm their operands), so the
        # residual goes in place: one (B, C, T, H, W) buffer fewer.
        return p.add_(x5)

    # -- attention maps ------------------------------------------------------------------------------------------
    def attention_rows(
        self, x: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """f/C(x) for Q query cells only: returns (weights (B, Q, N'), key_grid (t', h', w')).

        x: the block's input ((B, C, L), (B, C, H, W) or (B, C, T, H, W)); queries: LongTensor (Q, 3) of (t, h, w)
        cells on the 5-D view of the input grid (see the module docstring). Weights are softmax rows for the
        gaussians and raw f / n' for dot_product/concatenation, over the pooled key grid flattened in (t', h', w')
        order, zero outside the keys a query may see in mode space/time (global_context: its softmax map over the
        query's group, the same row for every query of a group). Memory is O(Q * N'), not O(N * N').
        """
        x5 = self._as5d(x)
        self._check_channels(x5)
        B, C, T, H, W = x5.shape
        queries = torch.as_tensor(queries, dtype=torch.long, device=x5.device)
        if queries.dim() != 2 or queries.shape[1] != 3:
            raise ConfigError(f"attention_rows: queries of shape {tuple(queries.shape)} is not allowed; use (Q, 3)")
        limits = torch.tensor([T, H, W], device=x5.device)
        if ((queries < 0) | (queries >= limits)).any():
            raise ConfigError(
                f"attention_rows: a query cell lies outside the input grid (T, H, W) = {(T, H, W)}; "
                "use 0 <= t < T, 0 <= h < H, 0 <= w < W"
            )
        kernel = self.kernel_for((T, H, W))
        kgrid = (T // kernel[0], H // kernel[1], W // kernel[2])
        key_conv = self._key_conv()
        flat = (queries[:, 0] * H + queries[:, 1]) * W + queries[:, 2]  # (Q,)
        xq = x5.flatten(2)[:, :, flat]  # (B, C, T, H, W) -> (B, C, N) -> (B, C, Q)
        xq_t = xq.transpose(1, 2)  # (B, C, Q) -> (B, Q, C)
        q = F.linear(xq_t, self.theta.weight.flatten(1), self.theta.bias) if self.variant.embeds else xq_t  # (B, Q, D)
        if self.pool_position == "input" or key_conv is None:
            xp = F.max_pool3d(x5, kernel, kernel) if kernel != (1, 1, 1) else x5  # (B, C, t', h', w')
            phi = xp if key_conv is None else key_conv(xp)
        else:
            phi = key_conv(x5)
            phi = F.max_pool3d(phi, kernel, kernel) if kernel != (1, 1, 1) else phi
        k = phi.flatten(2).transpose(1, 2)  # (B, D, t', h', w') -> (B, D, N') -> (B, N', D); D = 1 for the mask
        n_all = k.shape[1]

        # Which keys each query may see: (Q, N') bool, or None for spacetime.
        allowed = None
        if self.mode != "spacetime":
            kt_idx = torch.arange(kgrid[0], device=x5.device).repeat_interleave(kgrid[1] * kgrid[2])  # (N',)
            khw = torch.arange(kgrid[1] * kgrid[2], device=x5.device).repeat(kgrid[0])  # (N',)
            if self.mode == "space":  # kt = 1: key frame index == query frame index
                allowed = kt_idx[None, :] == queries[:, 0:1]
            else:  # kh = kw = 1: key (h, w) == query (h, w)
                allowed = khw[None, :] == (queries[:, 1:2] * W + queries[:, 2:3])
        n_group = {"spacetime": n_all, "space": kgrid[1] * kgrid[2], "time": kgrid[0]}[self.mode]

        if self.instantiation == "concatenation":
            w1, w2 = self._concat_weights()
            f = torch.relu((q @ w1)[:, :, None] + (k @ w2)[:, None, :]) / n_group  # (B, Q, 1) + (B, 1, N')
        else:
            if self.variant.query_dependent:
                s = torch.bmm(q, k.transpose(1, 2))  # (B, Q, D) @ (B, D, N') -> (B, Q, N')
            else:
                s = k.transpose(1, 2).expand(-1, q.shape[1], -1)  # (B, N', 1) -> (B, 1, N') -> (B, Q, N'), one row
            if self.instantiation == "dot_product":
                f = s / n_group
            else:
                s = s * self.scale_value
                if allowed is not None:
                    s = s.masked_fill(~allowed, float("-inf"))
                return torch.softmax(s, dim=-1), kgrid
        if allowed is not None:
            f = f * allowed
        return f, kgrid


# ----------------------------------------------------------------------------------------------------------------
# Recorder
# ----------------------------------------------------------------------------------------------------------------


class AttentionRecorder:
    """Context manager that keeps each Non-local block's input during forward passes, to compute attention rows later.

        with AttentionRecorder(model) as rec:
            model(clip)
        weights, key_grid = rec.attention(rec.names[0], torch.tensor([[0, 3, 4]]))

    blocks: None (every NonLocalBlock in the model) or an iterable of module names ("res3.nl.1").
    rec.names: block names in forward order; rec.inputs[name]: the (detached) input of the last forward.
    Hooks exist only inside the `with`; outside it the model runs untouched.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[str] | None = None) -> None:
        self.model = model
        found = {name: m for name, m in model.named_modules() if isinstance(m, NonLocalBlock)}
        if blocks is None:
            self._blocks = found
        else:
            wanted = list(blocks)
            unknown = [b for b in wanted if b not in found]
            if unknown:
                raise ConfigError(
                    f"AttentionRecorder: unknown block(s) {', '.join(unknown)}; "
                    f"allowed: {', '.join(found) or '(the model has no NonLocalBlock)'}"
                )
            self._blocks = {b: found[b] for b in wanted}
        self.names: list[str] = []
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            if name not in self.inputs:
                self.names.append(name)
            self.inputs[name] = x.detach()

        return hook

    def __enter__(self) -> AttentionRecorder:
        self.names.clear()
        self.inputs.clear()
        for name, block in self._blocks.items():
            self._handles.append(block.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def attention(self, name: str, queries: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(weights (B, Q, N'), key_grid) of block `name` for the recorded input; see NonLocalBlock.attention_rows."""
        if name not in self.inputs:
            raise ConfigError(
                f"AttentionRecorder: no input recorded for block {name!r}; recorded: {', '.join(self.names) or 'none'}"
            )
        block = self._blocks[name]
        return block.attention_rows(self.inputs[name], queries)
