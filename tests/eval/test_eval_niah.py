"""NIAH grid prompts, haystacks and scoring."""

import pytest
import torch

from tokensparse.eval import haystack, metrics, niah


def test_build_needle_prompt_keeps_working(byte_tokenizer):
    prompt = niah.build_needle_prompt(byte_tokenizer, 400, 0.5)
    assert prompt.input_ids.shape[0] == 1 and prompt.input_ids.dtype == torch.long
    assert abs(prompt.num_tokens - 400) <= 4
    text = byte_tokenizer.decode(prompt.input_ids[0].tolist())
    assert "The special magic number is 7481926." in text and prompt.expected == "7481926"
    assert niah.is_correct("It is 7481926.", prompt.expected)
    assert not niah.is_correct("It is 7481925.", prompt.expected)


@pytest.mark.parametrize("source", ["filler", "essay"])
def test_grid_places_the_needle_at_each_depth(byte_tokenizer, source):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples = niah.grid_samples(byte_tokenizer, [1024, 2048], depths, haystack=source, max_new_tokens=16)
    assert len(samples) == 10
    assert {s.task for s in samples} == {f"niah_{source}"}
    for s in samples:
        text = byte_tokenizer.decode(list(s.input_ids))
        (answer,) = s.references
        needle = f"The special magic number is {answer}."
        assert s.num_tokens + 16 <= s.length and s.num_tokens + 16 > s.length - 100
        assert text.count(needle) == 1
        context = text.split("<|user|>", 1)[1].rsplit("\n\n", 1)[0]
        position = context.index(needle) / max(len(context) - len(needle), 1)
        # the needle sits at the sentence boundary nearest the depth
        longest = max(len(x) for x in haystack.split_sentences(context))
        assert abs(position - s.info["depth"]) <= longest / len(context) + 0.02, (s.info, position)
        assert text.endswith(niah.QUESTION + "</s><|assistant|>")
        assert metrics.score(s.metric, f"The number is {answer}", list(s.references)) == 1.0
        assert metrics.score(s.metric, "I do not know", list(s.references)) == 0.0
    # answers differ per cell (drawn from the seed) and are stable
    assert len({s.references for s in samples}) > 1
    again = niah.grid_samples(byte_tokenizer, [1024, 2048], depths, haystack=source, max_new_tokens=16)
    assert [s.input_ids for s in again] == [s.input_ids for s in samples]


def test_custom_needle_and_text_directory(byte_tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("Second file. It talks about boats.\n\nMore here.")
    (tmp_path / "a.txt").write_text("First file speaks of apples. Apples are red!")
    source = haystack.load_haystack(str(tmp_path))
    assert source.sentences[:3] == ("First file speaks of apples.", "Apples are red!", "Second file.")
    samples = niah.grid_samples(
        byte_tokenizer,
        [300],
        [0.5],
        haystack=str(tmp_path),
        needle="The secret fruit is {answer}.",
        question="What is the secret fruit?",
        answer="mango",
        max_new_tokens=8,
    )
    (s,) = samples
    text = byte_tokenizer.decode(list(s.input_ids))
    assert s.task == "niah_text" and s.references == ("mango",)
    assert "The secret fruit is mango." in text and "apples" in text


def test_haystack_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        haystack.load_haystack(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither 'filler' nor 'essay'"):
        haystack.load_haystack(str(tmp_path / "missing"))


def test_essay_haystack_is_prose():
    essay = haystack.load_haystack("essay")
    assert len(essay.sentences) > 500
    assert all(s[0].isupper() or s[0] in "\"'(0123456789" for s in essay.sentences[:200])
    assert len(haystack.word_pool()) > 1000
    assert essay.take(len(essay.sentences) + 2)[-1] == essay.sentences[1]  # cycles


def test_default_lengths():
    assert niah.default_lengths(8192) == [1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192]
    assert niah.default_lengths(4096, count=4) == [1024, 2048, 3072, 4096]


def test_grid_argument_errors(byte_tokenizer):
    with pytest.raises(ValueError, match="answer"):
        niah.grid_samples(byte_tokenizer, [512], needle="no field")
    with pytest.raises(ValueError, match="depths"):
        niah.grid_samples(byte_tokenizer, [512], [1.5])
    with pytest.raises(ValueError, match="no room"):
        niah.grid_samples(byte_tokenizer, [40])
