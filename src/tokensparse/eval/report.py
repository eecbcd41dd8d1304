"""Tables and plots from result files only.

:func:`summarize` aggregates records (from :func:`tokensparse.eval.results.load_records`)
per eval, task, length and method; :func:`write_report` writes ``report.md``,
``summary.json`` and the plots:

- ``accuracy_<eval>.png``: score per task, one panel per length, one bar per method;
- ``niah_<task>.png``: NIAH heatmaps, depth x length, one panel per method;
- ``tradeoff_<eval>.png``: average score against prefill seconds per sample and
  against the kept share of prefix tokens, one point per method and length,
  dense as the reference;
- ``tradeoff_attention_<eval>.png`` (when a ``tokensparse bench attention`` JSON
  is given): average score against the attention time each method would take
  per layer of the benchmarked model (:func:`attention_times`), every method on
  one plot.

Scores are shown in points (0-100).

Methods are compared on the same samples only: when the methods of an eval ran
on different sample grids (other lengths, depths, seeds, budgets: each sample is
identified by (task, length, sample_id) and its ``sample_hash``), every table
and plot uses the samples all of them ran, and the report opens that eval's
section with a warning naming what was left out; methods that share no sample
are an error. Methods run with different generation settings (``run_key``:
model, dtype, context, RoPE) are flagged too; a chunked prefill
(``<label> @ chunk N``) is a method of its own, so its chunk size is left out of
that check, as is the layer profile a method's plan read. Records written before these
keys existed count as unknown: their grids are compared by (task, length,
sample_id) and a note says so.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .results import grid_key, settings_differences, settings_key

DENSE = "dense"
NIAH_EVAL = "niah"
TARGET_POINTS = 1.0
TARGET_DROP = 0.30


def _mean(values: Iterable[float | None]) -> float | None:
    items = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(items) / len(items) if items else None


def method_order(labels: Iterable[str]) -> list[str]:
    """Dense first, then the others by name."""
    labels = sorted(set(labels))
    return [m for m in labels if m == DENSE] + [m for m in labels if m != DENSE]


def _prefix_kept(record: dict[str, Any]) -> float | None:
    if record.get("mean_prefix_kept_share") is not None:
        return float(record["mean_prefix_kept_share"])
    if record.get("mean_kept_share") is not None:
        return float(record["mean_kept_share"])
    return 1.0 if record.get("method_name", record.get("method")) == DENSE else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested aggregates: ``{eval: {"cells": ..., "methods": ..., "niah": ...}}``.

    ``cells[task][length][method]`` = {score, n}; ``methods[length][method]`` =
    {score (mean of task means), prefill_s, kept_share, prefix_kept_share, n};
    ``niah[task][method][length][depth]`` = score, for NIAH records.
    """
    by_eval: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_eval[str(r.get("eval") or "results")].append(r)
    out: dict[str, Any] = {}
    for eval_name, rows in sorted(by_eval.items()):
        rows, warnings = common_samples(eval_name, rows)
        groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[(str(r["task"]), int(r["length"]), str(r["method"]))].append(r)
        cells: dict[str, dict[int, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
        for (task, length, method), group in groups.items():
            cells[task][length][method] = {"score": 100 * _mean(g["score"] for g in group), "n": len(group)}
        methods: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        lengths = sorted({int(r["length"]) for r in rows})
        for length in lengths:
            at = [r for r in rows if int(r["length"]) == length]
            dense_scores = {_sample(r): float(r["score"]) for r in at if r["method"] == DENSE}
            for method in method_order(r["method"] for r in at):
                mine = [r for r in at if r["method"] == method]
                task_scores = [cells[t][length][method]["score"] for t in sorted(cells) if method in cells[t].get(length, {})]
                methods[length][method] = {
                    "vs_dense_interval": _paired_interval(mine, dense_scores) if method != DENSE else None,
                    "score": _mean(task_scores),
                    "tasks": len(task_scores),
                    "n": len(mine),
                    "prefill_s": _mean(r.get("prefill_s") for r in mine),
                    "kept_share": _mean(r.get("mean_kept_share") for r in mine)
                    if any(r.get("mean_kept_share") is not None for r in mine)
                    else (1.0 if method == DENSE else None),
                    "prefix_kept_share": _mean(_prefix_kept(r) for r in mine),
                    "sparse_layer_share": _mean(
                        len(r["kept_share"]) / r["num_layers"]
                        for r in mine
                        if r.get("kept_share") is not None and r.get("num_layers")
                    ),
                    "method_name": mine[0].get("method_name", method),
                }
        niah: dict[str, Any] = {}
        for r in rows:
            if "depth" in r:
                (
                    niah.setdefault(str(r["task"]), {})
                    .setdefault(str(r["method"]), {})
                    .setdefault(int(r["length"]), {})
                )[float(r["depth"])] = 100 * float(r["score"])
        out[eval_name] = {
            "cells": {t: {l: dict(m) for l, m in v.items()} for t, v in cells.items()},
            "methods": {l: dict(m) for l, m in methods.items()},
            "niah": niah,
            "warnings": warnings,
        }
    return out


def _sample(record: dict[str, Any]) -> tuple[str, int, int]:
    return str(record["task"]), int(record["length"]), int(record["sample_id"])


def _paired_interval(
    rows: list[dict[str, Any]], dense: dict[tuple[str, int, int], float], draws: int = 2000, seed: int = 0
) -> list[float] | None:
    """95% interval of the score difference to dense (points, mean of task means), by a
    bootstrap of the paired per-sample differences resampled within each task; None
    without dense on these samples."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if _sample(r) in dense:
            by_task[str(r["task"])].append(100 * (float(r["score"]) - dense[_sample(r)]))
    if not by_task:
        return None
    rng = random.Random(seed)
    tasks = [diffs for _, diffs in sorted(by_task.items())]
    means = sorted(
        sum(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for diffs in tasks) / len(tasks) for _ in range(draws)
    )
    return [means[int(0.025 * draws)], means[int(0.975 * draws) - 1]]


def common_samples(eval_name: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of the samples every method ran, and warning lines naming what
    differs between the methods (samples left out, run settings).

    Raises ValueError when the methods share no sample."""
    methods = method_order(r["method"] for r in rows)
    unknown = sum(1 for r in rows if not r.get("sample_hash"))
    # Without a hash on every record, samples can only be matched by position.
    key = (lambda r: grid_key(r)[:3]) if unknown else grid_key
    grids = {m: {key(r) for r in rows if r["method"] == m} for m in methods}
    common = set.intersection(*grids.values()) if grids else set()
    warnings = []
    if unknown:
        warnings.append(
            f"{unknown} record(s) carry no sample or settings key (written by an older tokensparse): samples are "
            "matched by task, length and sample id only, and their prompts and settings cannot be checked"
        )
    if any(grid != common for grid in grids.values()):
        left_out = {m: [r for r in rows if r["method"] == m and key(r) not in common] for m in methods}
        details = "; ".join(
            f"{m}: {len(out)} of {len(grids[m])} left out ({_describe_samples(out)})" for m, out in left_out.items() if out
        )
        if not common:
            raise ValueError(f"{eval_name}: the methods share no sample, nothing to compare ({details})")
        warnings.append(
            f"the methods ran on different samples; every number below uses only the {len(common)} sample(s) all "
            f"{len(methods)} methods ran. {details}"
        )
        rows = [r for r in rows if key(r) in common]
    warnings += _settings_warnings(rows, methods)
    return rows, warnings


def _describe_samples(rows: list[dict[str, Any]]) -> str:
    """``task@length xN`` per cell (with the depths for NIAH records)."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(str(r["task"]), int(r["length"]))].append(r)
    parts = []
    for (task, length), group in sorted(cells.items()):
        depths = sorted({float(r["depth"]) for r in group if r.get("depth") is not None})
        where = f" at depths {', '.join(f'{d:.2f}' for d in depths)}" if depths else ""
        parts.append(f"{task}@{length} x{len(group)}{where}")
    return ", ".join(parts)


def _settings_warnings(rows: list[dict[str, Any]], methods: list[str]) -> list[str]:
    by_key: dict[str, dict[str, Any]] = {}
    methods_of: dict[str, list[str]] = defaultdict(list)
    for m in methods:
        for r in rows:
            key = _comparable_key(r)
            if r["method"] == m and key and m not in methods_of[key]:
                by_key.setdefault(key, r.get("run_settings") or {})
                methods_of[key].append(m)
    if len(by_key) < 2:
        return []
    (first, settings), *others = by_key.items()
    return [
        f"run settings differ: {', '.join(methods_of[k])} vs {', '.join(methods_of[first])}: "
        f"{settings_differences(other, settings)}"
        for k, other in others
    ]


def _comparable_key(record: dict[str, Any]) -> str | None:
    """The run key without the chunk size and the layer profile: a chunked prefill is a
    method of its own (``<label> @ chunk N``), and a profile only says where a method's
    sparse layers are; both are compared with runs of the same settings otherwise."""
    settings = record.get("run_settings")
    method_only = ("chunk_size", "profile")
    if not record.get("run_key") or not isinstance(settings, dict) or not any(k in settings for k in method_only):
        return record.get("run_key")
    return settings_key({k: v for k, v in settings.items() if k not in method_only})


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict[str, Any]) -> str:
    """The report as markdown: per eval, the task x length x method table, the
    per-method averages (score, prefill, kept share), and the accuracy checks."""
    lines = ["# Evaluation results", ""]
    lines.append(
        "Scores in points (0-100). vs dense: the difference to dense on the same samples, with a 95% interval "
        "(bootstrap of the paired per-sample differences within each task). Prefill: seconds per sample (batched "
        "prompts share a prefill; see batch_size in the records). Kept: share of prefix tokens kept per sparse "
        "layer, averaged over heads, layers and samples (dense = 1)."
    )
    lines.append("")
    for eval_name, data in summary.items():
        cells, per_method = data["cells"], data["methods"]
        methods = method_order(m for l in per_method.values() for m in l)
        lines += [f"## {eval_name}", ""]
        lines += [line for w in data.get("warnings", ()) for line in (f"> **Warning:** {w}", "")]
        lines += ["| task | length | " + " | ".join(methods) + " |"]
        lines.append("|---|---:|" + "---:|" * len(methods))
        lengths = sorted(per_method)
        for task in sorted(cells):
            for length in sorted(cells[task]):
                row = cells[task][length]
                lines.append(
                    f"| {task} | {length} | " + " | ".join(_fmt(row.get(m, {}).get("score")) for m in methods) + " |"
                )
        for length in lengths if len(cells) > 1 else ():
            lines.append(
                f"| **average** | {length} | "
                + " | ".join(f"**{_fmt(per_method[length].get(m, {}).get('score'))}**" for m in methods)
                + " |"
            )
        lines += ["", "| method | length | score | vs dense | prefill s | kept share (prefix) | dropped | samples |"]
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for length in lengths:
            dense = per_method[length].get(DENSE, {}).get("score")
            for m in methods:
                stats = per_method[length].get(m)
                if not stats:
                    continue
                delta = None if dense is None or stats["score"] is None else stats["score"] - dense
                interval = stats.get("vs_dense_interval")
                vs_dense = _fmt(delta, "+.1f") + ("" if not interval else f" [{interval[0]:+.1f}, {interval[1]:+.1f}]")
                kept = stats["prefix_kept_share"]
                lines.append(
                    f"| {m} | {length} | {_fmt(stats['score'])} | {vs_dense} | "
                    f"{_fmt(stats['prefill_s'], '.4f')} | {_fmt(kept, '.1%')} | "
                    f"{_fmt(None if kept is None else 1 - kept, '.1%')} | {stats['n']} |"
                )
        lines.append("")
        lines += _checks(eval_name, data)
    return "\n".join(lines).rstrip() + "\n"


def _checks(eval_name: str, data: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    per_method = data["methods"]
    if eval_name != NIAH_EVAL and any(DENSE in v for v in per_method.values()):
        lines += [
            f"Settings within {TARGET_POINTS:.1f} point of dense that drop at least {TARGET_DROP:.0%} of prefix "
            "tokens per sparse layer on average:",
            "",
        ]
        for length in sorted(per_method):
            dense = per_method[length].get(DENSE, {}).get("score")
            ok = [
                f"{m} ({_fmt(s['score'] - dense, '+.1f')}, dropped {_fmt(1 - s['prefix_kept_share'], '.1%')})"
                for m, s in per_method[length].items()
                if m != DENSE
                and dense is not None
                and s["score"] is not None
                and s["prefix_kept_share"] is not None
                and s["score"] >= dense - TARGET_POINTS
                and 1 - s["prefix_kept_share"] >= TARGET_DROP
            ]
            lines.append(f"- {length}: " + ("; ".join(ok) if ok else "none"))
        lines.append("")
    for task, grid in sorted(data["niah"].items()):
        if DENSE not in grid:
            continue
        lines += [f"NIAH {task}: cells where dense is right and the method is wrong:", ""]
        for method in method_order(grid):
            if method == DENSE:
                continue
            bad = [
                f"{length}@{depth:.2f}"
                for length, depths in sorted(grid[DENSE].items())
                for depth, score in sorted(depths.items())
                if score >= 100 and grid[method].get(length, {}).get(depth, 100) < 100
            ]
            lines.append(f"- {method}: " + (", ".join(bad) if bad else "none"))
        lines.append("")
    return lines


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(eval_name: str, data: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    cells, per_method = data["cells"], data["methods"]
    lengths = sorted(per_method)
    methods = method_order(m for l in per_method.values() for m in l)
    tasks = sorted(cells)
    fig, axes = plt.subplots(len(lengths), 1, figsize=(max(6, 0.9 * len(tasks) * max(1, len(methods)) / 2 + 2), 3.2 * len(lengths)), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, length in zip(axes[:, 0], lengths):
        for i, m in enumerate(methods):
            ys = [cells[t].get(length, {}).get(m, {}).get("score", float("nan")) for t in tasks]
            ax.bar([x + i * width for x in range(len(tasks))], ys, width, label=m)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(tasks))])
        ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("score")
        ax.set_title(f"{eval_name}, length {length}")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_niah(task: str, grid: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    methods = method_order(grid)
    lengths = sorted({l for m in grid.values() for l in m})
    depths = sorted({d for m in grid.values() for l in m.values() for d in l})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    image = None
    for ax, m in zip(axes[0], methods):
        table = [[grid[m].get(l, {}).get(d, float("nan")) for l in lengths] for d in depths]
        image = ax.imshow(table, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([f"{l // 1024}K" if l % 1024 == 0 else str(l) for l in lengths], fontsize=7, rotation=45)
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(m, fontsize=8)
        ax.set_xlabel("length")
    axes[0, 0].set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="score")
    fig.suptitle(task)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_tradeoff(eval_name: str, data: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    per_method = data["methods"]
    methods = method_order(m for l in per_method.values() for m in l)
    palette = plt.get_cmap("tab10")
    colors = {m: ("black" if m == DENSE else palette(i % 10)) for i, m in enumerate(methods)}
    markers = "osD^v<>phX"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for k, length in enumerate(sorted(per_method)):
        marker = markers[k % len(markers)]
        for ax, x_key in ((left, "prefill_s"), (right, "prefix_kept_share")):
            points = sorted(
                (stats[x_key], stats["score"], m)
                for m, stats in per_method[length].items()
                if stats[x_key] is not None and stats["score"] is not None
            )
            if len(points) > 1:  # the trade-off curve across settings at this length
                ax.plot([p[0] for p in points], [p[1] for p in points], color="gray", lw=0.7, alpha=0.6)
            for x, y, m in points:
                ax.scatter(x, y, color=colors[m], marker="*" if m == DENSE else marker, s=150 if m == DENSE else 45,
                           zorder=3, label=f"{m} @{length}" if ax is left else None)
    left.set_xlabel("prefill seconds per sample")
    right.set_xlabel("kept share of prefix tokens (sparse layers)")
    for ax in (left, right):
        ax.set_ylabel("average score")
        ax.grid(alpha=0.3)
    left.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{eval_name}: accuracy vs cost, one marker shape per length (dense = black star)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_times(
    bench: dict[str, Any], *, length: int | None = None, inputs: str = "realistic"
) -> dict[str, Any]:
    """One attention layer's time per method, from a ``tokensparse bench attention`` JSON.

    Takes the batch-1 row at ``length`` (default: the longest) and the entries
    measured on ``inputs``; dense is cuDNN where it ran (else the first dense
    kernel). Returns ``{"length", "inputs", "dense_kernel", "ms": {spec label: ms}}``.
    """
    rows = [r for r in bench["results"] if r["batch"] == 1] or bench["results"]
    if length is not None:
        rows = [r for r in rows if r["seq_len"] == length]
        if not rows:
            have = sorted({r["seq_len"] for r in bench["results"]})
            raise ValueError(f"attention length {length} is not in the benchmark (lengths {have})")
    row = max(rows, key=lambda r: r["seq_len"])
    dense = [(n, d) for n, d in row["dense"].items() if d.get("available")]
    if not dense:
        raise ValueError("the benchmark holds no dense timing")
    name, d = next(((n, d) for n, d in dense if n == "cudnn"), dense[0])
    ms = {DENSE: float(d["ms"])}
    for entry in row["sparse"]:
        if entry.get("spec") and entry.get("inputs") == inputs:
            ms[entry["spec"]] = float(entry["total_ms"])
    if len(ms) == 1:
        kinds = sorted({e.get("inputs") for e in row["sparse"]} - {None})
        raise ValueError(f"no benchmark entries on inputs {inputs!r} (found {kinds})")
    return {"length": row["seq_len"], "inputs": inputs, "dense_kernel": name, "ms": ms}


def model_attention_ms(method: str, stats: dict[str, Any], times: dict[str, Any]) -> float | None:
    """Mean attention time per layer of ``method`` over the evaluated model's layers.

    Token Sparse runs only on its sparse layers: the others run dense (or, in the
    composition, FlexPrefill, as the integration does), so the layer time is
    weighted by the share of sparse layers the records report.
    """
    ms = times["ms"]
    if method not in ms:
        return None
    name = stats.get("method_name", method)
    if name not in ("token_sparse", "token_sparse+flexprefill"):
        return ms[method]
    share = stats.get("sparse_layer_share")
    base = ms.get("flexprefill") if name == "token_sparse+flexprefill" else ms[DENSE]
    if share is None or base is None:
        return None
    return share * ms[method] + (1 - share) * base


def attention_markdown(eval_name: str, data: dict[str, Any], times: dict[str, Any]) -> list[str]:
    per_method = data["methods"]
    lengths = sorted(per_method)
    methods = method_order(m for l in per_method.values() for m in l)
    lines = [
        f"### {eval_name}: accuracy vs attention time",
        "",
        f"Attention time: one layer at {times['length']} tokens on {times['inputs']} inputs (the benchmark's "
        f"shapes), dense = {times['dense_kernel']}; 'model' weights the sparse-layer time by the share of "
        "sparse layers (the other layers run dense, or FlexPrefill in the composition).",
        "",
        "| method | layer ms | model ms | x dense | " + " | ".join(f"score @{l}" for l in lengths) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(lengths),
    ]
    for m in methods:
        stats = next((per_method[l][m] for l in lengths if m in per_method[l]), None)
        model_ms = model_attention_ms(m, stats, times) if stats else None
        speed = None if model_ms is None else times["ms"][DENSE] / model_ms
        scores = " | ".join(_fmt(per_method[l].get(m, {}).get("score")) for l in lengths)
        lines.append(
            f"| {m} | {_fmt(times['ms'].get(m), '.2f')} | {_fmt(model_ms, '.2f')} | {_fmt(speed, '.2f')} | {scores} |"
        )
    return lines + [""]


def plot_attention_tradeoff(eval_name: str, data: dict[str, Any], times: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    per_method = data["methods"]
    families = sorted({stats.get("method_name", m) for l in per_method.values() for m, stats in l.items()})
    palette = plt.get_cmap("tab10")
    colors = {f: ("black" if f == DENSE else palette(i % 10)) for i, f in enumerate(families)}
    markers = "osD^v<>phX"
    fig, ax = plt.subplots(figsize=(8, 5))
    seen = set()
    for k, length in enumerate(sorted(per_method)):
        for m, stats in per_method[length].items():
            x = model_attention_ms(m, stats, times)
            if x is None or stats["score"] is None:
                continue
            family = stats.get("method_name", m)
            ax.scatter(x, stats["score"], color=colors[family], marker="*" if m == DENSE else markers[k % len(markers)],
                       s=150 if m == DENSE else 45, zorder=3,
                       label=f"{family}" if family not in seen else None)
            seen.add(family)
            ax.annotate(m.split(":", 1)[1] if ":" in m else "", (x, stats["score"]), fontsize=5,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"attention ms per layer, averaged over the model's layers ({times['length']} tokens, "
                  f"{times['inputs']} inputs)")
    ax.set_ylabel("average score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{eval_name}: accuracy vs attention time, one marker shape per eval length", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    records: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    plots: bool = True,
    attention: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.md, summary.json and (with ``plots``) the figures into ``out_dir``.

    ``attention``: the result of :func:`attention_times`, for the accuracy vs
    attention time table and plot.
    """
    if not records:
        raise ValueError("no result records found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    written = {"report": out / "report.md", "summary": out / "summary.json"}
    text = markdown(summary)
    if attention is not None:
        text += "\n## Accuracy vs attention time\n\n"
        for eval_name, data in summary.items():
            text += "\n".join(attention_markdown(eval_name, data, attention)) + "\n"
            if plots:
                key = f"tradeoff_attention_{eval_name}"
                written[key] = plot_attention_tradeoff(eval_name, data, attention, out / f"{key}.png")
                text += f"![{key}]({key}.png)\n\n"
    if plots:
        figures = []
        for eval_name, data in summary.items():
            if data["niah"]:
                for task, grid in sorted(data["niah"].items()):
                    written[f"niah_{task}"] = plot_niah(task, grid, out / f"niah_{task}.png")
                    figures.append(written[f"niah_{task}"].name)
            written[f"accuracy_{eval_name}"] = plot_accuracy(eval_name, data, out / f"accuracy_{eval_name}.png")
            written[f"tradeoff_{eval_name}"] = plot_tradeoff(eval_name, data, out / f"tradeoff_{eval_name}.png")
            figures += [written[f"accuracy_{eval_name}"].name, written[f"tradeoff_{eval_name}"].name]
        text += "\n## Figures\n\n" + "\n".join(f"![{name}]({name})" for name in figures) + "\n"
    written["report"].write_text(text, encoding="utf-8")
    written["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return written
