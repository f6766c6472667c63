"""CLI helpers that need no real model."""

import pytest
import torch

from onebit.cli import set_act_bits
from onebit.config import QuantConfig
from onebit.nn import BinaryLinear

pytest.importorskip("transformers")
from helpers import tiny_llama  # noqa: E402


def test_set_act_bits_switches_every_packed_layer():
    from onebit.models import quantize_model

    model = tiny_llama()
    quantize_model(model, QuantConfig(method="rtn", block_size=32), progress=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y16 = model(ids).logits
        assert set_act_bits(model, 8) == 8
        y8 = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert layers and all(m.act_bits == 8 for m in layers)
    assert not torch.equal(y8, y16)  # int8 activations really are used
    assert (y8 - y16).abs().max() < 0.1 * y16.abs().max()


def test_set_act_bits_needs_a_quantized_model():
    with pytest.raises(ValueError, match="no BinaryLinear"):
        set_act_bits(tiny_llama(), 8)


def test_model_report_bits_by_part_add_up():
    from onebit.cli import model_report
    from onebit.compact import bits_breakdown
    from onebit.models import quantize_model, set_module

    model = tiny_llama()
    quantize_model(model, QuantConfig(method="rtn", block_size=32), progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    name, first = next(iter(layers.items()))
    set_module(model, name, torch.nn.Linear(first.in_features, first.out_features, bias=False))  # one left in fp32
    r = model_report(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    parts = r["bits_per_weight_by_part"]
    assert parts["float_linear"] == pytest.approx(32 * first.in_features * first.out_features / weights)
    packed_sign = sum(bits_breakdown(m.compact)["sign"] for n, m in layers.items() if n != name)
    assert parts["sign"] == pytest.approx(packed_sign / weights)
    assert sum(parts.values()) == pytest.approx(r["bits_per_weight"])
