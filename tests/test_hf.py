"""transformers integration: from_pretrained / save_pretrained round trips, clear errors, `onebit info`."""

import json
import random

import pytest
import torch
from helpers import copy_checkpoint, edit_config, tiny_llama

from onebit import QuantConfig
from onebit.checkpoint import CheckpointError, load_quantized, save_quantized
from onebit.models import quantize_model
from onebit.nn import BinaryLinear

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

import onebit.hf
from onebit.hf import OnebitConfig, attach

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantize_model(tiny_llama(), QuantConfig(block_size=32), progress=False)
    d = tmp_path_factory.mktemp("hf") / "q"
    save_quantized(model, d)
    return model, d


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_save_quantized_then_from_pretrained_identical(saved):
    model, d = saved
    loaded = AutoModelForCausalLM.from_pretrained(d)
    assert sum(isinstance(m, BinaryLinear) for m in loaded.modules()) == 14
    assert type(loaded.lm_head) is torch.nn.Linear  # modules_to_not_convert (lm_head) stayed float
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    _same_state(model, loaded)
    assert torch.equal(_logits(model), _logits(loaded))
    assert isinstance(loaded.config.quantization_config, OnebitConfig)
    assert loaded.onebit_config == model.onebit_config


def test_save_pretrained_loads_bit_identically_both_ways(saved, tmp_path):
    model, d = saved
    out = tmp_path / "sp"
    AutoModelForCausalLM.from_pretrained(d).save_pretrained(out)
    names = sorted(p.name for p in out.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    assert not any(p.read_bytes()[:2] == b"\x80\x04" or b"pickle" in p.read_bytes()[:64] for p in out.iterdir())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc) == {"quant_method", "format_version", "onebit_version", "quant", "layers"}
    assert len(qc["layers"]) == 14
    via_checkpoint, _, config = load_quantized(out, tokenizer=False)
    via_hf = AutoModelForCausalLM.from_pretrained(out)
    assert config == model.onebit_config
    for m in (via_checkpoint, via_hf):
        _same_state(model, m)
        assert torch.equal(_logits(model), _logits(m))


def test_sharded_save_pretrained_loads_both_ways(saved, tmp_path):
    model, d = saved
    AutoModelForCausalLM.from_pretrained(d).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 1
    _same_state(model, load_quantized(tmp_path / "s", tokenizer=False)[0])
    _same_state(model, AutoModelForCausalLM.from_pretrained(tmp_path / "s"))
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-8])  # truncate one shard
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "s", tokenizer=False)
    with pytest.raises(CheckpointError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "s")


def test_register_is_idempotent_and_import_onebit_stays_lean():
    import subprocess
    import sys

    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    onebit.hf.register()
    onebit.hf.register()
    assert AUTO_QUANTIZER_MAPPING["onebit"] is onebit.hf.OnebitHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["onebit"] is OnebitConfig
    code = "import sys, onebit, onebit.generate, onebit.serve; print(sorted(m for m in sys.modules if m.startswith(('transformers', 'starlette', 'uvicorn'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_quantize_model_attach_save_pretrained(tmp_path):
    model = quantize_model(tiny_llama(seed=1), QuantConfig(block_size=64, scale_dtype="float32"), progress=False)
    attach(model)
    model.save_pretrained(tmp_path / "a")
    back, _, _ = load_quantized(tmp_path / "a", tokenizer=False)
    _same_state(model, back)
    back.save_pretrained(tmp_path / "b")  # load_quantized attaches the quantizer too
    _same_state(model, AutoModelForCausalLM.from_pretrained(tmp_path / "b"))


def test_dtype_and_device_map(saved):
    model, d = saved
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cpu")
    layer = m.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BinaryLinear)
    assert (
        layer.signs.dtype == torch.int32
        and layer.out_scale.dtype == model.model.layers[0].self_attn.q_proj.out_scale.dtype
    )
    assert torch.equal(layer.signs, model.model.layers[0].self_attn.q_proj.signs)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16 and m.model.norm.weight.dtype == torch.bfloat16
    ref, got = _logits(model), _logits(m).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().max() / ref.pow(2).mean().sqrt() < 0.1  # bf16 activations: loose but real


