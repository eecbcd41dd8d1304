"""Layer plans: which method runs in which decoder layer, and the length gate."""

import pytest
import torch

import tokensparse
from tokensparse.methods import parse_method, parse_methods
from tokensparse.plan import LayerPlan, build_plan
from tokensparse.sensitivity import SensitivityProfile
from tokensparse.profile import ModelIdentity

from tiny_models import tiny_llama

SPARSE = "token_sparse:keep_ratio=0.5,window=16,min_tokens=16"


def labels(plan: LayerPlan) -> list[str | None]:
    return [None if e is None else e.spec.name for e in plan.layers]


def test_token_sparse_on_its_layers_the_models_own_attention_elsewhere():
    plan = build_plan(None, SPARSE + ",sparse_layers=1;3", num_layers=4)
    assert labels(plan) == [None, "token_sparse", None, "token_sparse"]
    assert plan.sparse_layers == (1, 3) and plan.method == parse_method(SPARSE + ",sparse_layers=1;3")


def test_a_composition_runs_its_inner_method_on_the_other_layers():
    plan = build_plan(None, "token_sparse+flexprefill:sparse_layers=2-3,gamma=0.9", num_layers=4)
    assert labels(plan) == ["flexprefill", "flexprefill", "token_sparse+flexprefill", "token_sparse+flexprefill"]
    assert plan.layers[0].spec.config.gamma == 0.9  # the inner method's settings reach the other layers
    assert plan.describe()[0] == (plan.layers[0].spec.label, [0, 1])


def test_block_sparse_methods_run_everywhere_and_dense_nowhere():
    assert labels(build_plan(None, "xattention", num_layers=3)) == ["xattention"] * 3
    assert labels(build_plan(None, "dense", num_layers=3)) == [None] * 3
    with pytest.raises(ValueError, match="takes no profile"):
        build_plan(None, "flexprefill", num_layers=3, profile="p.json")


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match="beyond the model's 4 layers"):
        build_plan(None, SPARSE + ",sparse_layers=4", num_layers=4)
    with pytest.raises(ValueError, match="not both"):
        build_plan(None, SPARSE + ",sparse_layers=1", num_layers=4, profile="p.json")
    with pytest.raises(ValueError, match="num_layers"):
        build_plan(None, SPARSE)
    with pytest.raises(ValueError, match="min_length"):
        build_plan(None, SPARSE + ",sparse_layers=1", num_layers=4, min_length=-1)


def test_length_gate_per_method():
    plan = build_plan(None, "token_sparse+xattention:sparse_layers=1", num_layers=3,
                      min_length={"token_sparse+xattention": 4096, "xattention": 65536})
    assert [e.min_length for e in plan.layers] == [65536, 4096, 65536]
    assert [e.min_length for e in plan.with_min_length(100).layers] == [100, 100, 100]


def test_gated_prefill_is_the_models_own_and_recorded_dense():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 160))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        tokensparse.enable(model, SPARSE + ",sparse_layers=0-3", record=True, min_length=161)
        gated = model(input_ids=ids).logits
        tokensparse.enable(model, SPARSE + ",sparse_layers=0-3", record=True, min_length=160)
        sparse = model(input_ids=ids).logits
    assert torch.equal(gated, ref) and not torch.equal(sparse, ref)
    (prefill,) = tokensparse.selection_report(model)
    assert min(r.mean_kept_share for r in prefill.values()) < 1.0


def test_sensitivity_profile_chooses_the_safe_layers(tmp_path):
    model = tiny_llama()
    profile = SensitivityProfile(
        model=ModelIdentity.from_model(model), length=512, positions=8, config={},
        kl=(0.5, 1e-4, 2e-3, 1e-3), top1=(0.5, 1.0, 1.0, 1.0), calibration="test", calibration_sha256="0",
        version="0", device="cpu", dtype="float32",
    )
    path = profile.save(tmp_path / "s.json")
    for given in (profile, path):
        plan = build_plan(model, SPARSE, profile=given)
        assert plan.sparse_layers == (1, 3)  # KL at most 1e-3
    with pytest.raises(ValueError, match="no sensitivity profile is shipped"):
        build_plan(model, SPARSE, profile="sensitivity")


