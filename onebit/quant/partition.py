"""BiLLM's per-block partition, extended by ARB-LLM's CGB (spec section 2).

A block (N x C columns) is split into
* salient columns (order-2 binarization), chosen by searching k in 1..max_salient-1 over the
  top-`max_salient` columns of the saliency score;
* a group bitmap g (N x C): concentrated (|R| < p, g = 0) and sparse (|R| >= p, g = 1)
  entries, p chosen among n_quantiles quantiles 0.10..0.90 of |R| over the non-salient
  entries. Under CGB the same bitmap also splits the salient columns.

Each candidate is scored by the closed-form error of BIN1 / BIN2 on its groups (per row, on a
group of n entries x with mean mu and d = x - mu):

* BIN1: sse = sum d^2 - (sum |d|)^2 / n.
* BIN2: a1 = mean |d|, s = sign(d), mu2 = -a1 sum(s) / n (sum d = 0), e = d - a1 s - mu2:
  sse = sum e^2 - (sum |e|)^2 / n.

Counts, sums and sums of squares of every candidate's groups are prefix sums: along the
score order for the (column-structured) salient sets, along each row sorted by |R| for the
threshold groups. Only the absolute deviations, which depend on each group's own mean, take
a pass over the entries per candidate; the salient search makes that pass over the top
columns only. ARB-X's S-weighted split builds each candidate's residual E directly.

The `*_ref` functions are the plain definitions (explicit reconstructions, one candidate at
a time): the executable spec and the tests' oracle.
"""

from __future__ import annotations

import torch

from onebit.config import SalientMetric
from onebit.quant.binarize import bin1, bin2, recon, weighted_error


def saliency(wb: torch.Tensor, u_diag: torch.Tensor, metric: SalientMetric) -> torch.Tensor:
    """R = W_b^2 / diag(U_bb)^2 (the OBS error of zeroing a weight) or |W_b|."""
    if metric is SalientMetric.HESSIAN:
        return wb.pow(2) / u_diag.pow(2).unsqueeze(0)
    return wb.abs()


# ------------------------------------------------------------------------- shared pieces


