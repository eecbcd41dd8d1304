"""Evaluations with a chunked prefill (``run_eval(..., chunk_size=N)``, ``--chunk-size``):
the same answers as the whole-prompt path where they must be, separate labels and
files, the chunk size in the run settings."""

import dataclasses

import pytest
import torch

from tokensparse.eval import niah, runner
from tokensparse.eval.report import summarize
from tokensparse.eval.results import load_records, method_label, read_results, result_path
from tokensparse.eval.runner import run_eval
from tokensparse.methods import parse_methods

SPARSE = "token_sparse:keep_ratio=0.2,window=16,min_tokens=16,sparse_layers=0-1"


@pytest.fixture(scope="module")
def sharp_loaded(tiny_loaded):
    """The tiny Llama with sharper attention (so dropping tokens changes answers) and
    a byte-level answer budget long enough to tell generations apart."""
    model = tiny_loaded.model
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(4.0)
    yield tiny_loaded
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(saved[name])


@pytest.fixture(scope="module")
def padded_batch(byte_tokenizer):
    """Two prompts of different lengths (left padded in one batch), 12 new tokens each."""
    a, b = niah.grid_samples(byte_tokenizer, [320], [0.0, 1.0], haystack="filler", max_new_tokens=12)
    b = dataclasses.replace(b, input_ids=b.input_ids[:5] + b.input_ids[60:])  # 55 tokens shorter
    return [a, b]


def answers(loaded, batch, spec=None, chunk_size=None):
    if spec is not None:
        runner.enable(loaded.model, parse_methods(spec)[0])
    try:
        texts, seconds = runner._generate(loaded.model, loaded.tokenizer, batch, max_new_tokens=12, chunk_size=chunk_size)
    finally:
        if spec is not None:
            runner.disable(loaded.model)
    assert seconds > 0
    return texts


@pytest.mark.parametrize("chunk_size", [64, 100, 1000])
def test_chunked_dense_answers_are_the_whole_prompts(sharp_loaded, padded_batch, chunk_size):
    whole = answers(sharp_loaded, padded_batch)
    assert all(len(t) >= 4 for t in whole)  # something to compare (no early end-of-sequence)
    assert answers(sharp_loaded, padded_batch, chunk_size=chunk_size) == whole
    # one prompt alone (no padding, the mask dropped) too
    assert answers(sharp_loaded, padded_batch[1:], chunk_size=chunk_size) == answers(sharp_loaded, padded_batch[1:])


def test_sparse_chunk_at_least_the_prompt_is_the_whole_prompt(sharp_loaded, padded_batch):
    whole = answers(sharp_loaded, padded_batch, SPARSE)
    assert whole != answers(sharp_loaded, padded_batch)  # tokens were really dropped
    assert answers(sharp_loaded, padded_batch, SPARSE, chunk_size=320) == whole
    assert answers(sharp_loaded, padded_batch, SPARSE, chunk_size=10_000) == whole


def test_labels_files_and_settings(sharp_loaded, byte_tokenizer, tmp_path):
    samples = niah.grid_samples(byte_tokenizer, [320], [0.0, 1.0], haystack="filler", max_new_tokens=4)
    specs = parse_methods("dense," + SPARSE)
    whole = run_eval(sharp_loaded, "niah", samples, specs, tmp_path)
    chunked = run_eval(sharp_loaded, "niah", samples, specs, tmp_path, chunk_size=128, batch_size=2)
    assert [r.method for r in chunked] == ["dense @ chunk 128", f"{specs[1].label} @ chunk 128"]
    assert [r.path.name for r in chunked] == ["dense__chunk-128.jsonl", f"{specs[1].slug}__chunk-128.jsonl"]
    assert {r.path for r in whole}.isdisjoint(r.path for r in chunked)
    assert [(r.ran, r.skipped) for r in chunked] == [(2, 0), (2, 0)]
    for spec, run in zip(specs, chunked):
        assert run.path == result_path(tmp_path, "niah", spec, 128)
        records = read_results(run.path)
        assert {r["method"] for r in records} == {method_label(spec, 128)}
        assert all(r["method_name"] == spec.name and r["chunk_size"] == 128 for r in records)
        assert all(r["run_settings"]["chunk_size"] == 128 and r["prefill_s"] > 0 for r in records)
    for run in whole:  # whole-prompt settings carry no chunk size (their keys stay as before)
        assert all("chunk_size" not in r["run_settings"] and "chunk_size" not in r for r in read_results(run.path))
    sparse = read_results(chunked[1].path)
    assert all(r["kept_share"] and 0 < r["mean_kept_share"] < 1 for r in sparse)  # the last chunk's selection
    # the identical rerun resumes
    again = run_eval(sharp_loaded, "niah", samples, specs, tmp_path, chunk_size=128)
    assert [(r.ran, r.skipped) for r in again] == [(0, 2), (0, 2)]
    # one report: four methods side by side, no warning about settings (the chunk size is in the label)
    summary = summarize(load_records([tmp_path]))["niah"]
    assert sorted(summary["methods"][320]) == sorted([s.label for s in specs] + [r.method for r in chunked])
    assert summary["warnings"] == []
    # other settings besides the chunk size are still flagged
    path = chunked[0].path
    path.write_text(path.read_text().replace('"dtype": "float32"', '"dtype": "bfloat16"'))
    (warning,) = summarize(load_records([tmp_path]))["niah"]["warnings"]
    assert "run settings differ: dense @ chunk 128 vs" in warning and "dtype 'bfloat16' vs 'float32'" in warning


def test_another_chunk_size_into_the_same_file_is_refused(sharp_loaded, byte_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_generate", lambda *a, **k: (["x"] * len(a[2]), 0.01))
    samples = niah.grid_samples(byte_tokenizer, [320], [0.0, 1.0], haystack="filler", max_new_tokens=4)
    specs = parse_methods("dense")
    (first,) = run_eval(sharp_loaded, "niah", samples, specs, tmp_path, chunk_size=128)
    # the same file written under another chunk size (e.g. renamed by hand)
    moved = result_path(tmp_path, "niah", specs[0], 256)
    first.path.rename(moved)
    text = moved.read_text().replace('"dense @ chunk 128"', '"dense @ chunk 256"')
    moved.write_text(text)
    with pytest.raises(runner.StaleResultsError, match="chunk_size 256 vs 128"):
        run_eval(sharp_loaded, "niah", samples, specs, tmp_path, chunk_size=256)
    (rerun,) = run_eval(sharp_loaded, "niah", samples, specs, tmp_path, chunk_size=256, overwrite=True)
    assert (rerun.ran, rerun.skipped) == (2, 0)


@pytest.mark.parametrize("bad", [0, -4, 1.5, True, "8"])
def test_chunk_size_must_be_a_positive_integer(sharp_loaded, byte_tokenizer, tmp_path, bad):
    samples = niah.grid_samples(byte_tokenizer, [320], [0.0], haystack="filler", max_new_tokens=4)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        run_eval(sharp_loaded, "niah", samples, parse_methods("dense"), tmp_path, chunk_size=bad)
    assert not (tmp_path / "niah").exists()  # refused before anything was written
