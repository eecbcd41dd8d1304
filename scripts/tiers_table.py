"""Markdown table of results/tiers/: TTFT over dense of every gated plan, beside its accuracy
against the dense run of the same evaluation (RULER difference with the report's paired 95%
interval; NIAH cells dense gets right and the plan does not).

    python scripts/tiers_table.py results/tiers results/tiers/round2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokensparse.eval.report import summarize
from tokensparse.eval.results import load_records

LENGTHS = (4096, 8192, 16384, 32768, 49152, 65536, 131072)
GATED = " @ auto"


def _accuracy(summary: dict, label: str) -> list[str]:
    ruler = summary["ruler"]["methods"]
    if label not in ruler[4096]:
        return ["-", "-", "-"]
    cells = []
    for length in (4096, 8192):
        stats, dense = ruler[length][label], ruler[length]["dense"]
        lo, hi = stats["vs_dense_interval"]
        cells.append(f"{stats['score'] - dense['score']:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    grid = summary["niah"]["niah"]["niah_essay"]
    lost = sum(
        1 for length, depths in grid["dense"].items() for depth, score in depths.items()
        if score > 0 and grid[label][length][depth] == 0
    )
    return cells + [str(lost)]


def main(folders: list[str]) -> None:
    print("| plan | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " | RULER 4K vs dense | RULER 8K vs dense | NIAH lost |")
    print("|---|" + "---:|" * (len(LENGTHS) + 3))
    for folder in map(Path, folders):
        rows = {r["seq_len"]: r["modes"] for r in json.loads((folder / "smollm2.json").read_text())["results"]}
        summary = summarize(load_records([folder / "eval"]))
        for label in rows[LENGTHS[0]]:
            if label.endswith(GATED):
                ratios = [f"{rows[n][label]['speedup_vs_dense']:.2f}" for n in LENGTHS]
                print(f"| {label[: -len(GATED)]} | " + " | ".join(ratios + _accuracy(summary, label[: -len(GATED)])) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["results/tiers", "results/tiers/round2"])
