"""NonLocalBlock and AttentionRecorder: identity at init, fast == explicit, attention rows, hooks, state dict, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlvid.errors import ConfigError
from nlvid.models.nonlocal_block import AttentionRecorder, NonLocalBlock

INSTS = ["gaussian", "embedded_gaussian", "dot_product", "concatenation", "global_context"]
MODES = ["spacetime", "space", "time"]
POSITIONS = ["input", "after"]
POOLS = [(1, 2, 2), (2, 2, 2), (1, 1, 1)]
SHAPES = {1: (2, 8, 10), 2: (2, 8, 5, 6), 3: (2, 8, 4, 5, 6)}  # odd sizes: pooling drops remainders

# global_context takes only norm "none" (GCNet: LayerNorm inside, W_z zero-initialised; see test_global_context_*).
FULL_GRID = [p for p in itertools.product(INSTS, MODES, POSITIONS, POOLS, sorted(SHAPES), ["bn", "none"])
             if not (p[0] == "global_context" and p[5] == "bn")]
# C' = 4 for every instantiation (C/2 of 8; global_context's default C/4 = 2 would make its LayerNorm over C' a
# sign function, whose gradient compares badly between two summation orders)
DIM_INNER = 4


def _ids(p):
    inst, mode, pos, pool, dims, norm = p
    return f"{inst}-{mode}-{pos}-{''.join(map(str, pool))}-{dims}d-{norm}"


def _randomise(block: NonLocalBlock, seed: int = 0) -> NonLocalBlock:
    """Non-zero weights everywhere (out and bn included) so the attention changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            std = 0.3 if name.startswith(("theta", "phi", "concat")) else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        if block.norm == "bn":
            block.bn.running_mean.copy_(torch.randn(block.dim_in, generator=gen) * 0.1)
            block.bn.running_var.copy_(torch.rand(block.dim_in, generator=gen) + 0.5)
    return block


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    """Max abs diff, relative to the magnitude when that exceeds 1 (fp32 sums of many terms)."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


@pytest.mark.parametrize("params", FULL_GRID, ids=[_ids(p) for p in FULL_GRID])
def test_identity_at_init_and_fast_equals_explicit(params):
    inst, mode, pos, pool, dims, norm = params
    torch.manual_seed(0)
    x = torch.randn(SHAPES[dims])
    block = NonLocalBlock(8, DIM_INNER, instantiation=inst, mode=mode, pool_position=pos, pool_size=pool, norm=norm)
    # identity at init, exactly, both impls, train and eval
    for impl, training in itertools.product(["explicit", "fast"], [True, False]):
        block.impl = impl
        block.train(training)
        assert torch.equal(block(x), x), (impl, training)

    _randomise(block)
    dy = torch.randn(SHAPES[dims])
    for training in (True, False):
        block.train(training)
        results = {}
        for impl in ("explicit", "fast"):
            block.impl = impl
            xx = x.clone().requires_grad_()
            y = block(xx)
            (y * dy).sum().backward()
            results[impl] = (y.detach(), xx.grad)
        (ye, ge), (yf, gf) = results["explicit"], results["fast"]
        assert yf.shape == x.shape
        assert (ye - x).abs().max() > 1e-3  # the attention branch matters
        assert _close(yf, ye) <= 1e-4, ("forward", training)
        assert _close(gf, ge) <= 1e-4, ("grad", training)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "strided", "channels_last_2d"])
def test_fast_path_input_layouts(layout):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 4, 6, 6)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.randn(2, 8, 4, 6, 12)[..., ::2]
    elif layout == "channels_last_2d":
        x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    block = _randomise(NonLocalBlock(8, impl="fast"))
    ref = _randomise(NonLocalBlock(8, impl="explicit"))
    for training in (True, False):
        block.train(training)
        ref.train(training)
        assert _close(block(x), ref(x.contiguous())) <= 1e-4


ROW_GRID = list(itertools.product(INSTS, MODES, POSITIONS, [(1, 2, 2), (2, 2, 2)], [1, 2, 3]))


@pytest.mark.parametrize("inst,mode,pos,pool,dims", ROW_GRID)
def test_attention_rows_match_full_matrix(inst, mode, pos, pool, dims):
    torch.manual_seed(2)
    x = torch.randn(SHAPES[dims])
    block = _randomise(NonLocalBlock(8, DIM_INNER, instantiation=inst, mode=mode, pool_position=pos,
                                     pool_size=pool)).eval()
    x5 = block._as5d(x)
    B, _, T, H, W = x5.shape
    kernel = block.kernel_for((T, H, W))
    kgrid = tuple(s // k for s, k in zip((T, H, W), kernel))

    # Full N x N' matrix from the explicit path, scattered back onto the whole key grid for space/time.
    theta, phi, _ = block._embed_explicit(x5)
    dense = block._affinity_explicit(block._group(theta), block._group(phi))  # (G, n, n')
    full = torch.zeros(B, T, H, W, *kgrid)
    if mode == "spacetime":
        full = dense.view(B, T, H, W, *kgrid)
    elif mode == "space":
        d = dense.view(B, T, H, W, kgrid[1], kgrid[2])
        for t in range(T):
            full[:, t, :, :, t] = d[:, t]
    else:
        d = dense.view(B, H, W, T, kgrid[0])
        for h, w in itertools.product(range(H), range(W)):
            full[:, :, h, w, :, h, w] = d[:, h, w]
    full = full.reshape(B, T * H * W, -1)  # (B, N, N')

    cells = list(itertools.product(range(T), range(H), range(W)))
    pick = [0, len(cells) // 2, len(cells) - 1]
    queries = torch.tensor([cells[i] for i in pick])
    weights, key_grid = block.attention_rows(x, queries)
    assert key_grid == kgrid
    assert weights.shape == (B, len(pick), full.shape[-1])
    assert torch.allclose(weights, full[:, pick], atol=1e-5, rtol=1e-4)
    if inst in ("gaussian", "embedded_gaussian", "global_context"):
        assert torch.allclose(weights.sum(-1), torch.ones(B, len(pick)), atol=1e-5)
        assert (weights >= 0).all()


def test_attention_rows_rejects_bad_queries():
    block = NonLocalBlock(8)
    x = torch.randn(1, 8, 2, 4, 4)
    with pytest.raises(ConfigError, match="outside the input grid"):
        block.attention_rows(x, torch.tensor([[2, 0, 0]]))
    with pytest.raises(ConfigError, match=r"\(Q, 3\)"):
        block.attention_rows(x, torch.tensor([0, 0, 0]))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.res3 = nn.Module()
        self.res3.nl = nn.ModuleDict({"1": NonLocalBlock(8), "3": NonLocalBlock(8, instantiation="dot_product")})
        self.res4 = nn.Module()
        self.res4.nl = nn.ModuleDict({"0": NonLocalBlock(8, mode="space")})

    def forward(self, x):
        x = self.res3.nl["1"](x)
        x = self.res3.nl["3"](x)
        return self.res4.nl["0"](x)


def test_attention_recorder_names_inputs_and_hook_removal():
    model = _Tiny()
    for m in model.modules():
        if isinstance(m, NonLocalBlock):
            _randomise(m)
    model.eval()
    x = torch.randn(1, 8, 2, 4, 4)
    with AttentionRecorder(model) as rec:
        model(x)
        assert all(len(m._forward_pre_hooks) == 1 for m in model.modules() if isinstance(m, NonLocalBlock))
    assert rec.names == ["res3.nl.1", "res3.nl.3", "res4.nl.0"]
    assert torch.equal(rec.inputs["res3.nl.1"], x)
    assert torch.equal(rec.inputs["res3.nl.3"], model.res3.nl["1"](x))
    w, grid = rec.attention("res3.nl.1", torch.tensor([[1, 2, 3]]))
    assert grid == (2, 2, 2) and w.shape == (1, 1, 8)
    assert torch.allclose(w.sum(-1), torch.ones(1, 1), atol=1e-5)
    w_space, grid_space = rec.attention("res4.nl.0", torch.tensor([[1, 0, 0]]))
    assert grid_space == (2, 2, 2)
    assert (w_space[0, 0, :4] == 0).all() and w_space[0, 0, 4:].sum().item() == pytest.approx(1.0, abs=1e-5)
    # hooks gone after exit
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules() if isinstance(m, NonLocalBlock))
    with AttentionRecorder(model, blocks=["res4.nl.0"]) as rec2:
        model(x)
        model.res4.nl["0"](x=x)  # keyword call is recorded too
    assert rec2.names == ["res4.nl.0"]
    assert torch.equal(rec2.inputs["res4.nl.0"], x)
    with pytest.raises(ConfigError, match="res9.nl.0"):
        AttentionRecorder(model, blocks=["res9.nl.0"])
    with pytest.raises(ConfigError, match="no input recorded"):
        rec2.attention("res3.nl.1", torch.tensor([[0, 0, 0]]))


def test_state_dict_keys_and_shapes():
    sd = NonLocalBlock(16).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["theta.weight"] == (8, 16, 1, 1, 1) and shapes["theta.bias"] == (8,)
    assert shapes["phi.weight"] == (8, 16, 1, 1, 1) and shapes["g.weight"] == (8, 16, 1, 1, 1)
    assert shapes["out.weight"] == (16, 8, 1, 1, 1) and shapes["out.bias"] == (16,)
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(sd)
    assert len(sd) == 13
    gauss = NonLocalBlock(16, instantiation="gaussian", norm="none").state_dict()
    assert set(gauss) == {"g.weight", "g.bias", "out.weight", "out.bias"}
    concat = NonLocalBlock(16, 4, instantiation="concatenation").state_dict()
    assert tuple(concat["concat_project.weight"].shape) == (1, 8)
    assert tuple(concat["theta.weight"].shape) == (4, 16, 1, 1, 1)
    # init: BN gamma zero, or out zero with norm none
    b = NonLocalBlock(16)
    assert torch.count_nonzero(b.bn.weight) == 0 and torch.count_nonzero(b.out.weight) > 0
    n = NonLocalBlock(16, norm="none")
    assert torch.count_nonzero(n.out.weight) == 0 and torch.count_nonzero(n.out.bias) == 0
    _randomise(n)
    n.reset_parameters()
    assert torch.count_nonzero(n.out.weight) == 0


def test_scale_values():
    assert NonLocalBlock(16).scale_value == pytest.approx(8**-0.5)
    assert NonLocalBlock(16, scale=False).scale_value == 1.0
    assert NonLocalBlock(16, scale=0.25).scale_value == 0.25
    assert NonLocalBlock(16, instantiation="gaussian").scale_value == pytest.approx(16**-0.5)
    assert NonLocalBlock(16, instantiation="dot_product").scale_value == 1.0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"instantiation": "softmax"}, "instantiation"),
        ({"mode": "spatial"}, "mode"),
        ({"pool_position": "before"}, "pool_position"),
        ({"norm": "gn"}, "norm"),
        ({"impl": "cuda"}, "impl"),
        ({"pool_size": (2, 2)}, "pool_size"),
        ({"pool_size": (1, 0, 2)}, "pool_size"),
        ({"pool_size": 2}, "pool_size"),
        ({"dim_inner": 0}, "dim_inner"),
        ({"scale": 0.5, "instantiation": "dot_product"}, "scale"),
        ({"scale": "yes"}, "scale"),
    ],
)
def test_bad_args_raise_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        NonLocalBlock(8, **kwargs)


def test_bad_inputs():
    block = NonLocalBlock(8)
    with pytest.raises(ConfigError, match="channels"):
        block(torch.randn(1, 4, 2, 4, 4))
    with pytest.raises(ConfigError, match="shape"):
        block(torch.randn(8, 8))
    with pytest.raises(ConfigError, match="dim_in"):
        NonLocalBlock(0)


def test_dot_product_fast_path_never_forms_n_by_n_prime():
    """N = 2*4096, N' = 4096 per sample: an N x N' fp32 matrix would be 128 MiB; the linear form needs a few MiB.
    Fails if the fast path calls bmm/matmul with an N x N' result (checked by intercepting torch.bmm)."""
    block = _randomise(NonLocalBlock(4, 2, instantiation="dot_product", pool_size=(1, 1, 1))).eval()
    x = torch.randn(2, 4, 1, 64, 64)  # N = N' = 4096
    seen = []
    real_bmm = torch.bmm

    def spy(a, b, *args, **kw):
        seen.append((a.shape[1], b.shape[2]))
        return real_bmm(a, b, *args, **kw)

    torch.bmm = spy
    try:
        with torch.no_grad():
            y = block(x)
    finally:
        torch.bmm = real_bmm
    assert seen and all(r * c < 4096 * 4096 for r, c in seen), seen
    block.impl = "explicit"
    with torch.no_grad():
        assert _close(y, block(x)) <= 1e-4


