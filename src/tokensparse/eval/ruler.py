"""RULER's synthetic tasks, generated locally with a fixed seed.

Tasks (RULER's ``synthetic.yaml``): ``niah_single_1/2/3``, ``niah_multikey_1/2/3``,
``niah_multivalue``, ``niah_multiquery``, ``vt`` (variable tracking), ``cwe``
(common words), ``fwe`` (frequent words), and ``qa_1`` / ``qa_2`` from local
SQuAD v2 / HotpotQA files. Templates, answer prefixes, generation budgets and
complexity settings are RULER's; every NIAH/VT/CWE/FWE task is scored with
``string_match_all`` and QA with ``string_match_part``.

Where this differs from RULER (no downloads, no extra packages):

- the "essay" haystack is :func:`tokensparse.eval.haystack.stdlib_prose`
  (RULER uses Paul Graham's essays; any .txt directory may be passed instead),
  split into sentences by a regular expression instead of NLTK;
- key words and CWE words come from :func:`tokensparse.eval.haystack.word_pool`
  instead of the ``wonderwords`` lists (keys are "word-word" as RULER's
  "adjective-noun");
- each sample has its own seed derived from (seed, task, length, index), so a
  sample does not depend on which others were generated;
- the answer prefix follows the chat template's assistant header without its
  leading space.

Lengths count the whole chat-formatted prompt plus the task's generation budget.
"""

from __future__ import annotations

import json
import math
import random
import string
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .haystack import FILLER, Haystack, load_haystack, word_pool
from .prompts import Sample, encode, fit_largest, format_prompt, sample_rng

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

# RULER's 40 insertion depths, in percent.
DEPTHS = [round(i * 100 / 39) for i in range(40)]
# Expected file names for the QA tasks inside --qa-dir.
QA_FILES = {"qa_1": "squad.json", "qa_2": "hotpotqa.json"}


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # "noise" (filler), "essay" or "needle"
    key_type: str  # "words", "numbers" or "uuids"
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


NIAH_TASKS: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", num_keys=4, num_queries=4),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
SYNTHETIC_TASKS = (*NIAH_TASKS, "vt", "cwe", "fwe")
QA_TASKS = tuple(QA_FILES)
ALL_TASKS = (*SYNTHETIC_TASKS, *QA_TASKS)


def task_family(task: str) -> str:
    if task in NIAH_TASKS:
        return "niah"
    if task in QA_TASKS:
        return "qa"
    if task in ("vt", "cwe", "fwe"):
        return task
    raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(ALL_TASKS)}")


@dataclass(frozen=True)
class RulerOptions:
    """Settings shared by all tasks of one run.

    Attributes:
        seed: base seed; each sample's generator derives from (seed, task, length, index).
        haystack: source of the "essay" haystack (see :func:`load_haystack`).
        qa_dir: directory with ``squad.json`` (SQuAD v2 dev) and ``hotpotqa.json``
            (HotpotQA dev, distractor setting) for qa_1 / qa_2.
        chat: wrap prompts in the tokenizer's chat template.
    """

    seed: int = 42
    haystack: str = "essay"
    qa_dir: str | None = None
    chat: bool = True