def test_on_the_fly_quantization_honours_modules_to_not_convert(tmp_path):
    fp = tiny_llama(seed=2)
    fp.save_pretrained(tmp_path / "fp")
    qcfg = OnebitConfig(block_size=32, modules_to_not_convert=["lm_head", "down_proj"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qcfg)
    assert type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert sum(isinstance(x, BinaryLinear) for x in m.modules()) == 12
    ref = quantize_model(tiny_llama(seed=2), QuantConfig(block_size=32, modules_to_not_convert=("lm_head", "down_proj")),
                         progress=False)  # fmt: skip
    _same_state(ref, m)
    m.save_pretrained(tmp_path / "q")
    _same_state(ref, load_quantized(tmp_path / "q", tokenizer=False)[0])
    with pytest.raises(ValueError, match="calibration"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=OnebitConfig(method="arb"))


def test_from_pretrained_rejects_newer_and_mismatched(saved, tmp_path):
    _, d = saved
    c = copy_checkpoint(d, tmp_path, "newer")
    edit_config(c, lambda cfg: cfg["quantization_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="newer"):
        AutoModelForCausalLM.from_pretrained(c)
    cases = {
        "block": lambda cfg: cfg["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"].update(block_size=64),
        "arch": lambda cfg: cfg.update(intermediate_size=128),
        "dropped": lambda cfg: cfg["quantization_config"]["layers"].pop("model.layers.1.self_attn.o_proj"),
        "untied": lambda cfg: cfg.update(tie_word_embeddings=False),
        "scale": lambda cfg: cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(scale_dtype="float32"),
    }  # fmt: skip
    for name, fn in cases.items():
        c = copy_checkpoint(d, tmp_path, name)
        edit_config(c, fn)
        with pytest.raises(CheckpointError):
            AutoModelForCausalLM.from_pretrained(c)


def test_from_pretrained_rejects_corrupted_files(saved, tmp_path):
    """Random bit flips anywhere in the weights file and truncation: CheckpointError, never a silent load."""
    _, d = saved
    c = copy_checkpoint(d, tmp_path)
    w = c / "model.safetensors"
    clean = w.read_bytes()
    w.write_bytes(clean[: len(clean) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        AutoModelForCausalLM.from_pretrained(c)
    rng = random.Random(0)
    for _ in range(40):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data)) if rng.random() < 0.7 else rng.randrange(min(len(data), 4096))  # header too
            data[pos] ^= 1 << rng.randrange(8)
        w.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            AutoModelForCausalLM.from_pretrained(c)


def test_onebit_info_reports_true_bits_and_sizes(saved, capsys):
    from onebit.cli import main
    from onebit.compact import bits_breakdown
    from onebit.hf import checkpoint_info

    model, d = saved
    info = checkpoint_info(str(d))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    assert set(info["layers"]) == set(layers) and info["format_version"] == 2 and info["method"] == "rtn"
    for n, m in layers.items():
        assert info["layers"][n]["bits_per_weight"] == pytest.approx(m.bits_per_weight())
    total_bits = sum(m.bits_per_weight() * m.in_features * m.out_features for m in layers.values())
    assert info["bits_per_weight"] == pytest.approx(
        total_bits / sum(m.in_features * m.out_features for m in layers.values())
    )
    assert info["quantized_linear_bytes"] < info["fp16_linear_bytes"] / 3
    # The parts come from the headers and in_scale only; they must add up to the real tensors' bits.
    weights = sum(m.in_features * m.out_features for m in layers.values())
    for part, bpw in info["bits_per_weight_by_part"].items():
        want = sum(bits_breakdown(m.compact)[part] for m in layers.values()) / weights
        assert bpw == pytest.approx(want), part
    assert sum(info["bits_per_weight_by_part"].values()) == pytest.approx(info["bits_per_weight"])
    assert info["bytes_on_disk"] == (d / "model.safetensors").stat().st_size
    assert "lm_head" in info["tied"] or "lm_head.weight" in info["tied"]
    assert {"model.embed_tokens", "model.norm", "model.layers.*.input_layernorm"} <= set(info["float_modules"])
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "bits per weight" in out and "by part: sign 1.000" in out and "kept in floating point" in out and "model.layers.0.mlp.down_proj" in out
    assert main(["info", str(d / "missing")]) == 2
