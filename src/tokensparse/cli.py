"""The ``tokensparse`` command: parses arguments, calls the library, prints.

Heavy imports (torch, transformers) happen inside each subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import TokenSparseConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokensparse", description="Token Sparse Attention for long prompts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    _add_profile(sub)
    _add_sensitivity(sub)
    _add_eval(sub)
    _add_models(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    # The one place that turns exceptions into CLI errors: bad input, missing files
    # and refused settings are one line (with -v, the traceback first); other
    # exceptions are bugs and keep their traceback.
    try:
        _check_device(args)
        return run(args) or 0
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("tokensparse: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"tokensparse: error: {message}", file=sys.stderr)
        return 2


def _check_device(args: argparse.Namespace) -> None:
    """Refuse a --device this torch cannot use before any subcommand loads anything."""
    if getattr(args, "device", None) is not None:
        from .models import resolve_device

        resolve_device(args.device)


# ---------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="needle-in-a-haystack, dense vs Token Sparse, on the embedded model")
    p.add_argument("--model", default="smollm2", help="model name, hub id or path (default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default 4096)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    p.add_argument("--method", default="token_sparse", type=_method,
                   help="method spec run beside dense (default token_sparse, the paper's coverage 0.005; "
                   "e.g. token_sparse:dropped_rows=local or token_sparse+xattention:keep_ratio=0.5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--rope-scaling", type=float, default=None, help="YaRN factor for prompts past the context")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        model=args.model,
        length=args.length,
        depth=args.depth,
        method=args.method,
        device=args.device,
        rope_scaling_factor=args.rope_scaling,
        progress=lambda msg: print(msg, flush=True),
    )
    print()
    print(f"prompt: {result.prompt_tokens} tokens, needle at depth {result.depth:.2f}, answer {result.expected!r}")
    print(f"method: {result.method.label}, sparse layers {list(result.sparse_layers)}")
    for run in result.runs:
        verdict = "RIGHT" if run.correct else "WRONG"
        print(f"  {run.method:<30} {verdict}  prefill {run.prefill_s:6.2f} s  answer: {run.answer!r}")
    if result.selection:
        from .report import format_selection_report

        print("what each sparse layer kept (share of the prompt's tokens, over heads):")
        print(format_selection_report(result.selection))
    return 0 if all(r.correct for r in result.runs) else 1


# ---------------------------------------------------------------- models
_DTYPES = ("bfloat16", "float16", "float32")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model files: export the embedded model for other engines")
    models = p.add_subparsers(dest="models", required=True)
    e = models.add_parser("export", help="write a model as a Hugging Face folder (config.json, safetensors, "
                          "tokenizer) that vLLM and other engines load offline")
    e.add_argument("model", help="model name, hub id or path (smollm2: the embedded SmolLM2)")
    e.add_argument("folder", help="output folder")
    e.add_argument("--dtype", default="bfloat16", choices=_DTYPES, help="weight dtype written (default bfloat16)")
    e.set_defaults(run=_run_models_export)


def _run_models_export(args: argparse.Namespace) -> int:
    import torch

    from .models import export

    folder = export(args.model, args.folder, dtype=getattr(torch, args.dtype))
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    print(f"wrote {args.model} to {folder}: {', '.join(files)}")
    return 0


# ---------------------------------------------------------------- bench
DEFAULT_ATTENTION_METHODS = (
    "token_sparse:keep_ratio=0.75", "token_sparse:keep_ratio=0.5", "token_sparse:keep_ratio=0.25",
    "token_sparse:keep_ratio=0.1", "token_sparse",
)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (GPU for timings)")
    bench = p.add_subparsers(dest="bench", required=True)

    a = bench.add_parser("attention", help="one attention layer: dense cuDNN/flash vs token sparse, per stage")
    a.add_argument("--lengths", type=_int_list, default=[8192, 16384, 32768, 65536, 131072],
                   help="comma-separated sequence lengths (default 8K..128K)")
    a.add_argument("--batch", type=_int_list, default=[1, 4], help="comma-separated batch sizes (default 1,4)")
    a.add_argument("--max-tokens", type=int, default=262144, help="skip batch*length above this (default 256K)")
    a.add_argument("--heads", type=int, default=None, help="query heads (default 32, Llama-3.1-8B)")
    a.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8)")
    a.add_argument("--head-dim", type=int, default=None, help="head dimension (default 128)")
    a.add_argument("--hf-config", default=None, help="take heads, kv heads and head_dim from this transformers config")
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a.add_argument("--methods", default=",".join(DEFAULT_ATTENTION_METHODS), type=_methods,
                   help="comma-separated method specs, e.g. token_sparse:keep_ratio=0.5,flexprefill,"
                   "xattention,token_sparse+xattention:coverage=0.02 (dense is always timed; default: "
                   "token sparse at kept shares 0.75/0.5/0.25/0.1 and at coverage 0.005)")
    a.add_argument("--inputs", type=_str_list, default=["random"],
                   help="input kinds every method runs on: random, structured, realistic (default random)")
    a.add_argument("--warmup", type=int, default=1)
    a.add_argument("--reps", type=int, default=3, help="least timed runs per measurement (median)")
    a.add_argument("--budget-ms", type=float, default=1000.0, help="timed run time per measurement")
    a.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    a.add_argument("--out", default="runs/bench/attention.json", help="JSON output (default: runs/bench/attention.json)")
    a.add_argument("--plot", default=None, help="plot file (default: next to --out, .png)")
    a.set_defaults(run=_run_bench_attention)

    f = bench.add_parser("prefill", help="time to first token of a whole model, dense vs token sparse")
    f.add_argument("--model", default=None,
                   help="llama-3.1-8b-random (GPU default), tiny-random, smollm2 (CPU default), or a hub id/path")
    f.add_argument("--lengths", type=_int_list, default=None,
                   help="comma-separated prompt lengths (default 8K,32K,128K on GPU; 2K,4K on CPU)")
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--methods", default="token_sparse:keep_ratio=0.25", type=_methods,
                   help="comma-separated method specs run beside dense (default token_sparse:keep_ratio=0.25)")
    f.add_argument("--rope-scaling", type=float, default=None, help="YaRN factor for a loaded model (e.g. 16)")
    f.add_argument("--profile", default=None, metavar="PATH|sensitivity",
                   help="layer profile of the methods that name no sparse_layers: a profile JSON, or 'sensitivity' "
                        "for the one shipped for the model (default: the shipped drift profile, if any)")
    f.add_argument("--min-lengths", type=_gate_list, default=[0],
                   help="length gates to run every method at: integers or 'auto' (each method's measured "
                   "crossover); shorter prefills run dense (default 0: no gate)")
    f.add_argument("--warmup", type=int, default=1)
    f.add_argument("--reps", type=int, default=2, help="least timed runs per measurement (median)")
    f.add_argument("--budget-ms", type=float, default=1.0,
                   help="keep timing until this much time is spent (more runs at short prompts; default 1: --reps decides)")
    f.add_argument("--rounds", type=int, default=1,
                   help="time every mode this many times, the modes taking turns; TTFT is the median of the rounds")
    f.add_argument("--chunk-size", type=int, default=None,
                   help="prefill in chunks of this many tokens through a KV cache, dense and sparse alike "
                   "(default: the whole prompt in one forward)")
    f.add_argument("--device", default=None)
    f.add_argument("--out", default="runs/bench/prefill.json", help="JSON output (default: runs/bench/prefill.json)")
    f.add_argument("--plot", default=None)
    f.set_defaults(run=_run_bench_prefill)

    o = bench.add_parser("overhead", help="one layer's fixed cost: GPU vs host time, launches, syncs")
    o.add_argument("--methods", default="token_sparse:keep_ratio=0.5,token_sparse:coverage=0.02,dropped_rows=local",
                   type=_methods, help="comma-separated method specs (dense is always measured)")
    o.add_argument("--lengths", type=_int_list, default=[16384, 65536])
    o.add_argument("--heads", type=int, default=9, help="query heads (default 9, the embedded SmolLM2)")
    o.add_argument("--kv-heads", type=int, default=3)
    o.add_argument("--head-dim", type=int, default=64)
    o.add_argument("--inputs", default="realistic", choices=["random", "structured", "realistic"])
    o.add_argument("--device", default=None)
    o.add_argument("--out", default="runs/bench/overhead.json")
    o.add_argument("--plot", default=None)
    o.set_defaults(run=_run_bench_overhead)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _gate_list(text: str) -> list[int | str]:
    return [p if p == "auto" else int(p) for p in (x.strip() for x in text.split(",")) if p]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _methods(text: str):
    """Method specs of the registry (argparse type: a bad spec is a usage error naming it)."""
    from .methods import parse_methods

    try:
        return parse_methods(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _method(text: str):
    """One method spec (argparse type)."""
    specs = _methods(text)
    if len(specs) != 1:
        raise argparse.ArgumentTypeError(f"expected one method spec, got {len(specs)}: {text!r}")
    return specs[0]


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _write_json(data: dict, out: str) -> None:
    """Write (or overwrite with a longer partial result) the benchmark JSON."""
    import json
    from pathlib import Path

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _run_bench(
    run: Callable[..., dict],
    cfg: object,
    args: argparse.Namespace,
    plotter: Callable[[dict, str], None],
    summary: Callable[[dict], list[str]],
) -> int:
    """Run a benchmark (JSON checkpointed to ``args.out``), write its JSON and plot, print its summary."""
    import json
    from pathlib import Path

    data = run(cfg, progress=lambda msg: print(msg, flush=True), checkpoint=lambda d: _write_json(d, args.out))
    _write_json(data, args.out)
    path = Path(args.out)
    plot_path = args.plot or str(path.with_suffix(".png"))
    # The plot is drawn from the JSON file just written, nothing else.
    plotter(json.loads(path.read_text()), plot_path)
    print()
    for line in summary(data):
        print(line)
    print(f"wrote {args.out} and {plot_path}")
    return 0


def _run_bench_attention(args: argparse.Namespace) -> int:
    from .bench.attention import AttentionBenchConfig, plot_attention, run_attention_bench, summary_lines

    shape = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}
    if args.hf_config:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(args.hf_config).get_text_config()
        heads = hf.num_attention_heads
        shape = {
            "num_heads": heads,
            "num_kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
            "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        }
    for key, value in (("num_heads", args.heads), ("num_kv_heads", args.kv_heads), ("head_dim", args.head_dim)):
        if value is not None:
            shape[key] = value
    cfg = AttentionBenchConfig(
        lengths=tuple(args.lengths), batches=tuple(args.batch), max_tokens=args.max_tokens, **shape,
        dtype=args.dtype, methods=tuple(s.label for s in args.methods), inputs=tuple(args.inputs),
        warmup=args.warmup, min_reps=args.reps, budget_ms=args.budget_ms, device=args.device,
    )
    return _run_bench(run_attention_bench, cfg, args, plot_attention, summary_lines)


def _run_bench_prefill(args: argparse.Namespace) -> int:
    import torch

    from .bench.prefill import PrefillBenchConfig, plot_prefill, run_prefill_bench, summary_lines

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    lengths = args.lengths or ([8192, 32768, 131072] if on_gpu else [2048, 4096])
    cfg = PrefillBenchConfig(
        model=args.model, lengths=tuple(lengths), batch=args.batch, methods=tuple(s.label for s in args.methods),
        rope_scaling=args.rope_scaling, profile=args.profile, min_lengths=tuple(args.min_lengths),
        warmup=args.warmup, min_reps=args.reps, budget_ms=args.budget_ms, device=args.device,
        chunk_size=args.chunk_size, rounds=args.rounds,
    )
    return _run_bench(run_prefill_bench, cfg, args, plot_prefill, summary_lines)


def _run_bench_overhead(args: argparse.Namespace) -> int:
    from .bench.overhead import OverheadBenchConfig, plot_overhead, run_overhead_bench, summary_lines

    cfg = OverheadBenchConfig(
        methods=tuple(s.label for s in args.methods), lengths=tuple(args.lengths), num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.head_dim, inputs=args.inputs, device=args.device,
    )
    return _run_bench(run_overhead_bench, cfg, args, plot_overhead, summary_lines)


# ---------------------------------------------------------------- profile
def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure per-layer drift on a calibration prompt and choose the sparse layers")
    p.add_argument("--model", default="smollm2", help="model name, hub id or path (default: the embedded SmolLM2)")
    p.add_argument("--delta", type=float, default=0.5, help="quantile of drift at or below which layers are sparse (default 0.5)")
    p.add_argument("--length", type=int, default=None,
                   help="calibration prompt length in tokens (default: 4096, or the model's context if shorter)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="UTF-8 text file to calibrate on (default: a built-in English text)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="profile JSON to write (default: runs/profile/NAME.json); the plot goes beside it as .png")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import models
    from .profile import (
        DEFAULT_LENGTH,
        LayerProfile,
        calibration_ids,
        check_delta,
        format_drift_table,
        plot_profile,
        profile_model,
    )

    check_delta(args.delta)  # fail before the slow load and calibration
    if args.length is not None and args.length < 2:
        raise ValueError(f"--length must be >= 2, got {args.length}")
    text, source = _calibration_text(args.calibration)
    print(f"loading {args.model} ...", flush=True)
    loaded = models.load(args.model, device=args.device)
    length = _calibration_length(args.length, loaded.max_context, DEFAULT_LENGTH)
    models.check_context(loaded, length, "--length", scalable=False)
    input_ids = calibration_ids(loaded.tokenizer, length, text)
    print(f"running {length} calibration tokens densely on {loaded.device} ...", flush=True)
    profile = profile_model(loaded.model, input_ids, delta=args.delta, calibration=source)
    out = Path(args.out) if args.out else Path("runs") / "profile" / f"{_model_slug(args.model)}.json"
    profile.save(out)
    # The plot is made from the file, as every result plot is.
    plot = plot_profile(LayerProfile.load(out), out.with_suffix(".png"))
    print(format_drift_table(profile))
    print(f"wrote {out} and {plot}")
    return 0


def _calibration_text(path_arg: str | None) -> tuple[str | None, str]:
    """(text, source) of ``--calibration``: None and the built-in source without a file."""
    from pathlib import Path

    from .profile import BUILTIN_CALIBRATION

    if path_arg is None:
        return None, BUILTIN_CALIBRATION
    path = Path(path_arg)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file at {path}")
    return path.read_text(encoding="utf-8"), f"file:{path.name}"


def _calibration_length(length: int | None, context: int, default: int) -> int:
    """``--length``, or ``default`` capped at the model's context; past the context is an error."""
    if length is None:
        return min(default, context) if context else default
    if context and length > context:
        raise ValueError(f"--length {length} exceeds the model's context of {context} tokens")
    return length


