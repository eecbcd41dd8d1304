"""Tensor parallelism on the CPU: two gloo ranks keep exactly what one process keeps.

A tiny Llama (4 query / 2 KV heads, every layer sparse) is saved, loaded split
over 2 ranks by transformers (``DistributedConfig(tp_size=2)`` under torchrun)
and run on a left-padded batch; each rank's kept-key masks, concatenated over
the ranks in head order, must equal the single-process masks bitwise for the
coverage, head_coverage and keep_ratio budgets, and the logits must match.
With the exchange switched off (``tp_group=None``) the coverage budget of a
rank sees half the heads and keeps other counts: the check can fail.
"""

import os
import subprocess
import sys

import pytest
import torch

import tokensparse
from tiny_models import tiny_llama
from tp_worker import cases, kept_masks

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

LENGTHS = (280, 230)  # the second sequence left-padded by 50


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, per-rank results) of every case."""
    folder = tmp_path_factory.mktemp("tp")
    model_dir, out_dir = folder / "model", folder / "out"
    out_dir.mkdir()
    model = tiny_llama(num_layers=2, seed=3)
    model.config.max_position_embeddings = 512
    model.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(11)
    length = max(LENGTHS)
    ids = torch.randint(0, model.config.vocab_size, (len(LENGTHS), length), generator=g)
    mask = torch.stack([torch.arange(length) >= length - n for n in LENGTHS]).long()
    torch.save({"ids": ids, "mask": mask}, model_dir / "inputs.pt")

    src = os.path.dirname(os.path.dirname(tokensparse.__file__))
    tests = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, tests, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(tests, "tp_worker.py"), str(model_dir), str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]

    single = type(model).from_pretrained(model_dir).eval()
    reference = {name: kept_masks(single, config, ids, mask, tp_group=None) for name, (config, _) in cases().items()}
    return reference, ranks


def _joined(ranks, name, what):
    """A per-layer quantity of both ranks concatenated over the heads (dim 1), rank 0's heads first."""
    parts = [r[name][what] for r in ranks]
    if isinstance(parts[0], dict):
        return {layer: torch.cat([p[layer] for p in parts], dim=1) for layer in parts[0]}
    return [torch.cat(layer, dim=1) for layer in zip(*parts)]


@pytest.mark.parametrize("name", ["coverage", "head_coverage", "keep_ratio"])
def test_ranks_keep_what_one_process_keeps(runs, name):
    reference, ranks = runs
    ref = reference[name]
    kept = _joined(ranks, name, "kept")
    assert len(kept) == len(ref["kept"]) == 2  # one selection per sparse layer
    for layer, (got, want) in enumerate(zip(kept, ref["kept"])):
        assert got.shape == want.shape
        assert torch.equal(got, want), f"layer {layer}: kept keys differ"
    assert not all(m.all() for m in ref["kept"]), "nothing was dropped: the case checks nothing"
    num_kept = _joined(ranks, name, "num_kept")
    assert num_kept.keys() == ref["num_kept"].keys()
    for layer in num_kept:
        assert torch.equal(num_kept[layer], ref["num_kept"][layer])
    for r in ranks:
        torch.testing.assert_close(r[name]["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


def test_without_the_exchange_coverage_counts_differ(runs):
    reference, ranks = runs
    alone = _joined(ranks, "coverage_alone", "num_kept")
    want = reference["coverage"]["num_kept"]
    assert any(not torch.equal(alone[layer], want[layer]) for layer in want)
