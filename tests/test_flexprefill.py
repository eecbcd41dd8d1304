"""FlexPrefill: pattern estimation against an independent loop implementation,
the op against dense attention on its own pattern, per-head lengths, left
padding, composition with Token Sparse Attention, and the transformers method."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokensparse import TokenSparseConfig, token_sparse_attention
from tokensparse.methods.flexprefill import FlexPrefillConfig, estimate_pattern, flexprefill_attention
from tokensparse.kernels.block_sparse import block_sparse_attention_ref
from tokensparse.kernels.reference import gather_kept_ref, scatter_kept_ref
from tokensparse.selection import select_tokens


# ---------------------------------------------------------------- independent reference
def _cover(values, gamma):
    """Fewest of the largest values (ties: lower index first) reaching gamma of the sum."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    total, acc, chosen = sum(values), 0.0, []
    for i in order:
        if total <= 0 or acc >= gamma * total:
            break
        chosen.append(i)
        acc += values[i]
    return order, len(chosen)


def reference_pattern(q, k, *, gamma, tau, min_budget, block, scale=None):
    """Blocks of ONE head alone: q, k (n, D) float64. Returns (set of (qb, kb), query_aware)."""
    n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    rows = list(range(n - min(block, n), n))
    nb = -(-n // block)
    vertical = [0.0] * n
    slash = [0.0] * n
    for i in rows:
        probs = torch.softmax(q[i] @ k[: i + 1].T * scale, dim=0)
        for j in range(i + 1):
            vertical[j] += probs[j].item() / len(rows)
            slash[i - j] += probs[j].item() / len(rows)
    v_block = [sum(vertical[b * block : (b + 1) * block]) for b in range(nb)]
    diag = [0.0] * nb
    for o in range(n):
        s, r = divmod(o, block)
        diag[s] += slash[o] * (block - r) / block
        if s + 1 < nb:
            diag[s + 1] += slash[o] * r / block
    k_mean = [k[b * block : (b + 1) * block].mean(0) for b in range(nb)]
    count = [min(block, n - b * block) for b in range(nb)]
    q_last = q[rows].mean(0)
    est = torch.softmax(torch.tensor([(q_last @ k_mean[b]).item() * scale + math.log(count[b]) for b in range(nb)]), 0)
    true = torch.tensor(v_block) / sum(v_block)
    mid = (est + true) / 2
    jsd = 0.5 * sum(
        (p * math.log(p / m) if p > 0 else 0.0) + (t * math.log(t / m) if t > 0 else 0.0)
        for p, t, m in zip(est.tolist(), true.tolist(), mid.tolist())
    )
    query_aware = math.sqrt(max(jsd, 0.0)) < tau
    min_blocks = -(-min_budget // block)
    blocks = set()
    if query_aware:
        entries, values = [], []
        for qb in range(nb):
            q_mean = q[qb * block : (qb + 1) * block].mean(0)
            logits = torch.tensor([(q_mean @ k_mean[b]).item() * scale + math.log(count[b]) for b in range(qb + 1)])
            row = torch.softmax(logits, 0).tolist()
            entries += [(qb, kb) for kb in range(qb + 1)]
            values += row
            top = sorted(range(qb + 1), key=lambda kb: (-row[kb], kb))[:min_blocks]
            blocks |= {(qb, kb) for kb in top}
        order, c = _cover(values, gamma)
        blocks |= {entries[i] for i in order[:c]}
    else:
        order_v, c_v = _cover(v_block, gamma)
        order_s, c_s = _cover(diag, gamma)
        kept_v = set(order_v[: min(max(c_v, min_blocks), nb)])
        kept_s = set(order_s[: min(max(c_s, min_blocks), nb)])
        blocks = {(qb, kb) for qb in range(nb) for kb in range(qb + 1) if kb in kept_v or qb - kb in kept_s}
    blocks |= {(qb, 0) for qb in range(nb)} | {(qb, qb) for qb in range(nb)}
    return blocks, query_aware


def structured_qkv(batch, heads, kv_heads, length, dim, dtype=torch.float64, sharp=3.0):
    """Peaked attention: a few heavy keys (vertical lines) and sharp logits."""
    q = torch.randn(batch, heads, length, dim, dtype=dtype) * sharp / dim**0.25
    k = torch.randn(batch, kv_heads, length, dim, dtype=dtype) / dim**0.25
    v = torch.randn(batch, kv_heads, length, dim, dtype=dtype)
    heavy = torch.randperm(length)[: max(1, length // 40)]
    k[:, :, heavy] += q.mean(dim=(1, 2))[:, None, None, :] * 0.5
    return q, k, v


def pattern_sets(pattern, b, h):
    mask = pattern.block_mask()[b, h]
    return {tuple(x) for x in mask.nonzero().tolist()}


# ---------------------------------------------------------------- estimation
@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("gamma", [0.8, 0.95])
def test_pattern_matches_independent_reference(gamma, tau):
    q, k, _ = structured_qkv(2, 4, 2, 150, 16)
    pattern = estimate_pattern(q, k, gamma=gamma, tau=tau, min_budget=16, block_size=16)
    for b in range(2):
        for h in range(4):
            blocks, aware = reference_pattern(q[b, h], k[b, h // 2], gamma=gamma, tau=tau, min_budget=16, block=16)
            assert bool(pattern.query_aware[b, h]) == aware
            assert pattern_sets(pattern, b, h) == blocks, f"head {b},{h}"
    if tau == 0.0:
        assert not pattern.query_aware.any()
    if tau == 1.0:  # the JS distance (natural log) is at most sqrt(ln 2) < 1
        assert pattern.query_aware.all()
    share = pattern.visited_share
    assert ((share > 0) & (share <= 1)).all()


def test_planted_vertical_lines_are_found():
    # Two keys every query attends to strongly: their blocks must be visited by all rows.
    torch.manual_seed(1)
    length, dim = 512, 32
    q = torch.randn(1, 2, length, dim, dtype=torch.float64) * 0.3
    k = torch.randn(1, 1, length, dim, dtype=torch.float64) * 0.3
    direction = torch.randn(dim, dtype=torch.float64)
    q += direction
    for pos in (70, 300):
        k[0, 0, pos] = direction * 4
    pattern = estimate_pattern(q, k, gamma=0.9, tau=0.0, min_budget=0, block_size=32)
    mask = pattern.block_mask()[0]
    for pos in (70, 300):
        kb = pos // 32
        assert mask[:, kb:, kb].all()
    assert (pattern.visited_share < 0.5).all()


def test_min_budget_and_long_budget_make_it_dense():
    q, k, v = structured_qkv(1, 2, 1, 100, 16)
    for kwargs in ({"min_budget": 100}, {"gamma": 1.0, "tau": 0.0}):
        pattern = estimate_pattern(q, k, block_size=16, **kwargs)
        assert (pattern.visited_share == 1).all()


# ---------------------------------------------------------------- the op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_is_dense_attention_on_its_pattern(dtype):
    q, k, v = (t.to(dtype) for t in structured_qkv(2, 4, 2, 141, 32))
    out, pattern = flexprefill_attention(q, k, v, gamma=0.8, min_budget=0, block_size=16, return_pattern=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert (pattern.visited_share < 1).any(), "test inputs should give a sparse pattern"
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), pattern.block_idx, pattern.block_cnt, 16)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert ((out.double() - ref).norm() / ref.norm()) < tol


def test_op_dense_settings_equal_sdpa():
    q, k, v = structured_qkv(1, 4, 2, 99, 16, dtype=torch.float32)
    out = flexprefill_attention(q, k, v, gamma=1.0, tau=0.0, block_size=16, backend="torch")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_per_head_lengths_equal_each_head_alone():
    # Compressed sequences: each head's valid prefix is treated as if alone; padding is junk.
    q, k, v = structured_qkv(2, 3, 3, 120, 16)
    lens = torch.tensor([[120, 75, 16], [5, 97, 64]])
    for t in (q, k, v):
        t[..., 100:, :] += 50.0 * (torch.arange(120)[100:, None] % 3 - 1)  # junk where some heads are padded
    out, pattern = flexprefill_attention(
        q, k, v, seq_lens=lens, min_budget=16, block_size=16, tau=0.1, return_pattern=True, backend="torch"
    )
    for b in range(2):
        for h in range(3):
            n = int(lens[b, h])
            alone_q, alone_k, alone_v = (t[b : b + 1, h : h + 1, :n] for t in (q, k, v))
            ref, ref_pattern = flexprefill_attention(
                alone_q, alone_k, alone_v, min_budget=16, block_size=16, tau=0.1, return_pattern=True, backend="torch"
            )
            assert pattern_sets(pattern, b, h) == pattern_sets(ref_pattern, 0, 0)
            torch.testing.assert_close(out[b, h, :n], ref[0, 0])
            assert (out[b, h, n:] == 0).all()


def test_left_padding_equals_unpadded():
    q, k, v = structured_qkv(2, 4, 2, 90, 16, dtype=torch.float32)
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[1, :37] = False
    out = flexprefill_attention(q, k, v, key_padding_mask=mask, min_budget=16, block_size=16, layout="blhd")
    assert out.shape == (2, 90, 4, 16)
    alone = flexprefill_attention(q[1:, :, 37:], k[1:, :, 37:], v[1:, :, 37:], min_budget=16, block_size=16)
    torch.testing.assert_close(out[1, 37:].transpose(0, 1), alone[0], atol=1e-5, rtol=1e-5)
    assert (out[1, :37] == 0).all()
    first = flexprefill_attention(q[:1], k[:1], v[:1], min_budget=16, block_size=16)
    torch.testing.assert_close(out[0].transpose(0, 1), first[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_triton_backend_matches_torch_with_left_padding(layout):
    # "auto" runs the reference on the CPU even under TRITON_INTERPRET=1, so the kernel
    # path (strided output, padding moved to the end) is asked for by name here.
    from tokensparse.kernels import triton_runnable

    if not triton_runnable(torch.empty(0)):
        pytest.skip("the Triton kernel needs TRITON_INTERPRET=1 on the CPU")
    q, k, v = structured_qkv(2, 4, 2, 90, 16, dtype=torch.float32)
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[1, :37] = False
    kwargs = dict(key_padding_mask=mask, min_budget=16, block_size=16, layout=layout, return_pattern=True)
    out_t, pattern_t = flexprefill_attention(q, k, v, backend="triton", **kwargs)
    out_r, pattern_r = flexprefill_attention(q, k, v, backend="torch", **kwargs)
    assert torch.equal(pattern_t.block_mask(), pattern_r.block_mask())
    assert (pattern_r.visited_share < 1).any(), "test inputs should give a sparse pattern"
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-4)
    padded = out_t[1, :37] if layout == "blhd" else out_t[1, :, :37]
    assert (padded == 0).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"tau": -1.0}, "tau"),
     ({"min_budget": -1}, "min_budget"), ({"block_size": 24}, "block_size"), ({"layout": "x"}, "layout")],
)
def test_op_validates(kwargs, field):
    q, k, v = structured_qkv(1, 2, 1, 40, 16)
    with pytest.raises(ValueError, match=field):
        flexprefill_attention(q, k, v, **kwargs)


# ---------------------------------------------------------------- composition
def flexprefill_inner(**kwargs):
    """FlexPrefill's op as the inner attention of token sparse (what the composition method passes)."""
    from tokensparse.methods import get_method

    return get_method("flexprefill").inner(FlexPrefillConfig(**kwargs))


def test_config_fields_validate():
    from tokensparse.methods import parse_method

    spec = parse_method("token_sparse+flexprefill:gamma=0.9,tau=0.2,block_size=64,min_budget=256")
    assert spec.config.inner.config == FlexPrefillConfig(gamma=0.9, tau=0.2, min_budget=256, block_size=64)
    assert spec.config.token_sparse == TokenSparseConfig()
    for text, field in [("gamma=0", "gamma"), ("tau=-0.1", "tau"), ("block_size=100", "block_size"),
                        ("min_budget=-5", "min_budget"), ("magic=1", "magic")]:
        with pytest.raises(ValueError, match=field):
            parse_method("token_sparse+flexprefill:" + text)
    with pytest.raises(ValueError, match="attention"):  # the field moved into the composition method
        TokenSparseConfig(attention="flexprefill")


def test_composition_is_flexprefill_on_the_compressed_sequence():
    q, k, v = structured_qkv(2, 4, 2, 300, 16, dtype=torch.float32)
    config = TokenSparseConfig(coverage=0.3, window=32, min_tokens=64)
    inner = flexprefill_inner(block_size=16, min_budget=32)
    out, selection = token_sparse_attention(q, k, v, config=config, inner=inner, return_stats=True)
    assert selection.kept_idx is not None and (selection.num_kept < 300).any()
    q_c, k_c, v_c = gather_kept_ref(q, k, v, selection.kept_idx)
    out_c = flexprefill_attention(
        q_c, k_c, v_c, seq_lens=selection.num_kept, block_size=16, min_budget=32, backend="torch"
    )
    ref = scatter_kept_ref(out_c, selection.kept_idx, 300)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # With FlexPrefill made dense it is plain Token Sparse Attention.
    dense_fp = flexprefill_inner(gamma=1.0, tau=0.0, block_size=16, min_budget=32, backend="torch")
    plain = token_sparse_attention(q, k, v, config=config.replace(backend="torch"))
    torch.testing.assert_close(
        token_sparse_attention(q, k, v, config=config.replace(backend="torch"), inner=dense_fp), plain,
        atol=1e-5, rtol=1e-5,
    )


def test_composition_dense_selection_still_runs_flexprefill():
    q, k, v = structured_qkv(1, 2, 1, 120, 16, dtype=torch.float32)
    config = TokenSparseConfig(window=32, min_tokens=200)
    assert select_tokens(q, k, config).kept_idx is None
    out = token_sparse_attention(q, k, v, config=config, inner=flexprefill_inner(block_size=16, min_budget=16))
    torch.testing.assert_close(out, flexprefill_attention(q, k, v, block_size=16, min_budget=16))


# ---------------------------------------------------------------- transformers
def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than random init, so patterns are sparse
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(8.0)
    return model


def run_logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def test_flexprefill_method_on_a_model(monkeypatch):
    import tokensparse
    from tokensparse.methods import flexprefill as method_module

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 150))
    ref = run_logits(model, ids)
    calls = []
    real = method_module.block_sparse_op  # the body every FlexPrefill call runs
    monkeypatch.setattr(method_module, "block_sparse_op", lambda *a, **k: calls.append(1) or real(*a, **k))
    # Dense settings: the same function as SDPA.
    tokensparse.enable(model, FlexPrefillConfig(gamma=1.0, tau=0.0, min_budget=16, block_size=16, backend="torch"))
    assert model.config._attn_implementation == "tokensparse"
    torch.testing.assert_close(run_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    assert len(calls) == 2  # both layers
    # Sparse settings: runs, and differs from dense.
    tokensparse.enable(model, FlexPrefillConfig(gamma=0.5, tau=0.1, min_budget=16, block_size=16, backend="torch"))
    sparse = run_logits(model, ids)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, ref, atol=1e-3)
    # Short prompts and decode steps go to SDPA.
    calls.clear()
    run_logits(model, ids[:, :16])
    assert not calls
    tokensparse.disable(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(run_logits(model, ids), ref)


def test_flexprefill_method_left_padding():
    import tokensparse

    model = tiny_llama()
    tokensparse.enable(model, "flexprefill:gamma=0.6,min_budget=16,block_size=16,backend=torch")
    seqs = [torch.randint(1, 128, (n,)) for n in (160, 101)]
    ids = torch.zeros(2, 160, dtype=torch.long)
    mask = torch.zeros(2, 160, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, 160 - len(s):] = s
        mask[b, 160 - len(s):] = 1
    batch = run_logits(model, ids, attention_mask=mask)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(batch[b, 160 - len(s):], run_logits(model, s[None])[0], atol=1e-4, rtol=1e-4)


def test_token_sparse_with_flexprefill_on_a_model():
    import tokensparse

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 200))
    fp = "gamma=0.6,block_size=16,min_budget=16,backend=torch"
    # No sparse layers: every layer runs FlexPrefill alone.
    tokensparse.enable(model, f"token_sparse+flexprefill:sparse_layers=,{fp}")
    only_fp = run_logits(model, ids)
    tokensparse.disable(model)
    tokensparse.enable(model, FlexPrefillConfig(gamma=0.6, min_budget=16, block_size=16, backend="torch"))
    torch.testing.assert_close(only_fp, run_logits(model, ids))
    tokensparse.disable(model)
    # Layer 1 sparse: tokens dropped there, FlexPrefill on the compressed sequence.
    config = f"token_sparse+flexprefill:coverage=0.3,window=16,min_tokens=16,sparse_layers=1,{fp}"
    tokensparse.enable(model, config, record=True)
    both = run_logits(model, ids)
    record = tokensparse.selection_report(model)[-1][1]
    assert record.mean_kept_share < 1.0
    assert torch.isfinite(both).all() and not torch.allclose(both, only_fp, atol=1e-3)