def _chunk_size(rows: int, cols: int, budget: int = 1 << 18) -> int:
    """Candidates per batch so that one (batch, rows, cols) buffer has ~budget elements:
    the passes are memory bound, and buffers this size stay in cache on CPU."""
    return max(1, budget // max(1, rows * cols))


class _Work:
    """Reused (batch, N, C) buffers for one search. Every pass writes into these (out=,
    in-place ops): a fresh multi-MB temporary per op costs ~3x the op itself on CPU."""

    def __init__(self, n_buf: int, shape: tuple, dtype: torch.dtype, device: torch.device):
        self.bufs = torch.empty((n_buf, *shape), dtype=dtype, device=device)

    def __call__(self, i: int, b: int) -> torch.Tensor:
        return self.bufs[i, :b]


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """[0, x_0, x_0 + x_1, ...] along the last dim."""
    return torch.cat([x.new_zeros(*x.shape[:-1], 1), x.cumsum(-1)], -1)


def _sub_own(out: torch.Tensor, x: torch.Tensor, f: tuple, v: torch.Tensor) -> torch.Tensor:
    """out = x minus the statistic of each entry's set: v (2, b, N) per set, f = the {0, 1}
    float masks of set 0 and set 1 (broadcastable to out). x - f0 v0 - f1 v1 is exact (one
    product is 0, the other v): unlike x - v0 - f1 (v1 - v0), which rounds at the scale of
    the larger set's statistic. Not torch.where: ~6x slower on CPU with broadcast operands."""
    return torch.addcmul(x, f[0], v[0].unsqueeze(-1), value=-1, out=out).addcmul_(f[1], v[1].unsqueeze(-1), value=-1)


def _own(out: torch.Tensor, f: tuple, v: torch.Tensor) -> torch.Tensor:
    """out = the statistic of each entry's set (see _sub_own)."""
    return torch.mul(f[0], v[0].unsqueeze(-1), out=out).addcmul_(f[1], v[1].unsqueeze(-1))


def _signf(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out = binarize.sign(x) (sign(0) = +1), the comparison written straight into floats
    (a bool result converted afterwards costs ~8x more on CPU)."""
    return torch.ge(x, 0, out=out).mul_(2).sub_(1)


def _pair_sums(v: torch.Tensor, f: tuple, tmp: torch.Tensor) -> torch.Tensor:
    """(2, b, N) float64 sums over the last dim of v on set 0 and on set 1 (masks f). Each set
    is summed on its own: the total minus one set loses the other's digits next to outliers."""
    return torch.stack([torch.mul(v, fi, out=tmp).sum(-1).double() for fi in f])


def _range_abs_sum(xs: torch.Tensor, P: torch.Tensor, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """sum_{lo <= r < hi} |xs[r] - t| per row and query; xs (N, M) sorted ascending,
    P = _prefix(xs), t / lo / hi (N, K): the entries below t and above t are two ranges."""
    m = torch.searchsorted(xs, t.contiguous()).clamp(lo, hi)
    below = t * (m - lo) - (P.gather(-1, m) - P.gather(-1, lo))
    above = (P.gather(-1, hi) - P.gather(-1, m)) - t * (hi - m)
    return below + above


class _SortedCols:
    """Columns that are in set 1 for every candidate (the salient search's non-top columns),
    sorted per row in float64 with prefix sums: their share of set 1's statistics for any
    candidate means, without a pass over them per candidate. Queries are (K, N)."""

    def __init__(self, x: torch.Tensor):
        self.xs = x.double().sort(-1).values.contiguous()
        self.P, self.P2 = _prefix(self.xs), _prefix(self.xs * self.xs)
        self.sum = self.P[:, -1]

    def stage1(self, mu: torch.Tensor):
        """sum |x - mu| and #(x >= mu) (K, N), and #(x < mu) (N, K): where the sorted rows
        split into sign -1 and sign +1, reused by stage2."""
        mu = mu.T.contiguous()
        neg = torch.searchsorted(self.xs, mu)
        full = torch.full_like(neg, self.xs.shape[1])
        absd = _range_abs_sum(self.xs, self.P, mu, torch.zeros_like(neg), full)
        return absd.T, (full - neg).T.double(), neg

    def stage2(self, mu: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, neg: torch.Tensor):
        """sum |e| and sum e^2 (K, N) with e = x - (mu + hi) for x >= mu, x - (mu + lo) for x < mu."""
        mu, hi, lo = mu.T, hi.T, lo.T
        zero, full = torch.zeros_like(neg), torch.full_like(neg, self.xs.shape[1])
        abse = _range_abs_sum(self.xs, self.P, mu + hi, neg, full) + _range_abs_sum(self.xs, self.P, mu + lo, zero, neg)
        e2 = self._range_sq_sum(mu + hi, neg, full) + self._range_sq_sum(mu + lo, zero, neg)
        return abse.T, e2.T

    def _range_sq_sum(self, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """sum_{lo <= r < hi} (xs[r] - t)^2 per row and query."""
        s1 = self.P.gather(-1, hi) - self.P.gather(-1, lo)
        s2 = self.P2.gather(-1, hi) - self.P2.gather(-1, lo)
        return s2 - 2 * t * s1 + (hi - lo) * t * t


def _bin1_pair(x, f, cnt, mu, ss, ws: _Work, residual: torch.Tensor | None = None):
    """BIN1 of two sets of the entries of x (f: float masks of set 0 and set 1, broadcastable
    to the (b, N, C) buffers), given each set's count, mean and sum d^2 (2, b, N): the per-row sse
    (2, b, N) float64, or, given a `residual` (b, N, C) tensor, x minus the fit written there."""
    b = cnt.shape[1]
    c1 = cnt.clamp_min(1)
    d = _sub_own(ws(0, b), x, f, mu.to(x.dtype))
    ad = torch.abs(d, out=ws(1, b))
    absd = _pair_sums(ad, f, ws(2, b))
    if residual is None:
        return ss - absd * absd / c1
    res = _sub_own(residual, ad, f, (absd / c1).to(x.dtype))  # d - a sign(d) = sign(d) (|d| - a)
    return res.mul_(_signf(ws(1, b), d))


def _bin2_pair(x, f, cnt, mu1, ws: _Work, residual: torch.Tensor | None = None, rest: _SortedCols | None = None):
    """BIN2 of two sets, as _bin1_pair (sum d^2 is not needed). `rest`: sorted columns that
    belong to set 1 besides the entries of x (already counted in cnt and mu1).

    sum e^2 is summed from e, not taken as sum d^2 - n (a1^2 + mu2^2): when BIN2 fits a row
    almost exactly (a lone outlier), that difference of large numbers is all rounding."""
    b, dt = cnt.shape[1], x.dtype
    c1 = cnt.clamp_min(1)
    d = _sub_own(ws(0, b), x, f, mu1.to(dt))
    posf = torch.ge(d, 0, out=ws(1, b))  # s = +1 (sign(0) = +1)
    absd = _pair_sums(torch.abs(d, out=ws(2, b)), f, ws(3, b))
    npos = _pair_sums(posf, f, ws(3, b))
    if rest is not None:
        ra, rp, neg = rest.stage1(mu1[1])
        absd[1] += ra
        npos[1] += rp
    a1 = absd / c1
    mu2 = -a1 * (2 * npos - cnt) / c1  # (sum d - a1 sum s) / n with sum d = 0
    # e = d - a1 s - mu2 = d - (mu2 - a1) - 2 a1 [d >= 0]
    e = _sub_own(ws(2, b), d, f, (mu2 - a1).to(dt)).addcmul_(posf, _own(ws(3, b), f, (2 * a1).to(dt)), value=-1)
    ae = torch.abs(e, out=ws(0, b))
    abse = _pair_sums(ae, f, ws(1, b))
    if residual is None:
        e2 = _pair_sums(torch.mul(e, e, out=ws(3, b)), f, ws(1, b))
        if rest is not None:
            ra, re2 = rest.stage2(mu1[1], (a1 + mu2)[1], (mu2 - a1)[1], neg)
            abse[1] += ra
            e2[1] += re2
        return e2 - abse * abse / c1
    res = _sub_own(residual, ae, f, (abse / c1).to(dt))  # e - a2 sign(e)
    return res.mul_(_signf(ws(3, b), e))


# ------------------------------------------------------------------------- salient columns


def _salient_order(R: torch.Tensor, max_salient: int) -> torch.Tensor:
    """The top-max_salient columns by sum_i |R_ij|, best first."""
    return R.abs().sum(0).argsort(descending=True)[: min(max_salient, R.shape[1])]


def search_salient(R: torch.Tensor, max_salient: int) -> torch.Tensor:
    """Salient column mask (C,) bool: the best top-k (k in 1..max_salient-1) columns by
    sum_i |R_ij|, scored by the error of reconstructing R with BIN2 on the top-k columns and
    BIN2 on the rest (searching on R, as the published code does). Ties: the smallest k."""
    sal = torch.zeros(R.shape[1], dtype=torch.bool, device=R.device)
    order = _salient_order(R, max_salient)
    if order.numel() >= 2:
        sal[order[: int(salient_errors(R, order).argmin()) + 1]] = True
    return sal


def salient_errors(R: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(top-1,) float64 error of k = 1..top-1: the sum over rows of the BIN2 sse on set
    A_k = columns order[:k] plus on set B_k = every other column.

    Counts and sums of both sets are prefix sums along `order`. The deviations of the top
    columns from each candidate's means take one (k, N, top) pass per quantity (top <= 50,
    instead of (k, N, C) passes for both sets); the other columns are in every B_k and are
    handled by _SortedCols. The means and the sorted columns are float64: B_k's sums add
    prefix sums over many columns, whose float32 rounding would reach the gaps between
    candidates.
    """
    n, c = R.shape
    top = order.numel()
    T = R[:, order]
    rest_cols = torch.ones(c, dtype=torch.bool, device=R.device)
    rest_cols[order] = False
    rest = _SortedCols(R[:, rest_cols])
    Td = T.double()
    PT1 = _prefix(Td)
    ks = torch.arange(1, top, device=R.device)
    step = _chunk_size(n, top, 1 << 20)  # few (K, N, top) chunks: this search has many small ops per chunk
    ws = _Work(4, (step, n, top), R.dtype, R.device)
    errs = []
    for i in range(0, top - 1, step):
        k = ks[i : i + step]
        inB = (torch.arange(top, device=R.device) >= k.unsqueeze(1)).to(R.dtype).unsqueeze(1)  # (K, 1, top)
        cnt = torch.stack([k, c - k]).double().unsqueeze(-1)  # (2, K, 1): set A, set B
        s = torch.stack([PT1[:, k].T, (PT1[:, -1:] - PT1[:, k]).T + rest.sum])
        sse = _bin2_pair(T, (1 - inB, inB), cnt, s / cnt, ws, rest=rest)
        errs.append(sse.clamp_min(0).sum((0, 2)))
    return torch.cat(errs)


def salient_errors_ref(R: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """salient_errors by explicit BIN2 reconstructions, one candidate at a time."""
    errs = []
    for k in range(1, order.numel()):
        m = torch.zeros_like(R)
        m[:, order[:k]] = 1
        q = recon(bin2(R, m), m) + recon(bin2(R, 1 - m), 1 - m)
        errs.append((R - q).pow(2).sum())
    return torch.stack(errs)


def search_salient_ref(R: torch.Tensor, max_salient: int) -> torch.Tensor:
    sal = torch.zeros(R.shape[1], dtype=torch.bool, device=R.device)
    order = _salient_order(R, max_salient)
    if order.numel() >= 2:
        sal[order[: int(salient_errors_ref(R, order).argmin()) + 1]] = True
    return sal


# ------------------------------------------------------------------------- group split


def split_candidates(R: torch.Tensor, sal: torch.Tensor, n_quantiles: int) -> torch.Tensor:
    """Thresholds p: quantiles 0.10..0.90 of |R| over the non-salient entries (empty if none)."""
    vals = R.abs()[:, ~sal].flatten()
    if vals.numel() == 0:
        return vals.new_zeros(0)
    qs = torch.linspace(0.10, 0.90, n_quantiles, device=R.device) if n_quantiles > 1 else torch.tensor([0.5])
    return torch.quantile(vals.float(), qs.to(vals.device))


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
    Ties: the first (lowest) quantile.
    """
    cands = split_candidates(R, sal, n_quantiles)
    if cands.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    return R.abs() >= cands[int(split_errors(w, R, sal, cands, cgb, S).argmin())]


class _Groups:
    """One column set of the block (non-salient, or salient under CGB) split by |R| >= p for
    every candidate p, fitted with BIN1 (order 1) or BIN2 (order 2) per group.

    Per group (0: |R| < p, 1: |R| >= p), candidate and row: count, mean and (for BIN1) sum
    d^2, each (2, B, N). Group 0 of p is a prefix of the row sorted by |R|, so these are
    prefix sums read at searchsorted(p): one sort per row instead of masked passes per
    candidate. float64: sum d^2 = sum x^2 - n mu^2 cancels when a group's mean is large
    against its spread.
    """

    def __init__(self, x: torch.Tensor, a: torch.Tensor, cands: torch.Tensor, order: int, step: int):
        self.x, self.a, self.cands, self.order, self.step = x, a, cands, order, step
        a_sorted, idx = a.sort(-1)
        xs = x.gather(-1, idx).double()
        P1, P2 = _prefix(xs), _prefix(xs * xs)
        cut = torch.searchsorted(a_sorted, cands.to(a.dtype).expand(a.shape[0], -1).contiguous())  # #(|R| < p)
        s0, q0 = P1.gather(-1, cut), P2.gather(-1, cut)
        cnt = torch.stack([cut.double(), a.shape[1] - cut.double()])
        s = torch.stack([s0, P1[:, -1:] - s0])
        q = torch.stack([q0, P2[:, -1:] - q0])
        self.cnt = cnt.transpose(1, 2)
        self.mu = (s / cnt.clamp_min(1)).transpose(1, 2)
        self.ss = (q - s * s / cnt.clamp_min(1)).transpose(1, 2)
        self.mask = torch.empty((2, step, *x.shape), dtype=x.dtype, device=x.device)  # groups 0, 1
        self.ws = _Work(3 if order == 1 else 4, (step, *x.shape), x.dtype, x.device)

    def fit(self, i: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Candidates cands[i : i + step]: per-row sse (2, b, N), or the residual written into
        `residual` (b, N, C')."""
        sl = slice(i, i + self.step)
        p = self.cands[sl]
        g1 = torch.ge(self.a, p.to(self.a.dtype).view(-1, 1, 1), out=self.mask[1, : p.numel()])  # the returned bitmap
        g = (torch.sub(1, g1, out=self.mask[0, : p.numel()]), g1)
        if self.order == 1:
            return _bin1_pair(self.x, g, self.cnt[:, sl], self.mu[:, sl], self.ss[:, sl], self.ws, residual)
        return _bin2_pair(self.x, g, self.cnt[:, sl], self.mu[:, sl], self.ws, residual)

    def errors(self) -> torch.Tensor:
        """(B,) sum over rows and groups of the sse, clamped at 0 per row and group."""
        sse = [self.fit(i) for i in range(0, self.cands.numel(), self.step)]
        return torch.cat(sse, 1).clamp_min(0).sum((0, 2))


def split_errors(
    w: torch.Tensor,
    R: torch.Tensor,
    sal: torch.Tensor,
    cands: torch.Tensor,
    cgb: bool,
    S: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) float64 score of each candidate threshold (see search_split).

    Unweighted, the errors separate by column set: each set is scored on its own columns.
    Under S the whole block's residual is needed: it is built per column set (non-salient
    first, then salient) against S permuted to that column order, so nothing is scattered.
    """
    n, c = w.shape
    a = R.abs()
    ns = ~sal
    has_sal = bool(sal.any())
    sets = [(ns, 1)] + ([(sal, 2)] if cgb and has_sal else [])
    if S is None:
        return sum(_Groups(w[:, m], a[:, m], cands, o, _chunk_size(n, int(m.sum()))).errors() for m, o in sets)
    step = _chunk_size(n, c)
    parts = [_Groups(w[:, m], a[:, m], cands, o, step) for m, o in sets]
    perm = torch.cat([m.nonzero().flatten() for m in (ns, sal)])
    Sp = S[perm][:, perm].to(w.dtype)
    ws = _Work(2, (step, n, c), w.dtype, w.device)  # E (columns in perm order), E @ Sp
    cn = int(ns.sum())
    if not cgb and has_sal:
        # The salient columns' (candidate-independent) BIN2 residual couples with the rest.
        sm = sal.to(w.dtype).expand_as(w)
        ws.bufs[0, :, :, cn:] = (w - recon(bin2(w, sm), sm))[:, sal]
    errs = []
    for i in range(0, cands.numel(), step):
        b = min(step, cands.numel() - i)
        E = ws(0, b)
        for part, cols in zip(parts, (slice(0, cn), slice(cn, c))):
            part.fit(i, E[:, :, cols])
        ES = torch.matmul(E, Sp, out=ws(1, b))
        errs.append(ES.mul_(E).sum((-1, -2)).double())
    return torch.cat(errs)


def split_errors_ref(
    w: torch.Tensor,
    R: torch.Tensor,
    sal: torch.Tensor,
    cands: torch.Tensor,
    cgb: bool,
    S: torch.Tensor | None = None,
) -> torch.Tensor:
    """split_errors by explicit reconstructions, one candidate at a time. Unweighted, only
    the candidate-dependent groups are scored (the non-CGB salient part is a constant)."""
    salf = sal.to(w.dtype).expand_as(w)
    nsf = 1 - salf
    errs = []
    for p in cands:
        g = (R.abs() >= p).to(w.dtype)
        masks = [(nsf * (1 - g), 1), (nsf * g, 1)]
        if cgb:
            masks += [(salf * (1 - g), 2), (salf * g, 2)]
        elif S is not None:
            masks.append((salf, 2))
        q = sum(recon(bin2(w, m) if order == 2 else [bin1(w, m)], m) for m, order in masks)
        keep = sum(m for m, _ in masks)  # the scored entries
        errs.append(weighted_error((w - q) * keep, S))
    return torch.stack(errs)


def search_split_ref(w, R, sal, n_quantiles, cgb, S=None) -> torch.Tensor:
    cands = split_candidates(R, sal, n_quantiles)
    if cands.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    return R.abs() >= cands[int(split_errors_ref(w, R, sal, cands, cgb, S).argmin())]