def test_concatenation_chunks_queries(monkeypatch):
    import nlvid.models.nonlocal_block as nb

    monkeypatch.setattr(nb, "_CONCAT_CHUNK_ELEMS", 64)  # force many chunks
    torch.manual_seed(3)
    block = _randomise(NonLocalBlock(8, instantiation="concatenation"))
    x = torch.randn(2, 8, 2, 6, 6)
    outs = {}
    for impl in ("explicit", "fast"):
        block.impl = impl
        xx = x.clone().requires_grad_()
        y = block(xx)
        y.square().sum().backward()
        outs[impl] = (y.detach(), xx.grad, block.concat_project.weight.grad.clone())
        block.zero_grad()
    for a, b in zip(outs["fast"], outs["explicit"]):
        assert _close(a, b) <= 1e-4


def test_parameter_gradients_match():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 4, 4, 4)
    for inst in INSTS:
        block = _randomise(NonLocalBlock(8, DIM_INNER, instantiation=inst))
        grads = {}
        for impl in ("explicit", "fast"):
            block.impl = impl
            block.zero_grad()
            block(x).square().sum().backward()
            grads[impl] = {n: p.grad.clone() for n, p in block.named_parameters()}
        # one vector, so parameters whose gradient is ~0 in theory (g.bias under train-mode BN) compare on the
        # scale of the others rather than on their own rounding noise
        fast = torch.cat([g.flatten() for g in grads["fast"].values()])
        ref = torch.cat([g.flatten() for g in grads["explicit"].values()])
        assert _close(fast, ref) <= 1e-4, inst


