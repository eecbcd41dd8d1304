"""Markdown tables of results/tiers/: TTFT ratios of every plan beside dense, and its accuracy
against the dense run of the same evaluation (RULER mean difference with a paired bootstrap 95%
interval, NIAH cells dense gets right and the plan gets wrong).

    python scripts/tiers_table.py results/tiers results/tiers/round2
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

LENGTHS = (4096, 8192, 16384, 32768, 49152, 65536, 131072)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def _paired_interval(diffs: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def accuracy(folder: Path) -> dict[str, dict]:
    """Method label -> {"ruler": {length: (diff, lo, hi)}, "niah_lost": [cells]} against this folder's dense."""
    out: dict[str, dict] = {}
    ruler, niah = folder / "eval" / "ruler", folder / "eval" / "niah"
    dense = {r["sample_hash"]: r for r in _rows(ruler / "dense.jsonl")}
    dense_niah = {r["sample_hash"]: r for r in _rows(niah / "dense.jsonl")}
    for path in sorted(ruler.glob("*.jsonl")):
        if path.name == "dense.jsonl":
            continue
        rows = _rows(path)
        label = rows[0]["method"]
        entry = out.setdefault(label, {"ruler": {}, "niah_lost": []})
        for length in sorted({r["length"] for r in rows}):
            diffs = [100 * (r["score"] - dense[r["sample_hash"]]["score"]) for r in rows if r["length"] == length]
            lo, hi = _paired_interval(diffs)
            entry["ruler"][length] = (sum(diffs) / len(diffs), lo, hi)
        niah_rows = _rows(niah / path.name)
        entry["niah_lost"] = sorted(
            f"{r['length']}@{r['depth']:.2f}" for r in niah_rows
            if dense_niah[r["sample_hash"]]["score"] > 0 and r["score"] == 0
        )
    return out


def main(folders: list[str]) -> None:
    print("| plan | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " | RULER 4K vs dense | RULER 8K vs dense | NIAH cells lost |")
    print("|---|" + "---:|" * (len(LENGTHS) + 3))
    for folder in map(Path, folders):
        prefill = json.loads((folder / "smollm2.json").read_text())
        acc = accuracy(folder)
        rows = {r["seq_len"]: r["modes"] for r in prefill["results"]}
        for label in rows[LENGTHS[0]]:
            if label == "dense" or not label.endswith(" @ auto"):
                continue
            spec = label[: -len(" @ auto")]
            cells = [f"{rows[n][label]['speedup_vs_dense']:.2f}" for n in LENGTHS]
            a = acc.get(spec)
            if a is None:
                extra = ["-", "-", "-"]
            else:
                extra = [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in (a["ruler"][4096], a["ruler"][8192])]
                extra.append(str(len(a["niah_lost"])))
            print(f"| {spec} | " + " | ".join(cells + extra) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["results/tiers", "results/tiers/round2"])
