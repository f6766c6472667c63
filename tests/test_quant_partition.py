"""Partition search and the GPTQ block loop."""

import pytest
import torch
from helpers import one_thread_fixture

from onebit.config import QuantConfig
from onebit.quant import binarize as bz
from onebit.quant import partition as pt
from onebit.quant.gptq import gptq_loop, prepare_hessian


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)


def _w(n=32, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, c, generator=g) * 0.1
    w[:, :5] *= 8  # a few clearly salient columns
    return w


def test_salient_search_returns_valid_top_columns():
    w = _w()
    R = w.pow(2)
    sal = pt.search_salient(R, 50)
    k = int(sal.sum())
    assert sal.dtype == torch.bool and sal.shape == (64,)
    assert 1 <= k <= 49
    top = set(R.abs().sum(0).argsort(descending=True)[:k].tolist())
    assert set(torch.nonzero(sal).flatten().tolist()) == top
    assert pt.search_salient(R, 0).sum() == 0 and pt.search_salient(R, 1).sum() == 0


def test_salient_search_picks_min_error_k():
    w = _w(seed=1)
    R = w.pow(2)
    sal = pt.search_salient(R, 20)
    order = R.sum(0).argsort(descending=True)

    def err(k):
        m = torch.zeros_like(R)
        m[:, order[:k]] = 1
        q = bz.recon(bz.bin2(R, m), m) + bz.recon(bz.bin2(R, 1 - m), 1 - m)
        return float((R - q).pow(2).sum())

    errs = [err(k) for k in range(1, 20)]
    assert err(int(sal.sum())) == pytest.approx(min(errs), rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("cgb", [False, True])
def test_split_is_valid_and_optimal_over_candidates(cgb, weighted):
    w = _w(seed=2)
    R = w.pow(2)
    sal = torch.zeros(64, dtype=torch.bool)
    sal[:5] = True
    S = None
    if weighted:  # ARB-X: tr(E S E^T) with S a Gram of correlated inputs
        gen = torch.Generator().manual_seed(9)
        X = torch.randn(256, 64, generator=gen) @ (torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64))
        S = X.T @ X / 256
    g = pt.search_split(w, R, sal, 9, cgb, S)
    assert g.shape == w.shape and g.dtype == torch.bool
    frac = float(g[:, ~sal].float().mean())
    assert 0.05 < frac < 0.95
    ns, sl = (~sal).float(), sal.float()

    def err(gb):  # explicit reconstruction, independent of the fast path
        gf = gb.float()
        q = sum(bz.recon([bz.bin1(w, m)], m) for m in (ns * (1 - gf), ns * gf))
        if cgb:
            q = q + sum(bz.recon(bz.bin2(w, m), m) for m in (sl * (1 - gf), sl * gf))
        else:
            q = q + bz.recon(bz.bin2(w, sl.expand_as(w)), sl.expand_as(w))
        e = w - q
        return float((e @ S * e).sum()) if weighted else float(e.pow(2).sum())

    cands = torch.quantile(R.abs()[:, ~sal].flatten(), torch.linspace(0.1, 0.9, 9))
    errs = [err(R.abs() >= p) for p in cands]
    assert err(g) == pytest.approx(min(errs), rel=1e-4)


def test_bin1_sse_fast_path():
    w = _w(seed=3)
    m = (torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    slow = float(((w - bz.recon([bz.bin1(w, m)], m)) * m).pow(2).sum())
    assert float(pt._bin1_sse(w, m)) == pytest.approx(slow, rel=1e-4)


def _h(k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3 + torch.eye(k))
    return 2 * X.T @ X / 512


def test_exact_compensation_is_optimal_for_a_fixed_first_block():
    """Quantize block 0 only (others pass through): exact compensation must give the
    closed-form optimum E_r = -E_0 H_0r H_rr^-1 of tr(E H E^T); published must be no better."""
    k, n = 96, 8
    H = _h(k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))

    def qblock(wb, ubb, b0, b1):
        return (bz.sign(wb) * wb.abs().mean() if b0 == 0 else wb.clone()), None

    res = {}
    for comp in ("exact", "published", "off"):
        cfg = QuantConfig(method="billm", block_size=32, compensation=comp, percdamp=0.0)
        Q, _ = gptq_loop(w, H, cfg, qblock)
        E = w - Q
        res[comp] = float(((E @ H) * E).sum())
        if comp == "exact":
            E0 = E[:, :32]
            Er = -E0 @ H[:32, 32:] @ torch.linalg.inv(H[32:, 32:])
            assert torch.allclose(E[:, 32:], Er, atol=1e-3 * float(Er.abs().max()))
    assert res["exact"] <= res["published"] * (1 + 1e-5)
    assert res["exact"] < res["off"]


def test_dead_inputs_and_damping():
    H = _h(64)
    H[5, :] = 0
    H[:, 5] = 0
    w = torch.randn(4, 64)
    Hd, wd = prepare_hessian(H, w, 0.01)
    assert Hd[5, 5] > 0 and (wd[:, 5] == 0).all()
    assert torch.isfinite(torch.linalg.cholesky(Hd)).all()
    cfg = QuantConfig(method="billm", block_size=32)
    Q, _ = gptq_loop(w, H, cfg, lambda wb, u, b0, b1: (bz.sign(wb) * 0.1, None))
    assert torch.isfinite(Q).all()
