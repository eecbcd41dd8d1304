"""What every evaluation produces: :class:`Sample`, and the helpers that build them.

A sample is a finished prompt (token ids, chat template and answer prefix
included) with what to generate and how to score it. Lengths follow RULER: the
prompt tokens plus the generation budget fit within the sample's ``length``.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One prompt to answer and score.

    Attributes:
        task: task name, e.g. ``"niah_single_1"``.
        length: the target length in tokens (prompt plus ``max_new_tokens`` fit in it;
            for LongBench/InfiniteBench, the truncation limit).
        sample_id: index of the sample within (task, length).
        input_ids: token ids of the whole prompt, as given to the model.
        references: acceptable answers, as the metric expects them.
        metric: name in :data:`tokensparse.eval.metrics.METRICS`.
        max_new_tokens: generation budget (greedy decoding).
        postprocess: name in :data:`tokensparse.eval.metrics.POSTPROCESS`.
        metric_options: keyword arguments of the metric (e.g. ``all_classes``).
        info: extra fields written to the result record (e.g. ``depth``).
    """

    task: str
    length: int
    sample_id: int
    input_ids: tuple[int, ...]
    references: tuple[Any, ...]
    metric: str
    max_new_tokens: int
    postprocess: str = "none"
    metric_options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.task, self.length, self.sample_id)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def fingerprint(self) -> str:
        """16 hex digits of a hash of everything that decides this sample's record:
        the prompt's token ids (so the seed, depth, needle, haystack and chat template),
        the references, the generation budget and the scoring. Written to every result
        record as ``sample_hash``; a rerun reuses a record only if it matches."""
        content = [
            list(self.input_ids), list(self.references), self.max_new_tokens,
            self.metric, self.postprocess, self.metric_options,
        ]
        text = json.dumps(content, sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_rng(seed: int, *parts: Any) -> random.Random:
    """A generator seeded from ``seed`` and the sample's identity (stable across runs)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return random.Random(zlib.crc32(text.encode()))


def format_prompt(tokenizer: Any, user_text: str, answer_prefix: str = "", *, chat: bool = True) -> str:
    """The prompt text: the tokenizer's chat template around ``user_text`` (when it has
    one and ``chat``), then ``answer_prefix`` (stripped of leading spaces after a
    template) so that the model continues the answer."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + answer_prefix.lstrip()
    return user_text + answer_prefix


def encode(tokenizer: Any, text: str, *, chat: bool = True) -> list[int]:
    """Token ids of a prompt from :func:`format_prompt` (special tokens only where the
    text has them, or the tokenizer's BOS for plain prompts)."""
    has_template = chat and getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=not has_template)["input_ids"])


def fit_largest(
    build: Callable[[int], T],
    size: Callable[[T], int],
    budget: int,
    *,
    low: int,
    high: int,
    what: str,
) -> tuple[int, T]:
    """Largest ``n`` in [low, high] with ``size(build(n)) <= budget``, by binary search.

    ``size`` must grow with ``n``. Raises ValueError naming ``what`` when even
    ``low`` is too long.
    """
    best: tuple[int, T] | None = None
    lo, hi = low, max(high, low)
    while lo <= hi:
        mid = (lo + hi) // 2
        built = build(mid)
        if size(built) <= budget:
            best = (mid, built)
            lo = mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"{what}: the shortest prompt ({size(build(low))} tokens) exceeds the budget of {budget}")
    if best[0] == max(high, low):
        # The estimate was too small: keep doubling.
        n = best[0]
        while True:
            built = build(n * 2)
            if size(built) > budget:
                return fit_largest(build, size, budget, low=n, high=n * 2 - 1, what=what)
            n, best = n * 2, (n * 2, built)
    return best


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to ``max_tokens`` tokens by dropping its middle, as LongBench and
    InfiniteBench do (the instructions at both ends survive)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
        ids[len(ids) - (max_tokens - half) :], skip_special_tokens=True
    )


def read_jsonl(path: Any, *, what: str, hint: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines data file; FileNotFoundError names the file and how to get it."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the data file {path} ({hint})")
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON: {err}") from None
    return out


def build_prompt_ids(
    tokenizer: Any, text: str, *, limit: int, max_new_tokens: int, chat: bool, answer_prefix: str = ""
) -> list[int]:
    """Token ids of ``text`` (middle-truncated) formatted as a prompt, so that the
    prompt plus ``max_new_tokens`` fit in ``limit`` tokens."""
    overhead = len(encode(tokenizer, format_prompt(tokenizer, "", answer_prefix, chat=chat), chat=chat))
    room = limit - max_new_tokens - overhead
    if room < 16:
        raise ValueError(f"a limit of {limit} tokens leaves no room for the prompt next to {max_new_tokens} new tokens")
    ids: list[int] = []
    for _ in range(4):
        # Decoding and re-encoding at the cut can change the count by a few tokens.
        ids = encode(tokenizer, format_prompt(tokenizer, truncate_middle(tokenizer, text, room), answer_prefix, chat=chat), chat=chat)
        if len(ids) + max_new_tokens <= limit:
            return ids
        room -= len(ids) + max_new_tokens - limit + 2
    return ids[: limit - max_new_tokens]


def read_task_records(
    benchmark: str, task: str, known: Mapping[str, Any], path: Any, *, hint: str, num_samples: int | None
) -> list[dict[str, Any]]:
    """The first ``num_samples`` records (all when None or 0) of one task of a JSON-lines
    benchmark; ValueError for a task not in ``known``, FileNotFoundError as :func:`read_jsonl`."""
    if task not in known:
        raise ValueError(f"unknown {benchmark} task {task!r}; known: {', '.join(known)}")
    records = read_jsonl(path, what=f"{benchmark} {task}", hint=hint)
    return records[:num_samples] if num_samples else records


def truncated_sample(
    tokenizer: Any, task: str, index: int, text: str, *, limit: int, max_new_tokens: int, chat: bool, **fields: Any
) -> Sample:
    """A :class:`Sample` of ``text`` middle-truncated by :func:`build_prompt_ids` to fit
    ``limit`` tokens with ``max_new_tokens``; ``fields`` are its other attributes."""
    ids = build_prompt_ids(tokenizer, text, limit=limit, max_new_tokens=max_new_tokens, chat=chat)
    return Sample(
        task=task, length=limit, sample_id=index, input_ids=tuple(ids), max_new_tokens=max_new_tokens, **fields
    )