# ---------------------------------------------------------------------------------------------------------------
# global_context (GCNet)
# ---------------------------------------------------------------------------------------------------------------


def _gcnet_reference(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """GCNet's ContextBlock (mmcv, pooling_type="att", fusion "channel_add") written out for 3-D input, spacetime
    mode, no key pooling: softmax over positions of a 1x1x1 conv, attention-pooled x, then conv C -> C', LayerNorm
    over [C', 1, 1, 1], ReLU, conv C' -> C, added to every position."""
    B, C = x.shape[:2]
    logits = F.conv3d(x, block.mask.weight, block.mask.bias).view(B, 1, -1)  # (B, 1, N)
    a = torch.softmax(logits, dim=-1)
    ctx = torch.bmm(x.view(B, C, -1), a.transpose(1, 2)).view(B, C, 1, 1, 1)  # (B, C, N) @ (B, N, 1) -> (B, C, 1...)
    t = F.conv3d(ctx, block.g.weight, block.g.bias)
    t = torch.relu(F.layer_norm(t, t.shape[1:], block.ln.weight, block.ln.bias, block.ln.eps))
    return x + F.conv3d(t, block.out.weight, block.out.bias)


def test_global_context_equals_plain_formula():
    torch.manual_seed(5)
    x = torch.randn(2, 16, 3, 5, 6)
    block = _randomise(NonLocalBlock(16, instantiation="global_context", pool_size=None))
    ref = _gcnet_reference(block, x)
    for impl in ("explicit", "fast"):
        block.impl = impl
        assert _close(block(x), ref) <= 1e-5, impl
    # its attention rows: one map, the same for every query
    w, grid = block.attention_rows(x, torch.tensor([[0, 0, 0], [2, 4, 5], [1, 2, 3]]))
    assert grid == (3, 5, 6)
    a = torch.softmax(F.conv3d(x, block.mask.weight, block.mask.bias).view(2, -1), -1)  # (B, N)
    assert torch.allclose(w, a[:, None].expand(-1, 3, -1), atol=1e-6)


def test_global_context_parts_defaults_and_state_dict():
    b = NonLocalBlock(32, instantiation="global_context")
    assert b.dim_inner == 8 and b.norm == "none" and not b.variant.query_dependent
    shapes = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    assert shapes == {"mask.weight": (1, 32, 1, 1, 1), "mask.bias": (1,), "g.weight": (8, 32, 1, 1, 1),
                      "g.bias": (8,), "ln.weight": (8, 1, 1, 1), "ln.bias": (8, 1, 1, 1),
                      "out.weight": (32, 8, 1, 1, 1), "out.bias": (32,)}
    assert torch.count_nonzero(b.out.weight) == 0 and torch.count_nonzero(b.out.bias) == 0  # identity at init
    assert NonLocalBlock(32, 2, instantiation="global_context").dim_inner == 2  # r = 16
    assert b.scale_value == 1.0
    with pytest.raises(ConfigError, match="norm='bn' is not allowed for instantiation=global_context"):
        NonLocalBlock(32, instantiation="global_context", norm="bn")
    with pytest.raises(ConfigError, match="never scaled"):
        NonLocalBlock(32, instantiation="global_context", scale=0.5)
