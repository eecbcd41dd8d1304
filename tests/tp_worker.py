"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), and the case runner it shares
with the single-process reference.

Run by the test as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py MODEL_DIR OUT_DIR``:
each rank loads the saved tiny Llama split over the ranks (gloo), runs every
case of of :func:`cases` on ``MODEL_DIR/inputs.pt`` and saves what it kept to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def cases() -> dict[str, tuple[Any, Any]]:
    """name -> (token sparse config, enable's tp_group); every layer sparse, tiny window and floor."""
    from tokensparse import TokenSparseConfig

    common = dict(window=16, min_tokens=16, kernel_size=3, sparse_layers=(0, 1))
    coverage = TokenSparseConfig(coverage=0.3, **common)
    return {
        "coverage": (coverage, "auto"),
        "head_coverage": (TokenSparseConfig(coverage=0.3, budget="head_coverage", **common), "auto"),
        "keep_ratio": (TokenSparseConfig(budget="keep_ratio", keep_ratio=0.4, **common), "auto"),
        # The exchange switched off: each rank averages its own heads only.
        "coverage_alone": (coverage, None),
    }


def kept_masks(model, config, ids: torch.Tensor, mask: torch.Tensor, tp_group: Any = "auto") -> dict[str, Any]:
    """Logits and, per sparse layer, the (B, H, L) bool mask of the keys each head kept.

    Every selection is captured where token sparse makes it (``select_tokens``),
    so the masks hold the kept indices themselves, not only their counts.
    """
    import tokensparse
    from tokensparse.methods import token_sparse as ts

    selections = []
    original = ts.select_tokens

    def capture(*args, **kwargs):
        selection = original(*args, **kwargs)
        selections.append(selection)
        return selection

    ts.select_tokens = capture
    try:
        tokensparse.enable(model, config, record=True, tp_group=tp_group)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        report = tokensparse.selection_report(model, clear=True)
    finally:
        ts.select_tokens = original
        tokensparse.disable(model)
    return {
        "logits": logits.float(),
        "kept": [_mask_of(s) for s in selections],
        "num_kept": {layer: torch.tensor(r.num_kept) for layer, r in report[-1].items()},
    }


def _mask_of(selection) -> torch.Tensor:
    batch, heads = selection.num_kept.shape
    length = selection.seq_len
    if selection.kept_idx is None:  # dense: every real (left-padded) position
        real = torch.arange(length)[None, :] >= (length - selection.seq_lens)[:, None]
        return real[:, None, :].expand(batch, heads, length).clone()
    valid = torch.arange(selection.kept_idx.shape[-1])[None, None, :] < selection.num_kept[..., None]
    out = torch.zeros(batch, heads, length + 1, dtype=torch.bool)
    out.scatter_(2, torch.where(valid, selection.kept_idx, length), True)
    return out[..., :length]


def main(model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    dist.init_process_group("gloo")
    try:
        from transformers import DistributedConfig

        model = LlamaForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_size=2))
    except ImportError:  # transformers before DistributedConfig
        model = LlamaForCausalLM.from_pretrained(model_dir, tp_plan="auto")
    model.eval()
    inputs = torch.load(os.path.join(model_dir, "inputs.pt"))
    results = {
        name: kept_masks(model, config, inputs["ids"], inputs["mask"], tp_group=tp_group)
        for name, (config, tp_group) in cases().items()
    }
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
