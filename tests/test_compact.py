"""Format v2 (onebit.compact): the stored form against per-bit references, round trips to the
v1 execution layout, its checks, its bit accounting, and checkpoints of both versions."""

import json

import pytest
import torch
from helpers import LAYOUTS, random_dense, tiny_llama
from safetensors.torch import load_file, save_file

from onebit import BinaryLinear, QuantConfig
from onebit.checkpoint import CheckpointError, content_hash, load_quantized, save_quantized
from onebit.compact import (
    CompactWeight,
    bits_breakdown,
    compact,
    compact_shapes,
    expand,
    stored_bits,
    validate_compact,
)
from onebit.format import bits_breakdown as v1_bits_breakdown
from onebit.format import Layout, dequantize, pack
from onebit.format import stored_bits as v1_stored_bits
from onebit.models import decoder_linears, set_module
from onebit.quant.methods import quantize_layer
from onebit.reference import binary_linear_ref


def bit(word: int, j: int) -> int:
    """Bit j of a stored int32 word, read the obvious way (no tensor ops)."""
    return (int(word) & 0xFFFFFFFF) >> j & 1


def salient_columns_by_hand(layout, in_scale: torch.Tensor) -> list[int]:
    return [j for j in range(in_scale.shape[1]) if any(in_scale[t, j] != 0 for t, tm in enumerate(layout.terms) if tm.plane >= 1)]