def _model_slug(model: str) -> str:
    import re
    from pathlib import Path

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model.rstrip("/")).name).removesuffix(".gguf") or "model"


# ---------------------------------------------------------------- sensitivity
def _add_sensitivity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="per-layer change of the final logits when only that layer runs token sparse")
    p.add_argument("--model", default="smollm2", help="model name, hub id or path (default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, default=None,
                   help="calibration prompt length in tokens (default: 4096, or the model's context if shorter)")
    p.add_argument("--positions", type=int, default=64, help="final positions the KL and top-1 average over (default 64)")
    p.add_argument("--config", default="", metavar="KEY=VALUE,...",
                   help="TokenSparseConfig fields over the default 'budget=keep_ratio,keep_ratio=0.25,"
                        "min_tokens=256,dropped_rows=local', e.g. 'keep_ratio=0.5' or 'budget=coverage,coverage=0.02'")
    p.add_argument("--max-kl", type=float, default=None,
                   help="mark the layers whose KL is at most this many nats as safe (default: "
                        "sensitivity.DEFAULT_MAX_KL)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="UTF-8 text file to calibrate on (default: a built-in English text)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="profile JSON to write (default: runs/profile/NAME_sensitivity.json); the plot goes beside it as .png")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(run=_run_sensitivity)


