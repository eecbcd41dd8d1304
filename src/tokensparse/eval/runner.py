"""Running samples through a model with each method, resumably.

Results are JSON lines, one file per (eval, method): ``OUT/<eval>/<method slug>.jsonl``,
one record per sample, appended as batches finish. A rerun reads the file and
skips every sample already there, so an interrupted run continues where it
stopped. A record is reused only when it answers the same sample (task, length,
sample_id and ``sample_hash``: prompt tokens, references, generation budget,
scoring) under the same run settings (``run_key``: model, dtype, context, RoPE;
:func:`run_settings`). Batch size and device are not part of the key.

A file that holds records of other settings (another seed, depth grid, needle,
chat template, ``max_new_tokens``, dtype, model or RoPE scaling, or records from
before the keys existed) is never mixed with new ones: :func:`run_eval` refuses
to start (:class:`StaleResultsError`, before running anything) unless
``overwrite=True``, which deletes the result files of the methods it runs.
Records of the same settings for samples not in this run (a grid extended, or
run in parts) are kept.

Generation is greedy (``do_sample=False``) up to each sample's budget, stopping
at the tokenizer's end-of-sequence token. Samples of one length are batched
(left padding) when ``batch_size > 1``.

Prefill time: each ``generate`` call is timed from its start to the first call
of its logits processors, which transformers makes right after the prefill
forward pass (CUDA synchronised on GPU). This is the time to the first token's
logits: the prefill forward plus generate's small set-up, without any decode
step. With batching, ``batch_prefill_s`` is the batch's time and ``prefill_s``
its share per sample. Before a method's first batch of each length, an untimed
warm-up call on that batch (one new token) compiles and autotunes kernels for
the shape.

Chunked prefill (``chunk_size``): the prompt is prefilled with
:func:`tokensparse.prefill` in chunks of ``chunk_size`` tokens over a KV cache
(the mask and positions of the left-padded batch), the first token is the
greedy choice from its last logits, and ``generate`` continues from the cache.
With ``chunk_size`` at or above the prompt length this gives ``generate``'s own
tokens. ``prefill_s`` is then the whole chunked prefill and the first token's
choice. The records' method is ``"<label> @ chunk N"`` in a file of its own
(:func:`tokensparse.eval.results.method_label`, ``result_path``), and
``chunk_size`` is one of the run settings. Generation config options that
change the logits (repetition penalty and the like) are not applied to the
first token of a chunked run.

Kept share: for methods that record their selection (token_sparse), each sparse
layer's share of the prompt's tokens kept per head, averaged over heads
(``kept_share``); ``prefix_kept_share`` is the same over the prefix only (the
tokens before the observation window, the ones that can be dropped). A sparse
layer that ran dense (prompt too short) counts as 1.0. For a chunked prefill it
is the last chunk's selection (over every key of the prompt).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import metrics
from ..integrations.hf import cache_kwarg
from ..integrations.transformers import disable, enable, plan_of, prefill, selection_report, sparse_layers_of
from ..methods import MethodSpec
from ..methods.registry import LAYERS_SPARSE
from ..plan import SHIPPED_SENSITIVITY, profile_for
from .prompts import Sample
from .results import check_chunk_size, method_label, read_results, record_key, result_path, settings_key, stale_reason

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
Stage = Callable[[str], None]


class StaleResultsError(ValueError):
    """A results file holds records of other settings than the run would write."""


@dataclass(frozen=True)
class EvalRun:
    """What :func:`run_eval` did for one method."""

    method: str
    path: Path
    skipped: int
    ran: int


def run_eval(
    loaded: Any,
    eval_name: str,
    samples: list[Sample],
    methods: list[MethodSpec],
    out_dir: str | Path,
    *,
    batch_size: int = 1,
    meta: dict[str, Any] | None = None,
    progress: Progress | None = None,
    stage: Stage | None = None,
    overwrite: bool = False,
    chunk_size: int | None = None,
    profile: "str | os.PathLike | None" = None,
) -> list[EvalRun]:
    """Answer and score ``samples`` with each method; append records to the result files.

    Args:
        loaded: a :class:`tokensparse.models.LoadedModel`.
        eval_name: ``niah``, ``ruler``, ``longbench`` or ``infinitebench`` (the subfolder).
        samples: the prompts; keys (task, length, sample_id) must be unique.
        methods: parsed method specs, run one after the other.
        out_dir: results folder.
        batch_size: samples per generate call (same length only).
        meta: extra settings written to ``<eval>/meta.json``.
        progress: called as ``progress(method_label, done, total)``: first after the
            method's first warm-up, then after each batch.
        stage: called with a one-line message before each untimed warm-up.
        overwrite: delete the result files of ``methods`` first instead of resuming them.
        chunk_size: prefill the prompts ``chunk_size`` tokens per forward pass
            (:func:`tokensparse.prefill`); None: the whole prompt in one pass.
            Chunked runs are methods of their own (``"<label> @ chunk N"``).
        profile: the layer profile (a JSON path, or ``"sensitivity"`` for the
            shipped one) of the methods whose layers come from a profile
            (:func:`tokensparse.plan.reads_profile`); recorded in their run settings.

    Returns:
        One :class:`EvalRun` per method.

    Raises:
        StaleResultsError: (without ``overwrite``) a method's file holds records of
            other settings; nothing has run.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_chunk_size(chunk_size)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError("samples have duplicate (task, length, sample_id) keys")
    settings = run_settings(loaded, chunk_size, profile)
    # The profile decides the plan of the methods that read it only; the others keep the plain key.
    method_settings = [run_settings(loaded, chunk_size, profile_for(spec, profile)) for spec in methods]
    stamps = [{"run_key": settings_key(s), "run_settings": s} for s in method_settings]
    labels = [method_label(spec, chunk_size) for spec in methods]
    paths = [result_path(out_dir, eval_name, spec, chunk_size) for spec in methods]
    if overwrite:
        for path in paths:
            path.unlink(missing_ok=True)
    done_by_method = _resumable(labels, paths, {s.key: s.fingerprint for s in samples}, stamps)
    folder = Path(out_dir) / eval_name
    folder.mkdir(parents=True, exist_ok=True)
    _write_meta(folder / "meta.json", loaded, eval_name,
                {"run_settings": settings, "run_key": settings_key(settings), **(meta or {})})
    runs = []
    for spec, label, path, done, stamp in zip(methods, labels, paths, done_by_method, stamps):
        todo = [s for s in samples if s.key not in done]
        if todo:
            logger.info("%s: %d samples to run, %d already in %s", label, len(todo), len(done), path)
            _run_method(loaded, eval_name, spec, todo, path, batch_size, progress, stage, stamp, chunk_size,
                        profile_for(spec, profile))
        elif progress:
            progress(label, 0, 0)
        runs.append(EvalRun(label, path, skipped=len(samples) - len(todo), ran=len(todo)))
    return runs


