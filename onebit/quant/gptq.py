"""The GPTQ-style block loop shared by every calibrated method (spec section 1.4).

    H += percdamp * mean(diag H) * I      (dead inputs: H[j,j] = 1, W[:, j] = 0 first)
    U  = upper Cholesky factor of H^-1
    for each block b of columns: Q_b = quantize(W_b) as a whole, then
        E = (W_b - Q_b) / diag(U_bb)      published (BiLLM / ARB-LLM code)
        E = (W_b - Q_b) U_bb^-1           exact for a block fixed as a whole
        W[:, after] -= E @ U[b, after]

The published update ignores the off-diagonal of U_bb; the exact one is a triangular solve
of the same cost. There is no column-by-column compensation inside a block.
"""

from __future__ import annotations

from typing import Callable

import torch

from onebit.config import Compensation, QuantConfig

# quantize_block(wb, u_bb, b0, b1) -> (q_b dense (N, C), whatever the caller wants kept)
BlockFn = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, object]]


def prepare_hessian(H: torch.Tensor, w: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped H and the weight with dead inputs zeroed (both fp32 copies)."""
    H = H.detach().float().clone()
    w = w.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return H, w


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """U with U^T U = H^-1, U upper triangular (GPTQ's factor). Retries with more damping
    if H is numerically indefinite (e.g. fewer tokens than columns)."""
    damp = 0.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = max(damp * 10, 1e-6 * float(H.diagonal().mean()))
    raise ValueError("Hessian is not positive definite even after extra damping; check the calibration data")


def gptq_loop(
    w: torch.Tensor, H: torch.Tensor | None, config: QuantConfig, quantize_block: BlockFn
) -> tuple[torch.Tensor, list[object]]:
    """Run the block loop; returns the dense fp32 Q (N x K) and each block's kept object."""
    n, k = w.shape
    if H is None:
        # No statistics: U = I, so compensation does nothing and saliency is |W|^2.
        H = torch.eye(k, device=w.device)
    if H.shape != (k, k):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({k}, {k}) for a weight with {k} inputs")
    Hd, W = prepare_hessian(H, w, config.percdamp)
    U = inverse_cholesky_upper(Hd)
    Q = torch.zeros_like(W)
    kept = []
    bs = config.block_size
    for b0 in range(0, k, bs):
        b1 = min(k, b0 + bs)
        wb = W[:, b0:b1]
        ubb = U[b0:b1, b0:b1]
        qb, keep = quantize_block(wb, ubb, b0, b1)
        Q[:, b0:b1] = qb
        kept.append(keep)
        if b1 < k and config.compensation is not Compensation.OFF:
            if config.compensation is Compensation.PUBLISHED:
                E = (wb - qb) / ubb.diagonal().unsqueeze(0)
            else:
                # E U_bb = W_b - Q_b  (right triangular solve)
                E = torch.linalg.solve_triangular(ubb, wb - qb, upper=True, left=False)
            W[:, b1:] -= E @ U[b0:b1, b1:]
    return Q, kept
