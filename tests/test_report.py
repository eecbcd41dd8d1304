"""Selection report (record=True), its summary and table, recording off, and model-level determinism."""

from __future__ import annotations

import pytest
import torch

import tokensparse
from tokensparse import TokenSparseConfig
from tokensparse.integrations import transformers as integ
from tokensparse.methods import token_sparse as token_sparse_method  # its prefill calls select_tokens
from tokensparse.integrations.transformers import LayerRecord
from tokensparse.report import format_selection_report, summarize_selection
from tiny_models import tiny_llama

CONFIG = TokenSparseConfig(window=16, kernel_size=3, min_tokens=8, coverage=0.3, sparse_layers=(1, 3), backend="torch")


def prompt(batch=1, length=96, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def forward(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits


# ---------------------------------------------------------------- formatting
def handmade() -> dict[int, LayerRecord]:
    return {
        7: LayerRecord(layer=7, seq_lens=[200, 100], num_kept=[[100, 50], [100, 100]],
                       dropped_mass=[[0.01, 0.02], [0.0, 0.0]], dense=[False, True]),
        3: LayerRecord(layer=3, seq_lens=[200, 100], num_kept=[[150, 150], [60, 80]],
                       dropped_mass=[[0.004, 0.004], [0.003, 0.005]], dense=[False, False]),
    }


def test_summarize_selection():
    rows = summarize_selection(handmade())
    assert [r.layer for r in rows] == [3, 7]
    r3, r7 = rows
    assert r3.tokens == 200
    assert r3.kept_mean == pytest.approx((0.75 + 0.75 + 0.6 + 0.8) / 4)
    assert (r3.kept_min, r3.kept_max) == (pytest.approx(0.6), pytest.approx(0.8))
    assert r3.dropped_max == pytest.approx(0.005)
    assert r7.kept_min == pytest.approx(0.25) and r7.kept_max == pytest.approx(1.0)
    assert (r3.dense, r7.dense) == (0, 1)


def test_format_selection_report_table():
    text = format_selection_report(handmade())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "tokens", "kept"]
    assert lines[1].split() == ["3", "200", "72.5%", "60.0%", "80.0%", "0.0050", "0/2"]
    assert lines[2].split() == ["7", "200", "68.8%", "25.0%", "100.0%", "0.0200", "1/2"]
    assert lines[3].split() == ["all", "70.6%", "0.0200"]
    assert format_selection_report({}) == "no sparse layer ran during this prefill"


# ---------------------------------------------------------------- recording on a model
def test_record_per_prefill_layer_and_head():
    model = tokensparse.enable(tiny_llama(), CONFIG, record=True)
    mask = torch.ones(2, 96, dtype=torch.long)
    mask[1, :20] = 0  # left padding: 76 real tokens
    forward(model, prompt(batch=2), mask)
    forward(model, prompt(length=64))
    prefills = tokensparse.selection_report(model)
    assert len(prefills) == 2
    first, second = prefills
    assert sorted(first) == [1, 3] and sorted(second) == [1, 3]
    for record in first.values():
        assert record.seq_lens == [96, 76]
        assert len(record.num_kept) == 2 and len(record.num_kept[0]) == 4
        for b, n in enumerate(record.seq_lens):
            for kept, dropped in zip(record.num_kept[b], record.dropped_mass[b]):
                assert 16 + 8 <= kept <= n and 0.0 <= dropped <= 1.0
        assert 0 < record.mean_kept_share < 1
    assert not all(first[1].dense)
    table = format_selection_report(first)
    assert len(table.splitlines()) == 4
    # clear empties the record.
    assert len(tokensparse.selection_report(model, clear=True)) == 2
    assert tokensparse.selection_report(model) == []


def test_record_matches_the_op_on_the_same_inputs():
    """Capture one sparse layer's q/k/v and rerun the public op on them: same counts and dropped mass."""
    model = tokensparse.enable(tiny_llama(), CONFIG, record=True)
    captured = {}
    original = token_sparse_method.select_tokens

    def spy(query, key, config, **kwargs):
        captured.setdefault("args", (query.clone(), key.clone(), kwargs))
        return original(query, key, config, **kwargs)

    token_sparse_method.select_tokens = spy
    try:
        forward(model, prompt())
    finally:
        token_sparse_method.select_tokens = original
    record = tokensparse.selection_report(model)[-1][1]
    query, key, kwargs = captured["args"]
    selection = tokensparse.select_tokens(query, key, CONFIG, **kwargs)
    assert selection.num_kept.tolist() == record.num_kept
    assert selection.dropped_mass.tolist() == record.dropped_mass


def test_recording_off_records_nothing_and_changes_nothing(monkeypatch):
    ids = prompt()
    on = tokensparse.enable(tiny_llama(), CONFIG, record=True)
    logits_on = forward(on, ids)

    def no_record(*args, **kwargs):
        raise AssertionError("a LayerRecord was built with recording off")

    off = tokensparse.enable(tiny_llama(), CONFIG)
    monkeypatch.setattr(integ, "LayerRecord", no_record)
    logits_off = forward(off, ids)
    assert torch.equal(logits_on, logits_off)
    assert off._tokensparse_model.prefills == []
    with pytest.raises(ValueError, match="recording is off"):
        tokensparse.selection_report(off)


def test_recording_off_adds_no_host_reads(monkeypatch):
    """Every host read (tolist) during a prefill with record=False also happens without the record path."""
    ids = prompt()
    counts = {}
    real_tolist = torch.Tensor.tolist

    def counting(self):
        counts["n"] = counts.get("n", 0) + 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    runs = {}
    for record in (False, True):
        model = tokensparse.enable(tiny_llama(), CONFIG, record=record)
        counts["n"] = 0
        forward(model, ids)
        runs[record] = counts["n"]
    # Recording reads 4 lists per sparse layer (seq_lens, num_kept, dropped_mass, dense); off reads none of them.
    assert runs[True] - runs[False] == 4 * len(CONFIG.sparse_layers)


# ---------------------------------------------------------------- determinism of a model prefill
def test_model_prefill_is_bitwise_deterministic():
    config = CONFIG.replace(budget="head_coverage")
    model = tokensparse.enable(tiny_llama(), config, record=True)
    mask = torch.ones(2, 96, dtype=torch.long)
    mask[0, :9] = 0
    ids = prompt(batch=2, seed=5)
    first = forward(model, ids, mask)
    second = forward(model, ids, mask)
    assert torch.equal(first, second)
    a, b = tokensparse.selection_report(model)
    assert a == b