def test_enable_takes_a_ready_plan():
    model = tiny_llama()
    plan = build_plan(model, SPARSE + ",sparse_layers=2")
    tokensparse.enable(model, plan)
    assert tokensparse.integrations.transformers.plan_of(model) is plan
    with pytest.raises(ValueError, match="the plan has 4 layers, the model 3"):
        tokensparse.enable(tiny_llama(3), plan)


def test_auto_gate_is_the_measured_crossover_of_each_method():
    from tokensparse.plan import measured_min_lengths

    table = measured_min_lengths()
    plan = build_plan(None, "token_sparse+flexprefill:sparse_layers=1", num_layers=3, min_length="auto")
    assert [e.min_length for e in plan.layers] == [table["flexprefill"], table["token_sparse+flexprefill"],
                                                   table["flexprefill"]]
    assert all(n > 0 for n in table.values())
    with pytest.raises(ValueError, match="'auto'"):
        build_plan(None, "xattention", num_layers=2, min_length="soon")


# ---------------------------------------------------------------- tiers: "SPEC | SPEC"
LOCAL = "token_sparse:keep_ratio=0.25,window=16,min_tokens=16,sparse_layers=1"
MILD = "token_sparse:keep_ratio=0.75,window=16,min_tokens=16"


def test_tiers_parse_label_and_round_trip():
    spec = parse_method(f"{LOCAL} | {MILD}")
    assert spec.name == "tiers" and [t.label for t in spec.config.tiers] == [parse_method(LOCAL).label,
                                                                              parse_method(MILD).label]
    assert spec.label == f"{parse_method(LOCAL).label} | {parse_method(MILD).label}"
    assert parse_method(spec.label) == spec
    # In a comma-separated list a '|' continues the spec before it; settings after it go to the last tier.
    specs = parse_methods(f"dense,{LOCAL} | token_sparse:keep_ratio=0.75,window=16,min_tokens=16,flexprefill")
    assert [s.label for s in specs] == ["dense", spec.label, "flexprefill"]
    assert parse_methods(spec.label) == [spec]


def test_tiers_first_tier_that_takes_a_layer_runs_it():
    plan = build_plan(None, f"{LOCAL} | {MILD}", num_layers=4)
    assert [e.spec.config.keep_ratio for e in plan.layers] == [0.75, 0.25, 0.75, 0.75]
    assert plan.sparse_layers == (0, 1, 2, 3)
    # Untaken layers run the model's own attention; a block-sparse tier takes every layer left.
    assert labels(build_plan(None, f"{MILD},sparse_layers=0;2 | {LOCAL}", num_layers=4)) == [
        "token_sparse", "token_sparse", "token_sparse", None]
    plan = build_plan(None, f"{LOCAL} | flexprefill", num_layers=3, min_length="auto")
    assert labels(plan) == ["flexprefill", "token_sparse", "flexprefill"] and plan.sparse_layers == (1,)
    from tokensparse.plan import measured_min_lengths

    assert [e.min_length for e in plan.layers] == [measured_min_lengths()[n] for n in labels(plan)]


def test_tiers_errors_name_the_problem():
    with pytest.raises(ValueError, match="runs on no layer"):
        build_plan(None, f"token_sparse+flexprefill:sparse_layers=1 | {MILD}", num_layers=3)
    with pytest.raises(ValueError, match="runs on no layer"):
        build_plan(None, f"{MILD} | {LOCAL}", num_layers=3)
    with pytest.raises(ValueError, match="changes nothing"):
        parse_method(f"{LOCAL} | dense")
    with pytest.raises(ValueError, match="SPEC | SPEC"):
        parse_method("tiers:tiers=1")
    with pytest.raises(ValueError, match="non-empty"):
        parse_method(f"{LOCAL} | ")
    with pytest.raises(ValueError, match="before any method name"):
        parse_methods("| token_sparse")
    with pytest.raises(ValueError, match="layer plan"):
        parse_method(f"{LOCAL} | {MILD}").method.prefill(None, None, None, None)
    from tokensparse.methods.registry import parse_op_methods

    with pytest.raises(ValueError, match="layer plan"):
        parse_op_methods(f"dense,{LOCAL} | {MILD}")


