"""RULER prompt building and scoring, task by task, with the byte tokenizer
(one token per byte) and hand-checkable properties of each prompt."""

import json
import re
from collections import Counter

import pytest

from tokensparse.eval import metrics, ruler
from tokensparse.eval.prompts import Sample


def _text(tok, sample: Sample) -> str:
    return tok.decode(list(sample.input_ids))


def _user_and_prefix(text: str) -> tuple[str, str]:
    user, _, prefix = text.partition("</s><|assistant|>")
    assert user.startswith("<|user|>")
    return user[len("<|user|>") :], prefix


def _score(sample: Sample, answer: str) -> float:
    return metrics.score(sample.metric, answer, list(sample.references), postprocess=sample.postprocess)


def _build(tok, task, length=1536, n=2, **options):
    return ruler.build_samples(tok, [task], [length], n, ruler.RulerOptions(**options))


@pytest.mark.parametrize("task", ruler.SYNTHETIC_TASKS)
def test_every_task_fits_and_is_deterministic(byte_tokenizer, task):
    length = {"cwe": 8192, "vt": 4096}.get(task, 1536)
    samples = _build(byte_tokenizer, task, length)
    budget = ruler.TOKENS_TO_GENERATE[ruler.task_family(task)]
    for s in samples:
        assert s.task == task and s.length == length
        assert s.num_tokens + s.max_new_tokens <= length
        assert s.num_tokens + s.max_new_tokens > 0.8 * length  # filled, not tiny
        assert s.max_new_tokens == budget
        assert s.metric == "string_match_all" and s.postprocess == "ruler"
        # the right answer scores 1, an empty one 0
        assert _score(s, " ".join(map(str, s.references))) == 1.0
        assert _score(s, "") == 0.0
    assert samples[0].input_ids != samples[1].input_ids
    again = _build(byte_tokenizer, task, length)
    assert [s.input_ids for s in again] == [s.input_ids for s in samples]
    assert _build(byte_tokenizer, task, length, seed=7)[0].input_ids != samples[0].input_ids


