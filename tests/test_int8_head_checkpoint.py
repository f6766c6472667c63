"""Checkpoints with an int8 head (format v3): saved as int8 table + fp32 scales, loaded as one.

The expected values come from the model in memory before saving (its int8 head was made by
compact_head, whose quantization test_head checks against loops); what is checked here is that
saving and loading, through onebit's functions and through transformers, change nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import copy_checkpoint, edit_config, tiny_llama
from onebit import QuantConfig
from onebit.checkpoint import CheckpointError, load_quantized, save_quantized
from onebit.head import Embedding8, Linear8, compact_head
from onebit.models import quantize_model

IDS = torch.tensor([[1, 7, 30, 4, 99, 12]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _quantized(seed: int = 2, tied: bool = True):
    model = tiny_llama(layers=1, seed=seed)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    return quantize_model(model, QuantConfig(block_size=32), progress=False)


def _check_int8_head(model, want: Linear8, tied: bool = True) -> None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, Linear8) and head.group_size == want.group_size
    assert head.weight.dtype == torch.int8 and head.scale.dtype == torch.float32
    assert torch.equal(head.weight, want.weight) and torch.equal(head.scale, want.scale)
    if tied:
        assert isinstance(emb, Embedding8)
        assert emb.weight.data_ptr() == head.weight.data_ptr() and emb.scale.data_ptr() == head.scale.data_ptr()
    else:
        assert type(emb) is torch.nn.Embedding and emb.weight.dtype == torch.float32


@pytest.mark.parametrize("tied", (True, False))
def test_save_quantized_then_load_quantized(tmp_path, tied):
    model = compact_head(_quantized(tied=tied), torch.int8)
    want, logits = model.get_output_embeddings(), _logits(model)
    save_quantized(model, tmp_path / "q", float_dtype=torch.float16)  # the CLI's default: narrows float tensors only
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3 and qc["head"] == {"dtype": "int8", "group_size": 32, "tied": tied}
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["onebit_format_version"] == "3"
        # Tied: one int8 table and its scales (under the embedding's names; lm_head's are aliases).
        stored = "model.embed_tokens" if tied else "lm_head"
        assert f.get_tensor(f"{stored}.weight").dtype == torch.int8
        assert f.get_tensor(f"{stored}.scale").dtype == torch.float32  # not narrowed to float16
        assert sum(k.endswith(".scale") for k in f.keys()) == 1
        if tied:
            assert json.loads(f.metadata()["aliases"]) == {"lm_head.weight": "model.embed_tokens.weight",
                                                           "lm_head.scale": "model.embed_tokens.scale"}  # fmt: skip
        else:
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    loaded, _, _ = load_quantized(tmp_path / "q", tokenizer=False)
    _check_int8_head(loaded, want, tied)
    if tied:  # float16 norms change the logits a little; the head is exact
        torch.testing.assert_close(_logits(loaded), logits, rtol=1e-2, atol=1e-2)
    save_quantized(model, tmp_path / "exact")  # float_dtype None: every tensor as it is
    exact, _, _ = load_quantized(tmp_path / "exact", tokenizer=False)
    assert torch.equal(_logits(exact), logits)


def test_from_pretrained_and_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compact_head(_quantized(), torch.int8)
    want, logits = model.get_output_embeddings(), _logits(model)
    model.save_pretrained(tmp_path / "sp")  # the model's hf_quantizer: same format as save_quantized
    qc = json.loads((tmp_path / "sp" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3 and qc["head"]["dtype"] == "int8"
    for dtype in (None, torch.bfloat16):
        kw = {} if dtype is None else {"dtype": dtype}
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sp", **kw)
        _check_int8_head(hf, want)  # the scales stay float32 whatever the model's dtype
        if dtype is None:
            assert torch.equal(_logits(hf), logits)
        else:
            assert hf.get_input_embeddings()(IDS).dtype == dtype
            torch.testing.assert_close(_logits(hf).float(), logits, rtol=0.1, atol=0.1)
    via_ours, _, _ = load_quantized(tmp_path / "sp", tokenizer=False)
    assert torch.equal(_logits(via_ours), logits)
    AutoModelForCausalLM.from_pretrained(tmp_path / "sp").save_pretrained(tmp_path / "again")
    again, _, _ = load_quantized(tmp_path / "again", tokenizer=False)
    _check_int8_head(again, want)
    assert torch.equal(_logits(again), logits)


def test_without_int8_head_the_checkpoint_stays_v2(tmp_path):
    """Older onebit (format 2) still reads every checkpoint that has no int8 head."""
    model = compact_head(_quantized(), torch.float16)
    save_quantized(model, tmp_path / "q")
    model.save_pretrained(tmp_path / "sp")
    for d in ("q", "sp"):
        qc = json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
        assert qc["format_version"] == 2 and "head" not in qc


def test_int8_head_made_before_quantizing_is_saved(tmp_path):
    model = compact_head(tiny_llama(layers=1, seed=4), torch.int8)
    with pytest.raises(RuntimeError, match="int8 head"):  # a float model: no checkpoint can hold it
        model.state_dict()
    quantize_model(model, QuantConfig(block_size=32), progress=False)
    save_quantized(model, tmp_path / "q")
    loaded, _, _ = load_quantized(tmp_path / "q", tokenizer=False)
    assert torch.equal(_logits(loaded), _logits(model))


def test_bad_head_records_raise(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compact_head(_quantized(), torch.int8)
    save_quantized(model, tmp_path / "q")
    cases = {
        "group": lambda cfg: cfg["quantization_config"]["head"].update(group_size=33),
        "dtype": lambda cfg: cfg["quantization_config"]["head"].update(dtype="int4"),
        "keys": lambda cfg: cfg["quantization_config"]["head"].pop("tied"),
        "untied": lambda cfg: cfg["quantization_config"]["head"].update(tied=False),  # tensors say tied
        "missing": lambda cfg: cfg["quantization_config"].pop("head"),  # int8 tensors, float skeleton
        "type": lambda cfg: cfg["quantization_config"].update(head="int8"),
    }
    for name, edit in cases.items():
        c = copy_checkpoint(tmp_path / "q", tmp_path, name)
        edit_config(c, edit)
        with pytest.raises(CheckpointError):
            load_quantized(c, tokenizer=False)
        with pytest.raises((CheckpointError, ValueError)):
            AutoModelForCausalLM.from_pretrained(c)


def test_info_reports_the_int8_head(tmp_path, capsys):
    from onebit.hf import checkpoint_info, print_info

    model = compact_head(_quantized(), torch.int8)
    save_quantized(model, tmp_path / "q")
    info = checkpoint_info(str(tmp_path / "q"))
    assert info["format_version"] == 3 and info["head"]["group_size"] == 32
    assert info["int8_modules"] == ["lm_head", "model.embed_tokens"]
    assert info["int8_head_bytes"] == 128 * 64 + 128 * 2 * 4  # int8 table + fp32 scales, stored once
    assert not any("embed" in m or "lm_head" in m for m in info["float_modules"])
    print_info(str(tmp_path / "q"))
    assert "int8 head: lm_head, model.embed_tokens" in capsys.readouterr().out


@pytest.mark.parametrize("how", ("load_quantized", "from_pretrained", "in_memory"))
def test_float_dtype_casts_keep_the_narrow_head(tmp_path, how):
    """model.to(bfloat16 / float16 / float32) casts the model's float tensors; the int8 table and
    its float32 scales stay as they are (one shared copy), the embedding's rows follow the model."""
    from transformers import AutoModelForCausalLM

    model = compact_head(_quantized(), torch.int8)
    want = model.get_output_embeddings()
    want = Linear8(want.weight.clone(), want.scale.clone(), want.group_size)
    if how != "in_memory":
        save_quantized(model, tmp_path / "q")
        model = (load_quantized(tmp_path / "q", tokenizer=False)[0] if how == "load_quantized"
                 else AutoModelForCausalLM.from_pretrained(tmp_path / "q"))  # fmt: skip
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert emb.weight is head.weight and emb.scale is head.scale  # one Parameter each, shared
    fp32 = _logits(model)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # (transformers refuses .half() on quantized models)
        model.to(dtype)
        _check_int8_head(model, want)
        assert model.get_input_embeddings()(IDS).dtype == dtype
        logits = _logits(model)
        assert logits.dtype == dtype
        torch.testing.assert_close(logits.float(), fp32, rtol=0.1, atol=0.1)


def test_float_dtype_casts_keep_a_16bit_head():
    from onebit.head import Embedding16, Linear16

    model = compact_head(tiny_llama(layers=1, seed=5), torch.float16)
    w = model.get_output_embeddings().weight.clone()
    model.to(torch.bfloat16)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, Linear16) and isinstance(emb, Embedding16) and emb.weight is head.weight
    assert head.weight.dtype == torch.float16 and torch.equal(head.weight, w)
    assert _logits(model).dtype == torch.bfloat16
    model.float()
    assert head.weight.dtype == torch.float16 and _logits(model).dtype == torch.float32
