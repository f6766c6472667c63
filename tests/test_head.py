"""The narrow head (onebit/head.py, csrc/cpu/dense.cpp) against float64 matmuls.

The reference widens the 16-bit weights (or int8 weights times their scales) to float64
(exact) and multiplies there, so the only differences allowed are the kernel's fp32 rounding
and accumulation (bounded by 2 K eps32 sum |w x|) and, for 16-bit outputs, one rounding to
the output dtype. int8 scales are checked against a loop over rows and groups written here.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from onebit.head import (
    Embedding8,
    Embedding16,
    Linear8,
    Linear16,
    compact_head,
    dense8_linear,
    dense8_linear_reference,
    dense16_linear,
    dense16_linear_reference,
    quantize_int8,
)

cpu = pytest.importorskip("onebit.backends.cpu")
_ok, _why = cpu.available("cpu")
ISAS = cpu.supported_isas() if _ok else []
needs_ext = pytest.mark.skipif(not _ok, reason=f"cpu backend unavailable: {_why}")


def _data(m: int, n: int, k: int, wdtype: torch.dtype, xdtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(wdtype)
    x = torch.randn(m, k, generator=g).to(xdtype)
    return x, w


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.double() @ w.double().T
    k = x.shape[-1]
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    if y.dtype != torch.float32:  # one rounding of the fp32 result to the 16-bit output
        bound = bound + ref.abs() * torch.finfo(y.dtype).eps
    err = (y.double() - ref).abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 5, 15), (2, 7, 16), (3, 67, 17), (4, 130, 33), (5, 64, 576), (16, 9, 40)])
def test_kernel_every_isa(isa, wdtype, m, n, k):
    x, w = _data(m, n, k, wdtype, torch.float32, seed=m * 1000 + n + k)
    _check(cpu.dense_linear(x, w, isa=isa), x, w)


@needs_ext
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes_and_3d(xdtype):
    x, w = _data(6, 33, 45, torch.float16, xdtype, seed=3)
    y = dense16_linear(x.reshape(2, 3, 45), w)
    assert y.shape == (2, 3, 33)
    _check(y.reshape(6, 33), x, w)


@needs_ext
def test_non_contiguous_input_and_bias():
    x, w = _data(8, 20, 24, torch.bfloat16, torch.float32, seed=4)
    xt = x.t().contiguous().t()  # same values, column-major strides
    bias = torch.randn(20)
    y = dense16_linear(xt, w)
    _check(y, x, w)
    torch.testing.assert_close(dense16_linear(xt, w, bias), y + bias, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 17, 40])
def test_paths_agree_with_reference(m):  # the kernel (where built) and the chunked F.linear path
    x, w = _data(m, 70, 50, torch.float16, torch.float32, seed=m)
    _check(dense16_linear(x, w), x, w)
    _check(dense16_linear_reference(x, w), x, w)


def test_reference_over_several_row_chunks():
    x, w = _data(2, 4096 + 5, 8, torch.bfloat16, torch.float32, seed=9)  # _CHUNK_ROWS + 5 rows
    _check(dense16_linear_reference(x, w), x, w)


def test_empty_shapes():
    w = torch.randn(3, 5).half()
    assert dense16_linear(torch.randn(0, 5), w).shape == (0, 3)
    y = dense16_linear(torch.randn(2, 4, 0), torch.zeros(3, 0, dtype=torch.float16))  # K = 0: sums of nothing
    assert y.shape == (2, 4, 3) and not y.any()


def test_bad_inputs():
    x, w = _data(2, 8, 16, torch.float16, torch.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        dense16_linear(x, w.float())
    with pytest.raises(ValueError, match="features"):
        dense16_linear(x[:, :15], w)
    with pytest.raises(ValueError, match="2-D"):
        dense16_linear(x, w[None])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dense16_linear(x.to(torch.int32), w)


@needs_ext
def test_extension_checks():
    ext = cpu._load_ext()
    x, w = _data(2, 8, 16, torch.float16, torch.float32)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or int8"):
        ext.dense_linear(x, w.float(), None, 0, -1)
    with pytest.raises(RuntimeError, match="columns"):
        ext.dense_linear(x[:, :15].contiguous(), w, None, 0, -1)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.dense_linear(x.t(), w, None, 0, -1)
    with pytest.raises(RuntimeError, match="int8 weights only"):
        ext.dense_linear(x, w, torch.ones(8, 1), 16, -1)
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu.dense_linear(x, w, isa="sse")


def test_compact_head_tied_llama():
    model = tiny_llama(layers=1, seed=1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    w32 = model.lm_head.weight.detach().clone()
    with torch.no_grad():  # the reference: the same model with the head's values rounded to fp16
        model.lm_head.weight.copy_(w32.half().float())
        want = model(ids).logits
    compact_head(model, torch.float16)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, Linear16) and isinstance(emb, Embedding16)
    assert head.weight.dtype == torch.float16 and emb.weight.data_ptr() == head.weight.data_ptr()  # one shared copy
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # decode-sized calls take the kernel path
        torch.testing.assert_close(model(ids[:1, :1]).logits, want[:1, :1], rtol=1e-4, atol=1e-4)
    assert compact_head(model, torch.float16) is model  # idempotent
    with pytest.raises(ValueError, match="already"):
        compact_head(model, torch.bfloat16)


def test_compact_head_refuses_overflow_and_bad_dtype():
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="use bfloat16"):
        compact_head(model, torch.float16)
    with pytest.raises(TypeError, match="float16, bfloat16 or int8"):
        compact_head(model, torch.float32)
    compact_head(model, torch.bfloat16)  # bf16 has the range
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_compact_head_save_and_load(tmp_path):
    from onebit import QuantConfig
    from onebit.checkpoint import load_quantized, save_quantized
    from onebit.models import quantize_model

    model = compact_head(quantize_model(tiny_llama(layers=1, seed=2), QuantConfig(block_size=32), progress=False))
    ids = torch.tensor([[1, 7, 30, 4]])
    with torch.no_grad():
        want = model(ids).logits
    save_quantized(model, tmp_path / "q")
    loaded, _, _ = load_quantized(tmp_path / "q")
    head = loaded.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # the model's own dtype again
    assert torch.equal(head.weight, model.get_output_embeddings().weight.float())  # the fp16 values, exactly
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_compact_head_untied_keeps_the_embedding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    emb = model.get_input_embeddings()
    compact_head(model, torch.bfloat16)
    assert model.get_input_embeddings() is emb and emb.weight.dtype == torch.float32  # not tied: left alone
    assert isinstance(model.get_output_embeddings(), Linear16)
    with torch.no_grad():
        assert model(torch.tensor([[3, 5, 8]])).logits.dtype == torch.float32



# ---------------------------------------------------------------------------- int8 weights


def _int8_by_loops(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8 written out row by row and group by group (the independent reference)."""
    n, k = w.shape
    ng = -(-k // group)
    q, scale = torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, ng)
    for i in range(n):
        for g in range(ng):
            cols = w[i, g * group : (g + 1) * group].double()
            s = cols.abs().max().item() / 127.0
            scale[i, g] = s
            if s > 0:
                s32 = torch.tensor(s, dtype=torch.float32).double()  # the fp32 scale the code divides by
                q[i, g * group : (g + 1) * group] = torch.round(cols / s32).clamp(-127, 127).to(torch.int8)
    return q, scale


