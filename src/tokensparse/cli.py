"""The ``tokensparse`` command: parses arguments, calls the library, prints.

Heavy imports (torch, transformers) happen inside each subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokensparse", description="Token Sparse Attention for long prompts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    _add_profile(sub)
    _add_eval(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"tokensparse {args.command}: error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="needle-in-a-haystack, dense vs Token Sparse, on the embedded model")
    p.add_argument("--model", default="smollm2", help="model name, hub id or path (default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default 4096)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    p.add_argument("--coverage", type=float, default=None, help="coverage tau (default: chosen for the length)")
    p.add_argument("--min-tokens", type=int, default=1024, help="floor on kept prefix tokens per head")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--rope-scaling", type=float, default=None, help="YaRN factor for prompts past the context")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        model=args.model,
        length=args.length,
        depth=args.depth,
        coverage=args.coverage,
        min_tokens=args.min_tokens,
        device=args.device,
        rope_scaling_factor=args.rope_scaling,
        progress=lambda msg: print(msg, flush=True),
    )
    print()
    print(f"prompt: {result.prompt_tokens} tokens, needle at depth {result.depth:.2f}, answer {result.expected!r}")
    print(f"token sparse settings: coverage {result.config.coverage}, window {result.config.window}, "
          f"min_tokens {result.config.min_tokens}, sparse layers {list(result.sparse_layers)}")
    for run in result.runs:
        verdict = "RIGHT" if run.correct else "WRONG"
        print(f"  {run.method:<12} {verdict}  prefill {run.prefill_s:6.2f} s  answer: {run.answer!r}")
    if result.kept_share:
        print("kept share per sparse layer (mean over heads):")
        for layer, share in result.kept_share.items():
            print(f"  layer {layer:>3}: {share:6.1%}")
        print(f"  average: {sum(result.kept_share.values()) / len(result.kept_share):6.1%}")
    return 0 if all(r.correct for r in result.runs) else 1


# ---------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (GPU for timings)")
    bench = p.add_subparsers(dest="bench", required=True)
    del bench  # filled in by the GPU benchmarks


# ---------------------------------------------------------------- profile
def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure per-layer drift on a calibration prompt and choose the sparse layers")
    p.add_argument("--model", default="smollm2", help="model name, hub id or path (default: the embedded SmolLM2)")
    p.add_argument("--delta", type=float, default=0.5, help="quantile of drift at or below which layers are sparse")
    p.add_argument("--length", type=int, default=None,
                   help="calibration prompt length in tokens (default: 4096, or the model's context if shorter)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="UTF-8 text file to calibrate on (default: a built-in English text)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="profile JSON to write (default: results/profile/NAME.json); the plot goes beside it as .png")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path

    from . import models
    from .profile import (
        BUILTIN_CALIBRATION,
        DEFAULT_LENGTH,
        LayerProfile,
        calibration_ids,
        format_drift_table,
        plot_profile,
        profile_model,
    )

    text = None
    source = BUILTIN_CALIBRATION
    if args.calibration is not None:
        path = Path(args.calibration)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file at {path}")
        text = path.read_text(encoding="utf-8")
        source = f"file:{path.name}"
    print(f"loading {args.model} ...", flush=True)
    loaded = models.load(args.model, device=args.device)
    context = loaded.max_context
    length = args.length if args.length is not None else (min(DEFAULT_LENGTH, context) if context else DEFAULT_LENGTH)
    if context and length > context:
        raise ValueError(f"--length {length} exceeds the model's context of {context} tokens")
    input_ids = calibration_ids(loaded.tokenizer, length, text)
    print(f"running {length} calibration tokens densely on {loaded.device} ...", flush=True)
    profile = profile_model(loaded.model, input_ids, delta=args.delta, calibration=source)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model.rstrip("/")).name).removesuffix(".gguf") or "model"
    out = Path(args.out) if args.out else Path("results") / "profile" / f"{slug}.json"
    profile.save(out)
    # The plot is made from the file, as every result plot is.
    plot = plot_profile(LayerProfile.load(out), out.with_suffix(".png"))
    print(format_drift_table(profile))
    print(f"wrote {out} and {plot}")
    return 0


# ---------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    del sub  # filled in by the evaluation suite


if __name__ == "__main__":
    raise SystemExit(main())
