"""Evaluation: perplexity, agreement with a reference model, and speed.

Perplexity uses non-overlapping windows of `seqlen` tokens (the GPTQ / BiLLM protocol):
each window is scored independently, the first token of a window has no context and is
not scored, and the reported figure is exp(mean token NLL) over all scored tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None) -> torch.Tensor:
    if ids.dim() != 1:
        raise ValueError(f"expected 1-D token ids, got shape {tuple(ids.shape)}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"need at least seqlen={seqlen} tokens, got {ids.numel()}")
    return ids[: n * seqlen].reshape(n, seqlen)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Reference:
    """A reference model's next-token distributions on fixed windows, kept so that many
    quantized models can be compared with it without re-running it. log-probs are stored
    in fp16 (8192 tokens of a 49k vocabulary: 0.8 GB); the top-1 ids come from fp32."""

    windows: torch.Tensor  # (n, seqlen) token ids
    logprobs: torch.Tensor  # (n, seqlen - 1, vocab) float16
    top1: torch.Tensor  # (n, seqlen - 1) int64


@torch.no_grad()
def reference(model, ids: torch.Tensor, seqlen: int = 512, max_tokens: int | None = None, batch_size: int = 4,
              progress: bool = True) -> Reference:  # fmt: skip
    from tqdm.auto import tqdm

    win = _windows(ids, seqlen, max_tokens)
    lps, tops = [], []
    for i in tqdm(range(0, len(win), batch_size), desc="reference", disable=not progress, unit="batch"):
        lp = F.log_softmax(model(win[i : i + batch_size].to(_device(model))).logits[:, :-1].float().cpu(), -1)
        tops.append(lp.argmax(-1))
        lps.append(lp.half())
    return Reference(win, torch.cat(lps), torch.cat(tops))


def _kl_top1(lp: torch.Tensor, lq: torch.Tensor, q_top1: torch.Tensor) -> tuple[float, int]:
    """sum over positions of KL(q || p) and of [argmax p == argmax q]; lp, lq log-probs."""
    return float((lq.exp() * (lq - lp)).sum()), int((lp.argmax(-1) == q_top1).sum())


@torch.no_grad()
def score(
    model, ids: torch.Tensor | None = None, seqlen: int = 512, max_tokens: int | None = None, batch_size: int = 4,
    ref: Reference | None = None, progress: bool = True,
) -> dict:
    """{'ppl', 'nll' (mean, nats), 'tokens' (scored), 'windows', 'seqlen'}, plus 'kl' (mean
    per-token KL(ref || model)) and 'top1_agree' when a Reference is given (its windows are
    then the ones scored, and `ids` may be None)."""
    from tqdm.auto import tqdm

    win = ref.windows if ref is not None else _windows(ids, seqlen, max_tokens)
    dev = _device(model)
    total, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for i in tqdm(range(0, len(win), batch_size), desc="score", disable=not progress, unit="batch"):
        batch = win[i : i + batch_size].to(dev)
        # One log-softmax serves the NLL and, with a reference, the KL and top-1.
        lp = F.log_softmax(model(batch).logits[:, :-1].float(), -1)
        total -= float(lp.gather(-1, batch[:, 1:].unsqueeze(-1)).sum())
        count += batch[:, 1:].numel()
        if ref is not None:
            lp = lp.cpu()
            k, a = _kl_top1(lp, ref.logprobs[i : i + batch_size].float(), ref.top1[i : i + batch_size])
            kl_sum, agree = kl_sum + k, agree + a
    nll = total / count
    out = {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(win), "seqlen": win.shape[1]}
    if ref is not None:
        out.update(kl=kl_sum / count, top1_agree=agree / count)
    return out


def perplexity(
    model, ids: torch.Tensor, seqlen: int = 512, max_tokens: int | None = None, batch_size: int = 4, progress: bool = True
) -> dict:
    """{'ppl', 'nll' (mean, nats), 'tokens' (scored), 'windows', 'seqlen'}."""
    return score(model, ids, seqlen, max_tokens, batch_size, progress=progress)


@torch.no_grad()
def compare_to_reference(
    model, ref_model, ids: torch.Tensor, seqlen: int = 512, max_tokens: int | None = None, batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Mean per-token KL(ref || model) of next-token distributions, and top-1 agreement,
    running both models window batch by window batch (nothing cached)."""
    from tqdm.auto import tqdm

    win = _windows(ids, seqlen, max_tokens)
    kl_sum, agree, count = 0.0, 0, 0
    for i in tqdm(range(0, len(win), batch_size), desc="compare", disable=not progress, unit="batch"):
        batch = win[i : i + batch_size]
        lp = F.log_softmax(model(batch.to(_device(model))).logits.float().cpu(), -1)
        lq = F.log_softmax(ref_model(batch.to(_device(ref_model))).logits.float().cpu(), -1)
        k, a = _kl_top1(lp, lq, lq.argmax(-1))
        kl_sum, agree = kl_sum + k, agree + a
        count += lp.shape[0] * lp.shape[1]
    return {"kl": kl_sum / count, "top1_agree": agree / count, "tokens": count}


@torch.no_grad()
def speed(model, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, vocab: int | None = None) -> dict:
    """Prefill and greedy-decode tokens/s at batch 1 (median of `repeats`), with the KV cache."""
    dev = _device(model)
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(dev)
    pre, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        t1 = time.perf_counter()
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        pre.append(prompt_len / (t1 - t0))
        dec.append(new_tokens / (t2 - t1))
    return {"prefill_tok_s": sorted(pre)[len(pre) // 2], "decode_tok_s": sorted(dec)[len(dec) // 2],
            "prompt_len": prompt_len, "new_tokens": new_tokens}  # fmt: skip
