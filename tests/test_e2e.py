"""End to end on the real pretrained SmolLM2-135M, truncated to 2 decoder blocks."""

import json

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from onebit import QuantConfig
from onebit.checkpoint import load_quantized, save_quantized
from onebit.cli import main
from onebit.models import load_model, quantize_model
from onebit.nn import BinaryLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_model():
    model, tok = load_model("smollm2-135m", num_layers=2)
    return model, tok


def test_quantized_smollm2_outputs_match_dequantized_weights(small_model, tmp_path):
    model, tok = small_model
    ids = tok("The capital of France is Paris. It is known for", return_tensors="pt").input_ids
    inputs = {}
    quantize_model(model, QuantConfig(), progress=False)
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=n: inputs.__setitem__(name, (args[0].detach(), out.detach())))
        for n, m in model.named_modules() if isinstance(m, BinaryLinear)
    ]  # fmt: skip
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    assert torch.isfinite(logits).all()
    assert len(inputs) == 14
    for name, (x, y) in inputs.items():
        m = model.get_submodule(name)
        ref = F.linear(x.double(), m.dequantize().double())
        assert_close(y, ref, torch.float32, what=name)
    save_quantized(model, tmp_path / "q", tokenizer=tok)
    loaded, tok2, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert tok2 is not None and tok2(" hello").input_ids == tok(" hello").input_ids


def test_cli_quantize_then_eval_json(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", "--model", "smollm2-135m", "--method", "rtn", "--num-layers", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--text", "wiki", "--max-tokens", "1024", "--seqlen", "256", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "rtn" and res["tokens"] == 4 * 255
    assert res["ppl"] > 1 and res["bits_per_weight"] < 1.5
    assert res["linear_bytes"] < res["fp16_linear_bytes"] / 10
    parts = res["bits_per_weight_by_part"]  # rtn: one sign bit per weight, the rest scales and K padding
    assert sum(parts.values()) == pytest.approx(res["bits_per_weight"]) and parts["sign"] == 1.0
    assert "float_linear" not in parts and parts["unused_sign"] == parts["group"] == 0
    # Against itself: KL must vanish and the top-1 tokens must all agree.
    assert main(["eval", str(out), "--max-tokens", "512", "--seqlen", "256", "--json", "--compare-to", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(res["kl"]) < 1e-6 and res["top1_agree"] == 1.0
    assert main(["info", str(out)]) == 0
    assert main(["eval", str(tmp_path / "missing")]) == 2  # clear error, not a traceback


def test_cli_quantize_with_int8_head(tmp_path, capsys):
    """--head-dtype int8 stores the head (and the embedding tied to it) as int8 + scales: the
    checkpoint shrinks by the head's bytes and evaluates like the float-head checkpoint with
    the head compacted after loading."""
    out, ref = tmp_path / "h8", tmp_path / "fp-head"
    common = ["--model", "smollm2-135m", "--method", "rtn", "--num-layers", "2"]
    assert main(["quantize", *common, "--out", str(out), "--head-dtype", "int8"]) == 0
    assert main(["quantize", *common, "--out", str(ref)]) == 0
    capsys.readouterr()
    evals = {}
    for name, args in (("h8", [str(out)]), ("ref", [str(ref), "--head-dtype", "int8"])):
        assert main(["eval", *args, "--max-tokens", "512", "--seqlen", "256", "--json"]) == 0
        evals[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Not bit-equal: the reference compacts the fp16-stored embedding, --head-dtype the fp32 one.
    assert evals["h8"]["ppl"] == pytest.approx(evals["ref"]["ppl"], rel=2e-3)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))
    vocab, hidden = 49152, 576  # SmolLM2's tied head: fp16 in the reference checkpoint
    saved = vocab * hidden * 2 - (vocab * hidden + vocab * (hidden // 32) * 4)
    assert size(ref) - size(out) == pytest.approx(saved, abs=4096)
    assert main(["info", str(out)]) == 0
    assert "int8 head: lm_head, model.embed_tokens" in capsys.readouterr().out