# ---------------------------------------------------------------- random values
def _random_value(rng: random.Random, kind: str, words: tuple[str, ...]) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(words)}-{rng.choice(words)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _insert_at_depths(rng: random.Random, sentences: list[str], items: list[str]) -> str:
    """Insert ``items`` between sentences at RULER depths drawn without replacement."""
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(items)))
    parts, last = [], 0
    for cut, item in zip(cuts, items):
        parts.append(" ".join(sentences[last:cut]))
        parts.append(item)
        last = cut
    parts.append(" ".join(sentences[last:]))
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------- task text builders
def niah_text(spec: NiahSpec, rng: random.Random, size: int, essay: Haystack) -> tuple[str, str, list[str]]:
    """(task text, answer prefix, answers) of a NIAH task with ``size`` haystack units."""
    words = word_pool()
    num_keys = max(spec.num_keys, spec.num_queries)
    keys, values, needles = [], [], []
    for _ in range(num_keys):
        keys.append(_random_value(rng, spec.key_type, words))
        values.append([_random_value(rng, spec.value_type, words) for _ in range(spec.num_values)])
        for value in values[-1]:
            needles.append(NIAH_NEEDLE.format(type_needle_v=spec.value_type, key=keys[-1], value=value))
    rng.shuffle(needles)

    if spec.haystack == "essay":
        context = _insert_at_depths(rng, essay.words(size), needles)
    else:
        if spec.haystack == "noise":
            lines = [FILLER] * size
        else:  # "needle": the haystack is made of other needles
            lines = [
                NIAH_NEEDLE.format(
                    type_needle_v=spec.value_type,
                    key=_random_value(rng, spec.key_type, words),
                    value=_random_value(rng, spec.value_type, words),
                )
                for _ in range(size)
            ]
        for index, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
            lines.insert(index, needle)
        context = "\n".join(lines)

    chosen = rng.sample(range(num_keys), spec.num_queries)
    queries = [keys[i] for i in chosen]
    answers = [v for i in chosen for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, spec.value_type
    if spec.num_queries * spec.num_values == 1:
        # RULER's singular wording, applied to the template text before formatting.
        def singular(text: str) -> str:
            return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")

        template, prefix, type_v = singular(template), singular(prefix), type_v[:-1]
    text = template.format(type_needle_v=type_v, context=context, query=query)
    return text, prefix.format(type_needle_v=type_v, query=query), answers


def vt_text(
    rng: random.Random, size: int, *, num_chains: int = 1, num_hops: int = 4, name_len: int = 5
) -> tuple[str, str, list[str]]:
    """(task text, answer prefix, variable names) of variable tracking with ``size`` filler lines."""
    total = (num_hops + 1) * num_chains
    names: list[str] = []
    while len(set(names)) < total:
        names.append("".join(rng.choices(string.ascii_uppercase, k=name_len)))
    names = list(dict.fromkeys(names))[:total]
    chains, chain_vars = [], []
    for c in range(num_chains):
        chain_names = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chain_vars.append(chain_names)
        statements = [f"VAR {chain_names[0]} = {rng.randint(10000, 99998)}"]
        statements += [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} " for j in range(num_hops)]
        chains.append(statements)
    value = chains[0][0].split("=")[-1].strip()
    lines = [FILLER] * size
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, (pos, statement) in enumerate(zip(positions, chain)):
            lines.insert(pos + j, statement)
    context = "\n".join(lines).replace(". \n", ".\n")
    text = VT_TEMPLATE.format(context=context, query=value)
    return text, VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value), chain_vars[0]


def _cwe_words(rng: random.Random, count: int) -> list[str]:
    pool = list(word_pool())
    if count <= len(pool):
        return rng.sample(pool, count)
    # More words than the pool holds: add coded 7-letter words, as RULER falls
    # back to a larger list.
    extra: set[str] = set()
    while len(extra) < count - len(pool):
        extra.add("".join(rng.choices(string.ascii_lowercase, k=7)))
    words = pool + sorted(extra - set(pool))
    return rng.sample(words, count)


