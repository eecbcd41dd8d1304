import pytest

from tokensparse import TokenSparseConfig


def test_defaults_are_the_papers():
    cfg = TokenSparseConfig()
    assert (cfg.coverage, cfg.window, cfg.kernel_size, cfg.min_tokens) == (0.005, 128, 7, 1024)
    assert cfg.budget == "coverage" and cfg.sparse_layers is None


def test_frozen():
    cfg = TokenSparseConfig()
    with pytest.raises(Exception):
        cfg.coverage = 0.1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"coverage": -0.1}, "coverage"),
        ({"coverage": 1.0}, "coverage"),
        ({"coverage": float("nan")}, "coverage"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"budget": "magic"}, "budget"),
        ({"budget": "keep_ratio"}, "keep_ratio"),
        ({"budget": "keep_ratio", "keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": 0.5}, "keep_ratio"),
        ({"budget": "keep_tokens", "keep_tokens": 0}, "keep_tokens"),
        ({"sparse_layers": "12"}, "sparse_layers"),
        ({"sparse_layers": 5}, "sparse_layers"),
        ({"sparse_layers": 3.0}, "sparse_layers"),
        ({"sparse_layers": [1, -2]}, "sparse_layers"),
        ({"backend": "cuda"}, "backend"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenSparseConfig(**kwargs)


def test_round_trip_and_normalised_layers():
    cfg = TokenSparseConfig(coverage=0.02, sparse_layers=[5, 3, 3])
    assert cfg.sparse_layers == (3, 5)
    assert TokenSparseConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(window=64).window == 64
    with pytest.raises(ValueError, match="window"):
        cfg.replace(window=-1)
    with pytest.raises(ValueError, match="unknown field 'tau'"):
        TokenSparseConfig.from_dict({"tau": 0.1})
