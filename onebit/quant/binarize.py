"""Binarizers for one masked group, vectorized over every row (and any leading batch dims).

Shapes: `w` is (..., N, C) (C = columns of one GPTQ block), `m` is a {0,1} float mask of the
same shape (or broadcastable), every per-row statistic is (..., N). A row whose mask is
empty gets zero scales, so it reconstructs to zero and contributes nothing.

Each binarizer returns a list of `Fit` terms; the reconstruction on the mask is

    w_hat = sum_t m * c_t[None, :] * (a_t[:, None] * b_t + mu_t[:, None])

with c_t = 1 for the mean-based methods (BIN1/BIN2/ARB), mu_t = 0 for ARB-RC. This is
exactly one term of packed format v1 (out_scale = a, mean = mu, in_scale = c), so the
methods hand these straight to `pack`. Leading batch dims let the partition search evaluate
many candidate masks at once (onebit.quant.partition).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


@dataclass
class Fit:
    """One binary term on a mask: a (..., N) row scale, b (..., N, C) in {-1,+1},
    mu (..., N) row mean or None, c (..., C) column scale or None (= 1)."""

    a: torch.Tensor
    b: torch.Tensor
    mu: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def recon(self, m: torch.Tensor) -> torch.Tensor:
        v = self.a.unsqueeze(-1) * self.b
        if self.mu is not None:
            v = v + self.mu.unsqueeze(-1)
        if self.c is not None:
            v = v * self.c.unsqueeze(-2)
        return v * m


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, as the packed format stores it."""
    # (x >= 0) * 2 - 1 rather than torch.where with scalars (a slow path on CPU), and the
    # comparison written straight into floats: a bool result converted afterwards costs ~4x.
    return torch.ge(x, 0, out=torch.empty_like(x)).mul_(2).sub_(1)


