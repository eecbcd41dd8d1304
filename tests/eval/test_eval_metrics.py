"""Every metric against examples checked by hand (expected values in comments)."""

import importlib.util

import pytest

from tokensparse.eval import metrics


def approx(x):
    return pytest.approx(x, abs=1e-6)


def test_ruler_string_match():
    pred = "The numbers are 123 and 456."
    assert metrics.string_match_all(pred, ["123", "456", "789"]) == approx(2 / 3)
    assert metrics.string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case insensitive
    assert metrics.string_match_part(pred, ["789", "456"]) == 1.0
    assert metrics.string_match_part(pred, ["789"]) == 0.0
    with pytest.raises(ValueError):
        metrics.string_match_all(pred, [])


def test_qa_f1():
    # normalised: "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1, F1 = 6/7
    assert metrics.qa_f1("The cat sat on the mat", ["a cat on a mat"]) == approx(6 / 7)
    # best over references: "cat sat" gives P = 1/2, R = 1, F1 = 2/3
    assert metrics.qa_f1("The cat sat on the mat", ["dog", "cat sat"]) == approx(2 / 3)
    assert metrics.qa_f1("nothing", ["else"]) == 0.0
    assert metrics.normalize_answer("The  Answer, an apple!") == "answer apple"


@pytest.mark.skipif(importlib.util.find_spec("jieba") is not None, reason="jieba changes Chinese tokens")
def test_chinese_metrics_per_character():
    # characters: 5 vs 2, 2 common: P = 2/5, R = 1, F1 = 4/7
    assert metrics.qa_f1_zh("北京是首都。", ["北京"]) == approx(4 / 7)
    # LCS("北京是首都", "首都北京") = 2: P = 2/5, R = 2/4, F1 = 4/9
    assert metrics.rouge_l_zh("北京是首都", ["首都北京"]) == approx(4 / 9)


def test_rouge_l():
    # LCS 6 of 7 predicted and 6 reference tokens: F1 = 12/13
    assert metrics.rouge_l("the cat was found under the bed", ["The cat was under the bed."]) == approx(12 / 13)
    assert metrics.rouge_l("", ["anything"]) == 0.0
    assert metrics.lcs_length("ABCBDAB", "BDCABA") == 4


def test_rouge_lsum_union_lcs():
    # Lin (2004): reference w1..w5, candidate sentences "w1 w2 w6 w7 w8" and
    # "w1 w3 w8 w9 w5": union LCS = w1 w2 w3 w5 -> 4 hits, R = 4/5, P = 4/10, F = 8/15
    assert metrics.rouge_lsum("a b f g h\na c h i e", ["a b c d e"]) == approx(8 / 15)
    # one sentence each: same as ROUGE-L
    assert metrics.rouge_lsum("a b c", ["a c"]) == approx(metrics.rouge_l("a b c", ["a c"]))


def test_edit_similarity():
    # LCS("kitten", "sitting") = "ittn": 2 * 4 / 13
    assert metrics.edit_similarity("kitten", "sitting") == approx(8 / 13)
    assert metrics.edit_similarity("", "x") == 0.0
    # LongBench code_sim: first line without a comment; LCS 10, lengths 12 + 10
    # -> 20/22 = 90.9%, rounded to a whole percent as fuzz.ratio does
    assert metrics.edit_sim("# comment\nreturn x + 1\nmore", ["return x+1"]) == approx(0.91)
    assert metrics.edit_sim("```python", ["x = 1"]) == 0.0


def test_accuracy_metrics():
    assert metrics.exact_match("The Answer.", ["answer"]) == 1.0
    assert metrics.exact_match("an answer here", ["answer"]) == 0.0
    classes = ["Location", "Person", "Loc"]
    # "Loc" is a strict substring of the reference and is dropped
    assert metrics.classification("The type is Location.", ["Location"], all_classes=classes) == 1.0
    assert metrics.classification("Person or Location", ["Location"], all_classes=classes) == 0.5
    assert metrics.classification("no idea", ["Location"], all_classes=classes) == 0.0
    assert metrics.retrieval("Paragraph 3, maybe 5", ["Paragraph 3"]) == 0.5
    assert metrics.retrieval_zh("段落2", ["段落2"]) == 1.0
    assert metrics.count("There are 7 unique paragraphs", [7]) == 1.0
    assert metrics.count("7 or 8", [7]) == 0.5
    assert metrics.count("none", [7]) == 0.0


def test_infinitebench_metrics():
    assert metrics.first_int_match("The pass key is 71432.", ["71432"]) == 1.0
    assert metrics.first_int_match("1 then 71432", ["71432"]) == 0.0
    assert metrics.kv_match('The value is "abc-123".', ["abc-123"]) == 1.0
    assert metrics.kv_match("abc-1234", ["abc-123"]) == 0.0
    assert metrics.dialogue_match("JOHN: I think so.", ["John"]) == 1.0
    assert metrics.choice_match("B. The dog", ["The dog", "B"]) == 1.0
    assert metrics.choice_match("I think the answer is: B", ["The dog", "B"]) == 1.0
    assert metrics.choice_match("I think the answer is: C", ["The dog", "B"]) == 0.0
    assert metrics.choice_match("hmm, D seems right", ["x", "D"]) == 1.0
    assert metrics.code_run_match("The return value is: 42", [42]) == 1.0
    assert metrics.code_run_match("42 is not it: 41", [42]) == 0.0
    assert metrics.code_debug_match("C. func_b", ["func_b", "C"]) == 1.0
    assert metrics.code_debug_match("The answer is: func_b", ["func_b", "C"]) == 1.0
    assert metrics.code_debug_match("The answer is: A", ["func_b", "C"]) == 0.0
    assert metrics.math_find_match("The answer is 17.", [17]) == 1.0
    assert metrics.math_find_match("It is 2.5", [2.5]) == 1.0
    # first two values right, then a mistake: 2 of 4
    assert metrics.math_calc_prefix("[1, 4, 9, 3]", [1, 4, 8, 3]) == 0.5


def test_score_dispatch_and_postprocess():
    assert metrics.score("qa_f1", "\nParis\nand more words", ["Paris"], postprocess="first_line") == 1.0
    assert metrics.score("string_match_all", "\x00 123\x07", ["123"], postprocess="ruler") == 1.0
    assert metrics.clean_prediction(" a\tb ") == "a\nb"
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        metrics.score("nope", "x", ["x"])
    with pytest.raises(ValueError, match="unknown postprocess"):
        metrics.score("qa_f1", "x", ["x"], postprocess="nope")
