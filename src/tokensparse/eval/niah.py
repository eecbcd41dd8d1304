"""Needle-in-a-haystack prompts.

A needle sentence holding a fact is hidden at a chosen depth of a filler text;
the model is asked for the fact after the text. Lengths are in tokens of the
model's own tokenizer, counted on the final chat-formatted prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
    context_len = max(length - overhead - len(needle_ids), 1)
    filler = (hay_ids * (context_len // len(hay_ids) + 1))[:context_len]
    cut = int(round(depth * context_len))
    context = filler[:cut] + needle_ids + filler[cut:]
    ids = _format(tokenizer, context, question)
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
