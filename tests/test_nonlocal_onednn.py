"""oneDNN routing on CPU (nlvid.models.onednn) and the NL fast path's use of it (nlvid.models.nonlocal_block):
gemm_nt, _SoftmaxAttention, the 1x1x1 convs, and when each is taken. Every result is compared with an independent
computation (float64 matmul, SDPA in float64, the explicit block), and the tests that rely on the oneDNN path being
taken check that it was."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import nlvid.models.nonlocal_block as nb
from nlvid.models.nonlocal_block import NonLocalBlock
from nlvid.models.onednn import gemm_nt

from test_nonlocal import _close, _randomise


@pytest.fixture
def attention_calls(monkeypatch):
    """Records the q shape of every _SoftmaxAttention call."""
    calls: list[tuple[int, ...]] = []
    original = nb._SoftmaxAttention.apply

    def spy(q, k, v, scale):
        calls.append(tuple(q.shape))
        return original(q, k, v, scale)

    monkeypatch.setattr(nb._SoftmaxAttention, "apply", spy)
    return calls


@pytest.mark.parametrize("M,K,N", [(7, 3, 5), (448, 256, 784), (64, 256, 784), (196, 392, 512), (1, 9, 1)])
def test_gemm_nt_is_a_times_b_transposed(M, K, N):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    out = gemm_nt(a, b)
    assert out.shape == (M, N)
    ref = (a.double() @ b.double().t()).float()
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("n,n_keys", [(3136, 784), (12544, 3136), (784, 196), (5, 3), (1001, 70), (100, 10**6)])
def test_row_blocks_cover_every_row_once_in_near_equal_blocks(n, n_keys):
    blocks = nb._row_blocks(n, n_keys)
    assert blocks[0].start == 0 and blocks[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    rows = [b.stop - b.start for b in blocks]
    assert max(rows) <= nb._ATTENTION_ROWS
    assert min(rows) >= max(rows) - len(rows)  # no small tail block


@pytest.mark.parametrize("G,n,m,D,E", [(2, 300, 70, 16, 24), (1, 1001, 129, 32, 8), (3, 5, 3, 4, 4)])
def test_softmax_attention_equals_sdpa_values_and_gradients(monkeypatch, G, n, m, D, E):
    monkeypatch.setattr(nb, "_ATTENTION_ROWS", 64)  # several row blocks per group
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(G, n, D, generator=gen), torch.randn(G, m, D, generator=gen)
    v, dy = torch.randn(G, m, E, generator=gen), torch.randn(G, n, E, generator=gen)
    scale = 2.0 * D**-0.5  # sharper rows than 1/sqrt(D), so the softmax is far from uniform
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    y = nb._SoftmaxAttention.apply(*ins, scale)
    grads = torch.autograd.grad(y, ins, dy)
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.unsqueeze(1) for t in ref_ins), scale=scale).squeeze(1)
    ref_grads = torch.autograd.grad(ref, ref_ins, dy.double())
    assert y.shape == (G, n, E) and y.dtype == torch.float32
    assert _close(y, ref.float()) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert _close(got, want.float()) <= 1e-5


def test_model_sized_attention_takes_the_onednn_path(two_threads):
    q, k = torch.empty(2, 3136, 256), torch.empty(2, 784, 256)  # I3D-R50 res3 block at 8 frames
    assert nb._onednn_attention_applies(q, k)
    assert not nb._onednn_attention_applies(q.double(), k.double())
    assert not nb._onednn_attention_applies(torch.empty(1568, 4, 256), torch.empty(1568, 4, 256))  # time mode
    torch.set_num_threads(1)
    assert not nb._onednn_attention_applies(q, k)


GRID = list(itertools.product(["embedded_gaussian", "gaussian"], ["spacetime", "space", "time"], ["input", "after"]))


@pytest.mark.parametrize("inst,mode,pos", GRID, ids=["-".join(p) for p in GRID])
def test_channels_last_fast_path_equals_explicit(monkeypatch, two_threads, attention_calls, inst, mode, pos):
    """Channels-last input (the 1x1x1 convs) with the oneDNN attention forced on for every size: output, input
    gradient and parameter gradients equal the explicit block's, in training and in eval (BN folded)."""
    monkeypatch.setattr(nb, "_ONEDNN_ATTENTION_MIN_SCORES", 0)
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 4, 6).contiguous(memory_format=torch.channels_last_3d)  # time mode: 48 groups
    fast = _randomise(NonLocalBlock(8, 4, instantiation=inst, mode=mode, pool_position=pos, impl="fast"))
    ref = _randomise(NonLocalBlock(8, 4, instantiation=inst, mode=mode, pool_position=pos, impl="explicit"))
    for training in (True, False):
        outs = {}
        for name, block in (("fast", fast), ("ref", ref)):
            block.train(training)
            block.zero_grad()
            xx = x.clone().requires_grad_()
            y = block(xx)
            y.square().sum().backward()
            params = torch.cat([p.grad.flatten() for p in block.parameters() if p.grad is not None])
            outs[name] = (y, xx.grad, params)
        assert outs["fast"][0].is_contiguous(memory_format=torch.channels_last_3d)
        for got, want in zip(outs["fast"], outs["ref"]):
            assert _close(got, want) <= 1e-4, training
    assert attention_calls, "the oneDNN attention was not used"


