"""Generation with BinaryLinear models: model.generate() agrees with a manual argmax loop."""

import json

import pytest
import torch
from helpers import tiny_llama

from onebit import QuantConfig
from onebit.checkpoint import save_quantized
from onebit.models import quantize_model

pytest.importorskip("transformers")


def tiny_tokenizer():
    """Character-level fast tokenizer (100 tokens, fits tiny_llama's vocab of 128) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def save_tiny_checkpoint(path, seed: int = 0):
    """A quantized tiny Llama with the char tokenizer, written by save_quantized; returns the model."""
    model = quantize_model(tiny_llama(seed=seed), QuantConfig(block_size=32), progress=False)
    model.generation_config.eos_token_id = None  # random weights: let tests control the length
    save_quantized(model, path, tokenizer=tiny_tokenizer())
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from onebit.generate import load_for_generation

    d = tmp_path_factory.mktemp("gen") / "q"
    save_tiny_checkpoint(d)
    model, tok = load_for_generation(str(d))
    return d, model, tok


@torch.no_grad()
def _argmax_loop(model, ids: list[int], n: int) -> list[int]:
    """Reference: recompute the full sequence each step (no cache), take the argmax."""
    seq = torch.tensor([ids])
    for _ in range(n):
        nxt = model(seq, use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


def test_greedy_generate_matches_argmax_loop(loaded):
    from onebit.generate import Request, generate_batch
    from onebit.nn import BinaryLinear

    _, model, tok = loaded
    assert sum(isinstance(m, BinaryLinear) for m in model.modules()) == 14
    ids = tok("The cat sat on")["input_ids"]
    ref = _argmax_loop(model, ids, 12)
    with torch.no_grad():  # transformers' own generate() with the KV cache
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out[0, len(ids) :].tolist() == ref
    assert generate_batch(model, tok, [Request(ids, 12)])[0].token_ids == ref


def test_batched_left_padded_equals_single(loaded):
    from onebit.generate import Request, generate_batch

    _, model, tok = loaded
    prompts = ["a", "Hello there, how", "xyz 123"]
    reqs = [Request(tok(p)["input_ids"], n) for p, n in zip(prompts, (5, 9, 7))]
    batch = generate_batch(model, tok, reqs)
    for r, res in zip(reqs, batch):
        assert res.token_ids == _argmax_loop(model, r.prompt_ids, r.max_new_tokens)
        assert res.finish_reason == "length" and res.prompt_tokens == len(r.prompt_ids)
    with pytest.raises(ValueError, match="group"):
        generate_batch(model, tok, [Request([5], 2), Request([5], 2, temperature=0.7)])


def test_sampling_is_seeded_and_streams_in_order(loaded):
    from onebit.generate import Request, generate_batch

    _, model, tok = loaded
    ids = tok("sample me")["input_ids"]
    streamed = []
    a = generate_batch(model, tok, [Request(ids, 16, temperature=1.0, top_p=0.9, on_token=streamed.append)], seed=1)
    b = generate_batch(model, tok, [Request(ids, 16, temperature=1.0, top_p=0.9)], seed=1)
    c = generate_batch(model, tok, [Request(ids, 16, temperature=1.0, top_p=0.9)], seed=2)
    assert a[0].token_ids == b[0].token_ids == streamed and len(streamed) == 16
    assert a[0].token_ids != c[0].token_ids  # 16 tokens from a near-uniform distribution: a collision is ~0
    assert all(0 <= t < model.config.vocab_size for t in a[0].token_ids)


def test_eos_stops_a_row(loaded):
    from onebit.generate import Request, generate_batch

    _, model, tok = loaded
    ids = tok("stop")["input_ids"]
    first = generate_batch(model, tok, [Request(ids, 12, temperature=1.0)], seed=3)[0].token_ids
    p = next(i for i in range(2, 12) if first[i] not in first[:i])  # a token not sampled before position p
    model.generation_config.eos_token_id = first[p]  # acts as EOS; the same seed replays the same draws
    try:
        res = generate_batch(model, tok, [Request(ids, 12, temperature=1.0)], seed=3)[0]
    finally:
        model.generation_config.eos_token_id = None
    assert res.token_ids == first[:p] and res.finish_reason == "stop"


def test_cli_generate_prints_text_and_speed(loaded, capsys):
    from onebit.cli import main

    d, model, tok = loaded
    assert main(["generate", str(d), "--prompt", "The cat sat on", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = _argmax_loop(model, tok("The cat sat on")["input_ids"], 6)
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)
    assert out["new_tokens"] == 6 and out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0
    assert main(["generate", str(d), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "prefill" in text and "decode" in text and "tok/s" in text
    assert main(["generate", str(d), "--prompt", "hi", "--max-new-tokens", "0"]) == 2  # clear error, no traceback
    assert "max_new_tokens" in capsys.readouterr().err


def test_cancelled_row_stops_early(loaded):
    from onebit.generate import Request, generate_batch

    _, model, tok = loaded
    got = []
    req = Request(tok("cancel me")["input_ids"], 30, on_token=got.append, cancelled=lambda: len(got) >= 3)
    other = Request(tok("keep going")["input_ids"], 8)
    a, b = generate_batch(model, tok, [req, other])
    assert a.finish_reason == "cancelled" and a.token_ids == got and len(got) == 3
    assert len(b.token_ids) == 8 and b.finish_reason == "length"  # the other row is unaffected


def test_head_dtype_loads_a_16bit_head(loaded):
    """--head-dtype: the checkpoint's head and tied embedding become one fp16 copy; logits follow."""
    from onebit.generate import load_for_generation
    from onebit.head import Linear16

    d, model, _ = loaded
    m16, _ = load_for_generation(str(d), head_dtype="float16")
    head = m16.get_output_embeddings()
    assert isinstance(head, Linear16) and head.weight.dtype == torch.float16
    assert m16.get_input_embeddings().weight.data_ptr() == head.weight.data_ptr()
    ids = torch.tensor([[5, 17, 40, 3, 9]])
    with torch.no_grad():
        want, got = model(ids).logits, m16(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # the head's weights rounded to fp16


def test_head_dtype_loads_an_int8_head(loaded):
    """--head-dtype int8: one int8 copy with scales per group of 32; logits close to the float head's."""
    from onebit.generate import load_for_generation
    from onebit.head import Linear8

    d, model, _ = loaded
    m8, _ = load_for_generation(str(d), head_dtype="int8")
    head = m8.get_output_embeddings()
    assert isinstance(head, Linear8) and head.weight.dtype == torch.int8 and head.group_size == 32
    assert m8.get_input_embeddings().weight.data_ptr() == head.weight.data_ptr()
    ids = torch.tensor([[5, 17, 40, 3, 9]])
    with torch.no_grad():
        want, got = model(ids).logits, m8(ids).logits
    # int8 rounding of head and embedding (|error| <= half a step per weight): loose, and not zero
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    assert not torch.equal(got, want)


def test_compiled_generate_matches_eager(loaded, capsys):
    """compile=True: transformers' compiled decode with a static cache (on the CPU too, through
    onebit's CompileConfig) gives the eager greedy tokens; the compiling step is reported apart."""
    from onebit.cli import main
    from onebit.generate import generate
    from onebit.hf import OnebitHfQuantizer

    d, model, tok = loaded
    assert isinstance(model.hf_quantizer, OnebitHfQuantizer) and model.hf_quantizer.is_compileable
    ids = tok("The cat sat on")["input_ids"]
    ref = _argmax_loop(model, ids, 10)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    r = generate(model, tok, "The cat sat on", max_new_tokens=10, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did compile the decode step
    assert tok(r["text"], add_special_tokens=False)["input_ids"] == ref and r["new_tokens"] == 10
    assert r["compile_s"] > 0 and r["decode_tok_s"] > 0
    # Another prompt and length in the same 256-token bucket: the cache and the compiled step are reused.
    graphs = counters["stats"]["unique_graphs"]
    ids2 = tok("A dog")["input_ids"]
    r2 = generate(model, tok, "A dog", max_new_tokens=7, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert tok(r2["text"], add_special_tokens=False)["input_ids"] == _argmax_loop(model, ids2, 7)
    # A batch of two left-padded prompts (its own cache and graph): the eager batch's tokens.
    from onebit.generate import Request, generate_batch

    reqs = [Request(tok("The cat sat on")["input_ids"], 5), Request(tok("A")["input_ids"], 5)]
    eager = [r.token_ids for r in generate_batch(model, tok, reqs)]
    assert [r.token_ids for r in generate_batch(model, tok, reqs, compile=True)] == eager
    # the CLI flag (a newly loaded model: its own cache)
    assert main(["generate", str(d), "--prompt", "The cat", "--max-new-tokens", "4", "--compile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["new_tokens"] == 4 and out["compile_s"] > 0
