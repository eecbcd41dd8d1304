"""Scoring functions of the long-context benchmarks, without third-party packages.

Every metric has the signature ``metric(prediction, references, **options) -> float``
with ``references`` a list of acceptable answers and a score in [0, 1]; where a
benchmark takes the best score over its references, the metric does too. The
runner looks metrics up by name in :data:`METRICS`.

Definitions follow the benchmarks' own scorers:

- RULER: ``string_match_all`` (share of references found in the prediction, case
  insensitive) and ``string_match_part`` (1 if any reference is found).
- LongBench: SQuAD-style token F1 (``qa_f1``), ROUGE-L F1 (``rouge_l``),
  classification accuracy (``classification``), paragraph retrieval and count
  accuracy, and edit similarity of the first code line (``edit_sim``).
- InfiniteBench: exact / first-integer matches, multiple-choice accuracy,
  summary-level ROUGE-L (``rouge_lsum``), QA F1, and the running-prefix score of
  ``math_calc``.

Differences from the reference implementations, stated so numbers are read right:
ROUGE uses its textbook definitions (Lin, 2004) with lower-cased alphanumeric
tokens, where LongBench calls the ``rouge`` package (which splits sentences on
'.') and InfiniteBench calls ``rouge_score``; Chinese text is tokenised with
``jieba`` when it is installed and per character otherwise.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Callable, Sequence

Metric = Callable[..., float]

_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_CONTROL = re.compile(r"[\x00-\x1f]")


# ----------------------------------------------------------------- normalisation
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower case, no (Chinese or ASCII) punctuation, no spaces."""
    punctuation = set(string.punctuation + _CN_PUNCTUATION)
    return "".join(ch for ch in text.lower() if ch not in punctuation and not ch.isspace())


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", text).strip()


def first_line(text: str) -> str:
    """LongBench's post-processing for few-shot tasks: the first line after leading newlines."""
    return text.lstrip("\n").split("\n")[0]


def zh_tokens(text: str) -> list[str]:
    """Chinese words: ``jieba`` when installed, else one token per character."""
    try:
        import jieba  # type: ignore[import-not-found]
    except ImportError:
        return [ch for ch in text if not ch.isspace()]
    return [t for t in jieba.cut(text, cut_all=False) if t.strip()]


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# ----------------------------------------------------------------- RULER
def string_match_all(prediction: str, references: Sequence[str], **_: Any) -> float:
    """Share of the references that appear in the prediction (case insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: Sequence[str], **_: Any) -> float:
    """1 if any reference appears in the prediction (case insensitive), else 0."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# ----------------------------------------------------------------- token F1
def _f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, references: Sequence[str], **_: Any) -> float:
    """SQuAD token F1 after :func:`normalize_answer`, best over references."""
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(r).split()) for r in references), default=0.0)


def qa_f1_zh(prediction: str, references: Sequence[str], **_: Any) -> float:
    """Token F1 on Chinese words (see :func:`zh_tokens`), punctuation removed."""

    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in zh_tokens(text)) if t]

    pred = tokens(prediction)
    return max((_f1(pred, tokens(r)) for r in references), default=0.0)


# ----------------------------------------------------------------- ROUGE
def _lcs_table(a: Sequence[Any], b: Sequence[Any]) -> list[list[int]]:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        row, nxt = table[i], table[i + 1]
        for j, y in enumerate(b):
            nxt[j + 1] = row[j] + 1 if x == y else max(row[j + 1], nxt[j])
    return table


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence."""
    if not a or not b:
        return 0
    return _lcs_table(a, b)[-1][-1]


def _fmeasure(hits: float, n_pred: int, n_ref: int) -> float:
    if hits == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = hits / n_pred, hits / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_l_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences."""
    return _fmeasure(lcs_length(prediction, reference), len(prediction), len(reference))


def rouge_l(prediction: str, references: Sequence[str], **_: Any) -> float:
    """ROUGE-L F1 on lower-cased alphanumeric tokens, best over references."""
    pred = _rouge_tokens(prediction)
    return max((rouge_l_tokens(pred, _rouge_tokens(r)) for r in references), default=0.0)


