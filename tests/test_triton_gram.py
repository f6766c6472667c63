"""Fused Gram kernel (kernels/gram.py) in the Triton interpreter against torch in fp64.

Bound: each entry is an fp32 dot product of length T accumulated onto fp32 values, so
|err| <= gamma * (sum_t |xq_ti| |x_tj| + |old|) with gamma ~ T * 2^-24 (rigorous summation
bound, tiled order included); we assert 2x that, and also a scale-free max error.
"""

from __future__ import annotations

import pytest
import torch

gram = pytest.importorskip("onebit.kernels.gram", reason="triton is not installed")
from onebit.kernels.binary_linear import available

DEVICE = "cpu" if available("cpu")[0] else "cuda"
if not available(DEVICE)[0]:
    pytest.skip(f"Triton kernels cannot run here: {available(DEVICE)[1]}", allow_module_level=True)

EPS32 = 2.0**-24


def _inputs(t: int, k: int, kind: str, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g, dtype=torch.float64)
    if kind == "large":
        x *= 3e4  # squares ~1e9 summed over T: far from fp32 overflow, large absolute error scale
    elif kind == "outliers":
        x[:, torch.randperm(k, generator=g)[:3]] *= 1000.0  # LLM-style outlier channels
    elif kind == "offset":
        x += 50.0  # strongly non-zero mean: large cancellation-free sums, tiny relative differences
    xq = x + 0.05 * torch.randn(t, k, generator=g, dtype=torch.float64) * x.abs().mean()
    return xq.to(dtype), x.to(dtype)


def _check(sq, s, xq, x, sq0, s0, alpha):
    sq_ref, s_ref = sq0.double().clone(), s0.double().clone()
    gram.gram_update_ref(xq.double(), sq_ref, x.double(), s_ref, alpha)
    t = xq.shape[0]
    gamma = 2 * (t + 2) * EPS32
    absq = abs(alpha) * (xq.double().abs().T @ xq.double().abs()) + sq0.double().abs()
    abss = abs(alpha) * (xq.double().abs().T @ x.double().abs()) + s0.double().abs()
    upper = torch.triu(torch.ones_like(sq_ref, dtype=torch.bool))
    err_sq = (sq.double() - sq_ref).abs()
    assert bool((err_sq[upper] <= gamma * absq[upper] + 1e-30).all()), f"Sq max err {err_sq[upper].max():.3g}"
    assert torch.equal(sq[~upper], sq0[~upper]), "the strictly lower triangle of Sq must be untouched"
    err_s = (s.double() - s_ref).abs()
    assert bool((err_s <= gamma * abss + 1e-30).all()), f"S max err {err_s.max():.3g}"
    assert float(err_s.max() / s_ref.abs().max()) < 1e-5


@pytest.mark.parametrize("kind", ["random", "large", "outliers", "offset"])
@pytest.mark.parametrize("t,k", [(1, 5), (77, 70), (130, 33)])  # T, K not multiples of the tiles
def test_gram_matches_fp64(kind, t, k):
    xq, x = _inputs(t, k, kind, seed=t + k)
    g = torch.Generator().manual_seed(1)
    sq0 = torch.randn(k, k, generator=g)  # accumulate onto existing values
    s0 = torch.randn(k, k, generator=g)
    sq, s = sq0.clone().to(DEVICE), s0.clone().to(DEVICE)
    alpha = 2.0 / 300
    gram.gram_update_triton(xq.to(DEVICE), sq, x.to(DEVICE), s, alpha=alpha)
    _check(sq.cpu(), s.cpu(), xq, x, sq0, s0, alpha)


def test_gram_accumulates_over_calls_and_half_inputs():
    """Streaming use: several batches (one in bf16) add up to the Gram of the concatenation."""
    k = 40
    sq = torch.zeros(k, k, device=DEVICE)
    s = torch.zeros(k, k, device=DEVICE)
    batches = [_inputs(t, k, "random", seed=t) for t in (9, 31, 64)]
    batches[1] = tuple(b.to(torch.bfloat16) for b in batches[1])
    for xq, x in batches:
        gram.gram_update_triton(xq.to(DEVICE), sq, x.to(DEVICE), s)
    xq_all = torch.cat([b[0].double() for b in batches])
    x_all = torch.cat([b[1].double() for b in batches])
    _check(sq.cpu(), s.cpu(), xq_all, x_all, torch.zeros(k, k), torch.zeros(k, k), 1.0)
    full = gram.symmetrize_upper(sq.cpu())
    assert torch.equal(full, full.T)


def test_gram_without_s_and_strided_rows():
    xq, _ = _inputs(50, 2 * 36, "random", seed=3)
    xv = xq[::2, 5:41]  # row stride 144, unit stride along K
    sq = torch.zeros(36, 36, device=DEVICE)
    gram.gram_update_triton(xv.to(DEVICE), sq)
    ref = torch.zeros(36, 36, dtype=torch.float64)
    gram.gram_update_ref(xv.double(), ref)
    upper = torch.triu(torch.ones(36, 36, dtype=torch.bool))
    assert float((sq.cpu().double() - ref)[upper].abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize("cfg", gram.CONFIGS, ids=str)
def test_every_gram_config(cfg):
    xq, x = _inputs(45, 70, "outliers", seed=4)
    sq, s = torch.zeros(70, 70, device=DEVICE), torch.zeros(70, 70, device=DEVICE)
    gram.gram_update_triton(xq.to(DEVICE), sq, x.to(DEVICE), s, config=cfg)
    _check(sq.cpu(), s.cpu(), xq, x, torch.zeros(70, 70), torch.zeros(70, 70), 1.0)


def test_gram_bad_inputs():
    sq = torch.zeros(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        gram.gram_update_triton(torch.zeros(3, 4, device=DEVICE), torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        gram.gram_update_triton(torch.zeros(3, 4, device=DEVICE), sq, torch.zeros(2, 4, device=DEVICE), sq.clone())
    with pytest.raises(ValueError, match="S needs"):
        gram.gram_update_triton(torch.zeros(3, 4, device=DEVICE), sq, None, sq.clone())
    with pytest.raises(TypeError):
        gram.gram_update_triton(torch.zeros(3, 4, dtype=torch.int32, device=DEVICE), sq)