def test_niah_single_wording_and_needle(byte_tokenizer):
    (s,) = _build(byte_tokenizer, "niah_single_1", n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    (value,) = s.references
    key = re.search(r"for (\S+) is: " + value, user).group(1)
    # RULER's singular template, noise haystack, and the answer prefix after the template
    assert user.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert "\nThe grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n" in user
    assert user.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert f"One of the special magic numbers for {key} is: {value}." in user
    assert prefix == f"The special magic number for {key} mentioned in the provided text is"
    assert re.fullmatch(r"\d{7}", value)
    assert _score(s, f"{value}.") == 1.0


def test_niah_single_3_uuid_in_essay(byte_tokenizer):
    (s,) = _build(byte_tokenizer, "niah_single_3", n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    (value,) = s.references
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)
    assert "The grass is green" not in user  # essay haystack
    assert user.count(value) == 1
    assert prefix.startswith("The special magic uuid for ")


def test_niah_multikey_and_needle_haystacks(byte_tokenizer):
    (s,) = _build(byte_tokenizer, "niah_multikey_1", n=1)
    user, _ = _user_and_prefix(_text(byte_tokenizer, s))
    assert user.count("One of the special magic numbers for") == 4  # 4 keys, one asked
    (s,) = _build(byte_tokenizer, "niah_multikey_2", n=1)
    user, _ = _user_and_prefix(_text(byte_tokenizer, s))
    lines = user.split("\n")[1:-1]
    assert len(lines) > 10 and all(line.startswith("One of the special magic numbers for ") for line in lines)
    (s,) = _build(byte_tokenizer, "niah_multikey_3", n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    assert "One of the special magic uuids for " in user and prefix.startswith("The special magic uuid for ")


def test_niah_multivalue_and_multiquery(byte_tokenizer):
    (s,) = _build(byte_tokenizer, "niah_multivalue", n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    assert len(s.references) == 4 and all(v in user for v in s.references)
    assert user.startswith("Some special magic numbers are hidden")
    assert prefix.endswith("mentioned in the provided text are")
    # string_match_all: the share of values found
    assert _score(s, f"{s.references[0]} and {s.references[2]}") == 0.5
    (s,) = _build(byte_tokenizer, "niah_multiquery", n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    keys = re.search(r"numbers for (.+) mentioned in the provided text\?$", user).group(1)
    assert keys.count(", ") == 3 and ", and " in keys
    for key, value in zip(re.split(r", (?:and )?", keys), s.references):
        assert f"One of the special magic numbers for {key} is: {value}." in user


def test_vt_chain_resolves_to_the_expected_names(byte_tokenizer):
    (s,) = _build(byte_tokenizer, "vt", length=4096, n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    shot, _, task = user.rpartition("Memorize and track the chain(s)")
    assert shot.startswith("Memorize and track")  # the one-shot example comes first, solved
    assert re.search(r"they are: +([A-Z]{3} ){4}[A-Z]{3}\n\n$", shot)
    value = re.search(r"assigned the value (\d+) in the text above\.$", task).group(1)
    # follow the assignments of the task part by hand
    assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\S+(?: [A-Z]{5})?)", task))
    names = {n for n, v in assigned.items() if v == value}
    changed = True
    while changed:
        changed = False
        for n, v in assigned.items():
            if v.startswith("VAR ") and v[4:] in names and n not in names:
                names.add(n)
                changed = True
    assert names == set(s.references) and len(names) == 5
    assert prefix == f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, they are: "


@pytest.mark.parametrize("length,common,uncommon", [(2048, 6, 1), (8192, 30, 3)])
def test_cwe_counts(byte_tokenizer, length, common, uncommon):
    (s,) = _build(byte_tokenizer, "cwe", length=length, n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    shot, _, task = user.rpartition("Below is a numbered list of words.")
    assert "The top 10 words that appear most often in the list are: 1. " in shot  # solved example
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", task.split("\n")[1]))
    assert {w for w, c in counts.items() if c == common} == set(s.references) and len(s.references) == 10
    assert all(c == uncommon for w, c in counts.items() if w not in s.references)
    assert prefix == "Answer: The top 10 words that appear most often in the list are:"


def test_fwe_answer_is_the_three_most_frequent_words(byte_tokenizer):
    (s,) = _build(byte_tokenizer, "fwe", length=2048, n=1)
    user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
    coded = user.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    counts = Counter(coded)
    assert counts.most_common(1)[0][0] == "..."  # the noise word leads
    top = [w for w, _ in counts.most_common() if w != "..."][:3]
    assert top == list(s.references)
    assert prefix.startswith("Answer: According to the coded text above")


def _write_qa_files(folder):
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Paragraph {a}-{p} says that item {a}{p} is colour number {a * 10 + p}.",
                        "qas": [
                            {"question": f"What colour is item {a}{p}?", "answers": [{"text": f"number {a * 10 + p}"}], "is_impossible": False},
                            {"question": "Unanswerable?", "answers": [], "is_impossible": True},
                        ],
                    }
                    for p in range(3)
                ]
            }
            for a in range(6)
        ]
    }
    hotpot = [
        {
            "question": f"Which city hosts event {i}?",
            "answer": f"City{i}",
            "context": [[f"Title {i}a", [f"Event {i} is in City{i}.", " It is big."]], [f"Title {i}b", ["Other text."]]],
        }
        for i in range(8)
    ]
    (folder / "squad.json").write_text(json.dumps(squad))
    (folder / "hotpotqa.json").write_text(json.dumps(hotpot))


def test_qa_tasks_from_local_files(byte_tokenizer, tmp_path):
    _write_qa_files(tmp_path)
    for task in ("qa_1", "qa_2"):
        samples = _build(byte_tokenizer, task, length=1024, n=3, qa_dir=str(tmp_path))
        for s in samples:
            user, prefix = _user_and_prefix(_text(byte_tokenizer, s))
            assert s.metric == "string_match_part" and s.max_new_tokens == 32
            assert user.startswith("Answer the question based on the given documents.")
            assert "Document 1:\n" in user and prefix == "Answer:"
            (answer,) = s.references[:1]
            assert answer.split()[-1] in user  # the gold document is in the context
            assert _score(s, f"It is {answer}") == 1.0
    (s,) = _build(byte_tokenizer, "qa_1", length=1024, n=1, qa_dir=str(tmp_path))
    assert _score(s, "no") == 0.0


def test_qa_missing_file_names_it(byte_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"squad\.json"):
        _build(byte_tokenizer, "qa_1", qa_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"hotpotqa\.json.*--qa-dir"):
        _build(byte_tokenizer, "qa_2")


def test_bad_arguments(byte_tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        _build(byte_tokenizer, "niah_single_9")
    with pytest.raises(ValueError, match="no room"):
        _build(byte_tokenizer, "niah_single_1", length=150)
