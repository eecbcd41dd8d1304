"""Time to first token under tensor parallelism, dense against method specs, with an exactness check.

One command on a machine with N GPUs (NCCL; NVLink multicast is switched off
unless ``NCCL_NVLS_ENABLE`` is set)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tokensparse.bench.tp --out runs/tp

Every rank builds the Llama-3.1-8B architecture with the same random bf16
weights on its GPU and keeps its tensor-parallel shard (transformers' TP plan:
column-parallel q/k/v, row-parallel o), then times whole prefills dense and with
each method spec at each length; rank 0 writes ``OUT/tp_bench.json`` after every
length. Each row has per-rank TTFT and peak memory, and for coverage budgets
the time of the exchange that makes the budget exact (one all-gather of the
window scores per sparse layer, timed alone at the same shape) against the
TTFT, beside the model's own all-reduces (two per layer, timed alone too).

The exactness check (at ``check_length``) captures each sparse layer's local
window scores and the budget the rank used, gathers the scores of every rank
and recomputes the budget as one device would; the two must be equal, and the
JSON also says whether a rank alone (no exchange) would have kept other counts.
On the CPU (gloo) ``--model tiny-random`` runs the same path in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import selection
from ..distributed import HeadGroup
from ..integrations.hf import tensor_parallel_group
from ..integrations.transformers import disable, enable, plan_of
from ..methods import parse_methods
from .prefill import LLAMA_8B, TINY, PrefillBenchConfig, _sdpa_priority, _time_method, llama_8b_config, tiny_config
from .timing import machine_info, time_fn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPBenchConfig:
    """What to run.

    Attributes:
        model: ``"llama-3.1-8b-random"`` or ``"tiny-random"`` (CPU smoke runs).
        lengths: prompt lengths (batch 1).
        methods: method specs timed against dense.
        check_length: the length of the exactness check (0: none).
        checkpoint_dir: split the model by saving it there and loading it split
            (default: in memory, this path only where that fails).
    """

    model: str = LLAMA_8B
    lengths: tuple[int, ...] = (32768, 65536, 131072)
    methods: tuple[str, ...] = ("token_sparse:coverage=0.02,dropped_rows=local",)
    check_length: int = 32768
    warmup: int = 1
    min_reps: int = 2
    seed: int = 0
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        if self.model not in (LLAMA_8B, TINY):
            raise ValueError(f"TPBenchConfig.model must be {LLAMA_8B!r} or {TINY!r}, got {self.model!r}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"TPBenchConfig.lengths must be positive, got {self.lengths}")
        parse_methods(list(self.methods) or ["dense"])  # raises ValueError naming a bad spec
        if self.check_length < 0:
            raise ValueError(f"TPBenchConfig.check_length must be >= 0, got {self.check_length}")


def init_distributed() -> torch.device:
    """Join the torchrun group (NCCL on GPUs, gloo on the CPU); this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def build_split_model(name: str, device: torch.device, seed: int = 0, *, checkpoint_dir: str | None = None):
    """(model, "memory" or "checkpoint"): the same random weights on every rank, split by transformers'
    TP plan over the world.

    Each rank builds the whole model on its device (seconds) and lets
    transformers shard it in memory (``prepare_distribute_model`` /
    ``maybe_distribute_model``, 5.2x); the full weights are then freed. Where
    that fails or leaves q_proj whole (transformers releases that shard only
    while loading), or with ``checkpoint_dir``, rank 0 saves the model there
    and every rank loads it split (``DistributedConfig(tp_size=N)``, else
    ``tp_plan="auto"``).
    """
    from transformers import LlamaForCausalLM

    config = llama_8b_config() if name == LLAMA_8B else tiny_config()
    config.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(config).to(config.dtype)
    model.set_attn_implementation("sdpa")
    if checkpoint_dir is None:
        try:
            split = _split_in_memory(model)
            if _is_split(split):
                return split.eval(), "memory"
            logger.warning("transformers did not shard the built model in memory; splitting through a checkpoint")
        except (AttributeError, TypeError, ValueError, ImportError) as err:
            logger.warning("splitting in memory failed (%s); splitting through a checkpoint", err)
        checkpoint_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tokensparse_tp_{name}")
    return _split_via_checkpoint(model, checkpoint_dir, device).eval(), "checkpoint"


def _split_in_memory(model):
    from transformers import DistributedConfig

    cls = type(model)
    distributed, _, mesh = cls.prepare_distribute_model(DistributedConfig(tp_size=dist.get_world_size()))
    model = cls.maybe_distribute_model(model, distributed, mesh)
    _own_shards(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def _is_split(model) -> bool:
    """Whether layer 0's q_proj holds this rank's share of the heads only."""
    weight = model.model.layers[0].self_attn.q_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    whole = model.config.num_attention_heads * model.config.head_dim
    return local.shape[0] * dist.get_world_size() == whole and tensor_parallel_group(model) is not None


def _split_via_checkpoint(model, folder: str, device: torch.device):
    from transformers import LlamaForCausalLM

    if dist.get_rank() == 0:
        model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    try:
        from transformers import DistributedConfig

        split = LlamaForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=dist.get_world_size()))
    except (ImportError, TypeError):  # releases before DistributedConfig
        split = LlamaForCausalLM.from_pretrained(folder, tp_plan="auto")
    split.set_attn_implementation("sdpa")
    if not _is_split(split):
        raise RuntimeError("transformers did not split the model's heads over the ranks")
    return split


