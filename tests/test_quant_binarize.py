"""Binarizers: hand-checked examples, and each refinement never worse than where it starts."""

import pytest
import torch
from helpers import one_thread_fixture

from onebit.quant import binarize as bz


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)


def _aniso(n=24, c=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed rows with different scales and column structure
    w = torch.randn(n, c, generator=g) * torch.rand(n, 1, generator=g) * 3
    w = w + 0.5 * torch.randn(1, c, generator=g) + torch.randn(n, c, generator=g).pow(3) * 0.2
    m = (torch.rand(n, c, generator=g) > 0.3).float()
    return w, m


def _err(w, m, fits):
    return float(((w - bz.recon(fits, m)) * m).pow(2).sum())


def test_bin1_hand_example():
    w = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    f = bz.bin1(w, torch.ones_like(w))
    assert f.mu.item() == 3.0 and f.a.item() == 1.5
    assert f.b.tolist() == [[-1.0, -1.0, 1.0, 1.0]]  # sign(0) = +1
    assert f.recon(torch.ones_like(w)).tolist() == [[1.5, 1.5, 4.5, 4.5]]


def test_bin1_respects_mask_and_empty_rows():
    w = torch.tensor([[1.0, 100.0, 3.0], [5.0, 6.0, 7.0]])
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    f = bz.bin1(w, m)
    assert f.mu.tolist() == [2.0, 0.0] and f.a.tolist() == [1.0, 0.0]
    assert f.recon(m).tolist() == [[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]


def test_bin2_hand_example():
    w = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    f1, f2 = bz.bin2(w, torch.ones_like(w))
    # residual [-0.5, 0.5, -1.5, 1.5]: mu2 = 0, alpha2 = 1, b2 = [-, +, -, +]
    assert f2.mu.item() == 0.0 and f2.a.item() == 1.0
    assert bz.recon([f1, f2], torch.ones_like(w)).tolist() == [[0.5, 2.5, 3.5, 5.5]]


@pytest.mark.parametrize("seed", [0, 1])
def test_arb_never_worse_than_bin(seed):
    w, m = _aniso(seed=seed)
    assert _err(w, m, [bz.arb1(w, m, 15)]) <= _err(w, m, [bz.bin1(w, m)]) + 1e-4
    assert _err(w, m, bz.arb2(w, m, 15)) <= _err(w, m, bz.bin2(w, m)) + 1e-4
    # order 2 beats order 1
    assert _err(w, m, bz.arb2(w, m, 15)) < _err(w, m, [bz.arb1(w, m, 15)])


def test_arb1_final_alpha_is_least_squares():
    w, m = _aniso(seed=2)
    f = bz.arb1(w, m, 5)
    base = _err(w, m, [f])
    for d in (1e-3, -1e-3):
        g = bz.Fit(a=f.a + d, b=f.b, mu=f.mu)
        assert _err(w, m, [g]) > base


def test_rc_refinement_and_ls_columns():
    w, m = _aniso(seed=3)
    init = bz._rc_init(w, m)
    f = bz.rc1(w, m, 15)
    assert _err(w, m, [f]) <= _err(w, m, [init]) + 1e-4
    # c is the least-squares column scale given r (the last step): perturbing it hurts
    base = _err(w, m, [f])
    for d in (1e-3, -1e-3):
        assert _err(w, m, [bz.Fit(a=f.a, b=f.b, c=f.c + d)]) > base
    two = bz.rc2(w, m, 15)
    assert _err(w, m, two) < base
    assert all(t.mu is None for t in two)


def test_nearest2_is_exact():
    g = torch.Generator().manual_seed(0)
    y, t0, t1 = (torch.randn(5000, generator=g) for _ in range(3))
    b0, b1 = bz._nearest2(y, t0, t1)
    e = (y - b0 * t0 - b1 * t1).abs()
    best = torch.stack([(y - s0 * t0 - s1 * t1).abs() for s0 in (1, -1) for s1 in (1, -1)]).min(0).values
    assert torch.allclose(e, best, atol=1e-6)
    assert set(b0.unique().tolist()) <= {-1.0, 1.0}


def _weighted_problem(seed: int, n: int = 16, c: int = 32):
    """An anisotropic weight, a correlated Gram S of 256 samples, a random two-group split; and
    the generator, positioned after them, for any further draws."""
    g = torch.Generator().manual_seed(seed)
    w, _ = _aniso(n, c, seed=seed)
    X = torch.randn(256, c, generator=g) @ (torch.randn(c, c, generator=g) * 0.5 + torch.eye(c))
    g0 = (torch.rand(n, c, generator=g) > 0.5).float()
    return w, X.T @ X / 256, g0, g


def test_weighted_refine_monotone():
    """ARB-X: each BCD pass over (mu, alpha) never increases sum_i r_i S r_i^T."""
    w, S, g0, _ = _weighted_problem(4)
    masks = [1 - g0, g0]
    fits = [bz.arb1(w, mk, 3) for mk in masks]
    prev = None
    for it in range(5):
        out = bz.weighted_refine(w, masks, fits, S, it)
        err = float(bz.weighted_error(w - sum(f.recon(mk) for f, mk in zip(out, masks)), S))
        if prev is not None:
            assert err <= prev * (1 + 1e-5) + 1e-6
        prev = err
    init = float(bz.weighted_error(w - sum(f.recon(mk) for f, mk in zip(fits, masks)), S))
    assert prev < init


def test_sign_is_the_plain_definition():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    assert torch.equal(bz.sign(x), (x >= 0).float() * 2 - 1)
    assert bz.sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("with_c", [False, True])
def test_weighted_refine_equals_reference(with_c):
    """The fast ARB-X refinement (basis products hoisted out of the loop) is bit-identical."""
    w, S, g0, g = _weighted_problem(5)
    c = w.shape[1]
    masks = [1 - g0, g0, g0]
    fits = [bz.arb1(w, masks[0], 3), *bz.arb2(w, masks[1], 3)]
    if with_c:  # RC-style terms: column scales, no mean
        fits = [bz.Fit(a=f.a, b=f.b, c=torch.rand(c, generator=g) + 0.5) for f in fits]
    free_mu = [True, True, False] if not with_c else [False] * 3
    fast = bz.weighted_refine(w, masks, fits, S, 7, free_mu)
    ref = bz.weighted_refine_ref(w, masks, fits, S, 7, free_mu)
    for f, r in zip(fast, ref):
        assert torch.equal(f.a, r.a)
        assert (f.mu is None and r.mu is None) or torch.equal(f.mu, r.mu)