def _run_sensitivity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import models
    from .profile import DEFAULT_LENGTH, calibration_ids
    from .sensitivity import (
        DEFAULT_CONFIG,
        DEFAULT_MAX_KL,
        SensitivityProfile,
        format_sensitivity_table,
        plot_sensitivity,
        safe_layers,
    )
    from .calibrate import sensitivity_profile

    config = _config_with_overrides(DEFAULT_CONFIG, args.config)
    text, source = _calibration_text(args.calibration)
    print(f"loading {args.model} ...", flush=True)
    loaded = models.load(args.model, device=args.device)
    length = _calibration_length(args.length, loaded.max_context, DEFAULT_LENGTH)
    input_ids = calibration_ids(loaded.tokenizer, length, text)
    print(f"{length} calibration tokens on {loaded.device}: one dense pass, then each layer sparse alone ...", flush=True)

    def progress(layer: int, num_layers: int, kl: float, top1: float, seconds: float) -> None:
        print(f"  layer {layer} ({layer + 1} of {num_layers}): KL {kl:.3g} nats, top-1 {top1:.3f} ({seconds:.1f} s)",
              flush=True)

    profile = sensitivity_profile(loaded.model, input_ids, config, positions=args.positions,
                                  calibration=source, progress=progress)
    out = Path(args.out) if args.out else Path("runs") / "profile" / f"{_model_slug(args.model)}_sensitivity.json"
    profile.save(out)
    max_kl = DEFAULT_MAX_KL if args.max_kl is None else args.max_kl
    # The plot is made from the file, as every result plot is.
    plot = plot_sensitivity(SensitivityProfile.load(out), out.with_suffix(".png"), max_kl=max_kl)
    print(format_sensitivity_table(profile, safe_layers(profile, max_kl=max_kl)))
    print(f"wrote {out} and {plot}")
    return 0