def _dequant_by_loops(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    w = torch.zeros(q.shape, dtype=torch.float64)
    for g in range(scale.shape[1]):
        w[:, g * group : (g + 1) * group] = q[:, g * group : (g + 1) * group].double() * scale[:, g : g + 1].double()
    return w


def _check8(y, x, q, scale, group):
    _check(y, x, _dequant_by_loops(q, scale, group))


def _data8(m, n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of different ranges
    w[0, : min(k, group)] = 0  # an all-zero group
    q, scale = quantize_int8(w, group)
    return torch.randn(m, k, generator=g), q, scale, w


@pytest.mark.parametrize("n,k,group", [(3, 32, 32), (5, 40, 16), (4, 33, 32), (2, 7, 64), (6, 100, 100)])
def test_quantize_int8_matches_loops(n, k, group):
    _, q, scale, w = _data8(1, n, k, group, seed=n + k)
    q_ref, scale_ref = _int8_by_loops(w, group)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (n, -(-k // group))
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1  # a tie at .5 may round either way through fp32 division
    assert (q == q_ref).float().mean() > 0.99
    assert q.abs().max() <= 127 and not q[0, : min(k, group)].any()
    err = (_dequant_by_loops(q, scale, group) - w.double()).abs()  # within half a step of each group
    step = scale.repeat_interleave(group, 1)[:, :k].double()
    assert (err <= 0.5 * step * (1 + 1e-5) + 1e-12).all()


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k,group", [(1, 1, 1, 16), (1, 5, 15, 16), (2, 7, 16, 16), (3, 67, 17, 16), (4, 130, 33, 32),
                                         (5, 64, 576, 32), (16, 9, 40, 64), (3, 11, 50, 50), (1, 9, 96, 48)])
def test_int8_kernel_every_isa(isa, m, n, k, group):
    x, q, scale, _ = _data8(m, n, k, group, seed=m * 1000 + n + k)
    _check8(cpu.dense_linear(x, q, scale, group, isa), x, q, scale, group)


@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_paths_agree_with_reference(m, xdtype):  # the kernel (where built) and the chunked F.linear path
    if xdtype != torch.float32 and not _ok:
        pytest.skip("16-bit x without the kernel multiplies in 16 bits: outside the fp32 bound")
    x, q, scale, _ = _data8(m, 70, 50, 32, seed=m)
    x = x.to(xdtype)
    _check8(dense8_linear(x, q, scale, 32), x, q, scale, 32)
    x32 = x.float()  # the widened path multiplies in x's dtype: the fp32 bound holds for fp32 x
    _check8(dense8_linear_reference(x32, q, scale, 32), x32, q, scale, 32)
    bias = torch.randn(70)
    y3 = dense8_linear(x.reshape(1, m, 50), q, scale, 32, bias)
    assert y3.shape == (1, m, 70)
    torch.testing.assert_close(y3[0], dense8_linear(x, q, scale, 32) + bias.to(xdtype), rtol=0, atol=0)


def test_int8_reference_over_several_row_chunks():
    x, q, scale, _ = _data8(2, 4096 + 5, 48, 16, seed=9)
    _check8(dense8_linear_reference(x, q, scale, 16), x, q, scale, 16)


def test_int8_bad_inputs():
    x, q, scale, _ = _data8(2, 8, 64, 32)
    with pytest.raises(TypeError, match="int8"):
        dense8_linear(x, q.float(), scale, 32)
    with pytest.raises(ValueError, match="scale must be float32 of shape"):
        dense8_linear(x, q, scale[:, :1], 32)
    with pytest.raises(ValueError, match="scale must be float32 of shape"):
        dense8_linear(x, q, scale.half(), 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        dense8_linear(x, q, scale, 24)
    with pytest.raises(ValueError, match="not finite"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]), 16)
    with pytest.raises(ValueError, match="features"):
        dense8_linear(x[:, :63], q, scale, 32)


@needs_ext
def test_int8_extension_checks():
    ext = cpu._load_ext()
    x, q, scale, _ = _data8(2, 8, 64, 32)
    with pytest.raises(RuntimeError, match="needs scales"):
        ext.dense_linear(x, q, None, 32, -1)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.dense_linear(x, q, scale, 24, -1)
    with pytest.raises(RuntimeError, match="shape"):
        ext.dense_linear(x, q, scale.t().contiguous(), 32, -1)
    with pytest.raises(RuntimeError, match="shape"):
        ext.dense_linear(x, q, scale.double(), 32, -1)


def test_compact_head_int8_tied_llama():
    model = tiny_llama(layers=1, seed=1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    w32 = model.lm_head.weight.detach().clone()
    q_ref, s_ref = _int8_by_loops(w32, 16)
    with torch.no_grad():  # the reference: the same model with head and embedding set to the int8 values
        model.lm_head.weight.copy_(_dequant_by_loops(q_ref, s_ref, 16).float())
        want = model(ids).logits
        model.lm_head.weight.copy_(w32)
    compact_head(model, torch.int8, int8_group=16)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, Linear8) and isinstance(emb, Embedding8)
    assert head.weight.dtype == torch.int8 and emb.weight.data_ptr() == head.weight.data_ptr()  # one shared copy
    assert emb.scale.data_ptr() == head.scale.data_ptr()
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:1, :1]).logits, want[:1, :1], rtol=1e-4, atol=1e-4)  # decode-sized
    assert compact_head(model, torch.int8) is model
    with pytest.raises(ValueError, match="already"):
        compact_head(model, torch.float16)


