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


def update_a_out(f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor) -> torch.Tensor:
    """a_i = (v_i . G_i) / (v_i Sq v_i^T), v_i = M_i * B_i * c. Rows with v Sq v^T = 0 keep a_i."""
    v = m * f.b * f.c.unsqueeze(0)
    den = ((v @ Sq) * v).sum(-1)
    ok = den > _EPS
    return torch.where(ok, (v * G).sum(-1) / den.clamp_min(_EPS), f.a)


def update_a_in(f: Fit, m: torch.Tensor, G: torch.Tensor, Sq: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (Sq * C + ridge) c = sum_i a_i (M*B)_ij G_ij, C = (M*B)^T diag(a^2) (M*B).

    The ridge is relative (ridge * mean diag), so it is scale-free; columns outside the
    term's mask get c = 0 (their row of the system is zero).
    """
    bm = m * f.b
    C = bm.T @ (f.a.pow(2).unsqueeze(1) * bm)
    A = Sq * C
    rhs = (f.a.unsqueeze(1) * bm * G).sum(0)
    d = A.diagonal()
    scale = d[d > 0].mean() if bool((d > 0).any()) else torch.ones((), device=A.device)
    A = A + (ridge * scale + _EPS) * torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(1), L).squeeze(1)
    return torch.linalg.lstsq(A, rhs.unsqueeze(1)).solution.squeeze(1)


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
    """Per column, the loss decrease of B[:, j] <- sign(Z[:, j]): 4 sum |Z| where it flips."""
    return (4 * Z.abs() * ((f.b * Z) < 0) * m).sum(0)


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
    """
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
                    _update_col(f, m, G, Sq_b, j, Q, M, gate)
                    track()
            else:
                for j in range(wb.shape[1]):
                    _update_col(f, m, G, Sq_b, j, Q, M, gate)
                    Q = total()
                track()
    for f, (a, b, c) in zip(fits, best_state):
        f.a, f.b, f.c = a, b, c
    return fits, {"loss_init": loss0, "loss": float(best)}


def _update_col(
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
