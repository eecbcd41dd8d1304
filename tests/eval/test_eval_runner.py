"""The runner: one smoke run of a tiny random Llama (records, kept shares), then
resuming, progress and errors with generation stubbed out."""

import json

import pytest

from tokensparse.eval import niah, ruler, runner
from tokensparse.methods import parse_methods
from tokensparse.eval.results import load_records, read_results, result_path
from tokensparse.eval.runner import run_eval


@pytest.fixture
def fake_generate(monkeypatch):
    """Replace generation: each sample answers its first reference (or 'x'), 10 ms prefill."""
    calls = []

    def generate(model, tokenizer, batch, *, max_new_tokens, chunk_size=None):
        calls.append((len(batch), max_new_tokens))
        return [str(s.references[0]) if s.sample_id % 2 == 0 else "x" for s in batch], 0.01

    monkeypatch.setattr(runner, "_generate", generate)
    return calls


@pytest.fixture(scope="module")
def samples(byte_tokenizer):
    grid = niah.grid_samples(byte_tokenizer, [320, 400], [0.0, 1.0], haystack="filler", max_new_tokens=4)
    return grid


METHODS = "dense,token_sparse:keep_ratio=0.5,window=16,min_tokens=16"


def test_records_and_kept_share(tiny_loaded, samples, tmp_path):
    specs = parse_methods(METHODS)
    runs = run_eval(tiny_loaded, "niah", samples, specs, tmp_path, batch_size=2)
    assert [(r.ran, r.skipped) for r in runs] == [(4, 0), (4, 0)]
    dense = read_results(result_path(tmp_path, "niah", specs[0]))
    sparse = read_results(result_path(tmp_path, "niah", specs[1]))
    assert len(dense) == len(sparse) == 4
    for record in dense + sparse:
        assert {"task", "length", "sample_id", "method", "answer", "references", "score", "prefill_s", "depth"} <= set(record)
        assert record["score"] in (0.0, 1.0) and record["prefill_s"] > 0 and record["batch_size"] == 2
        assert record["model"] == "tiny-llama"
    assert "kept_share" not in dense[0]
    for record in sparse:
        # one sparse layer (the second half of 2); keep_ratio 0.5 keeps half the prefix
        assert list(record["kept_share"]) == ["1"]
        assert record["mean_prefix_kept_share"] == pytest.approx(0.5, abs=0.02)
        assert 0.5 < record["mean_kept_share"] < 0.6
        assert record["settings"]["keep_ratio"] == 0.5
    meta = json.loads((tmp_path / "niah" / "meta.json").read_text())
    assert meta["runs"][0]["model"] == "tiny-llama"
    # the model is back to its own attention afterwards
    assert tiny_loaded.model.config._attn_implementation == "sdpa"


