"""BiLLM's per-block partition, extended by ARB-LLM's CGB (spec section 2).

A block (N x C columns) is split into
* salient columns (order-2 binarization), chosen by searching k in 1..max_salient-1 over the
  top-`max_salient` columns of the saliency score;
* a group bitmap g (N x C): concentrated (|R| < p, g = 0) and sparse (|R| >= p, g = 1)
  entries, p chosen among n_quantiles quantiles 0.10..0.90 of |R| over the non-salient
  entries. Under CGB the same bitmap also splits the salient columns.

Candidates are evaluated in batches (a leading batch dim through the binarizers) rather
than a Python loop per candidate; `chunk` bounds the memory to chunk * N * C floats.
"""

from __future__ import annotations

import torch

from onebit.config import SalientMetric
from onebit.quant.binarize import bin1, bin2, recon, sign, weighted_error


def saliency(wb: torch.Tensor, u_diag: torch.Tensor, metric: SalientMetric) -> torch.Tensor:
    """R = W_b^2 / diag(U_bb)^2 (the OBS error of zeroing a weight) or |W_b|."""
    if metric is SalientMetric.HESSIAN:
        return wb.pow(2) / u_diag.pow(2).unsqueeze(0)
    return wb.abs()


def _chunk_size(n: int, c: int, budget: int = 1 << 22) -> int:
    return max(1, budget // max(1, n * c))


def search_salient(R: torch.Tensor, max_salient: int) -> torch.Tensor:
    """Salient column mask (C,) bool: the best top-k (k in 1..max_salient-1) columns by
    sum_i |R_ij|, scored by the MSE of reconstructing R with BIN2 on the top-k columns and
    BIN2 on the rest (searching on R, as the published code does)."""
    n, c = R.shape
    top = min(max_salient, c)
    sal = torch.zeros(c, dtype=torch.bool, device=R.device)
    if top < 2:
        return sal
    order = R.abs().sum(0).argsort(descending=True)[:top]
    ks = torch.arange(1, top, device=R.device)
    # rank[j] = position of column j in the score order (top columns only)
    rank = torch.full((c,), c, dtype=torch.long, device=R.device)
    rank[order] = torch.arange(top, device=R.device)
    best_err, best_k = None, 1
    # Small chunks: each candidate's (N, C) temporaries then stay in cache (2x faster on CPU).
    step = _chunk_size(n, c, 1 << 18)
    for i in range(0, len(ks), step):
        kk = ks[i : i + step]
        m = (rank.unsqueeze(0) < kk.unsqueeze(1)).to(R.dtype).unsqueeze(1)  # (B, 1, C), broadcast over rows
        err = _bin2_sse(R, m) + _bin2_sse(R, 1 - m)
        j = int(err.argmin())
        if best_err is None or err[j] < best_err:
            best_err, best_k = err[j], int(kk[j])
    sal[order[:best_k]] = True
    return sal


def _bin2_sse(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """||m * (w - BIN2(w))||^2 summed over rows, without forming the reconstructions.

    Stage 1 (BIN1): d = w - mu1, residual r = d - alpha1 * sign(d) on the mask. Stage 2 is
    BIN1 on r, whose error per row is sum (r - mu2)^2 - n alpha2^2 (see _bin1_sse). The
    mask may broadcast over rows (B, 1, C): no (B, N, C) mask is materialised.
    """
    cnt = m.sum(-1).clamp_min(1)
    mu1 = (w * m).sum(-1) / cnt
    d = w - mu1.unsqueeze(-1)
    a1 = (d.abs() * m).sum(-1) / cnt
    r = d - a1.unsqueeze(-1) * sign(d)
    mu2 = (r * m).sum(-1) / cnt
    e = (r - mu2.unsqueeze(-1)) * m
    a2 = e.abs().sum(-1) / cnt
    sse = e.pow(2).sum(-1) - cnt * a2.pow(2)
    return sse.clamp_min(0).sum(-1)


def _bin1_sse(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """||m * (w - BIN1(w))||^2 summed over rows, without forming the reconstruction:
    per row, sum (w - mu)^2 - n alpha^2 (alpha = mean |w - mu| is the LS scale for b = sign)."""
    cnt = m.sum(-1)
    wm = w * m
    s1 = wm.sum(-1)
    mu = s1 / cnt.clamp_min(1)
    s2 = (wm * w).sum(-1)
    ab = ((w - mu.unsqueeze(-1)).abs() * m).sum(-1)
    sse = s2 - mu * s1 - ab.pow(2) / cnt.clamp_min(1)
    return sse.clamp_min(0).sum(-1)


def search_split(
    w: torch.Tensor,
    R: torch.Tensor,
    sal: torch.Tensor,
    n_quantiles: int,
    cgb: bool,
    S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group bitmap (N, C) bool, True = sparse (|R| >= p).

    Each candidate p is scored by the error of reconstructing w with BIN1 per non-salient
    group (and BIN2 per salient group under CGB; otherwise the salient part does not depend
    on p). The score is ||E||^2, or tr(E S E^T) for ARB-X (S = the block's Gram). BIN1 is a
    cheap proxy for every method's binarizer *(choice)*: it keeps the search O(candidates).
    """
    n, c = w.shape
    ns = ~sal
    a = R.abs()
    vals = a[:, ns].flatten()
    if vals.numel() == 0:
        return torch.zeros(n, c, dtype=torch.bool, device=w.device)
    qs = torch.linspace(0.10, 0.90, n_quantiles, device=w.device) if n_quantiles > 1 else torch.tensor([0.5])
    cands = torch.quantile(vals.float(), qs.to(vals.device))
    salf, nsf = sal.float(), ns.float()
    fixed = None
    if S is not None and not cgb and bool(sal.any()):
        # Under S-weighting the salient columns' error couples with the rest: include their
        # (candidate-independent) BIN2 reconstruction so E is the whole block's error.
        sm = salf.expand_as(w)
        fixed = recon(bin2(w, sm), sm)
    best_err, best_p = None, cands[0]
    step = _chunk_size(n, c, 1 << 21)
    for i in range(0, len(cands), step):
        p = cands[i : i + step]
        g = (a.unsqueeze(0) >= p.view(-1, 1, 1)).float()  # (B, N, C)
        m0, m1 = nsf * (1 - g), nsf * g
        if S is None:
            # Unweighted errors separate by column set: score each group on its own columns
            # only (the salient columns are few, so the CGB order-2 part becomes cheap).
            wn, gn = w[:, ns], g[:, :, ns]
            err = _bin1_sse(wn, 1 - gn) + _bin1_sse(wn, gn)
            if cgb and bool(sal.any()):
                ws, gs = w[:, sal], g[:, :, sal]
                err = err + _bin2_sse(ws, 1 - gs) + _bin2_sse(ws, gs)
        else:
            q = recon([bin1(w, m0)], m0) + recon([bin1(w, m1)], m1)
            if cgb:
                s0, s1 = salf * (1 - g), salf * g
                q = q + recon(bin2(w, s0), s0) + recon(bin2(w, s1), s1)
            elif fixed is not None:
                q = q + fixed
            err = weighted_error(w - q, S)
        j = int(err.argmin())
        if best_err is None or err[j] < best_err:
            best_err, best_p = err[j], p[j]
    return a >= best_p
