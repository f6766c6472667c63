"""Binary GEMV (A16): y (M, N) fp32 = x (M, K) @ W^T for a packed 1-bit W, small M (<= 8).

What: for every term t (sign plane p, selector ALL / GROUP0 / GROUP1) and K tile inside one
scale block b,

    y[m, i] += out_scale_t[i, b] * sum_j sel_t[i, j] * s_p[i, j] * x'_t[m, j]
             + mean_t[i, b]      * sum_j sel_t[i, j] * x'_t[m, j]          (mean layouts)

with x'_t = in_scale_t * x folded once per term and K tile (amortised over BLOCK_N rows) and
s = +-1 taken from the sign bit: a signed select-and-add, `where(bit, x', -x')`, never a
multiply by a dequantized weight. Accumulation is fp32 whatever the activation dtype.

Design trade-offs:
* Batch-1 decode is memory bound on the 1-bit words; each program owns BLOCK_N rows and
  streams their words along K (contiguous runs per row). Split-K (SPLIT_K > 1, fp32 atomics
  into a zeroed output) adds programs when N / BLOCK_N is too small to fill the GPU; it makes
  the summation order (not the math) depend on scheduling.
* The term list is a compile-time code (kernels/_common.py): the loops over planes and terms
  are unrolled, each sign plane and the group bitmap are loaded once per tile and shared by
  every term that reads them (CGB: 2 planes, 6 terms).
* The tile is 3-D (BLOCK_M, BLOCK_N, BLOCK_K), so BLOCK_M * BLOCK_N * BLOCK_K is bounded by
  the configs; M > 8 goes to the tensor-core GEMM (binary_gemm.py).

Limits: BLOCK_K divides block_size (chosen by the launcher), K_pad = padded K of the format;
x must have unit stride along K. Output is fp32 (the op casts to x's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    KernelWeight, autotuned, check_x, float_act_args, is_interpreted, layout_meta, next_pow2, pow2_divisor,
    term_plane, term_select,
)  # fmt: skip

# Autotune space on GPU (data: tests compile each one). BLOCK_M is set by the launcher to
# next_pow2(M); BLOCK_K = largest power of two <= max(32, 256 / BLOCK_M) dividing block_size.
CONFIGS: list[dict] = [
    {"BLOCK_N": 16, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 64, "SPLIT_K": 1, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 16, "SPLIT_K": 4, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 8, "SPLIT_K": 8, "num_warps": 2, "num_stages": 2},
]
# Interpreter: cost is per program and per loop iteration, so few big programs.
CPU_CONFIG: dict = {"BLOCK_N": 64, "SPLIT_K": 1}
MAX_M = 8
BLOCK_K_CAP = 256


@triton.jit
def _binary_gemv_kernel(
    x_ptr, signs_ptr, groups_ptr, out_scale_ptr, in_scale_ptr, mean_ptr, y_ptr,
    M, N, K, K_PAD,
    stride_xm, stride_sp, stride_sn, stride_gn, stride_ot, stride_on, stride_it, stride_ym,
    TERMS: tl.constexpr, N_TERMS: tl.constexpr, N_PLANES: tl.constexpr,
    HAS_GROUP: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    WORDS: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    offs_b = tl.arange(0, 32)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_nw = mask_n[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_tiles = K_PAD // BLOCK_K
    for kt in range(pid_k, n_tiles, SPLIT_K):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Activations of this tile, fp32 right after the load (bf16 math is wrong in the
        # interpreter and fp32 is the accumulation type anyway); zero past the logical K.
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        blk = k0 // BLOCK_SIZE
        word0 = k0 // 32
        if HAS_GROUP:
            g = tl.load(groups_ptr + offs_n[:, None] * stride_gn + word0 + offs_w[None, :], mask=mask_nw, other=0)
            gbits = tl.reshape((g[:, :, None] >> offs_b[None, None, :]) & 1, (BLOCK_N, BLOCK_K)) != 0
        for p in tl.static_range(N_PLANES):
            s = tl.load(
                signs_ptr + p * stride_sp + offs_n[:, None] * stride_sn + word0 + offs_w[None, :],
                mask=mask_nw,
                other=0,
            )
            sbits = tl.reshape((s[:, :, None] >> offs_b[None, None, :]) & 1, (BLOCK_N, BLOCK_K)) != 0
            for t in tl.static_range(N_TERMS):
                if term_plane(TERMS, t) == p:
                    in_s = tl.load(in_scale_ptr + t * stride_it + offs_k).to(tl.float32)
                    xs = x * in_s[None, :]  # (BLOCK_M, BLOCK_K): in_scale folded once per term
                    xs3 = xs[:, None, :]
                    # signed accumulate: +x' where the sign bit is 1, -x' where it is 0
                    signed3 = tl.where(sbits[None, :, :], xs3, -xs3)
                    if term_select(TERMS, t) == 0:
                        dot = tl.sum(signed3, axis=2)
                        if HAS_MEAN:
                            selsum = tl.sum(xs, axis=1)[:, None]
                    else:
                        if term_select(TERMS, t) == 1:
                            selb = gbits == 0
                        else:
                            selb = gbits
                        dot = tl.sum(tl.where(selb[None, :, :], signed3, 0.0), axis=2)
                        if HAS_MEAN:
                            selsum = tl.sum(tl.where(selb[None, :, :], xs3, 0.0), axis=2)
                    o_s = tl.load(out_scale_ptr + t * stride_ot + offs_n * stride_on + blk, mask=mask_n, other=0.0)
                    acc += o_s.to(tl.float32)[None, :] * dot
                    if HAS_MEAN:
                        mu = tl.load(mean_ptr + t * stride_ot + offs_n * stride_on + blk, mask=mask_n, other=0.0)
                        acc += mu.to(tl.float32)[None, :] * selsum
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


_tuned = None


def kernel_args(x: torch.Tensor, kw: KernelWeight, y: torch.Tensor, interpret: bool = False) -> tuple[list, dict]:
    """Positional runtime args and layout constexprs of one launch (shared with the compile tests).

    interpret=True lifts the GPU register budgets on tile sizes (the launcher sets it for the
    default CPU config; an explicit config keeps the GPU tiles, so tests exercise them).
    """
    args = float_act_args(x, kw, y)
    block_m = next_pow2(max(1, x.shape[0]))
    meta = {
        **layout_meta(kw),
        "BLOCK_M": block_m,
        # The (BLOCK_M, BLOCK_N, BLOCK_K) tile lives in registers: shrink K as M grows (sm_90,
        # M=8, BLOCK_K=128 spilled at 255 registers; BLOCK_K=32 does not). Not in the interpreter.
        "BLOCK_K": pow2_divisor(kw.block_size, BLOCK_K_CAP if interpret else max(32, BLOCK_K_CAP // block_m)),
    }
    return args, meta


def binary_gemv_triton(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """y (M, N) fp32 = x @ W^T for x (M <= 8, K) fp32/fp16/bf16 and a repacked weight.

    `config` forces one entry of CONFIGS (tests); by default the interpreter uses CPU_CONFIG
    and a GPU launch autotunes over CONFIGS.
    """
    global _tuned
    x = check_x(x, kw)
    m = x.shape[0]
    if m > MAX_M:
        raise ValueError(f"binary_gemv_triton handles M <= {MAX_M} rows, got {m}; use binary_gemm_triton")
    if m == 0:
        return torch.zeros(0, kw.n, dtype=torch.float32, device=x.device)
    # Zeroed: split-K configs accumulate with atomics.
    y = torch.zeros(m, kw.n, dtype=torch.float32, device=x.device)
    args, meta = kernel_args(x, kw, y, interpret=is_interpreted(_binary_gemv_kernel) and config is None)
    if config is None and not is_interpreted(_binary_gemv_kernel):
        if _tuned is None:
            _tuned = autotuned(
                _binary_gemv_kernel,
                CONFIGS,
                key=["N", "K_PAD", "BLOCK_M", "TERMS", "BLOCK_SIZE"],
                reset_to_zero=["y_ptr"],
            )
        grid = lambda c: (triton.cdiv(kw.n, c["BLOCK_N"]), c["SPLIT_K"])
        _tuned[grid](*args, **meta)
        return y
    cfg = dict(config or CPU_CONFIG)
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    grid = (triton.cdiv(kw.n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _binary_gemv_kernel[grid](*args, **meta, BLOCK_N=cfg["BLOCK_N"], SPLIT_K=cfg["SPLIT_K"], **launch)
    return y


__all__ = ["CONFIGS", "CPU_CONFIG", "MAX_M", "binary_gemv_triton", "kernel_args"]