def test_tiers_profile_chooses_the_first_tiers_layers():
    model = tiny_llama()
    profile = SensitivityProfile(
        model=ModelIdentity.from_model(model), length=512, positions=8, config={},
        kl=(0.5, 1e-4, 2e-3, 1e-3), top1=(0.5, 1.0, 1.0, 1.0), calibration="test", calibration_sha256="0",
        version="0", device="cpu", dtype="float32",
    )
    plan = build_plan(model, f"{SPARSE} | {MILD}", profile=profile)
    assert [e.spec.config.keep_ratio for e in plan.layers] == [0.75, 0.5, 0.75, 0.5]


def test_tiered_model_runs_each_tiers_setting_in_its_layers():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 200))
    with torch.inference_mode():
        tokensparse.enable(model, f"{LOCAL} | {MILD}", record=True)
        tiered = model(input_ids=ids).logits
        (prefill,) = tokensparse.selection_report(model)
        by_plan = [model(input_ids=ids).logits]
        plan = build_plan(model, f"{LOCAL} | {MILD}")
        tokensparse.enable(model, plan)
        by_plan.append(model(input_ids=ids).logits)
        tokensparse.disable(model)
        dense = model(input_ids=ids).logits
    shares = {layer: record.mean_kept_share for layer, record in prefill.items()}
    assert sorted(shares) == [0, 1, 2, 3]
    assert shares[1] < 0.4 and min(shares[i] for i in (0, 2, 3)) > 0.6
    assert all(torch.equal(tiered, other) for other in by_plan) and not torch.equal(tiered, dense)


# The recommended whole-model setting of the README ("Use it"), with profile="sensitivity".
RECOMMENDED = "token_sparse:coverage=0.01,dropped_rows=local | token_sparse:coverage=0.005,dropped_rows=local"


def test_recommended_tiers_on_the_embedded_model_are_the_evaluated_plan():
    """On SmolLM2's architecture the shipped sensitivity profile gives the first tier the 23 safe
    layers and the second the 7 others: the plan measured in results/tiers/ with the layers named."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokensparse.profile import shipped_profiles
    from tokensparse.sensitivity import find_sensitivity_profile

    (path,) = [p for p in shipped_profiles() if p.name == "smollm2_sensitivity.json"]
    identity = SensitivityProfile.load(path).model
    config = LlamaConfig(
        num_hidden_layers=identity.num_layers, hidden_size=identity.hidden_size,
        num_attention_heads=identity.num_heads, num_key_value_heads=identity.num_kv_heads,
        intermediate_size=identity.intermediate_size, vocab_size=identity.vocab_size,
        max_position_embeddings=identity.max_position_embeddings,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert find_sensitivity_profile(model) is not None
    plan = build_plan(model, RECOMMENDED, profile="sensitivity", min_length="auto")
    evaluated = build_plan(
        None, "token_sparse:coverage=0.01,dropped_rows=local,sparse_layers=3-6;9-13;15-16;18-29 | "
        "token_sparse:coverage=0.005,dropped_rows=local", num_layers=30, min_length="auto")
    assert [(e.spec.config.coverage, e.min_length) for e in plan.layers] == [
        (e.spec.config.coverage, e.min_length) for e in evaluated.layers]
    assert plan.sparse_layers == tuple(range(30))


def test_reads_profile_only_where_layers_come_from_one():
    from tokensparse.plan import reads_profile

    assert reads_profile(SPARSE) and reads_profile(f"{MILD} | {LOCAL}") and reads_profile("token_sparse+xattention")
    assert not reads_profile(LOCAL) and not reads_profile(f"{LOCAL} | {MILD}")
    assert not reads_profile("flexprefill") and not reads_profile("dense")
