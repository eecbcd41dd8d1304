"""The report from synthetic result files: table values, checks, plots, CLI."""

import json

import pytest

from tokensparse.cli import main
from tokensparse.eval.report import markdown, summarize, write_report
from tokensparse.eval.results import load_records

SPARSE = "token_sparse:coverage=0.02"


def _rec(eval_name, task, length, sample_id, method, score, *, prefill=0.1, kept=None, **extra):
    r = {
        "eval": eval_name, "task": task, "length": length, "sample_id": sample_id, "method": method,
        "method_name": method.split(":")[0], "score": score, "prefill_s": prefill, "answer": "", "references": [],
    }
    if kept is not None:
        r.update(mean_kept_share=kept + 0.02, mean_prefix_kept_share=kept, kept_share={"3": kept})
    r.update(extra)
    return r


def _write_results(root):
    ruler, niah = root / "ruler", root / "niah"
    ruler.mkdir(parents=True)
    niah.mkdir(parents=True)
    dense, sparse = [], []
    for length in (4096, 8192):
        for task, dense_scores, sparse_scores in (
            ("niah_single_1", [1, 1, 1, 1], [1, 1, 1, 0]),   # 100 vs 75
            ("vt", [0.8, 0.6, 1.0, 0.6], [0.8, 0.6, 1.0, 0.6]),  # 75 vs 75
        ):
            for i, (d, s) in enumerate(zip(dense_scores, sparse_scores)):
                dense.append(_rec("ruler", task, length, i, "dense", d, prefill=0.2))
                sparse.append(_rec("ruler", task, length, i, SPARSE, s, prefill=0.1, kept=0.6))
    (ruler / "dense.jsonl").write_text("\n".join(json.dumps(r) for r in dense) + "\n")
    (ruler / "sparse.jsonl").write_text("\n".join(json.dumps(r) for r in sparse) + "\n")
    grid = []
    for length in (1024, 2048):
        for i, depth in enumerate((0.0, 0.5, 1.0)):
            grid.append(_rec("niah", "niah_essay", length, i, "dense", 1.0, depth=depth))
            wrong = length == 2048 and depth == 0.5
            grid.append(_rec("niah", "niah_essay", length, i, SPARSE, 0.0 if wrong else 1.0, kept=0.7, depth=depth))
    (niah / "all.jsonl").write_text("\n".join(json.dumps(r) for r in grid) + "\n")


def test_summary_numbers(tmp_path):
    _write_results(tmp_path)
    summary = summarize(load_records([tmp_path]))
    ruler = summary["ruler"]
    assert ruler["cells"]["niah_single_1"][4096]["dense"] == {"score": 100.0, "n": 4}
    assert ruler["cells"]["niah_single_1"][4096][SPARSE]["score"] == 75.0
    assert ruler["cells"]["vt"][8192][SPARSE]["score"] == pytest.approx(75.0)
    stats = ruler["methods"][4096]
    assert stats["dense"]["score"] == pytest.approx(87.5) and stats[SPARSE]["score"] == pytest.approx(75.0)
    assert stats[SPARSE]["prefix_kept_share"] == pytest.approx(0.6) and stats["dense"]["prefix_kept_share"] == 1.0
    assert stats[SPARSE]["prefill_s"] == pytest.approx(0.1)
    assert summary["niah"]["niah"]["niah_essay"][SPARSE][2048][0.5] == 0.0
    lo, hi = stats[SPARSE]["vs_dense_interval"]
    assert lo < -12.5 < hi == 0.0 and stats["dense"]["vs_dense_interval"] is None
    assert ruler["methods"][8192][SPARSE]["vs_dense_interval"] == [lo, hi]  # the same differences, the same draws
    niah = summary["niah"]["methods"]
    assert niah[1024][SPARSE]["vs_dense_interval"] == [0.0, 0.0]  # identical answers: no spread