@pytest.mark.parametrize("name", ["single", "cgb", "mean"])
@pytest.mark.parametrize("n,k,bs", [(5, 70, 32), (3, 96, 64), (4, 200, 128)])
def test_stored_bits_match_the_dense_input(name, n, k, bs):
    layout = LAYOUTS[name]
    d = random_dense(n, k, layout, bs, torch.Generator().manual_seed(n * k + bs))
    c = compact(pack(d["signs"], d["out_scale"], d["in_scale"], layout, bs, d["groups"], d["mean"], "float32"))
    assert c.signs.shape == (n, -(-k // 32))
    for i in range(n):
        for j in range(-(-k // 32) * 32):
            want = int(d["signs"][0, i, j] >= 0) if j < k else 0
            assert bit(c.signs[i, j // 32], j % 32) == want
            if layout.has_group:
                assert bit(c.groups[i, j // 32], j % 32) == (int(d["groups"][i, j]) if j < k else 0)
    assert torch.equal(c.in_scale, d["in_scale"])
    if layout.n_planes == 1:
        assert c.salient_cols is None and c.salient_signs is None
        return
    cols = salient_columns_by_hand(layout, d["in_scale"])
    assert c.salient_cols.tolist() == cols
    for p in range(1, layout.n_planes):
        for i in range(n):
            for s, j in enumerate(cols):
                assert bit(c.salient_signs[p - 1, i, s // 32], s % 32) == int(d["signs"][p, i, j] >= 0)


@pytest.mark.parametrize("name", ["single", "cgb", "mean"])
def test_expand_gives_the_same_weight_and_outputs(name):
    layout = LAYOUTS[name]
    d = random_dense(9, 150, layout, 64, torch.Generator().manual_seed(3))
    p = pack(d["signs"], d["out_scale"], d["in_scale"], layout, 64, d["groups"], d["mean"], "float16")
    e = expand(compact(p))
    assert torch.equal(dequantize(e), dequantize(p))
    x = torch.randn(4, 150)
    for act_bits in (16, 8):
        assert torch.equal(binary_linear_ref(x, e, act_bits), binary_linear_ref(x, p, act_bits))
    assert torch.equal(e.signs[0], p.signs[0]) and torch.equal(e.in_scale, p.in_scale)


@pytest.mark.parametrize("method", ["arb-rc", "billm"])
def test_quantizer_output_round_trips_bit_for_bit(method):
    """The quantizers fill unread plane-1 bits with 1, which is what expand() writes there."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 100, generator=g)
    x = torch.randn(256, 100, generator=g)
    H = 2 * x.T @ x / x.shape[0]
    p = quantize_layer(w, QuantConfig(method=method, block_size=32), H=H)
    c = compact(p)
    assert 0 < c.n_salient < 100
    e = expand(c)
    for name, t in p.tensors().items():
        assert torch.equal(getattr(e, name), t), name
    assert stored_bits(c) < v1_stored_bits(p)


def test_no_salient_columns_and_word_aligned_k():
    layout = LAYOUTS["cgb"]
    d = random_dense(6, 96, layout, 64, torch.Generator().manual_seed(2))
    for t, term in enumerate(layout.terms):
        if term.plane >= 1:
            d["in_scale"][t] = 0
    p = pack(d["signs"], d["out_scale"], d["in_scale"], layout, 64, d["groups"], d["mean"], "float32")
    c = compact(p)
    assert c.n_salient == 0 and c.salient_signs.shape == (1, 6, 0)
    assert torch.equal(dequantize(expand(c)), dequantize(p))
    assert p.signs.shape[-1] == 4 and c.signs.shape[-1] == 3  # K_pad = 128 vs 96: no block padding stored


def test_bits_breakdown_adds_up_and_accounts_for_the_savings():
    layout = LAYOUTS["cgb"]
    d = random_dense(16, 200, layout, 128, torch.Generator().manual_seed(4))
    d["in_scale"][3:, 20:] = 0  # few salient columns, as in real models
    p = pack(d["signs"], d["out_scale"], d["in_scale"], layout, 128, d["groups"], d["mean"], "float16")
    c = compact(p)
    parts, v1 = bits_breakdown(c), v1_bits_breakdown(p)
    assert sum(parts.values()) == stored_bits(c)
    assert parts["sign"] == v1["sign"] == 16 * 200 and parts["second_sign"] == v1["second_sign"] == 16 * c.n_salient
    assert parts["unused_sign"] == 0 and parts["salient_index"] == 32 * c.n_salient
    # Everything v2 drops is v1's unread plane bits, block padding and in_scale padding.
    in_pad = p.in_scale.numel() * 16 - c.in_scale.numel() * 16
    saved = v1["unused_sign"] + v1["padding"] - parts["padding"] - parts["salient_index"] + in_pad
    assert v1_stored_bits(p) - stored_bits(c) == saved > 0
    meta = CompactWeight(c.out_features, c.in_features, c.block_size, c.layout,
                         **{k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in c.tensors().items()})  # fmt: skip
    assert bits_breakdown(meta) == parts  # shapes only: works on checkpoint headers


def test_validate_compact_rejects_broken_weights():
    layout = LAYOUTS["cgb"]
    d = random_dense(4, 100, layout, 32, torch.Generator().manual_seed(5))
    good = compact(pack(d["signs"], d["out_scale"], d["in_scale"], layout, 32, d["groups"], None, "float32"))
    assert good.n_salient > 2

    def broken(**kw):
        fields = {**good.tensors(), **kw}
        return CompactWeight(good.out_features, good.in_features, good.block_size, layout, **fields)

    cols = good.salient_cols
    with pytest.raises(ValueError, match="increasing"):
        validate_compact(broken(salient_cols=cols.flip(0).contiguous()))
    with pytest.raises(ValueError, match="increasing"):
        validate_compact(broken(salient_cols=torch.cat([cols[:-1], cols.new_tensor([100])])))
    reads = good.in_scale.clone()
    missing = int(cols[0])
    with pytest.raises(ValueError, match="salient_cols"):  # a plane-1 term reads a column that is not stored
        validate_compact(broken(salient_cols=cols[1:].contiguous(), salient_signs=good.salient_signs, in_scale=reads))
    assert reads[[t for t, tm in enumerate(layout.terms) if tm.plane == 1], missing].abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        validate_compact(broken(signs=good.signs[:, :-1]))
    with pytest.raises(ValueError, match="int32"):
        validate_compact(broken(salient_cols=cols.long()))
    with pytest.raises(ValueError, match="salient"):
        compact_shapes(4, 100, 32, LAYOUTS["single"], 3)


# ---------------------------------------------------------------------------- checkpoints


def cgb_model(seed: int = 0):
    """A tiny Llama whose decoder linears hold random CGB-layout weights (salient columns)."""
    model = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    for name, lin in decoder_linears(model, QuantConfig()):
        d = random_dense(lin.out_features, lin.in_features, LAYOUTS["cgb"], 32, g)
        d["in_scale"][2:, torch.rand(lin.in_features, generator=g) < 0.8] = 0
        p = pack(d["signs"], d["out_scale"] * 0.02, d["in_scale"], LAYOUTS["cgb"], 32, d["groups"], None, "float16")
        set_module(model, name, BinaryLinear.from_packed(p, lin.bias))
    return model


def write_as_v1(d):
    """Rewrite a v2 checkpoint directory the way onebit 0.1 (format v1) wrote it."""
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    sd = load_file(d / "model.safetensors")
    for name, lm in qc["layers"].items():
        keys = [k for k in list(sd) if k.startswith(name + ".") and not k.endswith(".bias")]
        c = CompactWeight(lm["out_features"], lm["in_features"], lm["block_size"], Layout.from_dict(lm["layout"]),
                          **{k.rsplit(".", 1)[1]: sd.pop(k) for k in keys})  # fmt: skip
        sd.update({f"{name}.{k}": v for k, v in expand(c).tensors().items()})
        lm.pop("n_salient")
    qc["format_version"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    meta = {"format": "pt", "onebit_format_version": "1", "aliases": json.dumps({"lm_head.weight": "model.embed_tokens.weight"}),
            "content_sha256": content_hash(sd)}  # fmt: skip
    save_file(sd, str(d / "model.safetensors"), metadata=meta)


def test_cgb_checkpoint_round_trip_and_v1_checkpoints_still_load(tmp_path):
    model = cgb_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    d = save_quantized(model, tmp_path / "v2", config=QuantConfig(method="arb-rc", block_size=32))
    loaded, _, _ = load_quantized(d, tokenizer=False)
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)

    write_as_v1(d)
    assert json.loads((d / "config.json").read_text())["quantization_config"]["format_version"] == 1
    old, _, _ = load_quantized(d, tokenizer=False)
    assert any(m.n_salient for m in old.modules() if isinstance(m, BinaryLinear))
    with torch.no_grad():
        assert torch.equal(old(ids).logits, want)

    from transformers import AutoModelForCausalLM

    import onebit.hf  # noqa: F401  (registers the quantizer)

    with pytest.raises(CheckpointError, match="load_quantized"):
        AutoModelForCausalLM.from_pretrained(str(d))


# ---------------------------------------------------------------------------- 8-bit scales


def e4m3_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite float8_e4m3fn value and its 8-bit code, from the 256 bit patterns (independent of torch's rounding)."""
    codes = torch.arange(256, dtype=torch.int32)
    v = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    keep = torch.isfinite(v) & ~((v == 0) & (codes == 128))  # -0 duplicates +0
    return v[keep].double(), codes[keep]


def nearest_e4m3_times_pow2(t: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D t: the smallest e with max|row| <= 448 * 2^e, then each value to the
    nearest grid point x 2^e, ties to the even code (round half to even)."""
    grid, codes = e4m3_grid()
    out = torch.empty_like(t, dtype=torch.float64)
    for i in range(t.shape[0]):
        row = t[i].double()
        amax = float(row.abs().max())
        e = 0
        if amax > 0:
            e = -200
            while amax > 448 * 2.0**e:
                e += 1
        dist = (row.reshape(-1, 1) / 2.0**e - grid).abs()
        best = dist == dist.min(1, keepdim=True).values
        best &= (codes % 2 == 0) | (best.sum(1, keepdim=True) == 1)  # a tie: the even code
        out[i] = grid[best.int().argmax(1)].reshape(row.shape) * 2.0**e
    return out


def test_fp8_scales_round_to_the_nearest_e4m3_value_times_a_power_of_two():
    from onebit.compact import from_fp8, round_fp8, to_fp8

    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, 40, generator=g) * torch.tensor([1e-3, 0.3, 80.0]).reshape(3, 1)
    t[1, 0] = -t[1].abs().max() * 1.5  # a negative extreme (means) sets the exponent
    q, e = to_fp8(t)
    assert q.dtype == torch.float8_e4m3fn and e.dtype == torch.int32 and e.shape == (3,)
    want = nearest_e4m3_times_pow2(t)
    assert torch.equal(from_fp8(q, e, dtype=torch.float64), want)
    assert torch.equal(round_fp8(t[2]).double(), want[2])
    mask = torch.zeros(40)
    mask[:10] = 1  # the exponent from the masked values only (a term's own columns)
    assert torch.equal(round_fp8(t[2], t[2] * mask).double()[:10], nearest_e4m3_times_pow2(t[2:, :10])[0])


def per_block_reference(p):
    """out_scale and in_scale of p rounded with one exponent per (term, column block)."""
    t, n, nb = p.out_scale.shape
    bs, k = p.block_size, p.in_features
    out = nearest_e4m3_times_pow2(p.out_scale.float().transpose(1, 2).reshape(t * nb, n))
    out = out.reshape(t, nb, n).transpose(1, 2)
    ins = torch.nn.functional.pad(p.in_scale.float(), (0, nb * bs - p.in_scale.shape[1])).reshape(t * nb, bs)
    ins = nearest_e4m3_times_pow2(ins).reshape(t, nb * bs)[:, :k]
    return out, ins


def test_fp8_stored_weight_round_trips_and_runs():
    layout = LAYOUTS["cgb"]
    d = random_dense(12, 150, layout, 64, torch.Generator().manual_seed(8))
    p = pack(d["signs"], d["out_scale"] * 0.01, d["in_scale"], layout, 64, d["groups"], None, "float16")
    c = compact(p, "float8_e4m3fn")
    assert c.out_scale.dtype == c.in_scale.dtype == torch.float8_e4m3fn and c.scale_exp.shape == (3, 6, 3)
    e = expand(c)
    out, ins = per_block_reference(p)
    rounded = pack(d["signs"], out, ins, layout, 64, d["groups"], None, "float32")
    assert torch.equal(dequantize(e), dequantize(rounded))
    parts = bits_breakdown(c)
    assert parts["out_scale"] == 8 * p.out_scale.numel() and parts["scale_exp"] == 3 * 6 * 3 * 32
    assert sum(parts.values()) == stored_bits(c) < stored_bits(compact(p))
    m = BinaryLinear.from_packed(p, scale_dtype="float8_e4m3fn")
    x = torch.randn(3, 150)
    assert torch.allclose(m(x), binary_linear_ref(x, rounded), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scale_dtype"):
        compact(p, "int8")


@pytest.mark.parametrize("method", ["arb-rc", "billm"])
def test_fp8_quantizers_fit_with_the_stored_scales(method):
    """The quantizers round each (term, block) to 8 bits before compensating: storing the
    result in 8 bits then loses nothing."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 100, generator=g) * 0.02
    x = torch.randn(256, 100, generator=g)
    p = quantize_layer(w, QuantConfig(method=method, block_size=32, scale_dtype="float8_e4m3fn"), H=2 * x.T @ x / 256)
    assert p.out_scale.dtype == torch.float32
    assert torch.equal(dequantize(expand(compact(p, "float8_e4m3fn"))), dequantize(p))
    p16 = quantize_layer(w, QuantConfig(method=method, block_size=32), H=2 * x.T @ x / 256)
    assert not torch.equal(dequantize(p16), dequantize(p))


def test_fp8_checkpoint_round_trip_and_nan_rejected(tmp_path):
    model = cgb_model(seed=1)
    for m in model.modules():
        if isinstance(m, BinaryLinear):
            c = compact(m.packed, "float8_e4m3fn")
            for name, t in c.tensors().items():
                m.register_buffer(name, t) if name == "scale_exp" else setattr(m, name, t)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    d = save_quantized(model, tmp_path / "f8", config=QuantConfig(method="arb-rc", block_size=32, scale_dtype="float8_e4m3fn"))
    loaded, _, config = load_quantized(d, tokenizer=False)
    assert config.scale_dtype == "float8_e4m3fn"
    for k, t in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else got,
                                                    t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t), k  # fmt: skip
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    from transformers import AutoModelForCausalLM

    import onebit.hf  # noqa: F401

    hf = AutoModelForCausalLM.from_pretrained(str(d))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, want)
    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if k.endswith("out_scale"))
    sd[key].view(torch.uint8)[0, 0, 0] = 0x7F  # e4m3fn NaN
    meta = {"format": "pt", "onebit_format_version": "2", "aliases": json.dumps({"lm_head.weight": "model.embed_tokens.weight"}),
            "content_sha256": content_hash(sd)}  # fmt: skip
    save_file(sd, str(d / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="NaN"):
        load_quantized(d, tokenizer=False)


def test_quantizers_store_fp8_scales_when_asked():
    lin = torch.nn.Linear(64, 16)
    m = BinaryLinear.from_linear(lin, QuantConfig(scale_dtype="float8_e4m3fn", block_size=32))
    assert m.out_scale.dtype == torch.float8_e4m3fn and m.scale_exp is not None
    ref = BinaryLinear.from_linear(lin, QuantConfig(block_size=32))
    x = torch.randn(2, 64)
    assert torch.allclose(m(x), ref(x), rtol=0.1, atol=0.05 * float(ref(x).abs().max()))