def test_flexprefill_config_and_method_settings():
    from tokensparse.methods import parse_method

    spec = parse_method("flexprefill:gamma=0.9,block_size=64")
    assert spec.config == FlexPrefillConfig(gamma=0.9, block_size=64) and dict(spec.settings) == {"gamma": "0.9", "block_size": "64"}
    composed = parse_method("token_sparse+flexprefill:gamma=0.8,block_size=32")
    assert composed.config.inner.config.kwargs()["block_size"] == 32
    assert FlexPrefillConfig(min_budget=1024).runs_dense(1024) and not FlexPrefillConfig(min_budget=1024).runs_dense(1025)
    for raw, field in [("gama=1", "gama"), ("gamma=2", "gamma"), ("tau=x", "tau"), ("backend=gpu", "backend")]:
        with pytest.raises(ValueError, match=field):
            parse_method("flexprefill:" + raw)


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_estimation_chunking_does_not_change_the_pattern(monkeypatch, tau):
    import tokensparse.methods.flexprefill as fp

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 8, 700, 32, generator=g)
    k = torch.randn(2, 2, 700, 32, generator=g)
    lens = torch.tensor([[700] * 8, [513] * 4 + [650] * 4])
    whole = fp.estimate_pattern(q, k, block_size=64, min_budget=64, tau=tau, seq_lens=lens)
    monkeypatch.setattr(fp, "_ESTIMATE_CHUNK_BYTES", 1)  # one KV head per step
    single = fp.estimate_pattern(q, k, block_size=64, min_budget=64, tau=tau, seq_lens=lens)
    assert torch.equal(whole.block_cnt, single.block_cnt)
    assert torch.equal(whole.block_idx, single.block_idx)
    assert torch.equal(whole.query_aware, single.query_aware)
