"""quantize_layer for every method: a real packed format v1, the right structure, and the
expected error ordering on a random anisotropic layer."""

import pytest
import torch
from helpers import one_thread_fixture

import onebit.quant.binarize as bz
from onebit.config import Method, QuantConfig
from onebit.format import Select, dequantize, unpack_bits, validate
from onebit.quant import layout_for, quantize_layer, quantize_weight
from onebit.quant.methods import MEAN_CGB_LAYOUT, MEAN_LAYOUT, RC_CGB_LAYOUT


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)

CAL = [m.value for m in Method if m is not Method.RTN]


def _layer(n=40, k=160, t=640, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, k, generator=g) * 0.2 + torch.diag(torch.rand(k, generator=g) * 2 + 0.2)
    X = torch.randn(t, k, generator=g) @ A
    Xq = X + 0.05 * torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, torch.randperm(k, generator=g)[:6]] *= 6
    return w, X, Xq


def _stats(X, Xq):
    t = X.shape[0]
    return 2 * Xq.T @ Xq / t, Xq.T @ X / t, Xq.T @ Xq / t


def _rel(w, q, Xq):
    return float((Xq @ (w - q).T).norm() / (Xq @ w.T).norm())


@pytest.fixture(scope="module")
def results():
    w, X, Xq = _layer()
    H, S, Sq = _stats(X, Xq)
    out = {}
    for m in ["rtn", *CAL]:
        cfg = QuantConfig(method=m, block_size=64, iters=5, iters_x=5, oa_iters=8)
        out[m] = quantize_layer(w, cfg, H=H, S=S, Sq=Sq, is_oa_layer=True)
    return w, X, Xq, out


@pytest.mark.parametrize("method", CAL)
def test_packed_structure(results, method):
    w, X, Xq, out = results
    p = out[method]
    validate(p)
    cfg = QuantConfig(method=method, block_size=64)
    assert p.layout == layout_for(cfg)
    assert p.out_scale.dtype == torch.float16
    W = dequantize(p)
    assert W.shape == w.shape and torch.isfinite(W).all()
    # every weight is covered by exactly one plane-0 term
    g = unpack_bits(p.groups, w.shape[1]).float()
    sel = {Select.ALL: torch.ones_like(g), Select.GROUP0: 1 - g, Select.GROUP1: g}
    cover = sum(
        sel[t.select] * (p.in_scale[i, : w.shape[1]] != 0).float() for i, t in enumerate(p.layout.terms) if t.plane == 0
    )
    assert (cover <= 1).all() and float(cover.mean()) > 0.99
    if method in ("billm", "arb", "arb-x"):
        assert p.mean is not None
        assert set(p.in_scale.float().unique().tolist()) <= {0.0, 1.0}
    else:
        assert p.mean is None


def test_layouts_are_named_constants():
    assert layout_for(QuantConfig(method="billm")) == MEAN_LAYOUT
    assert layout_for(QuantConfig(method="arb-x")) == MEAN_CGB_LAYOUT
    assert layout_for(QuantConfig(method="oa")) == RC_CGB_LAYOUT
    assert layout_for(QuantConfig(method="arb-rc", cgb=False)).n_terms == 4
    assert layout_for(QuantConfig(method="arb-rc", salient=False)).n_planes == 1


def test_error_ordering(results):
    w, X, Xq, out = results
    err = {m: _rel(w, dequantize(p), Xq) for m, p in out.items()}
    assert err["billm"] < err["rtn"]
    assert err["arb-rc"] < err["rtn"]
    assert err["arb"] < err["billm"]
    # OA aligns to the full-precision output X W^T
    fp = {m: float((X @ w.T - Xq @ dequantize(p).T).norm()) for m, p in out.items()}
    assert fp["oa"] < fp["arb-rc"]


def test_arbx_statistic_is_half_the_undamped_hessian(monkeypatch):
    w, X, Xq = _layer(n=8, k=128)
    H, S, Sq = _stats(X, Xq)
    seen = []
    orig = bz.weighted_refine

    def spy(wb, masks, fits, Sb, iters, free_mu=None):
        seen.append(Sb.clone())
        return orig(wb, masks, fits, Sb, iters, free_mu)

    monkeypatch.setattr(bz, "weighted_refine", spy)
    quantize_layer(w, QuantConfig(method="arb-x", block_size=64, percdamp=0.05), H=H)
    assert len(seen) == 2
    t = X.shape[0]
    for i, Sb in enumerate(seen):
        b = slice(64 * i, 64 * (i + 1))
        assert torch.allclose(Sb, Xq[:, b].T @ Xq[:, b] / t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("comp", ["off", "published", "exact"])
def test_compensation_modes_run_and_exact_helps(comp):
    w, X, Xq = _layer(seed=1)
    H, _, _ = _stats(X, Xq)
    p = quantize_layer(w, QuantConfig(method="arb-rc", block_size=32, compensation=comp), H=H)
    assert torch.isfinite(dequantize(p)).all()
    if comp == "exact":
        off = quantize_layer(w, QuantConfig(method="arb-rc", block_size=32, compensation="off"), H=H)
        assert _rel(w, dequantize(p), Xq) < _rel(w, dequantize(off), Xq)


def test_no_stats_paths():
    w, _, _ = _layer(n=8, k=96)
    assert quantize_weight(w, QuantConfig()).out_features == 8  # rtn unchanged
    with pytest.raises(ValueError, match="calibration"):
        quantize_weight(w, QuantConfig(method="billm"))
    p = quantize_layer(w, QuantConfig(method="arb-rc", block_size=32))  # H=None: weight space
    assert p.in_features == 96  # K not a multiple of the block: padded
    with pytest.raises(ValueError, match="OA"):
        quantize_layer(w, QuantConfig(method="oa"), is_oa_layer=True)