def test_markdown_table_and_checks(tmp_path):
    _write_results(tmp_path)
    text = markdown(summarize(load_records([tmp_path])))
    assert f"| task | length | dense | {SPARSE} |" in text
    assert "| niah_single_1 | 4096 | 100.0 | 75.0 |" in text
    assert "| **average** | 8192 | **87.5** | **75.0** |" in text
    # niah_single_1 differs on 1 of 4 samples (-25 points), vt on none: -12.5, a bootstrap interval
    # from 3 of 4 resampled misses (-37.5) to none (0)
    assert f"| {SPARSE} | 4096 | 75.0 | -12.5 [-37.5, +0.0] | 0.1000 | 60.0% | 40.0% | 8 |" in text
    assert "- 4096: none" in text  # 12.5 points below dense: not within 1 point
    assert f"- {SPARSE}: 2048@0.50" in text  # the one NIAH cell dense gets and sparse misses


def test_write_report_and_cli(tmp_path, capsys):
    _write_results(tmp_path)
    written = write_report(load_records([tmp_path]), tmp_path / "out")
    for key in ("report", "summary", "niah_niah_essay", "accuracy_ruler", "tradeoff_ruler", "tradeoff_niah"):
        assert written[key].is_file() and written[key].stat().st_size > 0
    assert "![niah_niah_essay.png](niah_niah_essay.png)" in written["report"].read_text()
    assert main(["report", str(tmp_path / "ruler"), str(tmp_path / "niah"), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    assert (tmp_path / "cli" / "report.md").is_file() and not (tmp_path / "cli" / "accuracy_ruler.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no results folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2


def test_cli_rejects_unknown_method_before_loading(capsys):
    assert main(["eval", "ruler", "--methods", "dense,flashy", "--model", "/nonexistent.gguf"]) == 2
    assert "unknown method 'flashy'; known methods: dense, flexprefill, token_sparse, token_sparse+flexprefill" in capsys.readouterr().err
    assert main(["eval", "ruler", "--tasks", "niah_single_9", "--model", "/nonexistent.gguf"]) == 2
    assert "unknown RULER task" in capsys.readouterr().err


def test_cli_names_missing_data_before_loading(tmp_path, capsys):
    assert main(["eval", "longbench", "--data-dir", str(tmp_path), "--tasks", "qasper", "--model", "/nonexistent.gguf"]) == 2
    assert f"expected the data file {tmp_path}/qasper.jsonl" in capsys.readouterr().err
    assert main(["eval", "infinitebench", "--data-dir", str(tmp_path), "--tasks", "passkey", "--model", "/x.gguf"]) == 2
    assert "passkey.jsonl" in capsys.readouterr().err
    assert main(["eval", "ruler", "--tasks", "qa_2", "--qa-dir", str(tmp_path), "--model", "/x.gguf"]) == 2
    assert "hotpotqa.json" in capsys.readouterr().err


def _bench(length=131072):
    entry = lambda spec, ms, kind="realistic": {"spec": spec, "inputs": kind, "total_ms": ms}  # noqa: E731
    return {"results": [{
        "batch": 1, "seq_len": length,
        "dense": {"cudnn": {"available": True, "ms": 240.0}, "flash": {"available": True, "ms": 400.0}},
        "sparse": [entry(SPARSE, 60.0), entry(SPARSE, 999.0, "random"), entry("flexprefill", 120.0),
                   entry("token_sparse+flexprefill:coverage=0.02", 30.0)],
    }]}


def test_attention_times_and_model_weighting(tmp_path):
    from tokensparse.eval.report import attention_markdown, attention_times, model_attention_ms

    times = attention_times(_bench())
    assert times["dense_kernel"] == "cudnn" and times["length"] == 131072
    assert times["ms"] == {"dense": 240.0, SPARSE: 60.0, "flexprefill": 120.0, "token_sparse+flexprefill:coverage=0.02": 30.0}
    with pytest.raises(ValueError, match="length 8192 is not in the benchmark"):
        attention_times(_bench(), length=8192)
    with pytest.raises(ValueError, match="no benchmark entries on inputs 'structured'"):
        attention_times(_bench(), inputs="structured")
    # 1 sparse layer of 4: 1/4 * 60 + 3/4 * 240 = 195; composition: 1/4 * 30 + 3/4 * 120 = 97.5.
    ts = {"method_name": "token_sparse", "sparse_layer_share": 0.25}
    assert model_attention_ms(SPARSE, ts, times) == pytest.approx(195.0)
    comp = {"method_name": "token_sparse+flexprefill", "sparse_layer_share": 0.25}
    assert model_attention_ms("token_sparse+flexprefill:coverage=0.02", comp, times) == pytest.approx(97.5)
    assert model_attention_ms("flexprefill", {"method_name": "flexprefill"}, times) == 120.0
    assert model_attention_ms("token_sparse:keep_ratio=0.5", ts, times) is None  # not benchmarked

    _write_results(tmp_path)
    records = load_records([tmp_path / "ruler"])
    for r in records:
        r["num_layers"] = 4  # one sparse layer ("3") of four
    data = summarize(records)["ruler"]
    lines = attention_markdown("ruler", data, times)
    row = next(x for x in lines if x.startswith(f"| {SPARSE} |"))
    assert row == f"| {SPARSE} | 60.00 | 195.00 | 1.23 | 75.0 | 75.0 |"
    written = write_report(records, tmp_path / "out", attention=times)
    assert written["tradeoff_attention_ruler"].stat().st_size > 0
    assert "## Accuracy vs attention time" in written["report"].read_text()


def _keyed(method, length, sample_id, depth, score=1.0, *, run_key="r1", dtype="bfloat16"):
    return _rec(
        "niah", "niah_essay", length, sample_id, method, score, depth=depth,
        sample_hash=f"h{length}-{depth}", run_key=run_key, run_settings={"model": "m", "dtype": dtype},
    )


def test_report_on_mismatched_grids_uses_common_samples_and_says_so(tmp_path, capsys):
    folder = tmp_path / "niah"
    folder.mkdir()
    # dense at depths 0, 1/3, 2/3, 1; the sparse method at 0, 0.5, 1 (sample ids reused, prompts differ)
    dense = [_keyed("dense", 1024, i, d) for i, d in enumerate((0.0, 1 / 3, 2 / 3, 1.0))]
    sparse = [_keyed(SPARSE, 1024, i, d, 0.0 if d == 1.0 else 1.0) for i, d in enumerate((0.0, 0.5, 1.0))]
    (folder / "dense.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dense))
    (folder / "sparse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sparse))
    summary = summarize(load_records([folder]))["niah"]
    # only depth 0 (sample 0, same prompt) is common; depth 1 is sample 3 of dense but sample 2 of the other
    assert summary["methods"][1024]["dense"]["n"] == 1 and summary["methods"][1024][SPARSE]["n"] == 1
    (warning,) = summary["warnings"]
    assert "only the 1 sample(s) all 2 methods ran" in warning
    assert "dense: 3 of 4 left out (niah_essay@1024 x3 at depths 0.33, 0.67, 1.00)" in warning
    assert f"{SPARSE}: 2 of 3 left out (niah_essay@1024 x2 at depths 0.50, 1.00)" in warning
    assert main(["report", str(folder), "--out", str(folder), "--no-plots"]) == 0
    text = (folder / "report.md").read_text()
    assert "> **Warning:** the methods ran on different samples" in text
    assert "different samples" in capsys.readouterr().err
    # no common sample at all: an error, not an empty table
    (folder / "sparse.jsonl").write_text(json.dumps(_keyed(SPARSE, 2048, 0, 0.0)) + "\n")
    assert main(["report", str(folder), "--out", str(folder), "--no-plots"]) == 2
    assert "share no sample" in capsys.readouterr().err


def test_report_flags_other_run_settings_and_unknown_keys(tmp_path):
    folder = tmp_path / "niah"
    folder.mkdir()
    dense = [_keyed("dense", 1024, 0, 0.0, run_key="r1", dtype="bfloat16")]
    sparse = [_keyed(SPARSE, 1024, 0, 0.0, run_key="r2", dtype="float32")]
    (folder / "a.jsonl").write_text(json.dumps(dense[0]) + "\n" + json.dumps(sparse[0]) + "\n")
    (warning,) = summarize(load_records([folder]))["niah"]["warnings"]
    assert warning == f"run settings differ: {SPARSE} vs dense: dtype 'float32' vs 'bfloat16'"
    # Records without keys (older files) still report; they are matched by sample id and flagged.
    _write_results(tmp_path / "old")
    summary = summarize(load_records([tmp_path / "old"]))
    assert summary["ruler"]["methods"][4096]["dense"]["n"] == 8
    assert "no sample or settings key" in summary["ruler"]["warnings"][0]
    assert len(summary["ruler"]["warnings"]) == 1