def test_int8_head_refuses_to_be_saved(tmp_path):
    model = compact_head(tiny_llama(layers=1, seed=2), torch.int8)
    with pytest.raises(RuntimeError, match="int8 head"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="int8 head"):
        model.save_pretrained(tmp_path / "m")


# ---------------------------------------------------------------------------- under torch.compile


def test_dense_op_opcheck_and_compiled_heads():
    x = torch.randn(3, 48)
    w16 = (torch.randn(20, 48) * 0.05).half()
    q, scale = quantize_int8(torch.randn(20, 48), 16)
    torch.library.opcheck(torch.ops.onebit.dense_linear.default, (x, w16, None, 0))
    torch.library.opcheck(torch.ops.onebit.dense_linear.default, (x, q, scale, 16))
    bias = torch.randn(20)
    for head in (Linear16(w16, bias), Linear8(q, scale, 16, bias)):
        f = torch.compile(head, fullgraph=True, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(f(x.reshape(1, 3, 48)), head(x.reshape(1, 3, 48)), rtol=0, atol=0)


def test_compiled_decode_step_tiny_llama():
    """A quantized tiny Llama with an int8 head: decode steps under torch.compile(fullgraph=True)
    with a StaticCache give the eager logits (dynamo traces BinaryLinear and Linear8 as ops)."""
    from transformers import StaticCache

    from onebit import QuantConfig
    from onebit.models import quantize_model

    model = compact_head(quantize_model(tiny_llama(layers=2, seed=4), QuantConfig(block_size=32), progress=False), torch.int8,
                         int8_group=16)  # fmt: skip
    prompt = torch.tensor([[3, 17, 40, 9]])

    def run(step_fn, cache):
        cache.reset()
        logits = [model(prompt, past_key_values=cache, cache_position=torch.arange(4), use_cache=True).logits[:, -1]]
        tok = logits[-1].argmax(-1, keepdim=True)
        for i in range(4):
            logits.append(step_fn(tok, torch.tensor([4 + i]), cache)[:, -1])
            tok = logits[-1].argmax(-1, keepdim=True)
        return torch.stack(logits)

    def step(tok, pos, cache):
        return model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=16)
    with torch.no_grad():
        want = run(step, cache)
        got = run(torch.compile(step, fullgraph=True, backend="eager", dynamic=False), cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
