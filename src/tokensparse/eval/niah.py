"""Needle-in-a-haystack prompts.

A needle sentence holding a fact is hidden at a chosen depth of a filler text;
the model is asked for the fact after the text. Lengths are in tokens of the
model's own tokenizer, counted on the final chat-formatted prompt.

:func:`build_needle_prompt` makes one prompt (the demo's); :func:`grid_samples`
makes the evaluation grid of depths x lengths over a haystack from
:mod:`tokensparse.eval.haystack`, scored by whether the answer appears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .prompts import Sample

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The special magic number is {answer}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
ANSWER = "7481926"


@dataclass(frozen=True)
class NeedlePrompt:
    """A chat-formatted prompt with a needle.

    Attributes:
        input_ids: (1, L) int64 token ids, generation prompt included.
        expected: the answer string that must appear in the model's output.
        depth: needle depth in [0, 1], as asked.
    """

    input_ids: torch.Tensor
    expected: str
    depth: float

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def build_needle_prompt(
    tokenizer: Any,
    length: int,
    depth: float,
    *,
    answer: str = ANSWER,
    needle: str = NEEDLE,
    question: str = QUESTION,
    haystack: str = FILLER,
) -> NeedlePrompt:
    """Build a needle prompt of about ``length`` tokens (within a few tokens).

    Args:
        tokenizer: the model's tokenizer (with a chat template, or plain text is used).
        length: target prompt length in tokens, >= 64.
        depth: where the needle goes, 0 = start of the text, 1 = end.
        answer: the fact; ``needle`` is formatted with it.
        needle: sentence with an ``{answer}`` field.
        question: asked after the text.
        haystack: filler text, repeated as needed.
    """
    if not isinstance(length, int) or length < 64:
        raise ValueError(f"length must be an integer >= 64, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if "{answer}" not in needle:
        raise ValueError("needle must contain an '{answer}' field")

    needle_ids = tokenizer.encode(" " + needle.format(answer=answer), add_special_tokens=False)
    hay_ids = tokenizer.encode(haystack, add_special_tokens=False)
    if not hay_ids:
        raise ValueError("haystack must not be empty")
    overhead = len(_format(tokenizer, [], question))
    target = max(length - overhead, len(needle_ids) + 1)  # context tokens wanted

    def build(context_len: int) -> list[int]:
        filler = (hay_ids * (context_len // len(hay_ids) + 1))[:context_len]
        cut = int(round(depth * context_len))
        return _format(tokenizer, filler[:cut] + needle_ids + filler[cut:], question)

    # The context travels as text, and re-tokenising it merges some tokens at the
    # seams of the repeated haystack, so correct the filler length until the
    # formatted prompt has the asked length.
    context_len = max(target - len(needle_ids), 1)
    ids = build(context_len)
    for _ in range(4):
        produced = len(ids) - overhead
        if abs(len(ids) - length) <= 2 or produced <= 0:
            break
        context_len = max(int(round(context_len * target / produced)), 1)
        ids = build(context_len)
    return NeedlePrompt(input_ids=torch.tensor([ids], dtype=torch.long), expected=answer, depth=depth)


def is_correct(output: str, expected: str) -> bool:
    """Whether the expected answer appears in the generated text."""
    return expected.strip().lower() in output.lower()


def _format(tokenizer: Any, context_ids: list[int], question: str) -> list[int]:
    context = tokenizer.decode(context_ids) if context_ids else ""
    content = f"{context}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer.encode(content)


# ---------------------------------------------------------------- the NIAH grid
DEFAULT_DEPTHS = tuple(round(i / 9, 4) for i in range(10))
NIAH_MAX_NEW_TOKENS = 32


def default_lengths(max_context: int, *, count: int = 8, smallest: int = 1024) -> list[int]:
    """``count`` evenly spaced lengths from ``max_context / count`` (at least ``smallest``) to ``max_context``."""
    if max_context < 64:
        raise ValueError(f"max_context must be >= 64, got {max_context}")
    step = max_context / count
    return sorted({max(min(smallest, max_context), int(round(step * (i + 1)))) for i in range(count)})


def niah_task_name(haystack: str) -> str:
    """Task name recorded for a haystack source: niah_filler, niah_essay or niah_text."""
    return f"niah_{haystack}" if haystack in ("filler", "essay") else "niah_text"


def grid_samples(
    tokenizer: Any,
    lengths: list[int] | tuple[int, ...],
    depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS,
    *,
    haystack: str = "essay",
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str | None = None,
    seed: int = 42,
    max_new_tokens: int = NIAH_MAX_NEW_TOKENS,
    chat: bool = True,
) -> list[Sample]:
    """Needle-in-a-haystack samples on a grid of lengths x depths.

    The haystack fills the prompt word by word (the last sentence may be cut);
    the needle sentence goes between two sentences, at the sentence boundary
    nearest to ``depth`` of the context, and the question follows the context.
    Each prompt plus ``max_new_tokens`` fits in its length.

    Args:
        tokenizer: the model's tokenizer.
        lengths: lengths in tokens (prompt plus generation budget).
        depths: needle depths in [0, 1].
        haystack: ``"filler"``, ``"essay"`` or a .txt file or directory
            (see :func:`tokensparse.eval.haystack.load_haystack`).
        needle: sentence with an ``{answer}`` field.
        question: asked after the text.
        answer: the fact; ``None`` draws a 7-digit number per cell from ``seed``.
        max_new_tokens: generation budget.
        chat: wrap the prompt in the tokenizer's chat template.

    Returns:
        One sample per (length, depth), ``sample_id`` the depth's index, scored by
        whether the answer appears in the output (``string_match_all``).
    """
    from .haystack import load_haystack
    from .prompts import Sample, encode, fit_largest, format_prompt, sample_rng

    if "{answer}" not in needle:
        raise ValueError("needle must contain an '{answer}' field")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {depth!r}")
    source = load_haystack(haystack)
    task = niah_task_name(haystack)
    samples = []
    for length in lengths:
        budget = length - max_new_tokens
        if budget < 64:
            raise ValueError(f"NIAH length {length} leaves no room for a prompt next to {max_new_tokens} new tokens")

        def build(count: int, depth: float, index: int) -> tuple[list[int], str]:
            rng = sample_rng(seed, task, length, index)
            fact = answer if answer is not None else str(rng.randint(10**6, 10**7 - 1))
            sentences = source.words(count)
            cut = _nearest_boundary(sentences, depth)
            context = " ".join([*sentences[:cut], needle.format(answer=fact), *sentences[cut:]])
            text = format_prompt(tokenizer, f"{context}\n\n{question}", chat=chat)
            return encode(tokenizer, text, chat=chat), fact

        probe = build(256, 0.5, 0)[0]
        per_word = max(len(probe) - len(build(1, 0.5, 0)[0]), 1) / 255
        count, _ = fit_largest(
            lambda n: build(n, 0.5, 0),
            lambda built: len(built[0]),
            budget,
            low=1,
            high=max(2, int(budget / per_word * 1.5)),
            what=f"NIAH at {length}",
        )
        for index, depth in enumerate(depths):
            n = count
            ids, fact = build(n, depth, index)
            while len(ids) > budget and n > 1:
                n -= max(1, n // 200)
                ids, fact = build(n, depth, index)
            samples.append(
                Sample(
                    task=task,
                    length=length,
                    sample_id=index,
                    input_ids=tuple(ids),
                    references=(fact,),
                    metric="string_match_all",
                    max_new_tokens=max_new_tokens,
                    info={"depth": float(depth), "haystack": haystack},
                )
            )
    return samples


def _nearest_boundary(sentences: list[str], depth: float) -> int:
    """Index of the sentence boundary whose character offset is nearest ``depth`` of the text."""
    offsets, total = [0], 0
    for sentence in sentences:
        total += len(sentence) + 1
        offsets.append(total)
    target = depth * total
    return min(range(len(offsets)), key=lambda i: (abs(offsets[i] - target), i))
