import pytest

from onebit.config import AmpGate, Method, QuantConfig


def test_round_trip_and_string_coercion():
    c = QuantConfig(method="oa", amp="B", oa_layers=["down", "o"], block_size=64)
    assert c.method is Method.OA and c.amp is AmpGate.B and c.oa_layers == ("down", "o")
    d = c.to_dict()
    assert d["method"] == "oa" and d["oa_layers"] == ["down", "o"]
    assert QuantConfig.from_dict(d) == c


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "gptq"}, "method"),
        ({"block_size": 100}, "multiple of 32"),
        ({"scale_dtype": "int8"}, "scale_dtype"),
        ({"oa_layers": ("mlp",)}, "oa_layers"),
        ({"version": 2}, "upgrade"),
        ({"iters": 0}, "iters"),
    ],
)
def test_invalid_values_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_unknown_field_and_frozen():
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"method": "rtn", "bogus": 1})
    with pytest.raises(Exception):
        QuantConfig().method = Method.OA  # frozen
