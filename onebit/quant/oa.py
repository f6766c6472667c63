"""OA: output alignment for one block of columns of the final FC layer (spec section 4).

Objective (Q_b the block's reconstruction, sum of its terms):

    L = ||X_b W_b^T - Xq_b Q_b^T||^2 = const - 2 <Q_b, W_b S_b^T> + tr(Q_b Sq_b Q_b^T)

Each term t is Q_t = diag(a) (M_t * B) diag(c) on its mask M_t (a = a_out, c = a_in). With the
other terms Q_o fixed, L as a function of term t is  -2 <Q_t, G_t> + tr(Q_t Sq Q_t^T) + const,
G_t = W_b S_b^T - Q_o Sq_b; with one term and no mask this is the paper's setting and the
closed forms below reduce to the spec's. Running them per term with the others subtracted is
the block-coordinate (BCD) treatment of CGB groups.

AMP gates (choice A / B / off) use L_AMP = tr(Q M Q^T), M = (W_b S_b^T)^T (W_b S_b^T),
gradient G_amp = Q M. Gating a coordinate of the joint a_in solution can raise L, so the
best iterate seen is kept.

oa_refine runs the schedule on quantities kept up to date between steps, each term on its
own columns (see _Block); oa_refine_ref rebuilds everything from the fits at every step:
the executable spec and the tests' oracle.
"""

from __future__ import annotations

import torch

from onebit.config import AmpGate, BSchedule, QuantConfig
from onebit.quant.binarize import Fit, sign

_EPS = 1e-12


def oa_loss(Q: torch.Tensor, G0: torch.Tensor, Sq: torch.Tensor) -> torch.Tensor:
    """L - const = -2 <Q, W S^T> + tr(Q Sq Q^T), with G0 = W_b S_b^T."""
    return -2 * (Q * G0).sum() + ((Q @ Sq) * Q).sum()


# ---------------------------------------------------------------------------- closed forms


def a_out_system(f: Fit, m: torch.Tensor, Sq: torch.Tensor, cols: torch.Tensor | None = None):
    """v = M * B * c, v Sq and den_i = v_i Sq v_i^T: the a_out step is a_i = (v_i . G_i) / den_i.

    With `cols`, f and m hold only those columns of the block and Sq only those rows (v is
    zero on the others): v Sq is still (N, C)."""
    v = m * f.b * f.c.unsqueeze(0)
    vSq = v @ Sq
    return v, vSq, ((vSq if cols is None else vSq[:, cols]) * v).sum(-1)


