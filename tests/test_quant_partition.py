"""Partition search and the GPTQ block loop."""

import pytest
import torch
from helpers import one_thread_fixture

from onebit.config import QuantConfig, SalientMetric
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


# ---------------------------------------------------------------- fast searches vs the plain definitions


def _block(kind: str, n: int, c: int, seed: int = 0):
    """(w, R, S) of one GPTQ block: anisotropic rows/columns and a Hessian-diag saliency; with
    outliers; with one huge weight; or with ties: zero / constant rows, a dead column, and |w|
    on a coarse dyadic grid as the saliency (equal scores, thresholds equal to entries, many
    equal R values). w itself stays continuous: with exact ties in w, the sign of BIN2's
    stage-2 residual at an exact zero is rounding noise, and so is the S-weighted error."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * c, c, generator=g) * torch.exp(0.7 * torch.randn(1, c, generator=g))
    X = X + 0.3 * X[:, torch.randperm(c, generator=g)]  # correlated inputs
    H = 2 * X.T @ X / X.shape[0]
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    w = torch.randn(n, c, generator=g) * torch.exp(0.5 * torch.randn(1, c, generator=g))
    w = w * torch.exp(0.3 * torch.randn(n, 1, generator=g))
    if kind == "outliers":
        w[torch.rand(n, c, generator=g) < 0.01] *= 30
    if kind == "spike":  # one weight dominating the block: BIN2 fits its row almost exactly
        w[5, 7] = 300 * float(w.abs().max())
    if kind == "ties":
        w[1] = 0
        w[2] = 0.125
        w[:, 3] = 0
        return w, torch.round(w.abs() * 4) / 4, H / 2
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return w, pt.saliency(w, U.diagonal(), SalientMetric.HESSIAN), H / 2


BLOCKS = [("aniso", 64, 128, 50), ("outliers", 48, 128, 50), ("spike", 48, 128, 50), ("ties", 40, 96, 50),
          ("aniso", 24, 40, 50), ("outliers", 33, 64, 20), ("ties", 16, 48, 10)]  # fmt: skip


def _assert_same_or_tie(i_fast: int, i_ref: int, errs_ref: torch.Tensor):
    """The fast search picks the reference's candidate, unless two candidates tie to float
    precision (then its pick must be as good)."""
    if i_fast != i_ref:
        assert float(errs_ref[i_fast]) <= float(errs_ref.min()) * (1 + 1e-6), (i_fast, i_ref)


@pytest.mark.parametrize("kind,n,c,ms", BLOCKS)
def test_salient_search_matches_reference(kind, n, c, ms):
    _, R, _ = _block(kind, n, c, seed=n + c)
    order = pt._salient_order(R, ms)
    fast = pt.salient_errors(R, order)
    ref = pt.salient_errors_ref(R.double(), order)  # float64 reconstructions, one k at a time
    torch.testing.assert_close(fast, ref, rtol=2e-5, atol=1e-9 * float(ref.max()))
    sal, sal_ref = pt.search_salient(R, ms), pt.search_salient_ref(R.double(), ms)
    assert set(torch.nonzero(sal).flatten().tolist()) == set(order[: int(sal.sum())].tolist())
    _assert_same_or_tie(int(sal.sum()) - 1, int(sal_ref.sum()) - 1, ref)


def _candidate(g: torch.Tensor, R: torch.Tensor, cands: torch.Tensor) -> int:
    return next(i for i, p in enumerate(cands) if torch.equal(R.abs() >= p, g))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("cgb", [False, True])
@pytest.mark.parametrize("kind,n,c,ms", BLOCKS)
def test_split_search_matches_reference(kind, n, c, ms, cgb, weighted):
    w, R, S = _block(kind, n, c, seed=n + c)
    S = S if weighted else None
    for sal in (pt.search_salient(R, ms), torch.zeros(c, dtype=torch.bool)):
        cands = pt.split_candidates(R, sal, 81)
        fast = pt.split_errors(w, R, sal, cands, cgb, S)
        S64 = None if S is None else S.double()
        ref = pt.split_errors_ref(w.double(), R.double(), sal, cands.double(), cgb, S64)
        torch.testing.assert_close(fast, ref, rtol=1e-4 if weighted else 2e-5, atol=1e-9 * float(ref.max()))
        g = pt.search_split(w, R, sal, 81, cgb, S)
        g_ref = pt.search_split_ref(w.double(), R.double(), sal, 81, cgb, S64)
        _assert_same_or_tie(_candidate(g, R, cands), _candidate(g_ref, R, cands), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cgb", [False, True])
def test_searches_agree_on_cuda(cgb):
    w, R, S = _block("outliers", 96, 128)
    sal = pt.search_salient(R, 50)
    assert torch.equal(pt.search_salient(R.cuda(), 50).cpu(), sal)
    for SS in (None, S):
        cands = pt.split_candidates(R, sal, 81)
        e_cpu = pt.split_errors(w, R, sal, cands, cgb, SS)
        e_gpu = pt.split_errors(w.cuda(), R.cuda(), sal.cuda(), cands.cuda(), cgb, None if SS is None else SS.cuda())
        torch.testing.assert_close(e_gpu.cpu(), e_cpu, rtol=1e-5, atol=0)


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
