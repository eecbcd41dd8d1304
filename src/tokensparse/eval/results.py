"""Result files: where they go and how they are read (no torch needed).

One JSON-lines file per (eval, method): ``OUT/<eval>/<method slug>.jsonl``, one
record per sample, keyed by (task, length, sample_id) and the method label.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from ..methods import MethodSpec

logger = logging.getLogger(__name__)


def result_path(out_dir: str | Path, eval_name: str, spec: MethodSpec) -> Path:
    """Where the results of ``spec`` on ``eval_name`` go."""
    return Path(out_dir) / eval_name / f"{spec.slug}.jsonl"


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
