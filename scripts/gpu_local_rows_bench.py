#!/usr/bin/env python3
"""H200 recipe for dropped_rows="local" (issue 13, part 3): check the in-place kernel
against the PyTorch path at large shapes, optionally sweep its tiles, then time zero
rows vs local rows and their peak memory against dense cuDNN (tokensparse.bench.local_rows).

    PYTHONPATH=src python3 scripts/gpu_local_rows_bench.py --out results/local_rows/h200.json [--sweep]
"""

import argparse
import json
import os

import torch

from tokensparse.bench.attention import make_inputs
from tokensparse.bench.local_rows import run_local_rows_bench
from tokensparse.bench.timing import time_fn
from tokensparse.kernels.local_rows import fill_dropped_rows, fill_dropped_rows_torch, kept_row_mask
from tokensparse import TokenSparseConfig
from tokensparse.selection import select_tokens


def check(length=32768, pad=1000) -> bool:
    q, k, v = make_inputs("random", 2, 32, 8, length, 128, torch.bfloat16, torch.device("cuda"), 1)
    padding = torch.ones(2, length, dtype=torch.bool, device="cuda")
    padding[1, :pad] = False
    sel = select_tokens(q, k, TokenSparseConfig(budget="keep_ratio", keep_ratio=0.5), key_padding_mask=padding)
    base = torch.randn(2, length, 32, 128, device="cuda", dtype=torch.bfloat16)
    got = fill_dropped_rows(base.clone().transpose(1, 2), q, k, v, sel.kept_idx, 64, seq_lens=sel.seq_lens)
    ref = fill_dropped_rows_torch(base.clone().transpose(1, 2), q, k, v, sel.kept_idx, 64, seq_lens=sel.seq_lens)
    kept = kept_row_mask(sel.kept_idx, length)[..., :length]
    err = float((got.double() - ref.double()).norm() / ref.double().norm())
    same_kept = bool(torch.equal(got[kept], base.transpose(1, 2)[kept]))
    ok = err < 1e-2 and same_kept and not bool(got.isnan().any())
    print(f"check L={length} pad={pad}: rel err vs torch {err:.2e}, kept rows untouched {same_kept}: {'OK' if ok else 'FAIL'}")
    return ok


def sweep(length=131072, ratio=0.5) -> dict:
    q, k, v = make_inputs("random", 1, 32, 8, length, 128, torch.bfloat16, torch.device("cuda"), 0)
    sel = select_tokens(q, k, TokenSparseConfig(budget="keep_ratio", keep_ratio=ratio))
    out = torch.zeros(1, 32, length, 128, device="cuda", dtype=torch.bfloat16)
    times = {}
    for tiles in [(128, 32, 4, 3), (128, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (256, 32, 8, 2), (64, 32, 4, 3)]:
        try:
            t = time_fn(lambda: fill_dropped_rows(out, q, k, v, sel.kept_idx, 64, tiles=tiles), torch.device("cuda"),
                        warmup=2, min_reps=10, budget_ms=300).median_ms
        except Exception as err:  # a config the compiler refuses: note it and go on
            times[str(tiles)] = str(err).splitlines()[0][:100]
            continue
        times[str(tiles)] = t
        print(f"tiles {tiles}: {t:.3f} ms")
    t = time_fn(lambda: fill_dropped_rows(out, q, k, v, None, 64), torch.device("cuda"), warmup=2, min_reps=10,
                budget_ms=300).median_ms
    print(f"every row (default tiles): {t:.3f} ms")
    times["every_row"] = t
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="local_rows.json")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--lengths", default="16384,32768,65536,131072")
    parser.add_argument("--left-pad", type=int, default=0)
    args = parser.parse_args()
    ok = check()
    data = {"sweep": sweep() if args.sweep else None}
    data.update(run_local_rows_bench(tuple(int(x) for x in args.lengths.split(",")), left_pad=args.left_pad,
                                     progress=print))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