def run_settings(loaded: Any, chunk_size: int | None = None, profile: "str | os.PathLike | None" = None) -> dict[str, Any]:
    """The settings besides the prompt that decide a model's answers (``run_settings``
    in every record; their hash is ``run_key``): the model (a local path made
    absolute, and its shape), the weight dtype, the context and RoPE parameters
    (``--rope-scaling`` changes both), for a chunked prefill ``chunk_size``, and
    the layer ``profile`` the plans read (each absent when not given, so older
    keys stay as they were)."""
    model = loaded.model
    config = model.config.get_text_config()
    name = str(loaded.name)
    if Path(name).exists():
        name = str(Path(name).resolve())
    shape = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    settings = {
        "model": name,
        "model_shape": [getattr(config, field, None) for field in shape],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)) if rope else None,
    }
    if chunk_size is not None:
        settings["chunk_size"] = chunk_size
    if profile is not None:
        settings["profile"] = profile if profile == SHIPPED_SENSITIVITY else str(Path(profile).resolve())
    return settings


def _resumable(
    labels: list[str],
    paths: list[Path],
    expected: dict[tuple[str, int, int], str],
    stamps: list[dict[str, Any]],
) -> list[set[tuple[str, int, int]]]:
    """The finished sample keys of each method; StaleResultsError if any file holds
    records of other settings than its stamp's (checked for every method before any runs)."""
    done, stale = [], []
    for label, path, stamp in zip(labels, paths, stamps):
        records = [r for r in read_results(path) if r.get("method") == label]
        reason = stale_reason(records, expected, stamp["run_key"], stamp["run_settings"])
        if reason:
            stale.append(f"{path} holds {reason}")
        done.append({record_key(r) for r in records})
    if stale:
        more = f" (and {len(stale) - 1} more file(s))" if len(stale) > 1 else ""
        raise StaleResultsError(
            f"results folder holds results of other settings: {stale[0]}{more}; "
            "use another --out folder, or --overwrite to discard these methods' results"
        )
    return done


