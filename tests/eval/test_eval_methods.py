"""Method specs: parsing, canonical labels, errors, and the registry."""

import pytest

from tokensparse import TokenSparseConfig, methods


def test_specs_and_labels():
    dense = methods.parse_method("dense")
    assert dense.name == "dense" and dense.config is None and dense.label == "dense"
    default = methods.parse_method("token_sparse")
    assert default.config == TokenSparseConfig()
    assert default.label == "token_sparse:coverage=0.005"
    assert methods.parse_method("token_sparse:coverage=0.005").label == default.label
    cov = methods.parse_method("token_sparse:coverage=0.02")
    assert cov.config.coverage == 0.02 and cov.label == "token_sparse:coverage=0.02"
    ratio = methods.parse_method("token_sparse:keep_ratio=0.5")
    assert ratio.config.budget == "keep_ratio" and ratio.config.keep_ratio == 0.5
    assert ratio.label == "token_sparse:budget=keep_ratio,keep_ratio=0.5"
    assert methods.parse_method("token_sparse:budget=keep_ratio,keep_ratio=0.5").label == ratio.label
    layers = methods.parse_method("token_sparse:sparse_layers=3-5;9,min_tokens=64,max_tokens=none")
    assert layers.config.sparse_layers == (3, 4, 5, 9) and layers.config.min_tokens == 64
    assert layers.slug == "token_sparse__coverage-0.005_min_tokens-64_sparse_layers-3_4_5_9"


def test_method_lists():
    specs = methods.parse_methods("dense, token_sparse:budget=keep_ratio,keep_ratio=0.5,token_sparse:coverage=0.02")
    assert [s.label for s in specs] == [
        "dense",
        "token_sparse:budget=keep_ratio,keep_ratio=0.5",
        "token_sparse:coverage=0.02",
    ]
    # duplicates collapse; lists of strings work
    assert len(methods.parse_methods(["token_sparse", "token_sparse:coverage=0.005"])) == 1


@pytest.mark.parametrize(
    "spec,message",
    [
        ("flash", r"unknown method 'flash'; known methods: dense, flexprefill, token_sparse"),
        ("token_sparse:covrage=0.1", r"unknown setting 'covrage'; known settings: coverage, window"),
        ("token_sparse:coverage=lots", r"setting 'coverage' has a bad value 'lots'"),
        ("token_sparse:coverage=1.5", r"TokenSparseConfig.coverage"),
        ("token_sparse:window", r"setting 'window' is not key=value"),
        ("dense:coverage=0.1", r"method 'dense' takes no settings"),
        ("token_sparse:coverage=0.1,coverage=0.2", r"given twice"),
    ],
)
def test_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        methods.parse_method(spec)
    with pytest.raises(ValueError):
        methods.parse_methods("window=3")  # a setting without a method


def test_registering_a_method_is_one_entry():
    """A new method is one Method entry: spec parsing, labels and the model integration follow."""
    from dataclasses import dataclass

    import torch

    import tokensparse
    from tiny_models import tiny_llama
    from tokensparse.ops import dense_causal_attention

    @dataclass(frozen=True)
    class ToyConfig:
        k: int = 1

    calls = []

    def prefill(query, key, value, config, *, scale=None, key_padding_mask=None, layout="bhld"):
        calls.append(config.k)
        out = dense_causal_attention(query, key, value, scale=scale, key_padding_mask=key_padding_mask)
        return (out.transpose(1, 2) if layout == "blhd" else out), None

    entry = methods.Method("toy_method", config_type=ToyConfig, prefill=prefill)
    methods.register_method(entry)
    try:
        spec = methods.parse_method("toy_method:k=3")
        assert spec.label == "toy_method:k=3" and spec.config == ToyConfig(3)
        assert methods.parse_method("toy_method").label == "toy_method"
        with pytest.raises(ValueError, match="unknown setting 'j'"):
            methods.parse_method("toy_method:j=1")
        model = tiny_llama(num_layers=2)
        ids = torch.randint(0, 128, (1, 40))
        with torch.inference_mode():
            ref = model(input_ids=ids).logits
            tokensparse.enable(model, spec)
            out = model(input_ids=ids).logits
            tokensparse.disable(model)
        assert calls == [3, 3]  # every layer, once
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert "toy_method" in methods.known_methods()
        with pytest.raises(ValueError, match="already registered"):
            methods.register_method(entry)
    finally:
        methods.registry._REGISTRY.pop("toy_method", None)


def test_flexprefill_methods_are_registered():
    from tokensparse.methods.flexprefill import FlexPrefillConfig

    fp, comp = methods.parse_methods("flexprefill:gamma=0.9,token_sparse+flexprefill:coverage=0.02")
    assert isinstance(fp.config, FlexPrefillConfig) and fp.config.gamma == 0.9
    assert comp.config.inner.name == "flexprefill" and comp.config.token_sparse.coverage == 0.02
    assert comp.label == "token_sparse+flexprefill:coverage=0.02"
    with pytest.raises(ValueError, match="attention"):
        methods.parse_methods("token_sparse+flexprefill:attention=sdpa")


def test_spec_for_gives_the_eval_label_of_a_config():
    from tokensparse import TokenSparseConfig
    from tokensparse.methods import composition_spec, parse_method, spec_for
    from tokensparse.methods.flexprefill import FlexPrefillConfig

    base = TokenSparseConfig()
    for spec_of, spec in [
        (spec_for("token_sparse", base.replace(budget="keep_ratio", keep_ratio=0.5)), "token_sparse:keep_ratio=0.5"),
        (spec_for("token_sparse", base.replace(coverage=0.02, sparse_layers=(3, 5))), "token_sparse:coverage=0.02,sparse_layers=3;5"),
        (composition_spec("flexprefill", base), "token_sparse+flexprefill"),
        (spec_for("flexprefill", FlexPrefillConfig(gamma=0.9)), "flexprefill:gamma=0.9"),
        (spec_for("dense"), "dense"),
    ]:
        assert spec_of.label == parse_method(spec).label
