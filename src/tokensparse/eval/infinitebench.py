"""InfiniteBench from the official JSON-lines files in a local directory.

Download the data yourself (xinrongzhang2022/InfiniteBench on the Hugging Face
hub) and pass the folder holding ``<task>.jsonl``; each record has ``context``,
``input``, ``answer`` (a list) and, for multiple choice, ``options``.

Prompts are InfiniteBench's templates for chat models (``gpt4_templates`` of its
``src/prompt.py``; math_calc uses the completion template, as the chat one needs
a multi-turn system prompt), middle-truncated to the limit, in the tokenizer's
chat template. Scoring follows its ``compute_scores.py``. Generation budgets are
InfiniteBench's except math_calc, capped at 2048 tokens (it asks for 30,000).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import Sample, read_task_records, truncated_sample


@dataclass(frozen=True)
class InfiniteBenchTask:
    template: str
    max_new_tokens: int
    metric: str


TASKS: dict[str, InfiniteBenchTask] = {
    "passkey": InfiniteBenchTask(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there.\n\n{context}\n\n{input}",
        6,
        "first_int_match",
    ),
    "number_string": InfiniteBenchTask(
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the "
        "important information there.\n\n{context}\n\n{input}",
        12,
        "first_int_match",
    ),
    "kv_retrieval": InfiniteBenchTask(
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
        50,
        "kv_match",
    ),
    "longbook_sum_eng": InfiniteBenchTask("Summarize the following book.\n\n{context}", 1200, "rouge_lsum"),
    "longbook_qa_eng": InfiniteBenchTask(
        "Read the book below and answer a question.\n\n{context}\n\nQuestion: {question}\n\nBe very concise.",
        40,
        "qa_f1",
    ),
    "longbook_choice_eng": InfiniteBenchTask(
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n\nOnly one of the following "
        "options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything else.\n"
        "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}",
        40,
        "choice_match",
    ),
    "longbook_qa_chn": InfiniteBenchTask(
        "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{question}\n请尽量简短地回答。", 40, "qa_f1_zh"
    ),
    "longdialogue_qa_eng": InfiniteBenchTask(
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
        "and you should try to guess who that character is.\n\nThe dialogue:\n\n---\n\n{context}\n\n---\n\nEnd of "
        'dialogue.\n\nWhich character is most likely "$$MASK$$"? Just say the name used by the scriptwriter '
        "(before the colon marks) of one single character and nothing else.",
        40,
        "dialogue_match",
    ),
    "math_find": InfiniteBenchTask("{prefix}\n\n{context}\n\n{input}", 3, "math_find_match"),
    "math_calc": InfiniteBenchTask(
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\n"
        "Expression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:",
        2048,
        "math_calc_prefix",
    ),
    "code_run": InfiniteBenchTask(
        "Following is a set of Python functions. There is a function called named {func}.\n\n{context}\n\nPlease "
        "give me the exact number of the return value of {func_call}. Be concise. Your response must end with the "
        "final returned value.",
        5,
        "code_run_match",
    ),
    "code_debug": InfiniteBenchTask(
        "There is ONLY ONE function in the large project that is deliberately made to include an obvious error. "
        "Please find the function that contains the most obvious errors. I will give you four options to narrow "
        "your scope. You can inspect through the options and think. Eventually, tell me the answer using one single "
        "letter (A, B, C, or D).\n\n{context}\n\nWhich funtion has deliberate error?\nA. {OPTION_A}\nB. {OPTION_B}\n"
        "C. {OPTION_C}\nD. {OPTION_D}\n\nYou should first find the functions in the options. Repeat their content, "
        "inspect through code, and at last give me your answer for the function that has the deliberate and obvious "
        "error in A, B, C, or D.",
        5,
        "code_debug_match",
    ),
}
DOWNLOAD_HINT = "the official InfiniteBench data: the <task>.jsonl files of the xinrongzhang2022/InfiniteBench dataset"
_LETTERS = "ABCD"


def data_file(data_dir: str | Path, task: str) -> Path:
    return Path(data_dir) / f"{task}.jsonl"


def prompt_text(task: str, record: dict[str, Any]) -> str:
    """The filled template of one record."""
    template = TASKS[task].template
    context, question = record.get("context", ""), record.get("input", "")
    fields: dict[str, Any] = {"context": context, "input": question, "question": question}
    options = list(record.get("options") or [])
    if "{OPTION_A}" in template:
        if len(options) < 4:
            raise ValueError(f"InfiniteBench {task}: record {record.get('id')!r} needs 4 options, has {len(options)}")
        fields.update({f"OPTION_{c}": options[i] for i, c in enumerate(_LETTERS)})
    if task == "code_run":
        calls = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", question)
        if not calls:
            raise ValueError(f"InfiniteBench code_run: no function call found in {question!r}")
        fields.update(func_call=calls[0], func=calls[0].split("(")[0])
    if task == "math_find":
        found = re.search(r"\bthe (\w+) (number|value|element)", question, re.IGNORECASE)
        target = f"the {found.group(1).lower()} {found.group(2).lower()}" if found else "the number"
        fields["prefix"] = f"What is {target} in the following list?"
    return template.format(**fields)


def references(task: str, record: dict[str, Any]) -> list[Any]:
    """What the task's metric compares the answer with."""
    answer = record["answer"]
    answers = answer if isinstance(answer, list) else [answer]
    if task in ("longbook_choice_eng", "code_debug"):
        options = list(record.get("options") or [])
        if len(answers) == 2 and str(answers[1]) in _LETTERS:
            return [str(answers[0]), str(answers[1])]
        first = str(answers[0])
        if first in options:
            return [first, _LETTERS[options.index(first)]]
        return [first]
    if task == "math_calc":
        return list(answers[0]) if answers and isinstance(answers[0], list) else answers
    return answers


def build_samples(
    tokenizer: Any,
    data_dir: str | Path,
    tasks: list[str] | tuple[str, ...],
    *,
    limit: int,
    num_samples: int | None = None,
    chat: bool = True,
) -> list[Sample]:
    """Samples of the given InfiniteBench tasks, middle-truncated so that prompt plus
    answer budget fit ``limit`` tokens.

    Raises:
        FileNotFoundError: naming the expected ``<task>.jsonl`` when it is missing.
    """
    samples = []
    for task in tasks:
        records = read_task_records(
            "InfiniteBench", task, TASKS, data_file(data_dir, task), hint=DOWNLOAD_HINT, num_samples=num_samples
        )
        spec = TASKS[task]
        for index, record in enumerate(records):
            samples.append(
                truncated_sample(
                    tokenizer,
                    task,
                    index,
                    prompt_text(task, record),
                    limit=limit,
                    max_new_tokens=spec.max_new_tokens,
                    chat=chat,
                    references=tuple(references(task, record)),
                    metric=spec.metric,
                    postprocess="strip",
                    info={"id": record.get("id")},
                )
            )
    return samples
