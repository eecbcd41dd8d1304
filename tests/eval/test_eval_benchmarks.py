"""LongBench and InfiniteBench loaders on small fixture files written here."""

import json

import pytest

from tokensparse.eval import infinitebench, longbench, metrics


def _write(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")


def _score(sample, answer):
    return metrics.score(sample.metric, answer, list(sample.references), postprocess=sample.postprocess, **sample.metric_options)


def test_longbench_prompts_truncation_and_scores(byte_tokenizer, tmp_path):
    long_context = "START " + "filler words here. " * 400 + " END"
    _write(
        tmp_path / "hotpotqa.jsonl",
        [
            {"input": "Who wrote it?", "context": long_context, "answers": ["Jane Austen"], "all_classes": None, "length": 2000, "_id": "a"},
            {"input": "Where?", "context": "Short passage.", "answers": ["Paris"], "all_classes": None, "length": 3, "_id": "b"},
        ],
    )
    _write(
        tmp_path / "trec.jsonl",
        [{"input": "What is X?", "context": "Question: Who? Type: Person", "answers": ["Location"], "all_classes": ["Location", "Person"], "length": 9, "_id": "c"}],
    )
    _write(tmp_path / "lcc.jsonl", [{"input": "", "context": "def f():\n", "answers": ["    return 1"], "all_classes": None, "length": 2, "_id": "d"}])
    samples = longbench.build_samples(byte_tokenizer, tmp_path, ["hotpotqa", "trec", "lcc"], limit=1024)
    hotpot_long, hotpot_short, trec, lcc = samples
    text = byte_tokenizer.decode(list(hotpot_long.input_ids))
    # chat template, truncated in the middle: both ends survive, the prompt plus answer fit
    assert text.startswith("<|user|>Answer the question based on the given passages.")
    assert "START" in text and "END" in text and text.endswith("Question: Who wrote it?\nAnswer:</s><|assistant|>")
    assert hotpot_long.num_tokens + 32 <= 1024 and hotpot_long.num_tokens > 900
    assert hotpot_long.metric == "qa_f1" and hotpot_long.max_new_tokens == 32
    assert _score(hotpot_long, "Jane Austen.") == 1.0
    assert _score(hotpot_long, "Austen") == pytest.approx(2 / 3)  # P = 1, R = 1/2
    short = byte_tokenizer.decode(list(hotpot_short.input_ids))
    assert "Short passage." in short and hotpot_short.info["id"] == "b"
    # few-shot tasks: no chat template, first line only, classification with all classes
    trec_text = byte_tokenizer.decode(list(trec.input_ids))
    assert "<|user|>" not in trec_text and trec_text.endswith("Type: Person\nWhat is X?")
    assert trec.metric_options == {"all_classes": ["Location", "Person"]}
    assert _score(trec, "Location\nPerson") == 1.0  # the second line is ignored
    assert _score(trec, "Person") == 0.0
    assert lcc.metric == "edit_sim" and _score(lcc, "    return 1\n") == 1.0
    only_one = longbench.build_samples(byte_tokenizer, tmp_path, ["hotpotqa"], limit=1024, num_samples=1)
    assert len(only_one) == 1


def test_longbench_missing_file_and_unknown_task(byte_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected the data file .*narrativeqa\.jsonl"):
        longbench.build_samples(byte_tokenizer, tmp_path, ["narrativeqa"], limit=1024)
    with pytest.raises(FileNotFoundError, match=r"qasper_e\.jsonl"):
        longbench.build_samples(byte_tokenizer, tmp_path, ["qasper"], limit=1024, longbench_e=True)
    with pytest.raises(ValueError, match="unknown LongBench task 'nope'"):
        longbench.build_samples(byte_tokenizer, tmp_path, ["nope"], limit=1024)


def test_every_longbench_task_has_a_known_metric():
    for task, spec in longbench.TASKS.items():
        assert spec.metric in metrics.METRICS, task
        assert "{context}" in spec.prompt


def test_infinitebench_prompts_and_scores(byte_tokenizer, tmp_path):
    book = "Once upon a time. " * 300
    _write(tmp_path / "passkey.jsonl", [{"id": 0, "context": "noise " * 50 + "The pass key is 71432. " + "noise " * 50, "input": "What is the pass key?", "answer": ["71432"], "options": []}])
    _write(
        tmp_path / "longbook_choice_eng.jsonl",
        [{"id": 1, "context": book, "input": "Who?", "answer": ["The fox"], "options": ["The cat", "The fox", "The dog", "The owl"]}],
    )
    _write(tmp_path / "code_run.jsonl", [{"id": 2, "context": "def func_1(x):\n    return x + 1\n", "input": "What is func_1(-3)?", "answer": [-2], "options": []}])
    _write(
        tmp_path / "code_debug.jsonl",
        [{"id": 3, "context": "def a(): pass", "input": "", "answer": ["func_b"], "options": ["func_a", "func_b", "func_c", "func_d"]}],
    )
    _write(tmp_path / "math_find.jsonl", [{"id": 4, "context": "[1, 5, 3]", "input": "What is the largest number of the list?", "answer": [5], "options": []}])
    tasks = ["passkey", "longbook_choice_eng", "code_run", "code_debug", "math_find"]
    passkey, choice, code_run, code_debug, math_find = infinitebench.build_samples(byte_tokenizer, tmp_path, tasks, limit=2048)
    text = byte_tokenizer.decode(list(passkey.input_ids))
    assert text.startswith("<|user|>There is an important info hidden") and text.endswith("What is the pass key?</s><|assistant|>")
    assert _score(passkey, "71432") == 1.0 and _score(passkey, "The key is 1.") == 0.0
    choice_text = byte_tokenizer.decode(list(choice.input_ids))
    assert "A. The cat\nB. The fox\nC. The dog\nD. The owl" in choice_text and choice.num_tokens + 40 <= 2048
    assert choice.references == ("The fox", "B") and _score(choice, "B") == 1.0 and _score(choice, "A") == 0.0
    assert "func_1(-3)" in byte_tokenizer.decode(list(code_run.input_ids)) and _score(code_run, "The value is -2") == 1.0
    assert _score(code_run, "It returns: 2") == 0.0 and code_run.references == (-2,)
    assert code_debug.references == ("func_b", "B") and _score(code_debug, "B. func_b") == 1.0
    assert "What is the largest number in the following list?" in byte_tokenizer.decode(list(math_find.input_ids))
    assert _score(math_find, "5") == 1.0


def test_infinitebench_missing_file(byte_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"InfiniteBench kv_retrieval: expected the data file .*kv_retrieval\.jsonl"):
        infinitebench.build_samples(byte_tokenizer, tmp_path, ["kv_retrieval"], limit=1024)
    with pytest.raises(ValueError, match="unknown InfiniteBench task"):
        infinitebench.build_samples(byte_tokenizer, tmp_path, ["nope"], limit=1024)
