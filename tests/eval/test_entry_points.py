"""Every registered method runs through every entry point (eval, bench attention, bench prefill) at tiny shapes.

The same spec strings reach all of them; each method's settings are chosen so that
it really sparsifies at these lengths (small blocks, windows and budgets).
"""

import json

import pytest

from tokensparse.cli import main
from tokensparse.methods import known_methods, parse_method

TINY = {
    "dense": "dense",
    "token_sparse": "token_sparse:keep_ratio=0.5,window=16,min_tokens=16,dropped_rows=local,local_block=16",
    "flexprefill": "flexprefill:gamma=0.6,min_budget=16,block_size=16",
    "xattention": "xattention:threshold=0.6,stride=4,block_size=16",
    "token_sparse+flexprefill": "token_sparse+flexprefill:keep_ratio=0.5,window=16,min_tokens=16,gamma=0.6,min_budget=16,block_size=16",
    "token_sparse+xattention": "token_sparse+xattention:keep_ratio=0.5,window=16,min_tokens=16,threshold=0.6,stride=4,block_size=16",
}

# Tiers (a layer plan, not an op) run through the model-level entry points only.
TIERED = ("token_sparse:keep_ratio=0.25,window=16,min_tokens=16,sparse_layers=0 | "
          "token_sparse+flexprefill:keep_ratio=0.75,window=16,min_tokens=16,gamma=0.6,min_budget=16,block_size=16")


def test_every_registered_method_has_a_tiny_spec():
    assert sorted(TINY) == known_methods()


@pytest.fixture(scope="module")
def specs():
    return ",".join(TINY.values())


def test_bench_attention_runs_every_method(tmp_path, specs):
    out = tmp_path / "a.json"
    assert main(["bench", "attention", "--device", "cpu", "--lengths", "160", "--batch", "1", "--heads", "4",
                 "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--methods", specs,
                 "--warmup", "0", "--reps", "1", "--budget-ms", "1", "--out", str(out)]) == 0
    entries = json.loads(out.read_text())["results"][0]["sparse"]
    assert sorted(e["method"] for e in entries) == sorted(set(TINY) - {"dense"})
    assert all(e["total_ms"] > 0 for e in entries)


def test_bench_prefill_runs_every_method(tmp_path, specs):
    out = tmp_path / "p.json"
    assert main(["bench", "prefill", "--device", "cpu", "--model", "tiny-random", "--lengths", "160",
                 "--methods", f"{specs},{TIERED}", "--warmup", "0", "--reps", "1", "--out", str(out)]) == 0
    modes = json.loads(out.read_text())["results"][0]["modes"]
    assert set(modes) == {parse_method(s).label for s in [*TINY.values(), TIERED]}
    assert set(modes[parse_method(TIERED).label]["kept_share_by_layer"]) == {"0", "1"}


def test_eval_runs_every_method(tiny_loaded, tmp_path, specs):
    from tokensparse.eval import niah
    from tokensparse.eval.runner import run_eval
    from tokensparse.methods import parse_methods

    samples = niah.grid_samples(tiny_loaded.tokenizer, [200], [0.5], haystack="filler", max_new_tokens=2)
    runs = run_eval(tiny_loaded, "niah", samples, parse_methods(f"{specs},{TIERED}"), tmp_path)
    assert [r.ran for r in runs] == [1] * (len(TINY) + 1)
    assert tiny_loaded.model.config._attn_implementation == "sdpa"