def _batches(samples: list[Sample], batch_size: int) -> Iterable[list[Sample]]:
    by_length: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_length[sample.length].append(sample)
    for length in sorted(by_length):
        group = sorted(by_length[length], key=lambda s: (s.task, s.num_tokens, s.sample_id))
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _run_method(
    loaded: Any,
    eval_name: str,
    spec: MethodSpec,
    samples: list[Sample],
    path: Path,
    batch_size: int,
    progress: Progress | None,
    stage: Stage | None,
    stamp: dict[str, Any],
    chunk_size: int | None = None,
    profile: "str | os.PathLike | None" = None,
) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    label = method_label(spec, chunk_size)
    num_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    # Dense is the model as loaded; every other method is switched on through the one integration.
    switched = spec.method.prefill is not None
    selects = spec.method.layers == LAYERS_SPARSE
    if switched:
        enable(model, spec, record=selects, profile=profile)
    try:
        # Each sparse layer's observation window (tiers may differ), for the prefix kept share.
        windows = {layer: _window(plan_of(model).layers[layer].spec.config) for layer in sparse_layers_of(model)} \
            if selects else {}
        settings = _settings(spec.config)
        batches = list(_batches(samples, batch_size))
        warm: set[int] = set()
        done = 0
        _repair(path)
        with path.open("a", encoding="utf-8") as out:
            for batch in batches:
                if batch[0].length not in warm:
                    if stage:
                        stage(f"{label}: warming up at {batch[0].length} tokens ...")
                    # Untimed warm-up at this shape: kernel compilation and autotuning.
                    _generate(model, tokenizer, batch, max_new_tokens=1, chunk_size=chunk_size)
                    if selects:
                        selection_report(model, clear=True)
                    warm.add(batch[0].length)
                    if progress and done == 0:
                        progress(label, 0, len(samples))
                budget = max(s.max_new_tokens for s in batch)
                texts, prefill_s = _generate(model, tokenizer, batch, max_new_tokens=budget, chunk_size=chunk_size)
                prefills = selection_report(model, clear=True) if selects else []
                # Whole prompt: the one prefill; chunked: the last chunk's (over every key).
                records = (prefills[-1] if chunk_size else prefills[0]) if prefills else {}
                for b, (sample, answer) in enumerate(zip(batch, texts)):
                    row = _record(sample, answer, eval_name, spec, label, settings, prefill_s, len(batch))
                    if chunk_size:
                        row["chunk_size"] = chunk_size
                    if selects:
                        row.update(_kept(records, windows, b))
                    row["model"] = loaded.name
                    row["num_layers"] = num_layers
                    row.update(sample_hash=sample.fingerprint, **stamp)
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                done += len(batch)
                if progress:
                    progress(label, done, len(samples))
    finally:
        if switched:
            disable(model)


def _settings(config: Any) -> Any:
    """The method's settings as JSON-able values (nested for compositions and tiers), None without settings."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, (list, tuple)):
        return [_settings(item) for item in config]
    if dataclasses.is_dataclass(config):
        return {f.name: _settings(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return config if isinstance(config, (str, int, float, bool)) else {"label": str(config)}


def _window(config: Any) -> int | None:
    """The observation window of a token-sparse layer's config (plain or composed)."""
    return getattr(getattr(config, "token_sparse", config), "window", None)


def _repair(path: Path) -> None:
    """Drop lines that are not JSON (a write cut short by an interruption) before appending."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    good = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line)
    if len(good) != len(lines) or (lines and not path.read_bytes().endswith(b"\n")):
        logger.warning("%s: dropping %d torn line(s) before resuming", path, len(lines) - len(good))
        path.write_text("".join(line + "\n" for line in good), encoding="utf-8")


def _record(
    sample: Sample,
    answer: str,
    eval_name: str,
    spec: MethodSpec,
    label: str,
    settings: dict[str, Any] | None,
    batch_prefill_s: float,
    batch_size: int,
) -> dict[str, Any]:
    value = metrics.score(
        sample.metric, answer, list(sample.references), postprocess=sample.postprocess, **sample.metric_options
    )
    return {
        "eval": eval_name,
        "task": sample.task,
        "length": sample.length,
        "sample_id": sample.sample_id,
        "method": label,
        "method_name": spec.name,
        "settings": settings,
        **sample.info,
        "prompt_tokens": sample.num_tokens,
        "answer": answer,
        "references": list(sample.references),
        "metric": sample.metric,
        "score": value,
        "prefill_s": batch_prefill_s / batch_size,
        "batch_prefill_s": batch_prefill_s,
        "batch_size": batch_size,
    }


def _kept(records: dict[int, Any], windows: dict[int, int | None], b: int) -> dict[str, Any]:
    """Sequence ``b``'s kept share, prefix kept share and dropped mass per sparse layer (``windows``:
    layer -> its observation window)."""
    kept, prefix_kept, dropped = {}, {}, {}
    for layer, window in windows.items():
        rec = records.get(layer)
        if rec is None:
            kept[str(layer)], prefix_kept[str(layer)], dropped[str(layer)] = 1.0, 1.0, 0.0
            continue
        heads = rec.num_kept[b]
        seq_len = rec.seq_lens[b]
        kept[str(layer)] = sum(heads) / (len(heads) * max(seq_len, 1))
        if window is not None and seq_len > window:
            prefix_kept[str(layer)] = sum(min(max(k - window, 0), seq_len - window) for k in heads) / (
                len(heads) * (seq_len - window)
            )
        dropped[str(layer)] = sum(rec.dropped_mass[b]) / len(rec.dropped_mass[b])
    out: dict[str, Any] = {"kept_share": kept, "dropped_mass": dropped}
    out["mean_kept_share"] = sum(kept.values()) / len(kept) if kept else None
    if prefix_kept:
        out["prefix_kept_share"] = prefix_kept
        out["mean_prefix_kept_share"] = sum(prefix_kept.values()) / len(prefix_kept)
    return out


class _PrefillTimer(LogitsProcessor):
    """A logits processor that notes when generate first produces logits."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first = time.perf_counter()
        return scores