def solve_a_out(a: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """a_i = num_i / den_i; rows with den = 0 (empty or degenerate) keep a_i."""
    return torch.where(den > _EPS, num / den.clamp_min(_EPS), a)


def update_a_out(f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor) -> torch.Tensor:
    """a_i = (v_i . G_i) / (v_i Sq v_i^T), v_i = M_i * B_i * c. Rows with v Sq v^T = 0 keep a_i."""
    v, _, den = a_out_system(f, m, Sq)
    return solve_a_out(f.a, (v * G).sum(-1), den)


def a_in_system(f: Fit, m: torch.Tensor, Sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M * B and the unridged matrix of the a_in step, Sq * C with C = (M*B)^T diag(a^2) (M*B)."""
    bm = m * f.b
    C = bm.T @ (f.a.pow(2).unsqueeze(1) * bm)
    return bm, Sq * C


def solve_a_in(A: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(A + ridge * mean(diag A) I) c = rhs: the ridge is relative, so it is scale-free;
    columns outside the term's mask get c = 0 (their row of A is zero)."""
    d = A.diagonal()
    scale = d[d > 0].mean() if bool((d > 0).any()) else torch.ones((), device=A.device)
    A = A + (ridge * scale + _EPS) * torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(1), L).squeeze(1)
    return torch.linalg.lstsq(A, rhs.unsqueeze(1)).solution.squeeze(1)


def update_a_in(f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (Sq * C + ridge) c = sum_i a_i (M*B)_ij G_ij, C = (M*B)^T diag(a^2) (M*B)."""
    bm, A = a_in_system(f, m, Sq)
    return solve_a_in(A, (f.a.unsqueeze(1) * bm * G).sum(0), ridge)


def presign(f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor) -> torch.Tensor:
    """Z = P - diag(a^2) (M*B) N_F,  P = diag(a) G diag(c),  N_F = diag(c) Sq diag(c), zero diag.

    The exact minimiser of L over one column j (others fixed) is B[:, j] = sign(Z[:, j]).
    """
    NF = f.c.unsqueeze(1) * Sq * f.c.unsqueeze(0)
    NF.fill_diagonal_(0)
    return f.a.unsqueeze(1) * G * f.c.unsqueeze(0) - f.a.pow(2).unsqueeze(1) * ((m * f.b) @ NF)


def presign_col(f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor, j: int) -> torch.Tensor:
    nf = f.c * Sq[:, j] * f.c[j]
    nf[j] = 0
    return f.a * G[:, j] * f.c[j] - f.a.pow(2) * ((m * f.b) @ nf)


def gain(Z: torch.Tensor, f: Fit, m: torch.Tensor) -> torch.Tensor:
    """Per column, the loss decrease of B[:, j] <- sign(Z[:, j]): 4 sum |Z| where it flips.

    |Z| - b Z is 2|Z| where b Z < 0 and 0 elsewhere (b = +-1), exactly: float ops only, no
    bool mask (a comparison into a bool tensor is ~4x slower on CPU)."""
    return 2 * ((Z.abs() - f.b * Z) * m).sum(0)


# ---------------------------------------------------------------------------- AMP gates


def _gate(gate: AmpGate, old: torch.Tensor, new: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if gate is AmpGate.OFF:
        return new
    if gate is AmpGate.A:
        return torch.where(grad > 0, new, old)
    return torch.where(torch.sign(new - old) == torch.sign(grad), new, old)


# ---------------------------------------------------------------------------- the schedule


def oa_refine(
    wb: torch.Tensor,
    S_b: torch.Tensor,
    Sq_b: torch.Tensor,
    fits: list[Fit],
    masks: list[torch.Tensor],
    active: list[bool],
    config: QuantConfig,
) -> tuple[list[Fit], dict]:
    """Algorithm 1 on one block, initialised from `fits` (the block's ARB-RC solution).

    fits: one Fit per term (a (N,), b (N, C), c (C,)), masks (N, C) {0,1}; `active` picks the
    terms OA updates (all for oa_cgb=bcd, the order-1 groups for oa_cgb=order1). Returns the
    best iterate and {"loss_init", "loss"} (L - const).

    The same steps as oa_refine_ref, with the quantities kept up to date instead of rebuilt
    (see _Block); equal to it up to float32 rounding, with the same sign and column choices
    on the tests' inputs.
    """
    st = _Block(wb, S_b, Sq_b, fits, masks, config)
    for it in range(config.oa_iters):
        st.refresh()
        for t in range(len(fits)):
            if not active[t] or not st.terms[t].cols:  # an empty group: no step changes it
                continue
            st.step_a_in(t)
            if (it + 1) % config.oa_k == 0:  # a_out every k-th iteration, never gated
                st.step_a_out(t)
            if config.b_schedule is BSchedule.TWO_COLUMNS:
                st.step_b_two(t)
            else:
                st.step_b_sweep(t)
    return st.result()


class _Term:
    """One term restricted to its support J (the columns its mask touches; a salient group
    has a few of the block's columns): its Fit, mask, rec = f.recon(m) (bit-equal), the rows
    Sq[J, :] and the columns M[:, J]. Columns outside J reconstruct nothing, so the term's
    steps never need them."""

    def __init__(self, f: Fit, m: torch.Tensor, Sq: torch.Tensor, M: torch.Tensor | None):
        self.J = (m != 0).any(0).nonzero().flatten()
        self.cols = self.J.tolist()
        J = self.J
        self.f = Fit(a=f.a.clone(), b=f.b[:, J], c=f.c[J])
        self.m = m[:, J]
        self.Sq_rows, self.Sq_JJ, self.dSq = Sq[J], Sq[J][:, J], Sq.diagonal()[J]
        self.M_cols = None if M is None else M[:, J]
        self.rec = self.f.recon(self.m)


class _Block:
    """The state of oa_refine on one block, and its steps.

    Kept up to date: each term's reconstruction rec (on its support, see _Term), their sum
    Q, and the residual gradient R = G0 - Q Sq, which is G_t - rec_t Sq for every term t
    (G_t = G0 - Q_o Sq, Q_o the other terms). Every step is written with R instead of G_t,
    which saves rebuilding G_t per step (a matmul each):

    * the loss: L = -2 <Q, G0> + <Q Sq, Q> = -<Q, G0 + R>;
    * a_in: sum_i a_i (M*B)_ij G_t,ij = sum_i a_i (M*B)_ij R_ij + (A c)_j, A = Sq * C;
    * a_out: v_i . G_t,i = v_i . R_i + a_i den_i, and R changes by -diag(da) v Sq;
    * the presign: Z = a G_t c - a^2 (M*B) N_F = a c R + a^2 (M*B) c^2 diag(Sq), because
      a_i c_j (rec Sq)_ij = a_i^2 ((M*B) N)_ij, and N_F is N without its diagonal;
    * a column update of term t changes Q by d e_j^T, so R -= d Sq[j, :] (rank 1).

    Only a new c moves R by a matmul. Q and R are rebuilt from the terms once per
    iteration, so incremental rounding does not accumulate. The best iterate is snapshot
    term by term: only terms changed since the last snapshot are copied.
    """

    def __init__(self, wb, S_b, Sq_b, fits, masks, config: QuantConfig):
        self.fits, self.Sq, self.config = fits, Sq_b, config
        self.G0 = wb @ S_b.T
        self.M = self.G0.T @ self.G0 if config.amp is not AmpGate.OFF else None
        self.terms = [_Term(f, m, Sq_b, self.M) for f, m in zip(fits, masks)]
        self.refresh()
        self.best = self.loss0 = self._loss()
        self.best_state = [_snapshot(tm.f) for tm in self.terms]
        self.dirty: set[int] = set()

    def refresh(self) -> None:
        self.Q = torch.zeros_like(self.G0)
        for tm in self.terms:
            self.Q.index_add_(1, tm.J, tm.rec)
        self.R = self.G0 - self.Q @ self.Sq

    def _loss(self) -> float:
        Q = self.Q.view(-1)
        return -float(torch.dot(Q, self.G0.view(-1)) + torch.dot(Q, self.R.view(-1)))

    def _track(self, t: int) -> None:
        """After a step on term t: keep the state if it is the best so far."""
        self.dirty.add(t)
        L = self._loss()
        if L < self.best:
            self.best = L
            for s in self.dirty:
                self.best_state[s] = _snapshot(self.terms[s].f)
            self.dirty.clear()

    def _new_rec(self, tm: _Term) -> torch.Tensor:
        """After a new a or c: the term's rec and Q; returns the change of rec."""
        new = tm.f.recon(tm.m)
        d = new - tm.rec
        tm.rec = new
        self.Q.index_add_(1, tm.J, d)
        return d

    def step_a_in(self, t: int) -> None:
        tm = self.terms[t]
        f = tm.f
        bm, A = a_in_system(f, tm.m, tm.Sq_JJ)
        a = f.a.unsqueeze(1)
        c_new = solve_a_in(A, (a * bm * self.R[:, tm.J]).sum(0) + A @ f.c, self.config.oa_ridge)
        if self.M is not None:
            grad = 2 * ((self.Q @ tm.M_cols) * a * bm).sum(0)
            c_new = _gate(self.config.amp, f.c, c_new, grad)
        f.c = c_new
        self.R.addmm_(self._new_rec(tm), tm.Sq_rows, alpha=-1)
        self._track(t)

    def step_a_out(self, t: int) -> None:
        tm = self.terms[t]
        f = tm.f
        v, vSq, den = a_out_system(f, tm.m, tm.Sq_rows, tm.J)
        a_new = solve_a_out(f.a, (v * self.R[:, tm.J]).sum(-1) + f.a * den, den)
        self.R.addcmul_((a_new - f.a).unsqueeze(1), vSq, value=-1)
        f.a = a_new
        self._new_rec(tm)
        self._track(t)

    def step_b_two(self, t: int) -> None:
        """The two columns with the largest loss decrease, one after the other."""
        tm = self.terms[t]
        f = tm.f
        done: list[int] = []
        for _ in range(min(2, f.b.shape[1])):
            a = f.a.unsqueeze(1)
            Z = torch.addcmul(a * self.R[:, tm.J] * f.c, a * a * (tm.m * f.b), f.c * f.c * tm.dSq)
            gn = gain(Z, f, tm.m)
            if done:
                gn[done] = -1
            jj = int(gn.argmax())
            done.append(jj)
            self._update_col(tm, jj, Z[:, jj])
            self._track(t)

    def step_b_sweep(self, t: int) -> None:
        tm = self.terms[t]
        f = tm.f
        for jj, j in enumerate(tm.cols):
            cj = f.c[jj]
            z = f.a * self.R[:, j] * cj + f.a * f.a * (tm.m[:, jj] * f.b[:, jj]) * (cj * cj * tm.dSq[jj])
            self._update_col(tm, jj, z)
        self._track(t)

    def _update_col(self, tm: _Term, jj: int, z: torch.Tensor) -> None:
        """B[:, j] <- sign(z) on the mask (rows independent, so gating rows is safe); j is
        the block column of the term's jj-th support column."""
        f, m, j = tm.f, tm.m, tm.cols[jj]
        old = f.b[:, jj]
        new = torch.where(m[:, jj] > 0, sign(z), old)
        if self.M is not None:
            grad = 2 * (self.Q @ self.M[:, j]) * f.a * f.c[jj]
            new = _gate(self.config.amp, old, new, grad)
        f.b[:, jj] = new
        q = f.a * new * f.c[jj] * m[:, jj]  # column jj of f.recon(m), the same products in order
        d = q - tm.rec[:, jj]
        tm.rec[:, jj] = q
        self.Q[:, j] += d
        self.R.addr_(d, self.Sq[j], alpha=-1)

    def result(self) -> tuple[list[Fit], dict]:
        """The best iterate as full-block Fits: a column outside a term's support keeps its
        initial b and c (they multiply a zero mask)."""
        out = []
        for f, tm, (a, b, c) in zip(self.fits, self.terms, self.best_state):
            fb, fc = f.b.clone(), f.c.clone()
            fb[:, tm.J], fc[tm.J] = b, c
            out.append(Fit(a=a, b=fb, c=fc))
        return out, {"loss_init": self.loss0, "loss": self.best}


def _snapshot(f: Fit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return f.a.clone(), f.b.clone(), f.c.clone()


# ---------------------------------------------------------------------------- the reference


def oa_refine_ref(
    wb: torch.Tensor,
    S_b: torch.Tensor,
    Sq_b: torch.Tensor,
    fits: list[Fit],
    masks: list[torch.Tensor],
    active: list[bool],
    config: QuantConfig,
) -> tuple[list[Fit], dict]:
    """oa_refine by the plain definitions: every quantity recomputed from the fits at every
    step (G, Q, the loss, the full presign matrix). The executable spec and the test oracle."""
    fits = [Fit(a=f.a.clone(), b=f.b.clone(), c=f.c.clone()) for f in fits]
    G0 = wb @ S_b.T
    M = G0.T @ G0 if config.amp is not AmpGate.OFF else None
    gate = config.amp

    def total() -> torch.Tensor:
        return sum(f.recon(m) for f, m in zip(fits, masks))

    Q = total()
    best = oa_loss(Q, G0, Sq_b)
    loss0 = float(best)
    best_state = [(f.a.clone(), f.b.clone(), f.c.clone()) for f in fits]

    def track() -> None:
        nonlocal best, best_state, Q
        Q = total()
        L = oa_loss(Q, G0, Sq_b)
        if L < best:
            best = L
            best_state = [(f.a.clone(), f.b.clone(), f.c.clone()) for f in fits]

    for it in range(config.oa_iters):
        for t, (f, m) in enumerate(zip(fits, masks)):
            if not active[t]:
                continue
            G = G0 - (Q - f.recon(m)) @ Sq_b
            # a_in
            c_new = update_a_in(f, m, G, Sq_b, config.oa_ridge)
            if M is not None:
                grad = 2 * ((Q @ M) * f.a.unsqueeze(1) * m * f.b).sum(0)
                c_new = _gate(gate, f.c, c_new, grad)
            f.c = c_new
            track()
            # a_out every k-th iteration; dL_AMP/da_out >= 0 for one term, so never gated
            if (it + 1) % config.oa_k == 0:
                G = G0 - (Q - f.recon(m)) @ Sq_b
                f.a = update_a_out(f, m, G, Sq_b)
                track()
            # B columns
            G = G0 - (Q - f.recon(m)) @ Sq_b
            if config.b_schedule is BSchedule.TWO_COLUMNS:
                done: list[int] = []
                for _ in range(min(2, wb.shape[1])):
                    gn = gain(presign(f, m, G, Sq_b), f, m)
                    if done:
                        gn[done] = -1
                    j = int(gn.argmax())
                    done.append(j)
                    _update_col_ref(f, m, G, Sq_b, j, Q, M, gate)
                    track()
            else:
                for j in range(wb.shape[1]):
                    _update_col_ref(f, m, G, Sq_b, j, Q, M, gate)
                    Q = total()
                track()
    for f, (a, b, c) in zip(fits, best_state):
        f.a, f.b, f.c = a, b, c
    return fits, {"loss_init": loss0, "loss": float(best)}


def _update_col_ref(
    f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor, j: int,
    Q: torch.Tensor, M: torch.Tensor | None, gate: AmpGate,
) -> None:  # fmt: skip
    """B[:, j] <- sign(Z[:, j]) on the mask (rows independent, so gating rows is safe)."""
    z = presign_col(f, m, G, Sq, j)
    old = f.b[:, j]
    new = torch.where(m[:, j] > 0, sign(z), old)
    if M is not None:
        grad = 2 * (Q @ M[:, j]) * f.a * f.c[j]
        new = _gate(gate, old, new, grad)
    f.b[:, j] = new
