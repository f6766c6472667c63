"""Fused Gram accumulation for calibration: Sq += a * Xq^T Xq (upper triangle) and S += a * Xq^T X.

What: X (T, K) are a layer's input activations from the full-precision model and Xq (T, K)
the same layer's inputs in the partially quantized model (OA / GPTQ-style calibration).
One pass over T accumulates, in place and in fp32,

    Sq[i, j] += alpha * sum_t Xq[t, i] Xq[t, j]     for i <= j only (the upper triangle)
    S[i, j]  += alpha * sum_t Xq[t, i] X[t, j]      all i, j (not symmetric)

with alpha e.g. GPTQ's 2 / n_samples. Program (bi, bj) owns one BLOCK x BLOCK output tile and
streams T in BLOCK_T rows: the Xq[:, bi] tile it loads feeds both products ("same loads"),
tiles strictly below the diagonal skip Sq entirely (half the Sq work), diagonal tiles store
only row <= col. The strictly lower triangle of Sq is never written (symmetrize_upper()
mirrors it when a full matrix is needed).

Design trade-offs:
* Products are fp32 with input_precision="ieee": no TF32 (10-bit mantissa inputs would
  put ~1e-3 relative error into Hessians that are later inverted / Cholesky-factored).
  On GPU that is an FMA (CUDA-core) dot, ~1/8 of TF32 tensor-core peak: the Gram pass is
  still cheap next to the forward passes and the solves.
* In-place accumulation (read-modify-write of the output tile once per call), so autotune
  restores the outputs between trials (restore_value).
* fp16/bf16 activations are converted to fp32 right after the load.

Limits: X, Xq must have unit stride along K (rows may be strided); Sq, S contiguous fp32
(K, K). The reference `gram_update_ref` is the pure-torch spec (fp32 or fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import is_interpreted

CONFIGS: list[dict] = [
    {"BLOCK": 32, "BLOCK_T": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK": 64, "BLOCK_T": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK": 64, "BLOCK_T": 16, "num_warps": 8, "num_stages": 3},
    {"BLOCK": 128, "BLOCK_T": 16, "num_warps": 8, "num_stages": 2},
]
CPU_CONFIG: dict = {"BLOCK": 64, "BLOCK_T": 64}


@triton.jit
def _gram_kernel(
    xq_ptr, x_ptr, sq_ptr, s_ptr,
    T, K, alpha,
    stride_xqt, stride_xt, stride_sq, stride_s,
    HAS_S: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    do_sq = pid_i <= pid_j  # upper-triangle tiles (incl. the diagonal)
    if HAS_S or do_sq:
        offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
        offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
        mask_i = offs_i < K
        mask_j = offs_j < K
        acc_sq = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            # Xq[:, i-tile] loaded transposed (BLOCK, BLOCK_T): shared by both products.
            a = tl.load(
                xq_ptr + offs_t[None, :] * stride_xqt + offs_i[:, None],
                mask=mask_i[:, None] & mask_t[None, :],
                other=0.0,
            ).to(tl.float32)
            if do_sq:
                bq = tl.load(
                    xq_ptr + offs_t[:, None] * stride_xqt + offs_j[None, :],
                    mask=mask_t[:, None] & mask_j[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc_sq = tl.dot(a, bq, acc_sq, input_precision="ieee")
            if HAS_S:
                b = tl.load(
                    x_ptr + offs_t[:, None] * stride_xt + offs_j[None, :],
                    mask=mask_t[:, None] & mask_j[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc_s = tl.dot(a, b, acc_s, input_precision="ieee")
        mask_ij = mask_i[:, None] & mask_j[None, :]
        if do_sq:
            sq_ptrs = sq_ptr + offs_i[:, None] * stride_sq + offs_j[None, :]
            sq_mask = mask_ij & (offs_i[:, None] <= offs_j[None, :])
            old = tl.load(sq_ptrs, mask=sq_mask, other=0.0)
            tl.store(sq_ptrs, old + alpha * acc_sq, mask=sq_mask)
        if HAS_S:
            s_ptrs = s_ptr + offs_i[:, None] * stride_s + offs_j[None, :]
            old_s = tl.load(s_ptrs, mask=mask_ij, other=0.0)
            tl.store(s_ptrs, old_s + alpha * acc_s, mask=mask_ij)


_tuned = None


def kernel_args(xq: torch.Tensor, x: torch.Tensor | None, sq: torch.Tensor, s: torch.Tensor | None, alpha: float):
    """Positional runtime args and constexprs of one launch (shared with the compile tests)."""
    x_ = x if x is not None else xq
    s_ = s if s is not None else sq
    args = [
        xq,
        x_,
        sq,
        s_,
        xq.shape[0],
        xq.shape[1],
        float(alpha),
        xq.stride(0),
        x_.stride(0),
        sq.stride(0),
        s_.stride(0),
    ]
    return args, {"HAS_S": s is not None}


def _check(xq: torch.Tensor, x: torch.Tensor | None, sq: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if xq.dim() != 2:
        raise ValueError(f"xq must be (T, K), got shape {tuple(xq.shape)}")
    k = xq.shape[1]
    for name, t in (("xq", xq), ("x", x)):
        if t is None:
            continue
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.shape != xq.shape:
            raise ValueError(f"x and xq must have the same shape, got {tuple(t.shape)} and {tuple(xq.shape)}")
        if t.device != sq.device:
            raise ValueError(f"{name} is on {t.device}, Sq on {sq.device}")
    for name, t in (("sq", sq), ("s", s)):
        if t is None:
            continue
        if t.dtype != torch.float32 or tuple(t.shape) != (k, k) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 ({k}, {k}) tensor, got {t.dtype} {tuple(t.shape)}")
    if x is not None and (s is None):
        raise ValueError("x was given but no S accumulator")
    if s is not None and x is None:
        raise ValueError("S needs the full-precision activations x")
    return xq if xq.shape[0] == 0 or xq.stride(1) == 1 else xq.contiguous()


def gram_update_triton(
    xq: torch.Tensor,
    sq: torch.Tensor,
    x: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    alpha: float = 1.0,
    config: dict | None = None,
) -> None:
    """In place: sq (upper triangle) += alpha * xq^T xq and, if given, s += alpha * xq^T x.

    xq, x: (T, K) fp32/fp16/bf16, unit stride along K. sq, s: contiguous fp32 (K, K).
    """
    xq = _check(xq, x, sq, s)
    if x is not None and x.shape[0] and x.stride(1) != 1:
        x = x.contiguous()
    t, k = xq.shape
    if t == 0 or k == 0:
        return
    global _tuned
    args, meta = kernel_args(xq, x, sq, s, alpha)
    if config is None and not is_interpreted(_gram_kernel):
        if _tuned is None:
            tconfigs = [
                triton.Config(
                    {"BLOCK": c["BLOCK"], "BLOCK_T": c["BLOCK_T"]}, num_warps=c["num_warps"], num_stages=c["num_stages"]
                )
                for c in CONFIGS
            ]
            _tuned = triton.autotune(configs=tconfigs, key=["K", "HAS_S"], restore_value=["sq_ptr", "s_ptr"])(
                _gram_kernel
            )
        grid = lambda c: (triton.cdiv(k, c["BLOCK"]), triton.cdiv(k, c["BLOCK"]))
        _tuned[grid](*args, **meta)
        return
    cfg = dict(config or CPU_CONFIG)
    launch = {key: v for key, v in cfg.items() if key in ("num_warps", "num_stages")}
    grid = (triton.cdiv(k, cfg["BLOCK"]), triton.cdiv(k, cfg["BLOCK"]))
    _gram_kernel[grid](*args, **meta, BLOCK=cfg["BLOCK"], BLOCK_T=cfg["BLOCK_T"], **launch)


def gram_update_ref(
    xq: torch.Tensor,
    sq: torch.Tensor,
    x: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> None:
    """Pure-torch spec of gram_update_triton, in sq's dtype (pass fp64 accumulators for an oracle)."""
    xqf = xq.to(sq.dtype)
    upper = torch.triu(torch.ones_like(sq, dtype=torch.bool))
    sq += torch.where(upper, alpha * (xqf.T @ xqf), torch.zeros((), dtype=sq.dtype, device=sq.device))
    if s is not None:
        s += alpha * (xqf.T @ x.to(s.dtype))


def symmetrize_upper(sq: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from an upper-triangle accumulator (new tensor)."""
    return torch.triu(sq) + torch.triu(sq, 1).T


__all__ = ["CONFIGS", "CPU_CONFIG", "gram_update_ref", "gram_update_triton", "kernel_args", "symmetrize_upper"]
