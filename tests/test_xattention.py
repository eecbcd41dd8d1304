"""XAttention: antidiagonal scores and threshold selection against an independent
float64 implementation, the op against dense attention with the reference's block
mask expanded to a token mask, per-head lengths, left padding and validation."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import tokensparse.methods.xattention as xa
from tokensparse.kernels import triton_runnable
from tokensparse.methods.xattention import (
    XAttentionConfig,
    antidiagonal_block_scores,
    estimate_xattention_pattern,
    xattention_attention,
)

TRITON = triton_runnable(torch.empty(0))
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 (or CUDA)")


# ---------------------------------------------------------------- independent reference
def reference_scores(q, k, *, stride, block, scale=None):
    """Normalised block scores of ONE head alone: q, k (n, D) -> (NB, NB) float64.

    Written from the paper's description: the logit of reshaped tile (r, c) is the
    sum over its antidiagonal, q[rS + S - 1 - i] . k[cS + i] for i < S, with the
    sequence zero-padded to a multiple of S.
    """
    n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    m = -(-n // stride)
    qp = F.pad(q.double(), (0, 0, 0, m * stride - n))
    kp = F.pad(k.double(), (0, 0, 0, m * stride - n))
    logits = sum(qp[stride - 1 - i :: stride] @ kp[i::stride].T for i in range(stride)) * scale / stride
    logits = logits.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), -math.inf)
    probs = torch.softmax(logits, dim=-1)
    tile, nb = block // stride, -(-n // block)
    scores = torch.zeros(nb, nb, dtype=torch.float64)
    for qb in range(nb):
        for kb in range(nb):
            scores[qb, kb] = probs[qb * tile : (qb + 1) * tile, kb * tile : (kb + 1) * tile].sum()
    return scores / scores.sum(dim=1, keepdim=True)


def reference_blocks(scores, threshold):
    """Set of kept (qb, kb): per row the fewest largest (ties: lower kb) reaching
    threshold of the row, in exact arithmetic, plus the sink and the diagonal."""
    kept = set()
    for qb in range(scores.shape[0]):
        row = [Fraction(x) for x in scores[qb, : qb + 1].tolist()]
        goal, acc = Fraction(threshold) * sum(row), Fraction(0)
        for kb in sorted(range(qb + 1), key=lambda j: (-row[j], j)):
            if acc >= goal:
                break
            kept.add((qb, kb))
            acc += row[kb]
        kept |= {(qb, 0), (qb, qb)}
    return kept


def reference_output(q, k, v, blocks, block, scale=None):
    """Dense float64 attention of ONE head with the block set expanded to a token mask."""
    n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for qb, kb in blocks:
        allowed[qb * block : (qb + 1) * block, kb * block : (kb + 1) * block] = True
    allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    logits = (q.double() @ k.double().T * scale).masked_fill(~allowed, -math.inf)
    return torch.softmax(logits, dim=-1) @ v.double()


def structured_qkv(batch, heads, kv_heads, length, dim, dtype=torch.float64, dim_v=None):
    """Peaked attention: a few heavy keys (vertical lines) and sharp logits."""
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64) * 3.0 / dim**0.25
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64) / dim**0.25
    v = torch.randn(batch, kv_heads, length, dim_v or dim, dtype=torch.float64)
    heavy = torch.randperm(length)[: max(1, length // 40)]
    k[:, :, heavy] += q.mean(dim=(1, 2))[:, None, None, :] * 0.5
    return q.to(dtype), k.to(dtype), v.to(dtype)


def pattern_set(pattern, b, h):
    return {tuple(x) for x in pattern.block_mask()[b, h].nonzero().tolist()}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def poison():
    """torch.empty (and new_empty) return NaN while the test runs: unwritten output shows."""
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    torch.utils.deterministic.fill_uninitialized_memory = old[2]


# ---------------------------------------------------------------- estimation
SCORE_CASES = [
    # heads, kv_heads, length, stride, block
    (4, 4, 150, 4, 16),  # MHA; 150 is a multiple of neither S nor B
    (4, 2, 97, 8, 32),  # GQA 2; odd length
    (3, 1, 128, 2, 16),  # MQA; whole blocks
    (2, 1, 61, 16, 16),  # stride == block: one reshaped row per block
]


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "H{}/{}-L{}-S{}-B{}".format(*c))
def test_scores_and_blocks_match_reference(case, threshold):
    heads, kv_heads, length, stride, block = case
    q, k, _ = structured_qkv(2, heads, kv_heads, length, 16)
    scores = antidiagonal_block_scores(q, k, stride=stride, block_size=block)
    pattern = estimate_xattention_pattern(q, k, threshold=threshold, stride=stride, block_size=block)
    group = heads // kv_heads
    for b in range(2):
        for h in range(heads):
            ref = reference_scores(q[b, h], k[b, h // group], stride=stride, block=block)
            torch.testing.assert_close(scores[b, h], ref, rtol=1e-9, atol=1e-12)
            assert pattern_set(pattern, b, h) == reference_blocks(ref, threshold), f"head {b},{h}"
    share = pattern.visited_share
    if threshold == 1.0:  # every causal block carries some estimated mass
        assert (share == 1).all()
    if threshold <= 0.6:
        assert (share < 1).any(), "test inputs should give sparse patterns"


def test_planted_vertical_line_is_found():
    # One key every query attends to strongly: its block must rank first and be kept
    # by all later rows.
    length, dim, block = 256, 16, 16
    q = torch.randn(1, 2, length, dim, dtype=torch.float64) * 0.3
    k = torch.randn(1, 1, length, dim, dtype=torch.float64) * 0.3
    direction = torch.randn(dim, dtype=torch.float64)
    q += direction
    k[0, 0, 150] = direction * 4
    pattern = estimate_xattention_pattern(q, k, threshold=0.5, stride=4, block_size=block)
    kb = 150 // block
    assert pattern.block_mask()[0, :, kb:, kb].all()
    scores = antidiagonal_block_scores(q, k, stride=4, block_size=block)
    assert (scores[0, :, kb + 1 :].argmax(dim=-1) == kb).all()


def test_ties_go_to_the_lower_block():
    # Zero queries: every reshaped row is uniform over its causal columns, so all the
    # full blocks left of the diagonal tie exactly.
    q = torch.zeros(1, 1, 128, 16)
    k = torch.randn(1, 1, 128, 16)
    scores = antidiagonal_block_scores(q, k, stride=4, block_size=16)
    assert (scores[0, 0, 7, :7] == scores[0, 0, 7, 0]).all()
    pattern = estimate_xattention_pattern(q, k, threshold=0.5, stride=4, block_size=16)
    assert pattern_set(pattern, 0, 0) == reference_blocks(scores[0, 0].double(), 0.5)
    mask = pattern.block_mask()[0, 0]
    for qb in range(1, 8):
        kept = mask[qb, :qb]
        assert kept.any() and kept[: int(kept.sum())].all(), f"row {qb} should keep a prefix of blocks"
    assert not mask[7, 4:7].any()


def test_threshold_one_drops_blocks_whose_estimate_underflows():
    # One key far above all others (logit gap ~900): every other block of the rows
    # that see it gets exactly zero estimated mass, so threshold 1 keeps only that
    # block, the sink and the diagonal.
    length, dim, block = 128, 16, 16
    q = torch.randn(1, 1, length, dim, dtype=torch.float64) * 0.1
    k = torch.randn(1, 1, length, dim, dtype=torch.float64) * 0.1
    direction = torch.randn(dim, dtype=torch.float64)
    direction *= 60.0 / direction.norm()  # logit 4 * 60^2 * scale / S = 900
    q += direction
    k[0, 0, 40:44] = direction  # one whole reshaped column (S = 4), block 2
    pattern = estimate_xattention_pattern(q, k, threshold=1.0, stride=4, block_size=block)
    mask = pattern.block_mask()[0, 0]
    for qb in range(3, length // block):
        assert {kb for kb in range(qb + 1) if mask[qb, kb]} == {0, 2, qb}
    assert pattern.block_cnt[0, 0, :3].tolist() == [1, 2, 3]


@pytest.mark.parametrize("budget", ["one block", "two kv heads"])
def test_estimation_chunking_does_not_change_the_pattern(monkeypatch, budget):
    q, k, _ = structured_qkv(2, 8, 4, 200, 16)
    lens = torch.tensor([[200] * 8, [111] * 2 + [37] * 2 + [200] * 2 + [150] * 2])
    kwargs = dict(threshold=0.8, stride=4, block_size=32, seq_lens=lens)
    whole_scores = antidiagonal_block_scores(q, k, stride=4, block_size=32, seq_lens=lens)
    whole = estimate_xattention_pattern(q, k, **kwargs)
    reshaped = 7 * 32 // 4  # padded length / stride
    head_bytes = 2 * 2 * reshaped * reshaped * 8  # batch * group * rows * cols * float64
    monkeypatch.setattr(xa, "_ESTIMATE_CHUNK_BYTES", 1 if budget == "one block" else 2 * head_bytes)
    expected = (1, 8) if budget == "one block" else (2, reshaped)  # (KV heads, reshaped rows) per step
    assert xa._estimate_steps(2, 2, 4, reshaped, 8, torch.float64) == expected
    torch.testing.assert_close(
        antidiagonal_block_scores(q, k, stride=4, block_size=32, seq_lens=lens), whole_scores, rtol=1e-12, atol=1e-14
    )
    chunked = estimate_xattention_pattern(q, k, **kwargs)
    assert torch.equal(chunked.block_mask(), whole.block_mask())


# ---------------------------------------------------------------- the op
OP_CASES = [
    # dtype, backend, layout, heads, kv_heads, length, stride, block, dim_v
    (torch.float32, "torch", "bhld", 4, 2, 150, 4, 16, 16),
    (torch.bfloat16, "torch", "blhd", 3, 1, 197, 8, 32, 16),
    (torch.float32, "triton", "blhd", 4, 2, 137, 4, 32, 24),
    (torch.bfloat16, "triton", "bhld", 2, 2, 100, 4, 16, 16),
    (torch.float32, "triton", "bhld", 3, 1, 200, 4, 32, 16),
]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize(
    "case", OP_CASES, ids=lambda c: "{}-{}-{}-H{}/{}-L{}-S{}-B{}".format(str(c[0])[6:], *c[1:8])
)
def test_op_equals_dense_attention_on_the_reference_pattern(case):
    dtype, backend, layout, heads, kv_heads, length, stride, block, dim_v = case
    if backend == "triton" and not TRITON:
        pytest.skip("needs TRITON_INTERPRET=1 (or CUDA)")
    q, k, v = structured_qkv(2, heads, kv_heads, length, 16, dtype=dtype, dim_v=dim_v)
    out, pattern = xattention_attention(
        q, k, v, threshold=0.5, stride=stride, block_size=block, backend=backend, layout=layout, return_pattern=True
    )
    assert out.dtype == dtype
    if layout == "blhd":
        assert out.shape == (2, length, heads, dim_v)
        out = out.transpose(1, 2)
    assert not out.isnan().any(), "unwritten or NaN output"
    group = heads // kv_heads
    errors = []
    for b in range(2):
        for h in range(heads):
            qh, kh, vh = q[b, h], k[b, h // group], v[b, h // group]
            blocks = reference_blocks(reference_scores(qh, kh, stride=stride, block=block), 0.5)
            assert pattern_set(pattern, b, h) == blocks, f"head {b},{h}"
            errors.append(rel_err(out[b, h], reference_output(qh, kh, vh, blocks, block)))
    assert (pattern.visited_share < 1).any(), "test inputs should give a sparse pattern"
    assert max(errors) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_threshold_one_is_dense_causal_attention(backend):
    q, k, v = structured_qkv(1, 4, 2, 99, 16, dtype=torch.float32)
    out, pattern = xattention_attention(
        q, k, v, threshold=1.0, stride=4, block_size=16, backend=backend, return_pattern=True
    )
    assert (pattern.visited_share == 1).all()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [3, 1])
def test_per_head_lengths_equal_each_head_alone(kv_heads):
    # Compressed sequences: each head's valid prefix is treated as if alone; padding is junk.
    heads = 3 if kv_heads == 3 else 2
    q, k, v = structured_qkv(2, heads, kv_heads, 120, 16)
    lens = torch.tensor([[120, 75, 16], [5, 0, 64]]) if kv_heads == 3 else torch.tensor([[120, 120], [47, 47]])
    for t in (q, k, v):
        t[..., 100:, :] += 50.0 * (torch.arange(120)[100:, None] % 3 - 1)  # junk where some heads are padded
    kwargs = dict(threshold=0.8, stride=4, block_size=16, backend="torch")
    out, pattern = xattention_attention(q, k, v, seq_lens=lens, return_pattern=True, **kwargs)
    scores = antidiagonal_block_scores(q, k, stride=4, block_size=16, seq_lens=lens)
    assert not out.isnan().any()
    for b in range(2):
        for h in range(heads):
            n = int(lens[b, h])
            assert (out[b, h, n:] == 0).all()
            if n == 0:
                assert pattern.block_cnt[b, h].sum() == 0
                continue
            kvh = h * kv_heads // heads
            ref = reference_scores(q[b, h, :n], k[b, kvh, :n], stride=4, block=16)
            nb = ref.shape[0]
            torch.testing.assert_close(scores[b, h, :nb, :nb], ref, rtol=1e-9, atol=1e-12)
            assert (scores[b, h, nb:] == 0).all() and (scores[b, h, :, nb:] == 0).all()
            assert pattern_set(pattern, b, h) == reference_blocks(ref, 0.8)
            alone_qkv = (t[b : b + 1, i : i + 1, :n] for t, i in ((q, h), (k, kvh), (v, kvh)))
            alone = xattention_attention(*alone_qkv, **kwargs)
            torch.testing.assert_close(out[b, h, :n], alone[0, 0])


def test_gqa_heads_of_a_group_must_share_a_length():
    q, k, v = structured_qkv(1, 4, 2, 40, 16)
    with pytest.raises(ValueError, match="seq_lens"):
        xattention_attention(q, k, v, seq_lens=torch.tensor([[40, 30, 20, 20]]), block_size=16, stride=4)


def test_left_padding_equals_unpadded():
    q, k, v = structured_qkv(2, 4, 2, 90, 16, dtype=torch.float32)
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[1, :37] = False
    kwargs = dict(threshold=0.7, stride=4, block_size=16, backend="torch")
    out, pattern = xattention_attention(q, k, v, key_padding_mask=mask, layout="blhd", return_pattern=True, **kwargs)
    assert out.shape == (2, 90, 4, 16)
    assert pattern.seq_lens.tolist() == [[90] * 4, [53] * 4]
    alone = xattention_attention(q[1:, :, 37:], k[1:, :, 37:], v[1:, :, 37:], **kwargs)
    torch.testing.assert_close(out[1, 37:].transpose(0, 1), alone[0], atol=1e-6, rtol=1e-6)
    assert (out[1, :37] == 0).all()
    first = xattention_attention(q[:1], k[:1], v[:1], **kwargs)
    torch.testing.assert_close(out[0].transpose(0, 1), first[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- settings
BAD_SETTINGS = [
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"threshold": True}, "threshold"),
    ({"stride": 0}, "stride"), ({"stride": 2.0}, "stride"), ({"stride": 3}, "stride"),
    ({"block_size": 24}, "block_size"), ({"block_size": 16, "stride": 32}, "block_size"),
]


@pytest.mark.parametrize("kwargs, field", BAD_SETTINGS + [({"backend": "gpu"}, "backend")])
def test_config_validates(kwargs, field):
    with pytest.raises(ValueError, match=field):
        XAttentionConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", BAD_SETTINGS + [({"layout": "x"}, "layout"), ({"backend": "gpu"}, "backend")])
def test_op_validates(kwargs, field):
    q, k, v = structured_qkv(1, 2, 1, 40, 16)
    with pytest.raises(ValueError, match=field):
        xattention_attention(q, k, v, **kwargs)


def test_config_kwargs_and_runs_dense():
    config = XAttentionConfig(threshold=0.05, stride=4, block_size=16, backend="torch")
    assert config.kwargs() == {"threshold": 0.05, "stride": 4, "block_size": 16, "backend": "torch"}
    assert XAttentionConfig().kwargs()["stride"] == 8 and XAttentionConfig().block_size == 128
    assert XAttentionConfig().runs_dense(256) and not XAttentionConfig().runs_dense(257)
    q, k, v = structured_qkv(1, 2, 1, 48, 16, dtype=torch.float32)
    for length in (16, 32):  # runs_dense: every causal block whatever the threshold
        assert config.runs_dense(length)
        _, pattern = xattention_attention(q[:, :, :length], k[:, :, :length], v[:, :, :length],
                                          return_pattern=True, **config.kwargs())
        assert (pattern.visited_share == 1).all()
    assert not config.runs_dense(48)
