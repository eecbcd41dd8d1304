"""Sensitivity profile: per-layer KL and top-1, keep-all gives zero, files, layer choice, the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import tokensparse
from tokensparse import TokenSparseConfig
from tokensparse import calibrate as calib
from tokensparse import profile as prof
from tokensparse import sensitivity as sens
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 96
POSITIONS = 8
# Drops tokens at LENGTH: prefix 96 - 16 = 80 > min_tokens, keeps 20 of them per head.
CONFIG = TokenSparseConfig(budget="keep_ratio", keep_ratio=0.25, window=16, min_tokens=8, dropped_rows="local")


class CharTokenizer:
    """Enough of a tokenizer for calibration_ids: one id per character, BOS 1."""

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % 120 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def calib_ids(length=LENGTH):
    return prof.calibration_ids(CharTokenizer(), length)


@pytest.fixture(scope="module")
def tiny_profile():
    model = tiny_llama(4)
    return calib.sensitivity_profile(model, calib_ids(), CONFIG, positions=POSITIONS)


def make_profile(kl, top1=None):
    n = len(kl)
    model = prof.ModelIdentity("LlamaForCausalLM", "llama", n, 64, 4, 2, 128, 128, 256, "tiny")
    return sens.SensitivityProfile(
        model=model, length=LENGTH, positions=POSITIONS, config=CONFIG.to_dict(), kl=tuple(kl),
        top1=tuple(top1 if top1 is not None else [1.0] * n), calibration="test", calibration_sha256="0",
        version="0",
    )


# ---------------------------------------------------------------- the measure
def test_logit_change_matches_float64_definition():
    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(5, 11, generator=gen)
    other = ref + 0.5 * torch.randn(5, 11, generator=gen)
    other[2] = ref[2] + 3.0  # a shift changes no probability
    other[4, ref[4].argmax()] -= 100.0  # another top token at position 4
    kl, top1 = calib.logit_change(ref, other)
    p = torch.softmax(ref.double(), -1)
    q = torch.softmax(other.double(), -1)
    expected = [float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(5)]
    assert expected[2] == pytest.approx(0.0, abs=1e-12)
    assert kl == pytest.approx(sum(expected) / 5, rel=1e-12)
    assert top1 == (ref.argmax(-1) == other.argmax(-1)).double().mean().item() and top1 < 1.0
    assert calib.logit_change(ref, ref.clone()) == (0.0, 1.0)
    with pytest.raises(ValueError, match="N, V"):
        calib.logit_change(ref, other[:4])


def test_profile_values_are_finite_and_nonnegative(tiny_profile):
    p = tiny_profile
    assert len(p.kl) == len(p.top1) == 4
    assert all(math.isfinite(x) and x >= 0 for x in p.kl)
    assert all(0.0 <= x <= 1.0 for x in p.top1)
    # Keeping a quarter of the tokens changes the output of a random model in every layer.
    assert all(x > 1e-6 for x in p.kl)
    assert p.length == LENGTH and p.positions == POSITIONS
    assert p.config == CONFIG.to_dict() and p.token_sparse_config() == CONFIG
    assert p.model == prof.ModelIdentity.from_model(tiny_llama(4))
    assert p.calibration_sha256 == prof.calibration_sha256(calib_ids())
    assert p.version == tokensparse.__version__


def test_one_layer_matches_a_full_logits_reference(tiny_profile):
    """Reference without logits_to_keep: full logits, layer 2 sparse, KL in float64."""
    model = tiny_llama(4)
    ids = calib_ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits[0, -POSITIONS:]
        tokensparse.enable(model, CONFIG.replace(sparse_layers=(2,)))
        sparse = model(input_ids=ids).logits[0, -POSITIONS:]
        tokensparse.disable(model)
    p = torch.softmax(dense.double(), -1)
    kl = float((p * (p.log() - torch.log_softmax(sparse.double(), -1))).sum(-1).mean())
    assert tiny_profile.kl[2] == pytest.approx(kl, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("keep_all", [
    CONFIG.replace(keep_ratio=1.0),
    CONFIG.replace(budget="coverage", keep_ratio=None, coverage=0.0),
])
def test_keep_all_config_gives_zero(keep_all):
    model = tiny_llama(3)
    kl, top1 = calib.measure_sensitivity(model, calib_ids(), keep_all, positions=POSITIONS)
    assert kl == [0.0, 0.0, 0.0] and top1 == [1.0, 1.0, 1.0]


def test_keeping_every_token_through_the_sparse_path_changes_little():
    """keep_tokens = the whole prefix runs selection and gathered attention, not the dense shortcut."""
    model = tiny_llama(3)
    keep_all = CONFIG.replace(budget="keep_tokens", keep_ratio=None, keep_tokens=LENGTH - CONFIG.window)
    kl, top1 = calib.measure_sensitivity(model, calib_ids(), keep_all, positions=POSITIONS)
    assert all(0.0 <= x < 1e-8 for x in kl) and top1 == [1.0, 1.0, 1.0]


def test_model_is_left_dense_and_measured_from_dense():
    model = tiny_llama(2)
    ids = calib_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    expected = calib.measure_sensitivity(model, ids, CONFIG, positions=POSITIONS)
    assert model.config._attn_implementation == "sdpa"
    tokensparse.enable(model, CONFIG.replace(sparse_layers=(0, 1)))
    assert calib.measure_sensitivity(model, ids, CONFIG, positions=POSITIONS) == expected
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("case, match", [
    ({"length": CONFIG.window + CONFIG.min_tokens}, "min_tokens"),
    ({"config": CONFIG.replace(sparse_layers=(1,))}, "sparse_layers"),
    ({"positions": 0}, "positions"),
    ({"positions": LENGTH + 1}, "positions"),
])
def test_bad_inputs(case, match):
    model = tiny_llama(2)
    ids = calib_ids(case.get("length", LENGTH))
    with pytest.raises(ValueError, match=match):
        calib.measure_sensitivity(model, ids, case.get("config", CONFIG), positions=case.get("positions", POSITIONS))
    with pytest.raises(ValueError, match="shape"):
        calib.measure_sensitivity(model, ids.repeat(2, 1), CONFIG)


def test_default_config_drops_three_quarters_at_4096():
    c = sens.DEFAULT_CONFIG
    assert c.budget == "keep_ratio" and c.keep_ratio == 0.25 and c.dropped_rows == "local"
    assert c.sparse_layers is None
    prefix = 4096 - c.window
    assert c.min_tokens < 0.25 * prefix  # the floor does not raise the kept share


# ---------------------------------------------------------------- files
def test_json_round_trip(tiny_profile, tmp_path):
    path = tiny_profile.save(tmp_path / "sub" / "s.json")
    raw = json.loads(path.read_text())
    assert raw["kind"] == "sensitivity"
    for field in ("model", "length", "positions", "config", "kl", "top1", "calibration", "calibration_sha256", "version"):
        assert field in raw
    assert sens.SensitivityProfile.load(path) == tiny_profile


def test_load_rejects_broken_profiles(tiny_profile, tmp_path):
    good = tiny_profile.to_dict()
    cases = {
        "kind": ({**good, "kind": "drift"}, "kind"),
        "format": ({**good, "format": 99}, "format"),
        "missing": ({k: v for k, v in good.items() if k != "top1"}, "top1"),
        "count": ({**good, "kl": good["kl"][:3]}, "layers"),
        "negative": ({**good, "kl": [-1.0] + good["kl"][1:]}, "kl"),
        "nan": ({**good, "kl": [float("nan")] + good["kl"][1:]}, "kl"),
        "top1": ({**good, "top1": [1.5] + good["top1"][1:]}, "top1"),
    }
    for name, (values, match) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        with pytest.raises(ValueError, match=match):
            sens.SensitivityProfile.load(path)
    with pytest.raises(ValueError, match="kind"):
        prof.LayerProfile.load(tiny_profile.save(tmp_path / "s.json"))


def test_find_by_kind_beside_drift_profiles(tiny_profile, tmp_path, monkeypatch, caplog):
    model = tiny_llama(4)
    model.config._name_or_path = "/elsewhere/another-folder"
    drift = prof.profile_model(model, calib_ids(32))
    drift.save(tmp_path / "tiny.json")
    tiny_profile.save(tmp_path / "tiny_sensitivity.json")
    make_profile([0.1, 0.2]).save(tmp_path / "two_layers_sensitivity.json")
    monkeypatch.setattr(prof, "_PROFILE_DIR", tmp_path)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        assert prof.find_profile(model) == drift
        assert sens.find_sensitivity_profile(model) == tiny_profile
        assert sens.find_sensitivity_profile(tiny_llama(3)) is None
    assert caplog.text == ""


# ---------------------------------------------------------------- choosing layers
def test_safe_layers_rules():
    p = make_profile([0.5, 0.01, 0.2, 0.01, 0.0, 3.0])
    assert sens.safe_layers(p, max_kl=0.01) == (1, 3, 4)
    assert sens.safe_layers(p, max_kl=0) == (4,)
    assert sens.safe_layers(p, max_kl=10) == tuple(range(6))
    assert sens.safe_layers(p, count=0) == ()
    assert sens.safe_layers(p, count=2) == (1, 4)  # tie at 0.01: the lower index
    assert sens.safe_layers(p, count=4) == (1, 2, 3, 4)
    assert sens.safe_layers(p, quantile=0.5) == prof.choose_layers(p.kl, 0.5)[0] == (1, 3, 4)  # median 0.105
    assert sens.safe_layers(p, quantile=0.7) == (1, 2, 3, 4)  # threshold 0.35
    assert sens.safe_layers(p, quantile=0.0) == (4,)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"max_kl": 0.1, "count": 2}, "exactly one"),
    ({"max_kl": -0.1}, "max_kl"),
    ({"max_kl": float("nan")}, "max_kl"),
    ({"count": 7}, "count"),
    ({"count": 1.5}, "count"),
    ({"quantile": 1.5}, "quantile"),
])
def test_safe_layers_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sens.safe_layers(make_profile([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), **kwargs)


def test_table_and_plot(tiny_profile, tmp_path):
    chosen = sens.safe_layers(tiny_profile, count=2)
    table = sens.format_sensitivity_table(tiny_profile, chosen)
    assert len(table.splitlines()) == 4 + 2
    assert f"2 of 4 layers chosen: {list(chosen)}" in table
    path = sens.plot_sensitivity(make_profile([0.0, 1e-3, 2.0]), tmp_path / "p.png", max_kl=1e-2)
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------- CLI
@pytest.fixture
def fake_load(monkeypatch):
    from tokensparse import models

    def load(name, device=None, **kwargs):
        return models.LoadedModel(model=tiny_llama(4), tokenizer=CharTokenizer(), name=name,
                                  device=torch.device("cpu"))

    monkeypatch.setattr(models, "load", load)


def test_cli_writes_json_plot_and_table(tmp_path, fake_load, capsys, monkeypatch):
    from tokensparse.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["sensitivity", "--model", "some/tiny", "--length", str(LENGTH), "--positions", str(POSITIONS),
               "--config", "window=16, min_tokens=8", "--max-kl", "1e9"])
    assert rc == 0
    out = tmp_path / "runs" / "profile" / "tiny_sensitivity.json"
    p = sens.SensitivityProfile.load(out)
    assert p.token_sparse_config() == CONFIG and p.length == LENGTH and p.positions == POSITIONS
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "layer 3 (4 of 4)" in printed and "KL (nats)" in printed and "4 of 4 layers chosen: [0, 1, 2, 3]" in printed


def test_cli_config_overrides(tmp_path, fake_load, capsys):
    from tokensparse.cli import _config_with_overrides, main

    base = sens.DEFAULT_CONFIG
    assert _config_with_overrides(base, "") == base
    assert _config_with_overrides(base, "budget=coverage,coverage=0.02") == base.replace(
        budget="coverage", keep_ratio=None, coverage=0.02)
    assert _config_with_overrides(base, "keep_ratio=0.5,max_tokens=none").keep_ratio == 0.5
    out = str(tmp_path / "x.json")
    assert main(["sensitivity", "--model", "tiny", "--length", "64", "--config", "bogus=1", "--out", out]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["sensitivity", "--model", "tiny", "--length", "64", "--config", "window", "--out", out]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    # The default min_tokens 256 drops nothing at 64 tokens: an error, not a profile of zeros.
    assert main(["sensitivity", "--model", "tiny", "--length", "64", "--out", out]) == 2
    assert "min_tokens" in capsys.readouterr().err


# ---------------------------------------------------------------- the shipped profile
def test_shipped_sensitivity_profile_for_the_embedded_model():
    path = prof._PROFILE_DIR / "smollm2_sensitivity.json"
    assert path in prof.shipped_profiles()
    p = sens.SensitivityProfile.load(path)
    drift = prof.LayerProfile.load(prof._PROFILE_DIR / "smollm2.json")
    assert p.model.same_architecture(drift.model)
    assert len(p.kl) == 30 and p.length <= p.model.max_position_embeddings
    config = p.token_sparse_config()
    assert p.length > config.window + config.min_tokens  # it did drop tokens
    result = ROOT / "results" / "profile" / "smollm2_sensitivity.json"
    if result.is_file():
        assert sens.SensitivityProfile.load(result) == p