def _config_with_overrides(base: TokenSparseConfig, text: str) -> TokenSparseConfig:
    """``base`` with the fields of ``'key=value,...'`` replaced (values: None, int, float or text).

    Switching ``budget`` clears the base's keep_ratio / keep_tokens unless they are given too.
    """
    changes: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config item {item!r} is not KEY=VALUE")
        changes[key.strip()] = _parse_value(value.strip())
    if changes.get("budget", base.budget) != base.budget:
        for field in ("keep_ratio", "keep_tokens"):
            changes.setdefault(field, None)
    return base.replace(**changes)


def _parse_value(value: str) -> object:
    if value.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# ---------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy evaluations: niah, ruler, longbench, infinitebench")
    evals = p.add_subparsers(dest="eval", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default="smollm2", help="model name, hub id, folder or .gguf file (default: the embedded SmolLM2)")
        q.add_argument("--methods", default="dense,token_sparse",
                       help="comma-separated method specs, e.g. 'dense,token_sparse:coverage=0.02,"
                            "token_sparse:keep_ratio=0.5' (default: dense,token_sparse)")
        q.add_argument("--out", default="runs/eval",
                       help="results folder (default: runs/eval); a rerun of the same settings skips finished samples, "
                            "one of other settings is refused")
        q.add_argument("--overwrite", action="store_true",
                       help="delete the result files of these methods in --out first (instead of resuming them)")
        q.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default 1)")
        q.add_argument("--chunk-size", type=int, default=None, metavar="N",
                       help="prefill each prompt N tokens per forward pass over a KV cache (tokensparse.prefill); "
                            "results are methods of their own, '<spec> @ chunk N' (default: the whole prompt at once)")
        q.add_argument("--profile", default=None, metavar="PATH|sensitivity",
                       help="layer profile of the methods that name no sparse_layers (the first tier of a tiered "
                            "spec): a profile JSON, or 'sensitivity' for the one shipped for the model "
                            "(default: the shipped drift profile); recorded in their run settings")
        q.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        q.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="weight dtype")
        q.add_argument("--rope-scaling", type=float, default=None, help="YaRN factor for lengths past the context")
        q.add_argument("--no-chat", action="store_true", help="plain prompts without the chat template")
        q.add_argument("--no-report", action="store_true", help="skip the report and plots after the run")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    q = evals.add_parser("niah", help="needle in a haystack on a grid of depths x lengths")
    common(q)
    q.add_argument("--lengths", default=None, help="comma-separated lengths in tokens (default: 8 up to the context)")
    q.add_argument("--depths", type=int, default=10, help="number of evenly spaced depths in [0, 1] (default 10)")
    q.add_argument("--haystack", default="essay", help="filler, essay (Python's reference prose), or a .txt file/dir")
    q.add_argument("--needle", default=None, help="needle sentence with an {answer} field")
    q.add_argument("--question", default=None, help="question asked after the text")
    q.add_argument("--answer", default=None, help="fixed answer (default: a random 7-digit number per cell)")
    q.add_argument("--max-new-tokens", type=int, default=32, help="generation budget (default 32)")
    q.add_argument("--seed", type=int, default=42)
    q.set_defaults(run=_run_eval_niah)

    q = evals.add_parser("ruler", help="RULER synthetic tasks generated locally")
    common(q)
    q.add_argument("--tasks", default="synthetic",
                   help="comma-separated tasks, 'synthetic' (all but QA) or 'all' (needs --qa-dir)")
    q.add_argument("--lengths", default=None, help="comma-separated lengths (default: 4096,8192,... up to the context)")
    q.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    q.add_argument("--haystack", default="essay", help="essay haystack: essay (Python's reference prose) or a .txt dir")
    q.add_argument("--qa-dir", default=None, help="folder with squad.json and hotpotqa.json for qa_1/qa_2")
    q.add_argument("--seed", type=int, default=42)
    q.set_defaults(run=_run_eval_ruler)

    for name, what in (("longbench", "LongBench"), ("infinitebench", "InfiniteBench")):
        q = evals.add_parser(name, help=f"{what} from the official JSONL files in a local folder")
        common(q)
        q.add_argument("--data-dir", required=True, help=f"folder holding the {what} <task>.jsonl files")
        q.add_argument("--tasks", required=True, help="comma-separated task names")
        q.add_argument("--limit", type=int, default=None, help="prompt plus answer limit in tokens (default: the context)")
        q.add_argument("--samples", type=int, default=None, help="first N records per task (default: all)")
        if name == "longbench":
            q.add_argument("--longbench-e", action="store_true", help="read the LongBench-E files <task>_e.jsonl")
        q.set_defaults(run=_run_eval_bench)

    r = sub.add_parser("report", help="markdown table and plots from result files")
    r.add_argument("results", nargs="+", help="results folders (or .jsonl files)")
    r.add_argument("--out", default="runs/report", help="where to write report.md and plots (default: runs/report)")
    r.add_argument("--no-plots", action="store_true", help="only the markdown and summary.json")
    r.add_argument("--attention-times", nargs="+", default=None,
                   help="`bench attention` JSON files: adds accuracy vs attention time (table and plot)")
    r.add_argument("--attention-length", type=int, default=None, help="its length to use (default: the longest)")
    r.add_argument("--attention-inputs", default="realistic", help="its input kind to use (default realistic)")
    r.set_defaults(run=_run_report)


