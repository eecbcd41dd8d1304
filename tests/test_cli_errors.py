"""CLI errors: one line on stderr and exit 2, raised before anything slow loads.

Every test runs ``tokensparse.cli.main`` in-process; none loads a real model: a
tiny random Llama with an 8K context is saved to a temporary folder where a
model is needed, and ``models.load`` is made to fail where nothing may load.
"""

import json
import time

import pytest
import torch

from tiny_models import byte_tokenizer
from tokensparse import models
from tokensparse.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with an 8192-token context and a byte tokenizer, saved as a hub folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama-8k")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the arguments are invalid")

    monkeypatch.setattr(models, "load", refuse)


def one_error_line(capsys) -> str:
    """The error's message: the last line of stderr, the only one of ours, no traceback
    (progress lines such as "loading ..." may come before it)."""
    err = capsys.readouterr().err
    *progress, last = err.strip().splitlines()
    assert "Traceback" not in err and not any(line.startswith("tokensparse") for line in progress), err
    assert last.startswith("tokensparse: error: "), last
    return last.removeprefix("tokensparse: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["eval", "niah"],
        ["eval", "ruler"],
        ["profile"],
        ["bench", "attention", "--lengths", "64"],
        ["bench", "prefill", "--lengths", "64"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_device_cuda_on_a_cpu_torch_is_refused_before_loading(argv, capsys, no_loading):
    assert main([*argv, "--device", "cuda"]) == 2
    assert one_error_line(capsys).startswith("device 'cuda' is not available")


def test_device_that_is_not_a_device(capsys, no_loading):
    assert main(["demo", "--device", "gpu0"]) == 2
    assert one_error_line(capsys) == "device 'gpu0' is not a torch device (e.g. cpu, cuda, cuda:1)"


def test_unknown_model_is_one_line_at_once(capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    # Offline (e.g. HF_HUB_OFFLINE=1) nothing is asked of the network.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    assert main(["eval", "niah", "--model", "nonexistent-model-xyz", "--device", "cpu"]) == 2
    assert time.perf_counter() - start < 10
    message = one_error_line(capsys)
    assert message.startswith("model 'nonexistent-model-xyz' is neither the embedded model ('smollm2') nor a local path")
    assert "offline" in message
    # Online but unreachable: one quick probe instead of transformers' ~25 s of retries.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(name, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(ValueError, match=r"nor a cached hub id, and the hub is not reachable \(\[Errno -2\]"):
        models.load("nonexistent-model-xyz", device="cpu")
    # A path that does not exist is not a valid hub id either.
    with pytest.raises(ValueError, match="neither the embedded model .* nor a local path, and not a valid hub id"):
        models.load("./no/such/model", device="cpu")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match=f"cannot load model '{tmp_path}'"):
        models.load(str(tmp_path), device="cpu")


def test_profile_checks_arguments_before_loading(capsys, no_loading):
    assert main(["profile", "--delta", "1.5"]) == 2
    assert one_error_line(capsys) == "delta must be a number in [0, 1], got 1.5"
    assert main(["profile", "--length", "1"]) == 2
    assert one_error_line(capsys) == "--length must be >= 2, got 1"


def test_eval_refuses_lengths_past_the_context(tiny_model_dir, tmp_path, capsys):
    argv = ["eval", "niah", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert main([*argv, "--lengths", "1024,9000"]) == 2
    assert one_error_line(capsys) == (
        "length 9000 exceeds the model's context of 8192 tokens; pass a YaRN factor (--rope-scaling 1.10 or more) "
        "to stretch it"
    )
    assert not (tmp_path / "niah").exists()  # refused before any sample ran
    expected = "length 9000 exceeds the model's context of 8192 tokens; pass a YaRN factor (--rope-scaling 1.10 or more)"
    assert main(["demo", "--model", str(tiny_model_dir), "--device", "cpu", "--length", "9000"]) == 2
    assert one_error_line(capsys).startswith(expected)  # the demo's check is the same
    # The same check as the demo's; a YaRN factor stretches the context it checks.
    loaded = models.load(str(tiny_model_dir), device="cpu", rope_scaling_factor=2.0)
    assert loaded.max_context == 16384
    models.check_context(loaded, 9000)
    with pytest.raises(ValueError, match="length 20000 exceeds the model's context of 16384 tokens"):
        models.check_context(loaded, 20000)


def test_eval_rerun_with_other_settings_is_refused_then_overwritten(tiny_model_dir, tmp_path, capsys):
    argv = [
        "eval", "niah", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path), "--lengths", "320",
        "--depths", "2", "--max-new-tokens", "2", "--haystack", "filler", "--no-report",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    # the model load and the warm-up are their own stages, before the bar starts
    loading, warming = err.index(f"loading {tiny_model_dir} ..."), err.index("dense: warming up at 320 tokens ...")
    assert loading < warming < err.index("niah dense:")
    assert main([*argv, "--no-progress"]) == 0
    assert "ran 0, skipped 2" in capsys.readouterr().out
    assert main([*argv, "--seed", "7", "--no-progress"]) == 2
    message = one_error_line(capsys)
    assert message.startswith("results folder holds results of other settings: ")
    assert "2 sample(s) whose prompt, answer or generation budget differ" in message
    assert message.endswith("use another --out folder, or --overwrite to discard these methods' results")
    assert main([*argv, "--seed", "7", "--no-progress", "--overwrite"]) == 0
    assert "ran 2, skipped 0" in capsys.readouterr().out
    lines = (tmp_path / "niah" / "dense.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["run_settings"]["dtype"] == "float32" for line in lines)


def test_interrupt_and_verbose(tmp_path, capsys, monkeypatch):
    import tokensparse.eval.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    folder = tmp_path / "niah"
    folder.mkdir()
    (folder / "dense.jsonl").write_text(json.dumps(
        {"eval": "niah", "task": "t", "length": 8, "sample_id": 0, "method": "dense", "score": 1.0}
    ) + "\n")
    monkeypatch.setattr(report, "write_report", interrupted)
    assert main(["report", str(folder)]) == 130
    assert capsys.readouterr().err == "tokensparse: interrupted\n"
    # -v: the traceback, then the same one line
    assert main(["-v", "report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1].startswith("tokensparse: error: no results folder")


def test_bugs_keep_their_traceback(monkeypatch):
    import tokensparse.eval.results as results

    def broken(roots):
        raise RuntimeError("a bug")

    monkeypatch.setattr(results, "load_records", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["report", "anything"])


@pytest.mark.parametrize("value", ["0", "-8"])
@pytest.mark.parametrize("eval_name", ["niah", "ruler"])
def test_eval_chunk_size_must_be_positive_before_loading(eval_name, value, capsys, no_loading):
    assert main(["eval", eval_name, "--device", "cpu", "--chunk-size", value]) == 2
    assert one_error_line(capsys) == f"--chunk-size must be an integer >= 1, got {value}"


@pytest.mark.parametrize("value", ["1.5", "many"])
def test_eval_chunk_size_must_be_an_integer(value, capsys, no_loading):
    with pytest.raises(SystemExit) as exit:
        main(["eval", "niah", "--device", "cpu", "--chunk-size", value])
    assert exit.value.code == 2
    assert f"argument --chunk-size: invalid int value: '{value}'" in capsys.readouterr().err


def test_eval_with_chunk_size_writes_its_own_method(tiny_model_dir, tmp_path, capsys):
    argv = [
        "eval", "niah", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path), "--lengths", "320",
        "--depths", "2", "--max-new-tokens", "2", "--haystack", "filler", "--no-progress",
    ]
    assert main(argv) == 0 and main([*argv, "--chunk-size", "100"]) == 0
    out = capsys.readouterr().out
    assert f"dense @ chunk 100: ran 2, skipped 0 finished -> {tmp_path}/niah/dense__chunk-100.jsonl" in out
    records = [json.loads(line) for line in (tmp_path / "niah" / "dense__chunk-100.jsonl").read_text().splitlines()]
    assert all(r["method"] == "dense @ chunk 100" and r["run_settings"]["chunk_size"] == 100 for r in records)
    report = (tmp_path / "niah" / "report.md").read_text()
    assert "dense @ chunk 100" in report and "Warning" not in report