def _cwe_example(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_common: int = 10):
    words = _cwe_words(rng, num_words)
    common, uncommon = words[:num_common], words[num_common:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def cwe_text(rng: random.Random, num_words: int, length: int) -> tuple[str, str, list[str]]:
    """(task text, answer prefix, the 10 common words) with ``num_words`` distinct words."""
    if length < 4096:
        shot_args, main_args = (20, 3, 1), (num_words, 6, 1)
    else:
        shot_args, main_args = (40, 10, 3), (num_words, 30, 3)
    shot_context, shot_answer = _cwe_example(rng, *shot_args)
    context, answer = _cwe_example(rng, *main_args)
    shot = (
        CWE_TEMPLATE.format(context=shot_context)
        + CWE_ANSWER_PREFIX
        + " "
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
    )
    return shot + "\n" + CWE_TEMPLATE.format(context=context), CWE_ANSWER_PREFIX, answer


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi**2 / 6
    n = 100_000
    return sum(k**-alpha for k in range(1, n + 1)) + n ** (1 - alpha) / (alpha - 1)


def fwe_text(
    rng: random.Random, num_words: int, vocab_size: int, *, alpha: float = 2.0, word_len: int = 6
) -> tuple[str, str, list[str]]:
    """(task text, answer prefix, the 3 most frequent coded words) of about ``num_words`` words."""
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise
    zeta = _zeta(alpha)
    listed = [w for k, w in enumerate(ranked, start=1) for _ in range(int(num_words * k**-alpha / zeta))]
    rng.shuffle(listed)
    return FWE_TEMPLATE.format(context=" ".join(listed)), FWE_ANSWER_PREFIX, ranked[1:4]


# ---------------------------------------------------------------- QA
def qa_path(task: str, qa_dir: str | Path | None) -> Path:
    """The data file of qa_1 / qa_2; FileNotFoundError names the file expected."""
    name = QA_FILES[task]
    if qa_dir is None:
        raise FileNotFoundError(f"RULER {task} needs {name} in a directory given with --qa-dir")
    path = Path(qa_dir) / name
    if not path.is_file():
        kind = "SQuAD v2.0 dev set (dev-v2.0.json)" if task == "qa_1" else "HotpotQA dev distractor set"
        raise FileNotFoundError(f"RULER {task} needs {path} (the {kind}, renamed to {name})")
    return path


def load_qa(task: str, qa_dir: str | Path | None) -> tuple[list[dict[str, Any]], list[str]]:
    """(questions, documents) of qa_1 (SQuAD v2) or qa_2 (HotpotQA) from ``qa_dir``.

    Questions are dicts with ``query``, ``outputs``, ``context`` (gold document
    indices) and ``more_context`` (same-article documents, SQuAD only).
    """
    path = qa_path(task, qa_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    if task == "qa_1":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        questions = []
        for article in data["data"]:
            article_docs = [index[p["context"]] for p in article["paragraphs"]]
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    if qa.get("is_impossible") or not qa.get("answers"):
                        continue
                    gold = index[p["context"]]
                    questions.append(
                        {
                            "query": qa["question"],
                            "outputs": [a["text"] for a in qa["answers"]],
                            "context": [gold],
                            "more_context": [i for i in article_docs if i != gold],
                        }
                    )
        return questions, docs
    docs = sorted({f"{title}\n{''.join(sents)}" for d in data for title, sents in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = [
        {
            "query": d["question"],
            "outputs": [d["answer"]],
            "context": [index[f"{title}\n{''.join(sents)}"] for title, sents in d["context"]],
            "more_context": [],
        }
        for d in data
    ]
    return questions, docs


def qa_text(rng: random.Random, question: dict[str, Any], docs: list[str], num_docs: int) -> tuple[str, str, list[str]]:
    gold, more = list(question["context"]), list(question["more_context"])
    if num_docs < len(docs):
        if num_docs - len(gold) > len(more):
            others = sorted(set(range(len(docs))) - set(gold) - set(more))
            chosen = gold + more + rng.sample(others, max(0, num_docs - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, max(0, num_docs - len(gold)))
    else:
        chosen = list(range(len(docs)))
    rng.shuffle(chosen)
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(chosen))
    return QA_TEMPLATE.format(context=context, query=question["query"]), QA_ANSWER_PREFIX, list(question["outputs"])


# ---------------------------------------------------------------- samples
def build_samples(
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...],
    lengths: list[int] | tuple[int, ...],
    num_samples: int,
    options: RulerOptions = RulerOptions(),
) -> list[Sample]:
    """RULER samples for every (task, length), ``num_samples`` each.

    Each prompt is the largest that fits ``length`` with the task's generation budget.
    """
    for task in tasks:
        task_family(task)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    needs_essay = any(task in NIAH_TASKS and NIAH_TASKS[task].haystack == "essay" for task in tasks)
    essay = load_haystack(options.haystack) if needs_essay else None
    samples = []
    for task in tasks:
        qa = load_qa(task, options.qa_dir) if task in QA_TASKS else None
        for length in lengths:
            samples.extend(_task_samples(tokenizer, task, length, num_samples, options, essay, qa))
    return samples


def _task_samples(
    tokenizer: Any,
    task: str,
    length: int,
    num_samples: int,
    options: RulerOptions,
    essay: Haystack | None,
    qa: tuple[list[dict[str, Any]], list[str]] | None,
) -> list[Sample]:
    family = task_family(task)
    max_new = TOKENS_TO_GENERATE[family]
    budget = length - max_new
    if budget < 64:
        raise ValueError(f"RULER {task}: length {length} leaves no room for a prompt next to {max_new} generated tokens")

    def builder(index: int) -> Callable[[int], tuple[list[int], list[str]]]:
        def build(size: int) -> tuple[list[int], list[str]]:
            rng = sample_rng(options.seed, task, length, index)
            if family == "niah":
                text, prefix, answers = niah_text(NIAH_TASKS[task], rng, size, essay)  # type: ignore[arg-type]
            elif family == "vt":
                text = _vt_fewshot(tokenizer, rng) + "\n" + (body := vt_text(rng, size))[0]
                prefix, answers = body[1], body[2]
            elif family == "cwe":
                text, prefix, answers = cwe_text(rng, size, length)
            elif family == "fwe":
                text, prefix, answers = fwe_text(rng, size, vocab_size=max(budget // 50, 4))
            else:
                questions, docs = qa  # type: ignore[misc]
                question = questions[rng.randrange(len(questions))]
                text, prefix, answers = qa_text(rng, question, docs, size)
            ids = encode(tokenizer, format_prompt(tokenizer, text, prefix, chat=options.chat), chat=options.chat)
            return ids, answers

        return build

    low = {"niah": 4, "vt": 5, "cwe": 11, "fwe": 10, "qa": 1}[family]
    first = builder(0)
    probe = max(low, 256 if family == "niah" and NIAH_TASKS[task].haystack == "essay" else 64)
    per_unit = max(len(first(probe)[0]) - len(first(low)[0]), 1) / max(probe - low, 1)
    estimate = max(int(budget / per_unit * 1.5), low + 1)
    if family == "qa":
        estimate = min(estimate, len(qa[1]))  # type: ignore[index]
    size, _ = fit_largest(first, lambda b: len(b[0]), budget, low=low, high=estimate, what=f"RULER {task} at {length}")

    samples = []
    for index in range(num_samples):
        build = builder(index)
        n = size
        ids, answers = build(n)
        while len(ids) > budget and n > low:
            n = max(low, n - max(1, size // 50))
            ids, answers = build(n)
        if len(ids) > budget:
            raise ValueError(f"RULER {task} at {length}: sample {index} does not fit")
        samples.append(
            Sample(
                task=task,
                length=length,
                sample_id=index,
                input_ids=tuple(ids),
                references=tuple(answers),
                metric="string_match_part" if family == "qa" else "string_match_all",
                max_new_tokens=max_new,
                postprocess="ruler",
            )
        )
    return samples


_VT_SHOT_TOKENS = 500


def _vt_fewshot(tokenizer: Any, rng: random.Random) -> str:
    """RULER's one-shot example for variable tracking: a short solved instance
    (3-letter names, at most 500 tokens with its answer)."""
    size = _vt_shot_size(tokenizer)
    text, prefix, names = vt_text(rng, size, name_len=3)
    return text + prefix + " " + " ".join(names) + "\n"


_shot_sizes: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def _vt_shot_size(tokenizer: Any) -> int:
    try:
        return _shot_sizes[tokenizer]
    except (KeyError, TypeError):
        pass

    def build(size: int) -> str:
        text, prefix, names = vt_text(random.Random(0), size, name_len=3)
        return text + prefix + " " + " ".join(names)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    try:
        size, _ = fit_largest(build, count, _VT_SHOT_TOKENS, low=5, high=60, what="RULER vt example")
    except ValueError:  # a tokenizer with long tokens: the smallest example
        size = 5
    try:
        _shot_sizes[tokenizer] = size
    except TypeError:
        pass
    return size