def _csv_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def _load_for_eval(args: argparse.Namespace):
    import torch

    from . import models
    from .methods import parse_methods

    methods = parse_methods(args.methods)  # fail before the slow load
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be an integer >= 1, got {args.chunk_size}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    loaded = models.load(args.model, device=args.device, dtype=dtype, rope_scaling_factor=args.rope_scaling)
    return loaded, methods


def _execute_eval(args: argparse.Namespace, eval_name: str, loaded, methods, samples, meta: dict) -> int:
    from .eval.results import load_records
    from .eval.runner import run_eval

    bars: dict[str, object] = {}

    def progress(label: str, done: int, total: int) -> None:
        if args.no_progress:
            return
        from tqdm import tqdm

        if label not in bars:
            bars[label] = tqdm(total=total, desc=f"{eval_name} {label}", file=sys.stderr, unit="sample")
        bar = bars[label]
        bar.n = done  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]
        if done >= total:
            bar.close()  # type: ignore[attr-defined]

    def stage(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)  # above any open bar

    print(f"{eval_name}: {len(samples)} samples x {len(methods)} methods on {loaded.name} ({loaded.device})", file=sys.stderr)
    runs = run_eval(
        loaded, eval_name, samples, methods, args.out, batch_size=args.batch_size, meta=meta, progress=progress,
        stage=None if args.no_progress else stage, overwrite=args.overwrite, chunk_size=args.chunk_size,
        profile=args.profile,
    )
    for run in runs:
        print(f"{run.method}: ran {run.ran}, skipped {run.skipped} finished -> {run.path}")
    if not args.no_report:
        from .eval.report import write_report

        folder = f"{args.out}/{eval_name}"
        written = write_report(load_records([folder]), folder)
        _print_report_warnings(written["summary"])
        print(f"report: {written['report']}")
    return 0