def rouge_l_zh(prediction: str, references: Sequence[str], **_: Any) -> float:
    """ROUGE-L F1 on Chinese words (see :func:`zh_tokens`)."""
    pred = zh_tokens(prediction)
    return max((rouge_l_tokens(pred, zh_tokens(r)) for r in references), default=0.0)


def _union_lcs_indices(reference: Sequence[str], candidate: Sequence[str]) -> set[int]:
    table = _lcs_table(reference, candidate)
    i, j, hit = len(reference), len(candidate), set()
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            hit.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return hit


def rouge_lsum_single(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F1 (union LCS over newline-separated sentences)."""
    pred_sents = [s for s in (_rouge_tokens(x) for x in prediction.split("\n")) if s]
    ref_sents = [s for s in (_rouge_tokens(x) for x in reference.split("\n")) if s]
    n_pred = sum(map(len, pred_sents))
    n_ref = sum(map(len, ref_sents))
    if n_pred == 0 or n_ref == 0:
        return 0.0
    pred_counts = Counter(t for s in pred_sents for t in s)
    ref_counts = Counter(t for s in ref_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union: set[int] = set()
        for pred in pred_sents:
            union |= _union_lcs_indices(ref, pred)
        for idx in sorted(union):
            token = ref[idx]
            if pred_counts[token] > 0 and ref_counts[token] > 0:
                hits += 1
                pred_counts[token] -= 1
                ref_counts[token] -= 1
    return _fmeasure(hits, n_pred, n_ref)


def rouge_lsum(prediction: str, references: Sequence[str], **_: Any) -> float:
    """Summary-level ROUGE-L F1, best over references."""
    return max((rouge_lsum_single(prediction, r) for r in references), default=0.0)


# ----------------------------------------------------------------- similarity
def edit_similarity(a: str, b: str) -> float:
    """Indel similarity ``2 * LCS / (len(a) + len(b))`` of two strings, 0 if one is empty.

    This is ``fuzz.ratio / 100`` of fuzzywuzzy with python-Levenshtein (and of
    rapidfuzz) before its rounding to an integer percentage.
    """
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def edit_sim(prediction: str, references: Sequence[str], **_: Any) -> float:
    """LongBench code similarity: the first line without a comment or fence, vs. each reference."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return max((round(100 * edit_similarity(line, r)) / 100 for r in references), default=0.0)


# ----------------------------------------------------------------- accuracy
def exact_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """1 if the normalised prediction equals a normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def contains(prediction: str, references: Sequence[str], **_: Any) -> float:
    """1 if any reference appears in the prediction (case insensitive); same as string_match_part."""
    return string_match_part(prediction, references)


def classification(prediction: str, references: Sequence[str], *, all_classes: Sequence[str] = (), **_: Any) -> float:
    """LongBench classification accuracy (trec, lsht).

    The classes named in the prediction, minus those that are a strict substring of
    the reference, share one point if the reference is among them. (LongBench's
    fallback to the most similar class is unreachable in its code; so here.)
    """
    if not all_classes:
        raise ValueError("classification needs all_classes")
    best = 0.0
    for reference in references:
        matched = [c for c in all_classes if c in prediction]
        matched = [c for c in matched if not (c in reference and c != reference)]
        if reference in matched:
            best = max(best, 1.0 / len(matched))
    return best


def _share_of_numbers(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(1 for n in numbers if n == target) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, references: Sequence[str], **_: Any) -> float:
    """LongBench passage retrieval: share of the numbers in the prediction that are the paragraph id."""
    scores = [_share_of_numbers(prediction, m[0]) for r in references if (m := re.findall(r"Paragraph (\d+)", r))]
    return max(scores, default=0.0)


def retrieval_zh(prediction: str, references: Sequence[str], **_: Any) -> float:
    """Chinese passage retrieval (``段落N``)."""
    scores = [_share_of_numbers(prediction, m[0]) for r in references if (m := re.findall(r"段落(\d+)", r))]
    return max(scores, default=0.0)


def count(prediction: str, references: Sequence[str], **_: Any) -> float:
    """LongBench passage count: share of the numbers in the prediction equal to the count."""
    return max((_share_of_numbers(prediction, str(r)) for r in references), default=0.0)


# ----------------------------------------------------------------- InfiniteBench
def _first_int(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def first_int_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """InfiniteBench passkey / number_string: the first integer of the prediction is the answer."""
    return float(_first_int(prediction) in {str(r) for r in references})


def _words(text: str, separators: str) -> list[str]:
    for ch in separators:
        text = text.replace(ch, " ")
    return text.split()


def kv_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """InfiniteBench kv_retrieval: the value is one of the prediction's words."""
    words = _words(prediction, "\n:\"'.,?!{}")
    return float(any(str(r) in words for r in references))


def dialogue_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """InfiniteBench longdialogue_qa_eng: the (upper-case) name is one of the prediction's words."""
    words = [w.upper() for w in _words(prediction, "\n:\"'.,?!{}")]
    return float(any(str(r).upper() in words for r in references))


def choice_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """InfiniteBench multiple choice: ``references`` hold the option text and its letter.

    The first character, an answer prefix ("answer is", "answer:", "option is") or
    else the first stand-alone letter A-D decides.
    """
    labels = [str(r) for r in references]
    pred = prediction.strip()
    if pred and pred[0] in "ABCD":
        return float(pred[0] in labels)
    pred = " ".join(_words(pred, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        after = pred[idx + len(prefix) + 1 :]
        return float(any(after.startswith(s) for s in labels))
    for word in pred.split():
        if word in ("A", "B", "C", "D"):
            return float(word in labels)
    return 0.0


def code_run_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """InfiniteBench code_run: the last word of the prediction is the returned integer."""
    words = _words(prediction.strip(), "\n.`'\":")
    if not words:
        return 0.0
    try:
        value = int(words[-1])
    except ValueError:
        return 0.0
    return float(any(str(value) == str(r).strip() for r in references))


def code_debug_match(prediction: str, references: Sequence[str], **_: Any) -> float:
    """InfiniteBench code_debug: ``references`` = [function name, option letter]."""
    if len(references) != 2:
        raise ValueError("code_debug_match needs references [function name, option letter]")
    name, letter = str(references[0]), str(references[1])
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = prediction.strip()
    for ch in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(ch, " ")
    pred = " ".join(pred.split())
    for prefix in ("answer is:", "is:", "answer:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        after = pred[idx + len(prefix) + 1 :]
        return float(after.startswith(letter) or after.startswith(name))
    return 0.0


def math_find_match(prediction: str, references: Sequence[Any], **_: Any) -> float:
    """InfiniteBench math_find: the first number of the prediction equals the answer."""
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return 0.0
    try:
        return float(any(float(match.group(0)) == float(r) for r in references))
    except (TypeError, ValueError):
        return 0.0


def math_calc_prefix(prediction: str, references: Sequence[Any], **_: Any) -> float:
    """InfiniteBench math_calc: share of the expected values matched before the first mistake.

    ``references`` is the list of expected intermediate values.
    """
    if not references:
        raise ValueError("math_calc_prefix needs the expected values")
    predicted = [int(x) for x in re.split(r"[^0-9]", prediction) if x]
    correct = 0
    for want, got in zip(references, predicted):
        if int(want) != got:
            break
        correct += 1
    return correct / len(references)


METRICS: dict[str, Metric] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "rouge_lsum": rouge_lsum,
    "edit_sim": edit_sim,
    "exact_match": exact_match,
    "contains": contains,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "first_int_match": first_int_match,
    "kv_match": kv_match,
    "dialogue_match": dialogue_match,
    "choice_match": choice_match,
    "code_run_match": code_run_match,
    "code_debug_match": code_debug_match,
    "math_find_match": math_find_match,
    "math_calc_prefix": math_calc_prefix,
}

POSTPROCESS: dict[str, Callable[[str], str]] = {
    "none": lambda text: text,
    "strip": str.strip,
    "ruler": clean_prediction,
    "first_line": first_line,
}


def score(metric: str, prediction: str, references: Sequence[Any], *, postprocess: str = "none", **options: Any) -> float:
    """Score ``prediction`` with the metric named ``metric`` after the named post-processing."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    if postprocess not in POSTPROCESS:
        raise ValueError(f"unknown postprocess {postprocess!r}; known: {sorted(POSTPROCESS)}")
    return float(METRICS[metric](POSTPROCESS[postprocess](prediction), references, **options))
