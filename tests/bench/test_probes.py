"""Kept shares per layer on a tiny random Llama (tokensparse.bench.probes)."""

from __future__ import annotations

import pytest
import torch

from tokensparse import TokenSparseConfig
from tokensparse.bench.probes import kept_shares
from tokensparse.integrations.transformers import sparse_layers_of

from tiny_models import tiny_llama


def test_kept_shares_per_layer_and_model_left_dense():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 200))
    half = TokenSparseConfig(budget="keep_ratio", keep_ratio=0.5, window=16, min_tokens=16, sparse_layers=(0, 1, 2, 3))
    configs = {"half": half, "all": half.replace(keep_ratio=1.0)}
    data = kept_shares(model, ids, configs)
    assert data["prompt_tokens"] == 200 and set(data["settings"]) == {"half", "all"}
    half, full = data["settings"]["half"], data["settings"]["all"]
    assert set(half["layers"]) == {"0", "1", "2", "3"}
    # Half the prefix (92) plus the window (16) of 200 tokens: 0.54 in every head.
    for row in half["layers"].values():
        assert abs(row["kept_mean"] - 108 / 200) < 1e-6 and row["kept_min"] == row["kept_max"]
    assert half["max_abs_logit_diff"] > 0
    # keep_ratio 1 runs dense: every sparse layer is recorded as dense, keeping everything.
    assert set(full["layers"]) == {"0", "1", "2", "3"} and full["kept_mean_all_layers"] == 1.0
    assert all(row["dense"] and row["kept_mean"] == 1.0 for row in full["layers"].values())
    assert full["max_abs_logit_diff"] < 1e-4 and full["next_token_same_as_dense"]
    assert half["config"]["keep_ratio"] == 0.5
    with pytest.raises(ValueError, match="not enabled"):  # disabled again
        sparse_layers_of(model)