def test_block_uses_sdpa_with_one_thread_and_the_same_numbers(two_threads, attention_calls):
    torch.manual_seed(3)
    x = torch.randn(2, 16, 4, 16, 16).contiguous(memory_format=torch.channels_last_3d)  # n = 1024, n' = 256
    block = _randomise(NonLocalBlock(16, 8, impl="fast")).train()
    y2 = block(x)
    assert attention_calls == [(2, 1024, 8)]
    torch.set_num_threads(1)
    y1 = block(x)
    assert len(attention_calls) == 1  # SDPA this time
    assert _close(y1, y2) <= 1e-5


def test_a_traced_block_holds_sdpa_and_serves_any_batch(monkeypatch, two_threads, attention_calls):
    """torch.jit.trace (and the exporters) get one SDPA op, not the Python loops frozen to the traced batch."""
    monkeypatch.setattr(nb, "_ONEDNN_ATTENTION_MIN_SCORES", 0)
    torch.manual_seed(4)
    block = _randomise(NonLocalBlock(8, 4)).eval()
    x2, x3 = torch.randn(2, 8, 4, 6, 6), torch.randn(3, 8, 4, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(block, x2, check_trace=False)
        assert attention_calls == []
        y3 = traced(x3)
        assert attention_calls == []
        assert _close(y3, block(x3)) <= 1e-5
    assert attention_calls == [(3, 144, 4)]


def test_conv1x1_uses_onednn_follows_torchs_rule(two_threads):
    """Checked against what torch actually runs: oneDNN (mkldnn_convolution) or its slow fallback."""
    from torch.profiler import ProfilerActivity, profile

    from nlvid.models.onednn import conv1x1_uses_onednn

    def runs_onednn(x):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            F.conv3d(x, torch.randn(4, x.shape[1], 1, 1, 1))
        return any(e.key == "aten::mkldnn_convolution" for e in prof.key_averages())

    cases = [torch.randn(2, 8, 4, 6, 6), torch.randn(1, 8, 2, 3, 3), torch.randn(1, 64, 4, 12, 12),
             torch.randn(16, 8, 1, 3, 3)]
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for x in cases:
            assert conv1x1_uses_onednn(x) == runs_onednn(x), (threads, tuple(x.shape))
    assert not conv1x1_uses_onednn(torch.randn(2, 8, 4, 6, 6).double())


def test_one_thread_never_takes_torchs_slow_1x1_conv(two_threads):
    """With one thread torch sends a 1x1x1 conv of a small batch to its im2col fallback (3-4x slower): the model
    folds such convs into a batch of B*T and the NL block uses its matmul path instead."""
    from torch.profiler import ProfilerActivity, profile

    from nlvid.models import create_model

    torch.set_num_threads(1)
    m = create_model("c2d_r18_nl5", width=8, num_classes=3).train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(torch.randn(2, 3, 8, 32, 32)).sum().backward()
    keys = {e.key for e in prof.key_averages()}
    assert not {k for k in keys if "slow_conv" in k}, keys