def test_rerun_skips_finished_samples(tiny_loaded, samples, tmp_path, fake_generate):
    specs = parse_methods("dense")
    run_eval(tiny_loaded, "niah", samples, specs, tmp_path)
    path = result_path(tmp_path, "niah", specs[0])
    first = read_results(path)
    (again,) = run_eval(tiny_loaded, "niah", samples, specs, tmp_path)
    assert (again.ran, again.skipped) == (0, 4)
    # drop one record and tear the last line as an interrupted write would
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[3][: len(lines[3]) // 2])
    (resumed,) = run_eval(tiny_loaded, "niah", samples, specs, tmp_path)
    assert (resumed.ran, resumed.skipped) == (2, 2)
    final = {(r["task"], r["length"], r["sample_id"]): r["answer"] for r in read_results(path)}
    assert final == {(r["task"], r["length"], r["sample_id"]): r["answer"] for r in first}
    assert [r["score"] for r in sorted(read_results(path), key=lambda r: (r["length"], r["sample_id"]))] == [1, 0, 1, 0]
    assert len(load_records([tmp_path])) == 4
    # the torn line is gone from the file
    assert len(path.read_text().splitlines()) == 4
    # one warm-up per length: two in the first run, one for the 400-token samples resumed
    assert fake_generate.count((1, 1)) == 3


def test_progress_and_errors(tiny_loaded, samples, tmp_path, fake_generate):
    seen = []
    run_eval(tiny_loaded, "niah", samples[:2], parse_methods("dense"), tmp_path, progress=lambda *a: seen.append(a))
    assert seen[0] == ("dense", 0, 2) and seen[-1] == ("dense", 2, 2)
    with pytest.raises(ValueError, match="duplicate"):
        run_eval(tiny_loaded, "niah", samples[:1] * 2, parse_methods("dense"), tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(tiny_loaded, "niah", samples, parse_methods("dense"), tmp_path, batch_size=0)


def test_ruler_sample_through_the_runner(tiny_loaded, byte_tokenizer, tmp_path, fake_generate):
    (sample,) = ruler.build_samples(byte_tokenizer, ["niah_single_1"], [1024], 1)
    (run,) = run_eval(tiny_loaded, "ruler", [sample], parse_methods("dense"), tmp_path)
    (record,) = read_results(run.path)
    assert record["task"] == "niah_single_1" and record["metric"] == "string_match_all"
    assert record["references"] == list(sample.references) and record["score"] == 1.0


def _grid(tokenizer, depths=(0.0, 1.0), **kwargs):
    options = {"haystack": "filler", "max_new_tokens": 4, **kwargs}
    return niah.grid_samples(tokenizer, [320], list(depths), **options)


@pytest.mark.parametrize(
    "changed",
    [
        {"depths": (0.0, 0.5, 1.0)},  # sample 1 moves from depth 1 to 0.5
        {"seed": 7},  # other random answers in the same cells
        {"max_new_tokens": 8},  # other generation budget (and shorter prompts)
        {"chat": False},  # other prompt template
    ],
    ids=lambda c: next(iter(c)),
)
def test_rerun_with_other_samples_refuses_then_overwrites(tiny_loaded, byte_tokenizer, tmp_path, fake_generate, changed):
    specs = parse_methods("dense")
    path = result_path(tmp_path, "niah", specs[0])
    (first,) = run_eval(tiny_loaded, "niah", _grid(byte_tokenizer), specs, tmp_path)
    assert (first.ran, first.skipped) == (2, 0)
    old = read_results(path)
    assert all(len(r["sample_hash"]) == 16 and r["run_key"] and r["run_settings"]["dtype"] == "float32" for r in old)
    other = _grid(byte_tokenizer, **changed)
    with pytest.raises(runner.StaleResultsError, match="whose prompt, answer or generation budget differ.*--overwrite"):
        run_eval(tiny_loaded, "niah", other, specs, tmp_path)
    assert read_results(path) == old  # nothing ran, nothing was written
    (rerun,) = run_eval(tiny_loaded, "niah", other, specs, tmp_path, overwrite=True)
    assert (rerun.ran, rerun.skipped) == (len(other), 0)
    new = read_results(path)
    assert sorted(r["sample_hash"] for r in new) == sorted(s.fingerprint for s in other)
    (again,) = run_eval(tiny_loaded, "niah", other, specs, tmp_path)  # the identical rerun skips everything
    assert (again.ran, again.skipped) == (0, len(other))


def test_rerun_extends_a_grid_of_the_same_settings(tiny_loaded, byte_tokenizer, tmp_path, fake_generate):
    specs = parse_methods("dense")
    run_eval(tiny_loaded, "niah", _grid(byte_tokenizer), specs, tmp_path)
    wider = _grid(byte_tokenizer) + niah.grid_samples(byte_tokenizer, [400], [0.0, 1.0], haystack="filler", max_new_tokens=4)
    (run,) = run_eval(tiny_loaded, "niah", wider, specs, tmp_path)
    assert (run.ran, run.skipped) == (2, 2)


def test_rerun_with_other_run_settings_or_old_records_refuses(tiny_loaded, byte_tokenizer, tmp_path, fake_generate):
    import dataclasses

    specs = parse_methods("dense")
    samples = _grid(byte_tokenizer)
    run_eval(tiny_loaded, "niah", samples, specs, tmp_path)
    path = result_path(tmp_path, "niah", specs[0])
    other_model = dataclasses.replace(tiny_loaded, name="another-model")
    with pytest.raises(runner.StaleResultsError, match="2 record\\(s\\) of other run settings \\(model 'another-model' vs 'tiny-llama'\\)"):
        run_eval(other_model, "niah", samples, specs, tmp_path)
    # Records of an older tokensparse have no keys: refused too, never reused.
    legacy = [{k: v for k, v in r.items() if k not in ("sample_hash", "run_key", "run_settings")} for r in read_results(path)]
    path.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    with pytest.raises(runner.StaleResultsError, match="2 record\\(s\\) without a sample or settings key"):
        run_eval(tiny_loaded, "niah", samples, specs, tmp_path)
    # run settings: dtype is part of them, batch size and device are not
    settings = runner.run_settings(tiny_loaded)
    assert settings["dtype"] == "float32" and settings["model"] == "tiny-llama"
    assert settings["max_position_embeddings"] == 4096 and "batch" not in json.dumps(settings)


def test_stages_come_before_the_progress_bar(tiny_loaded, samples, tmp_path, fake_generate):
    events = []
    run_eval(
        tiny_loaded, "niah", samples, parse_methods("dense"), tmp_path, batch_size=2,
        progress=lambda *a: events.append(("progress", *a)), stage=lambda msg: events.append(("stage", msg)),
    )
    assert events[0] == ("stage", "dense: warming up at 320 tokens ...")
    assert events[1] == ("progress", "dense", 0, 4)
    assert ("stage", "dense: warming up at 400 tokens ...") in events
    assert events[-1] == ("progress", "dense", 4, 4)


def test_profile_reaches_the_methods_that_read_it(tiny_loaded, byte_tokenizer, tmp_path):
    """A layer profile goes to the methods whose layers come from one and into their run
    settings only: dense keeps its key, another profile for the same method is refused."""
    from tokensparse.profile import ModelIdentity
    from tokensparse.sensitivity import SensitivityProfile

    def profile(kl):
        return SensitivityProfile(
            model=ModelIdentity.from_model(tiny_loaded.model), length=512, positions=8, config={}, kl=kl,
            top1=(1.0, 1.0), calibration="test", calibration_sha256="0", version="0", device="cpu", dtype="float32",
        ).save(tmp_path / f"profile_{kl[0]}.json")

    safe_first, safe_second = profile((1e-4, 0.5)), profile((0.5, 1e-4))
    tiers = "token_sparse:keep_ratio=0.25,window=16,min_tokens=16 | token_sparse:keep_ratio=0.75,window=16,min_tokens=16"
    specs = parse_methods(f"dense,{tiers}")
    samples = _grid(byte_tokenizer)
    run_eval(tiny_loaded, "niah", samples, specs, tmp_path / "out", profile=safe_first)
    dense, tiered = (read_results(result_path(tmp_path / "out", "niah", s)) for s in specs)
    assert "profile" not in dense[0]["run_settings"]
    assert tiered[0]["run_settings"]["profile"] == str(safe_first.resolve())
    kept = tiered[0]["prefix_kept_share"]
    assert kept["0"] == pytest.approx(0.25, abs=0.02) and kept["1"] == pytest.approx(0.75, abs=0.02)
    # dense reruns under any profile; the tiered plan under another one is refused
    (again,) = run_eval(tiny_loaded, "niah", samples, specs[:1], tmp_path / "out", profile=safe_second)
    assert again.skipped == len(samples)
    with pytest.raises(runner.StaleResultsError, match="other run settings"):
        run_eval(tiny_loaded, "niah", samples, specs[1:], tmp_path / "out", profile=safe_second)
    from tokensparse.eval.report import summarize

    summary = summarize(load_records([tmp_path / "out" / "niah"]))
    assert not any("run settings differ" in w for w in summary["niah"].get("warnings", []))
