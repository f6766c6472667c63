"""Save / load of quantized models: bit-identical round trips, and clear errors for bad files."""

import random
import shutil

import pytest
import torch
from helpers import copy_checkpoint, edit_config, tiny_llama

from onebit import QuantConfig
from onebit.checkpoint import CheckpointError, load_quantized, save_quantized
from onebit.models import decoder_linears, quantize_model
from onebit.nn import BinaryLinear


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantize_model(tiny_llama(), QuantConfig(block_size=32), progress=False)
    d = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(model, d)
    return model, d


def test_round_trip_bit_identical(saved):
    model, d = saved
    loaded, _, config = load_quantized(d, tokenizer=False)
    assert config == model.onebit_config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert sum(isinstance(m, BinaryLinear) for m in loaded.modules()) == 14
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_float_tensors_stored_narrower_load_back_in_the_model_dtype(saved, tmp_path):
    from safetensors import safe_open

    model, _ = saved
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6  # beyond fp16: that tensor must stay exact
    try:
        d = save_quantized(model, tmp_path / "h", float_dtype=torch.float16)
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
        assert dtypes["model.embed_tokens.weight"] == torch.float16
        assert dtypes["model.layers.0.input_layernorm.weight"] == torch.float16
        assert dtypes["model.norm.weight"] == torch.float32
        assert dtypes["model.layers.0.mlp.down_proj.out_scale"] == model.model.layers[0].mlp.down_proj.out_scale.dtype
        loaded, _, _ = load_quantized(d, tokenizer=False)
        for k, t in model.state_dict().items():
            got = loaded.state_dict()[k]
            want = t.half().to(t.dtype) if dtypes[k if k in dtypes else "model.embed_tokens.weight"] == torch.float16 else t
            assert got.dtype == t.dtype and torch.equal(got, want), k
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    finally:
        with torch.no_grad():
            model.model.norm.weight[0] = 1.0


def test_only_safetensors_and_json(saved):
    _, d = saved
    names = sorted(p.name for p in d.iterdir())
    assert names == ["config.json", "model.safetensors"]
    assert not any(open(p, "rb").read(2) == b"\x80\x04" for p in d.iterdir())  # no pickle stream


def test_truncated_and_garbled_files(saved, tmp_path):
    _, d = saved
    c = copy_checkpoint(d, tmp_path)
    w = c / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_quantized(c, tokenizer=False)
    w.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError):
        load_quantized(c, tokenizer=False)
    (c / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_quantized(c, tokenizer=False)


def test_random_corruptions_never_load_silently(saved, tmp_path):
    """Flip random bytes anywhere in the weights file: every load must raise CheckpointError."""
    _, d = saved
    c = copy_checkpoint(d, tmp_path)
    w = c / "model.safetensors"
    clean = w.read_bytes()
    rng = random.Random(0)
    for _ in range(60):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        w.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_quantized(c, tokenizer=False)


def test_foreign_newer_and_mismatched_configs(saved, tmp_path):
    _, d = saved
    c = copy_checkpoint(d, tmp_path)
    edit_config(c, lambda cfg: cfg["quantization_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="newer"):
        load_quantized(c, tokenizer=False)
    edit_config(c, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="not a onebit checkpoint"):
        load_quantized(c, tokenizer=False)
    shutil.rmtree(c)
    c = copy_checkpoint(d, tmp_path)
    layer = "model.layers.0.mlp.down_proj"
    edit_config(c, lambda cfg: cfg["quantization_config"]["layers"][layer].update(block_size=64))
    with pytest.raises(CheckpointError):
        load_quantized(c, tokenizer=False)
    shutil.rmtree(c)
    c = copy_checkpoint(d, tmp_path)
    edit_config(c, lambda cfg: cfg.update(intermediate_size=128))
    with pytest.raises(CheckpointError):
        load_quantized(c, tokenizer=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized(tmp_path / "nowhere", tokenizer=False)


def test_swap_leaves_embeddings_norms_and_lm_head():
    model = tiny_llama()
    names = [n for n, _ in decoder_linears(model, QuantConfig())]
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    quantize_model(model, QuantConfig(block_size=32), progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, BinaryLinear)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_llama(), QuantConfig(method="arb"))
