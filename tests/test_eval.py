"""onebit.eval: perplexity, KL / top-1 against a cached reference, checked against a
direct float64 computation window by window."""

import math

import pytest
import torch

from onebit.eval import compare_to_reference, perplexity, reference, score

pytest.importorskip("transformers")
from helpers import tiny_llama  # noqa: E402


def _direct(model, ref_model, ids, seqlen):
    """Per window, per position, in float64: NLL of the next token, KL(ref || model), agreement."""
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for w in ids[: ids.numel() // seqlen * seqlen].reshape(-1, seqlen):
            lp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(ref_model(w[None]).logits[0, :-1].double(), -1)
            for t in range(seqlen - 1):
                nll -= float(lp[t, w[t + 1]])
                kl += float((lq[t].exp() * (lq[t] - lp[t])).sum())
                agree += int(lp[t].argmax() == lq[t].argmax())
                n += 1
    return nll / n, kl / n, agree / n, n


def test_score_against_direct_computation():
    model, ref_model = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    nll, kl, agree, n = _direct(model, ref_model, ids, 32)
    ref = reference(ref_model, ids, seqlen=32, batch_size=3, progress=False)
    got = score(model, ref=ref, batch_size=2, progress=False)
    assert got["tokens"] == n == 6 * 31 and got["windows"] == 6
    assert got["nll"] == pytest.approx(nll, rel=1e-5) and got["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert got["kl"] == pytest.approx(kl, rel=2e-3)  # reference log-probs are stored in fp16
    assert got["top1_agree"] == pytest.approx(agree)
    assert 0 < got["kl"] and 0 < got["top1_agree"] < 1  # two different models really differ
    streamed = compare_to_reference(model, ref_model, ids, seqlen=32, progress=False)
    assert streamed["kl"] == pytest.approx(kl, rel=1e-3)  # fp32 sum of small differences and streamed["top1_agree"] == pytest.approx(agree)
    assert perplexity(model, ids, seqlen=32, progress=False)["nll"] == pytest.approx(nll, rel=1e-5)


def test_self_reference_is_zero_kl_full_agreement():
    model = tiny_llama()
    ids = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(1))
    got = score(model, ref=reference(model, ids, seqlen=48, progress=False), progress=False)
    assert abs(got["kl"]) < 1e-4 and got["top1_agree"] == 1.0


def test_too_few_tokens_rejected():
    with pytest.raises(ValueError, match="at least seqlen"):
        perplexity(tiny_llama(), torch.arange(10), seqlen=32, progress=False)