def _run_eval_niah(args: argparse.Namespace) -> int:
    from . import models
    from .eval import niah

    lengths = _csv_ints(args.lengths, "--lengths")
    if args.depths < 1:
        raise ValueError("--depths must be >= 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    loaded, methods = _load_for_eval(args)
    for length in lengths or ():
        models.check_context(loaded, length)
    lengths = lengths or niah.default_lengths(loaded.max_context or 8192)
    depths = [i / (args.depths - 1) if args.depths > 1 else 0.5 for i in range(args.depths)]
    options = {k: v for k, v in (("needle", args.needle), ("question", args.question)) if v is not None}
    samples = niah.grid_samples(
        loaded.tokenizer, lengths, depths, haystack=args.haystack, answer=args.answer, seed=args.seed,
        max_new_tokens=args.max_new_tokens, chat=not args.no_chat, **options,
    )
    meta = {"lengths": lengths, "depths": depths, "haystack": args.haystack, "seed": args.seed, **options}
    return _execute_eval(args, "niah", loaded, methods, samples, meta)


def _run_eval_ruler(args: argparse.Namespace) -> int:
    from . import models
    from .eval import ruler

    tasks = {"synthetic": list(ruler.SYNTHETIC_TASKS), "all": list(ruler.ALL_TASKS)}.get(
        args.tasks, [t.strip() for t in args.tasks.split(",") if t.strip()]
    )
    for task in tasks:
        if ruler.task_family(task) == "qa":
            ruler.qa_path(task, args.qa_dir)  # fail before the slow model load
    lengths = _csv_ints(args.lengths, "--lengths")
    loaded, methods = _load_for_eval(args)
    for length in lengths or ():
        models.check_context(loaded, length)
    if lengths is None:
        context = loaded.max_context or 8192
        lengths = [n for n in (4096, 8192, 16384, 32768, 65536, 131072) if n <= context] or [context]
    options = ruler.RulerOptions(seed=args.seed, haystack=args.haystack, qa_dir=args.qa_dir, chat=not args.no_chat)
    samples = ruler.build_samples(loaded.tokenizer, tasks, lengths, args.samples, options)
    meta = {"tasks": tasks, "lengths": lengths, "samples": args.samples, "haystack": args.haystack, "seed": args.seed}
    return _execute_eval(args, "ruler", loaded, methods, samples, meta)


def _run_eval_bench(args: argparse.Namespace) -> int:
    from . import models
    from .eval import infinitebench, longbench

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    module = longbench if args.eval == "longbench" else infinitebench
    for task in tasks:
        if task not in module.TASKS:
            raise ValueError(f"unknown {args.eval} task {task!r}; known: {', '.join(module.TASKS)}")
        path = module.data_file(args.data_dir, task, e=True) if getattr(args, "longbench_e", False) else module.data_file(args.data_dir, task)
        if not path.is_file():  # fail before the slow model load
            raise FileNotFoundError(f"{args.eval} {task}: expected the data file {path} ({module.DOWNLOAD_HINT})")
    loaded, methods = _load_for_eval(args)
    limit = args.limit or loaded.max_context or 8192
    models.check_context(loaded, limit, "--limit")
    extra = {"longbench_e": args.longbench_e} if args.eval == "longbench" else {}
    samples = module.build_samples(
        loaded.tokenizer, args.data_dir, tasks, limit=limit, num_samples=args.samples, chat=not args.no_chat, **extra
    )
    meta = {"tasks": tasks, "limit": limit, "data_dir": str(args.data_dir), **extra}
    return _execute_eval(args, args.eval, loaded, methods, samples, meta)


def _run_report(args: argparse.Namespace) -> int:
    from .eval.report import write_report
    from .eval.results import load_records

    records = load_records(args.results)
    attention = None
    if args.attention_times:
        import json
        from pathlib import Path

        from .eval.report import attention_times

        for path in args.attention_times:
            times = attention_times(
                json.loads(Path(path).read_text()), length=args.attention_length, inputs=args.attention_inputs
            )
            if attention is not None and times["length"] != attention["length"]:
                raise ValueError(f"{path}: length {times['length']} differs from the first file's {attention['length']}")
            # Entries of an earlier file win (dense and FlexPrefill are in every file).
            attention = times if attention is None else {**attention, "ms": {**times["ms"], **attention["ms"]}}
    written = write_report(records, args.out or args.results[0], plots=not args.no_plots, attention=attention)
    _print_report_warnings(written["summary"])
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _print_report_warnings(summary_path) -> None:
    """The report's warnings (methods compared on different samples or settings) on stderr."""
    import json
    from pathlib import Path

    for eval_name, data in json.loads(Path(summary_path).read_text()).items():
        for warning in data.get("warnings", ()):
            print(f"tokensparse: warning: {eval_name}: {warning}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