def weight_bytes(model) -> int:
    """Bytes of this rank's parameters (local shards of split ones)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def _own_shards(model: torch.nn.Module) -> None:
    """Copy every sharded parameter's local part out of the full tensor it views, so that tensor is freed."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                local = param.to_local().clone()
                shard = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                           shape=param.shape, stride=param.stride())
                module._parameters[name] = torch.nn.Parameter(shard, requires_grad=False)


def run_tp_bench(cfg: TPBenchConfig, progress: Callable[[str], None] | None = None,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run on every rank of an initialized group; returns the JSON-ready result (the same on every rank)."""
    say = progress or (lambda msg: None)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    say(f"building {cfg.model} split over {dist.get_world_size()} ranks")
    model, split_by = build_split_model(cfg.model, device, cfg.seed, checkpoint_dir=cfg.checkpoint_dir)
    group = tensor_parallel_group(model)
    specs = parse_methods(list(cfg.methods))
    # budget_ms 0: every rank runs exactly min_reps timed prefills (a rank that ran one more would
    # wait forever in a collective the others never join).
    timing = PrefillBenchConfig(model=cfg.model, methods=tuple(cfg.methods), warmup=cfg.warmup,
                                min_reps=cfg.min_reps, budget_ms=0.0)
    meta = machine_info(device)
    meta.update(model=cfg.model, tp_size=dist.get_world_size(), split_by=split_by, num_layers=model.config.num_hidden_layers,
                nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), plans=_plans(model, specs),
                weight_bytes_by_rank=[int(r[0]) for r in _gather_floats([float(weight_bytes(model))])])
    results: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.inference_mode(), _sdpa_priority(device):
        for length in cfg.lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(device)
            row = _bench_length(model, group, specs, ids, device, timing, cfg, say)
            results.append(row)
            if checkpoint is not None:
                checkpoint({"meta": meta, "config": asdict(cfg), "results": results})
    return {"meta": meta, "config": asdict(cfg), "results": results}


def _plans(model, specs) -> dict[str, Any]:
    plans = {}
    for spec in specs:
        enable(model, spec)
        plans[spec.label] = plan_of(model).describe()
        disable(model)
    return plans


def _bench_length(model, group, specs, ids, device, timing, cfg: TPBenchConfig, say) -> dict[str, Any]:
    length = ids.shape[1]

    def prefill(ids: torch.Tensor = ids):
        return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    row: dict[str, Any] = {"seq_len": length, "modes": {}}
    row["model_all_reduce_ms"] = _model_all_reduce_ms(model, group, length, device)
    for spec in [None, *specs]:
        label = "dense" if spec is None else spec.label
        try:
            entry = _time_mode(model, group, spec, prefill, length, device, timing)
        except torch.OutOfMemoryError as err:  # both ranks run the same shapes, so both raise
            entry = {"error": f"out of memory: {err}"[:300]}
            torch.cuda.empty_cache()
        row["modes"][label] = entry
        say(f"L={length:>7} {label:<45} " + (f"TTFT {entry['ttft_ms']:9.1f} ms" if "ttft_ms" in entry else entry["error"]))
    dense = row["modes"]["dense"].get("ttft_ms")
    for entry in row["modes"].values():
        if dense and "ttft_ms" in entry:
            entry["speedup_vs_dense"] = dense / entry["ttft_ms"]
    if length == cfg.check_length:
        row["exactness"] = {spec.label: check_exact_budgets(model, group, spec, ids) for spec in specs}
    return row


def _time_mode(model, group, spec, prefill, length: int, device, timing) -> dict[str, Any]:
    """TTFT and peak memory of every rank (``_ms``/``_bytes`` lists by rank), and the exchange's share."""
    dist.barrier()
    if spec is None:
        entry: dict[str, Any] = {"spec": "dense"}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time_fn(prefill, device, warmup=timing.warmup, min_reps=timing.min_reps, budget_ms=timing.budget_ms)
        entry.update(time=t.to_dict(), ttft_ms=t.median_ms)
        if device.type == "cuda":
            entry["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        entry = _time_method(model, spec, 0, prefill, device, timing)
    by_rank = _gather_floats([entry["ttft_ms"], float(entry.get("peak_memory_bytes", 0))])
    entry["ttft_ms_by_rank"] = [r[0] for r in by_rank]
    entry["peak_memory_bytes_by_rank"] = [int(r[1]) for r in by_rank]
    entry["ttft_ms"] = max(entry["ttft_ms_by_rank"])  # the slowest rank decides the first token
    if spec is not None and _uses_coverage(spec):
        layers = len(plan_sparse_layers(model, spec))
        exchange = _exchange_ms(model, group, length, spec, device)
        entry.update(exchange_ms_per_layer=exchange, exchange_ms=exchange * layers,
                     exchange_share=exchange * layers / entry["ttft_ms"])
    return entry


def _uses_coverage(spec) -> bool:
    config = getattr(spec.config, "token_sparse", spec.config)
    return getattr(config, "budget", None) == "coverage"


def plan_sparse_layers(model, spec) -> tuple[int, ...]:
    enable(model, spec)
    try:
        return plan_of(model).sparse_layers
    finally:
        disable(model)


def _exchange_ms(model, group, length: int, spec, device) -> float:
    """One sparse layer's all-gather of the window scores, (1, H/N, L - window) float32, timed alone."""
    config = getattr(spec.config, "token_sparse", spec.config)
    heads = HeadGroup(group, model.config.num_attention_heads)
    local = torch.rand(1, heads.local_heads, max(length - config.window, 1), device=device)
    return time_fn(lambda: heads.gather_heads(local), device, warmup=2, min_reps=5, budget_ms=0.0).median_ms


def _model_all_reduce_ms(model, group, length: int, device) -> float:
    """The model's own all-reduces of one prefill (o_proj and down_proj outputs, 2 per layer), timed alone."""
    hidden = torch.rand(1, length, model.config.hidden_size, device=device, dtype=model.dtype)
    one = time_fn(lambda: dist.all_reduce(hidden, group=group), device, warmup=2, min_reps=3, budget_ms=0.0)
    return one.median_ms * 2 * model.config.num_hidden_layers


def _gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values``, by rank."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [p.tolist() for p in parts]


def check_exact_budgets(model, group, spec, ids: torch.Tensor) -> dict[str, Any]:
    """One prefill with ``spec``: each sparse layer's budget on this rank against one device's.

    Captures the local window scores and the budget of every
    :func:`tokensparse.selection.token_budget` call, gathers every rank's
    scores and recomputes the budget on all heads outside any split (what a
    single device computes from these scores). Also says how many layers a rank
    alone, without the exchange, would have budgeted differently. The same on
    every rank.
    """
    captured: list[tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]] = []
    original = selection.token_budget

    def capture(scores, prefix_lens, config):
        keep = original(scores, prefix_lens, config)
        captured.append((scores.clone(), prefix_lens.clone(), config, keep.clone()))
        return keep

    selection.token_budget = capture
    try:
        enable(model, spec)
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    finally:
        selection.token_budget = original
        disable(model)
    heads = HeadGroup(group, model.config.num_attention_heads)
    mine = slice(heads.rank * heads.local_heads, (heads.rank + 1) * heads.local_heads)
    equal = alone_differs = 0
    for scores, lens, config, keep in captured:
        one_device = original(heads.gather_heads(scores), lens, config)[:, mine]
        equal += int(torch.equal(one_device, keep))
        alone_differs += int(not torch.equal(original(scores, lens, config), keep))
    counts = _gather_floats([len(captured), equal, alone_differs])
    return {
        "budgets_checked_by_rank": [int(c[0]) for c in counts],
        "equal_to_one_device_by_rank": [int(c[1]) for c in counts],
        "differ_without_exchange_by_rank": [int(c[2]) for c in counts],
        "exact": all(c[0] == c[1] for c in counts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch.distributed.run --standalone --nproc_per_node N -m tokensparse.bench.tp",
        description="TTFT under tensor parallelism, dense vs method specs, and the exactness of the coverage budget",
    )
    parser.add_argument("--out", required=True, help="folder for tp_bench.json (written by rank 0)")
    parser.add_argument("--model", default=LLAMA_8B, choices=[LLAMA_8B, TINY])
    parser.add_argument("--lengths", default="32768,65536,131072", help="comma-separated prompt lengths")
    parser.add_argument("--methods", action="append", default=None,
                        help="a method spec (repeat the flag for several; default token_sparse:coverage=0.02,"
                        "dropped_rows=local)")
    parser.add_argument("--check-length", type=int, default=32768, help="length of the exactness check (0: none)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="split the model through a checkpoint saved here (default: in memory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = TPBenchConfig(
        model=args.model, lengths=tuple(int(n) for n in args.lengths.split(",") if n),
        methods=tuple(args.methods or TPBenchConfig.methods), check_length=args.check_length,
        warmup=args.warmup, min_reps=args.reps, checkpoint_dir=args.checkpoint_dir,
    )
    init_distributed()
    rank = dist.get_rank()
    path = os.path.join(args.out, "tp_bench.json")

    def write(data: dict[str, Any]) -> None:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(data, f, indent=1)

    try:
        data = run_tp_bench(cfg, progress=(lambda msg: print(msg, flush=True)) if rank == 0 else None, checkpoint=write)
        write(data)
        if rank == 0:
            print(f"wrote {path}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
