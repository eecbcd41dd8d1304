"""Summaries of what the sparse layers kept during a recorded prefill.

Record with ``tokensparse.enable(model, config, record=True)``, read the raw
per-head numbers with :func:`tokensparse.selection_report`, and summarise one
prefill (a ``dict`` layer index -> ``LayerRecord``) with :func:`summarize_selection`
(a structure for programs) or :func:`format_selection_report` (a table for people).
"""

from __future__ import annotations

from dataclasses import dataclass

from .integrations.transformers import LayerRecord


@dataclass(frozen=True)
class LayerSummary:
    """One sparse layer of one prefill, over every (sequence, head) pair of the batch.

    Attributes:
        layer: decoder layer index.
        tokens: real tokens of the longest sequence in the batch.
        kept_mean, kept_min, kept_max: share of its sequence's real tokens a head
            kept (window included): mean, min and max over heads and sequences.
        dropped_max: largest share of window attention mass a head dropped.
        dense: sequences of the batch that ran this layer dense.
    """

    layer: int
    tokens: int
    kept_mean: float
    kept_min: float
    kept_max: float
    dropped_max: float
    dense: int


def summarize_selection(prefill: dict[int, LayerRecord]) -> list[LayerSummary]:
    """Per-layer summary of one recorded prefill, ordered by layer."""
    rows = []
    for layer in sorted(prefill):
        record = prefill[layer]
        shares = [s for row in record.kept_share for s in row]
        if not shares:
            continue
        rows.append(
            LayerSummary(
                layer=layer,
                tokens=max(record.seq_lens),
                # Clamped so float rounding never prints a mean outside [min, max].
                kept_mean=min(max(sum(shares) / len(shares), min(shares)), max(shares)),
                kept_min=min(shares),
                kept_max=max(shares),
                dropped_max=record.max_dropped_mass,
                dense=sum(bool(d) for d in record.dense),
            )
        )
    return rows


def format_selection_report(prefill: dict[int, LayerRecord]) -> str:
    """A per-layer table of one recorded prefill: kept share over heads, max dropped mass.

    Shares are of each sequence's real tokens, window included; "dropped" is the
    largest share of the window queries' attention mass any head lost.
    """
    rows = summarize_selection(prefill)
    if not rows:
        return "no sparse layer ran during this prefill"
    batch = len(next(iter(prefill.values())).seq_lens)
    lines = [
        f"{'layer':>5} {'tokens':>7} {'kept mean':>9} {'min':>7} {'max':>7} {'dropped max':>11}"
        + ("  dense" if batch > 1 else "")
    ]
    for r in rows:
        line = (
            f"{r.layer:>5} {r.tokens:>7} {r.kept_mean:>9.1%} {r.kept_min:>7.1%} {r.kept_max:>7.1%} "
            f"{r.dropped_max:>11.4f}"
        )
        if batch > 1:
            line += f"  {r.dense}/{batch}"
        elif r.dense:
            line += "  (dense)"
        lines.append(line)
    mean = sum(r.kept_mean for r in rows) / len(rows)
    worst = max(r.dropped_max for r in rows)
    lines.append(f"{'all':>5} {'':>7} {mean:>9.1%} {'':>7} {'':>7} {worst:>11.4f}")
    return "\n".join(lines)


__all__ = ["LayerSummary", "summarize_selection", "format_selection_report"]