def _mmean(x: torch.Tensor, m: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    return (x * m).sum(-1) / cnt.clamp_min(1)


def recon(fits: list[Fit], m: torch.Tensor) -> torch.Tensor:
    out = fits[0].recon(m)
    for f in fits[1:]:
        out = out + f.recon(m)
    return out


# ---------------------------------------------------------------------------- BiLLM


def bin1(w: torch.Tensor, m: torch.Tensor) -> Fit:
    """BiLLM's binarizer: mu = mean(w), alpha = mean|w - mu|, b = sign(w - mu) on the mask."""
    cnt = m.sum(-1)
    mu = _mmean(w, m, cnt)
    d = w - mu.unsqueeze(-1)
    return Fit(a=_mmean(d.abs(), m, cnt), b=sign(d), mu=mu)


def bin2(w: torch.Tensor, m: torch.Tensor) -> list[Fit]:
    """BIN1, then BIN1 on the residual: two (alpha, mu) pairs (BiLLM's salient columns)."""
    f1 = bin1(w, m)
    f2 = bin1(w - f1.recon(m), m)
    return [f1, f2]


# ---------------------------------------------------------------------------- ARB


def arb1(w: torch.Tensor, m: torch.Tensor, iters: int) -> Fit:
    """ARB order 1: alternate mu, alpha, b (each an exact least-squares step), then refit alpha.

    Every step minimises ||m*(w - alpha*b - mu)||^2 in one variable, so the error never
    increases; the final alpha refit makes alpha optimal for the last signs.
    """
    cnt = m.sum(-1)
    f = bin1(w, m)
    a, b, mu = f.a, f.b, f.mu
    d = w - mu.unsqueeze(-1)
    for _ in range(iters):
        mu = _mmean(w - a.unsqueeze(-1) * b, m, cnt)
        d = w - mu.unsqueeze(-1)
        a = _mmean(b * d, m, cnt)
        b = sign(d)
    a = _mmean(b * d, m, cnt)
    return Fit(a=a, b=b, mu=mu)


def _nearest2(y: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, the (s0, s1) in {+-1}^2 minimising |y - s0*t0 - s1*t1| (t0, t1
    broadcastable to y).

    With big >= small >= 0 the four levels are +-big +-small, ordered, so the nearest is
    s_big = sign(y), s_small = sign(y - s_big*big): no 4-way argmin (slow on CPU). Signs of
    t0, t1 are folded in and out; which magnitude is bigger is decided per element.
    """
    a0, a1 = t0.abs(), t1.abs()
    first = a0 >= a1
    big = torch.maximum(a0, a1)
    sb = sign(y)
    ss = sign(y - sb * big)
    g0, g1 = sign(t0), sign(t1)
    b0 = torch.where(first, sb * g0, ss * g0)
    b1 = torch.where(first, ss * g1, sb * g1)
    return b0, b1


def arb2(w: torch.Tensor, m: torch.Tensor, iters: int) -> list[Fit]:
    """ARB order 2: w_hat = a1*b1 + a2*b2 + mu with a shared mu (stored on the first term).

    Gauss-Seidel on mu, a1, a2, then the joint nearest-of-four sign pick; a final scale refit
    after the last sign pick (never worse).
    """
    cnt = m.sum(-1)
    f1, f2 = bin2(w, m)
    a1, b1, a2, b2 = f1.a, f1.b, f2.a, f2.b
    mu = f1.mu + f2.mu
    u = lambda t: t.unsqueeze(-1)  # noqa: E731

    def scales(a1, a2, mu):
        """Also returns w - mu, which the sign pick reuses."""
        t2 = u(a2) * b2
        mu = _mmean(w - u(a1) * b1 - t2, m, cnt)
        wm = w - u(mu)
        a1 = _mmean(b1 * (wm - t2), m, cnt)
        a2 = _mmean(b2 * (wm - u(a1) * b1), m, cnt)
        return a1, a2, mu, wm

    for _ in range(iters):
        a1, a2, mu, wm = scales(a1, a2, mu)
        b1, b2 = _nearest2(wm, u(a1), u(a2))  # per-row levels: broadcast, no (N, C) copies
    a1, a2, mu, _ = scales(a1, a2, mu)
    return [Fit(a=a1, b=b1, mu=mu), Fit(a=a2, b=b2, mu=torch.zeros_like(mu))]


# ---------------------------------------------------------------------------- ARB-RC


def _rc_scales(mby: torch.Tensor, m: torch.Tensor, r: torch.Tensor, c: torch.Tensor):
    """One least-squares r step (given c) then c step (given r) for y ~ r_i c_j b_ij on m,
    given mby = m * b * y (fixed while b and y are: computed once by the caller)."""
    r = (mby * c.unsqueeze(-2)).sum(-1) / (m * c.unsqueeze(-2) ** 2).sum(-1).clamp_min(_EPS)
    c = (mby * r.unsqueeze(-1)).sum(-2) / (m * r.unsqueeze(-1) ** 2).sum(-2).clamp_min(_EPS)
    return r, c


def _rc_init(y: torch.Tensor, m: torch.Tensor) -> Fit:
    cnt_r = m.sum(-1)
    r = (y.abs() * m).sum(-1) / cnt_r.clamp_min(1)
    cnt_c = m.sum(-2)
    c = (y.abs() / r.unsqueeze(-1).clamp_min(_EPS) * m).sum(-2) / cnt_c.clamp_min(1)
    return Fit(a=r, b=sign(y), c=c)


def rc1(w: torch.Tensor, m: torch.Tensor, iters: int) -> Fit:
    """ARB-RC order 1: w_hat = r_i c_j b_ij, b = sign(w), alternating least squares on r, c."""
    f = _rc_init(w, m)
    r, c = f.a, f.c
    mby = m * f.b * w
    for _ in range(iters):
        r, c = _rc_scales(mby, m, r, c)
    return Fit(a=r, b=f.b, c=c)


def rc2(w: torch.Tensor, m: torch.Tensor, iters: int) -> list[Fit]:
    """ARB-RC order 2: two r*c*b terms; refit each against the other's residual, then re-pick
    (b0, b1) per element as the nearest of +-t0 +-t1; a final scale refit after the last pick."""
    f0 = rc1(w, m, iters)
    f1 = rc1(w - f0.recon(m), m, iters)

    def refit(f0: Fit, f1: Fit) -> tuple[Fit, Fit]:
        r, c = _rc_scales(m * f0.b * (w - f1.recon(m)), m, f0.a, f0.c)
        f0 = Fit(a=r, b=f0.b, c=c)
        r, c = _rc_scales(m * f1.b * (w - f0.recon(m)), m, f1.a, f1.c)
        return f0, Fit(a=r, b=f1.b, c=c)

    for _ in range(iters):
        f0, f1 = refit(f0, f1)
        t0 = f0.a.unsqueeze(-1) * f0.c.unsqueeze(-2)
        t1 = f1.a.unsqueeze(-1) * f1.c.unsqueeze(-2)
        b0, b1 = _nearest2(w, t0, t1)
        f0, f1 = Fit(a=f0.a, b=b0, c=f0.c), Fit(a=f1.a, b=b1, c=f1.c)
    return list(refit(f0, f1))


# ---------------------------------------------------------------------------- ARB-X


def weighted_refine(
    w: torch.Tensor,
    masks: list[torch.Tensor],
    fits: list[Fit],
    S: torch.Tensor,
    iters: int,
    free_mu: list[bool] | None = None,
) -> list[Fit]:
    """ARB-X: with every b frozen, closed-form updates of each term's mu and alpha minimising
    the S-weighted error  sum_i r_i S r_i^T,  r = w - sum_t recon_t  (rows independent).

    Block-coordinate over all terms of a block (the groups are coupled through S). For a
    coefficient x with basis v (per row), the exact minimiser given the rest is
    x += (v S r^T) / (v S v^T). Only terms with free_mu[t] get mu updates (ARB order-2's
    second term shares the first term's mu); rows where v S v^T = 0 keep their value.
    """
    if free_mu is None:
        free_mu = [f.mu is not None for f in fits]
    fits = [Fit(a=f.a.clone(), b=f.b, mu=None if f.mu is None else f.mu.clone(), c=f.c) for f in fits]
    rS = (w - sum(f.recon(m) for f, m in zip(fits, masks))) @ S
    tiny = 1e-10 * float(S.diagonal().abs().max().clamp_min(_EPS))
    # Every basis v is fixed (b frozen), so v S and v S v^T are computed once; only r S moves.
    steps = []  # (fit, attribute, v, v S, v S v^T > tiny, clamped v S v^T)
    for f, m, has_mu in zip(fits, masks, free_mu):
        mc = m if f.c is None else m * f.c.unsqueeze(-2)
        for name, v in [("a", mc * f.b)] + ([("mu", mc)] if has_mu else []):
            vS = v @ S
            den = (vS * v).sum(-1)
            steps.append((f, name, v, vS, den > tiny, den.clamp_min(_EPS)))
    for _ in range(iters):
        for f, name, v, vS, ok, den in steps:
            step = torch.where(ok, (v * rS).sum(-1) / den, torch.zeros_like(den))
            setattr(f, name, getattr(f, name) + step)
            rS -= step.unsqueeze(-1) * vS
    return fits


def weighted_refine_ref(w, masks, fits, S, iters, free_mu=None) -> list[Fit]:
    """weighted_refine as first written: every basis product recomputed at every step."""
    if free_mu is None:
        free_mu = [f.mu is not None for f in fits]
    fits = [Fit(a=f.a.clone(), b=f.b, mu=None if f.mu is None else f.mu.clone(), c=f.c) for f in fits]
    r = w - sum(f.recon(m) for f, m in zip(fits, masks))
    rS = r @ S
    tiny = 1e-10 * float(S.diagonal().abs().max().clamp_min(_EPS))
    colw = [m if f.c is None else m * f.c.unsqueeze(-2) for f, m in zip(fits, masks)]
    for _ in range(iters):
        for f, mc, has_mu in zip(fits, colw, free_mu):
            bases = [("a", mc * f.b)] + ([("mu", mc)] if has_mu else [])
            for name, v in bases:
                vS = v @ S
                den = (vS * v).sum(-1)
                ok = den > tiny
                step = torch.where(ok, (v * rS).sum(-1) / den.clamp_min(_EPS), torch.zeros_like(den))
                setattr(f, name, getattr(f, name) + step)
                rS = rS - step.unsqueeze(-1) * vS
    return fits


def weighted_error(e: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """tr(E S E^T) per leading batch entry (or ||E||^2 when S is None): summed over rows/cols."""
    if S is None:
        return e.pow(2).sum((-1, -2))
    return ((e @ S) * e).sum((-1, -2))