def _generate(
    model: Any, tokenizer: Any, batch: list[Sample], *, max_new_tokens: int, chunk_size: int | None = None
) -> tuple[list[str], float]:
    """Greedy answers of a batch (left padded) and the batch's prefill seconds."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(s.num_tokens for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, sample in enumerate(batch):
        ids[i, width - sample.num_tokens :] = torch.tensor(sample.input_ids, dtype=torch.long)
        mask[i, width - sample.num_tokens :] = 1
    ids, mask = ids.to(device), mask.to(device)
    eos = _eos_ids(model, tokenizer)
    options = dict(
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=eos
    )
    if chunk_size is None:
        new, prefill_s = _generate_whole(model, ids, mask, max_new_tokens, options)
    else:
        new, prefill_s = _generate_chunked(model, ids, mask, max_new_tokens, chunk_size, options)
    texts = []
    for i, sample in enumerate(batch):
        tokens = new[i, : sample.max_new_tokens].tolist()
        # Up to the first end-of-sequence token (generate pads after it; a chunked row may not know it ended).
        stop = next((j for j, t in enumerate(tokens) if t in (eos or ())), len(tokens))
        texts.append(tokenizer.decode(tokens[:stop], skip_special_tokens=True))
    return texts, prefill_s


def _generate_whole(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, options: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """(B, new) tokens from one ``generate`` call, timed to its first logits."""
    device = ids.device
    timer = _PrefillTimer(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([timer]), **options,
        )
    prefill_s = (timer.first or time.perf_counter()) - start
    return out[:, ids.shape[1] :], prefill_s


def _generate_chunked(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, chunk_size: int, options: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """(B, new) tokens: a chunked :func:`prefill`, the greedy first token from its
    last logits, then ``generate`` from the cache; timed over the prefill and the
    first token's choice."""
    device = ids.device
    # generate drops an all-ones mask; so does this, so that chunk_size >= L gives its very calls.
    padded = mask if not bool(mask.all()) else None
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        cache, logits = prefill(model, ids, chunk_size=chunk_size, attention_mask=padded)
        first = logits.float().argmax(-1, keepdim=True)  # greedy, as generate's first step
        _sync(device)
        prefill_s = time.perf_counter() - start
        if max_new_tokens == 1:
            return first, prefill_s
        out = model.generate(
            input_ids=torch.cat([ids, first], dim=1), attention_mask=torch.cat([mask, torch.ones_like(first)], dim=1),
            max_new_tokens=max_new_tokens - 1, **{cache_kwarg(model): cache}, **options,
        )
    return out[:, ids.shape[1] :], prefill_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_ids(model: Any, tokenizer: Any) -> list[int] | None:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids or None


def _write_meta(path: Path, loaded: Any, eval_name: str, extra: dict[str, Any]) -> None:
    import transformers

    from .haystack import python_version

    meta = json.loads(path.read_text()) if path.is_file() else {}
    runs = meta.get("runs", [])
    model = loaded.model
    runs.append(
        {
            "eval": eval_name,
            "model": loaded.name,
            "device": str(loaded.device),
            "device_name": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
    )
    meta["runs"] = runs
    path.write_text(json.dumps(meta, indent=2, default=str) + "\n")

