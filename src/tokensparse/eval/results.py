"""Result files: where they go and how they are read (no torch needed).

One JSON-lines file per (eval, method): ``OUT/<eval>/<method slug>.jsonl``, one
record per sample, keyed by (task, length, sample_id) and the method label. A
chunked prefill of the same method is another method: label ``<label> @ chunk N``,
file ``<method slug>__chunk-N.jsonl``, and ``chunk_size`` in its run settings.

What a record was computed from is in two hashes: ``sample_hash`` (the prompt's
token ids, references, generation budget and scoring; see
:attr:`tokensparse.eval.prompts.Sample.fingerprint`) and ``run_key`` (the
generation settings of the run: model, dtype, context and RoPE; the settings
themselves are in ``run_settings``). Records written before these existed have
neither: they read as usual and their keys count as unknown.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

from ..methods import MethodSpec

logger = logging.getLogger(__name__)


def check_chunk_size(chunk_size: int | None) -> None:
    """ValueError unless ``chunk_size`` is None or an integer >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def method_label(spec: MethodSpec, chunk_size: int | None = None) -> str:
    """The method of a record: the spec's label, ``"<label> @ chunk N"`` for a
    chunked prefill of ``chunk_size`` tokens per forward pass."""
    check_chunk_size(chunk_size)
    return spec.label if chunk_size is None else f"{spec.label} @ chunk {chunk_size}"


def result_path(out_dir: str | Path, eval_name: str, spec: MethodSpec, chunk_size: int | None = None) -> Path:
    """Where the results of ``spec`` on ``eval_name`` go: ``<slug>.jsonl``, or
    ``<slug>__chunk-N.jsonl`` for a chunked prefill, so both sit side by side."""
    check_chunk_size(chunk_size)
    suffix = "" if chunk_size is None else f"__chunk-{chunk_size}"
    return Path(out_dir) / eval_name / f"{spec.slug}{suffix}.jsonl"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Records of one results file; a torn last line (interrupted write) is skipped."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping a line that is not JSON (interrupted write?)", path, number)
    return records


def record_key(record: dict[str, Any]) -> tuple[str, int, int]:
    return (str(record["task"]), int(record["length"]), int(record["sample_id"]))


def settings_key(settings: dict[str, Any]) -> str:
    """16 hex digits of a hash of a run's generation settings (``run_key``)."""
    text = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def grid_key(record: dict[str, Any]) -> tuple[str, int, int, str | None]:
    """(task, length, sample_id, sample_hash): the sample a record answers; the hash
    is None for records written before it was recorded."""
    return (*record_key(record), record.get("sample_hash"))


def settings_differences(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """``name A vs B`` for each run setting that differs, or ``unknown`` when either
    side has none recorded."""
    if not ours or not theirs:
        return "settings unknown (records from before run settings were recorded)"
    names = sorted(set(ours) | set(theirs))
    return ", ".join(f"{n} {ours.get(n)!r} vs {theirs.get(n)!r}" for n in names if ours.get(n) != theirs.get(n))


def stale_reason(
    records: list[dict[str, Any]], expected: dict[tuple[str, int, int], str], run_key: str, run_settings: dict[str, Any]
) -> str | None:
    """Why ``records`` (one method's results) cannot be resumed by a run of the samples
    ``expected`` ((task, length, sample_id) -> sample hash) under ``run_key``; None if
    they can. Records of samples outside ``expected`` but of the same settings are fine
    (a grid extended or run in parts)."""
    legacy = [r for r in records if not r.get("sample_hash") or not r.get("run_key")]
    other_run = [r for r in records if r.get("run_key") and r["run_key"] != run_key]
    changed = [
        r for r in records
        if r.get("sample_hash") and record_key(r) in expected and r["sample_hash"] != expected[record_key(r)]
    ]
    parts = []
    if legacy:
        parts.append(f"{len(legacy)} record(s) without a sample or settings key (written by an older tokensparse)")
    if other_run:
        parts.append(
            f"{len(other_run)} record(s) of other run settings "
            f"({settings_differences(run_settings, other_run[0].get('run_settings'))})"
        )
    if changed:
        task, length, sample_id = record_key(changed[0])
        parts.append(
            f"{len(changed)} sample(s) whose prompt, answer or generation budget differ "
            f"(e.g. {task} at length {length}, sample {sample_id})"
        )
    return "; ".join(parts) or None


def find_result_files(roots: Iterable[str | Path]) -> list[Path]:
    """Every ``*.jsonl`` result file under the given folders (or the files themselves)."""
    files: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files.extend(sorted(root.rglob("*.jsonl")))
        else:
            raise FileNotFoundError(f"no results folder or file at {root}")
    return files


def load_records(roots: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All records under ``roots``; a later record with the same key and method wins."""
    merged: dict[tuple[str, str, str, int, int], dict[str, Any]] = {}
    for path in find_result_files(roots):
        for record in read_results(path):
            if not {"task", "length", "sample_id", "method", "score"} <= record.keys():
                continue
            merged[(str(record.get("eval", "")), str(record["method"]), *record_key(record))] = record
    return list(merged.values())
