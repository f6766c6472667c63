"""Binary GEMM (A16): y (M, N) fp32 = x (M, K) @ W^T for a packed 1-bit W, M > 8 (prefill).

What: per output tile (BLOCK_M x BLOCK_N) and K tile inside one scale block b, the sign
(and group) words are unpacked in registers into a dense (BLOCK_K, BLOCK_N) weight tile that
feeds the tensor cores; no dequantized weight ever reaches memory.

* single term, no mean (ARB-RC): the tile is sel * s * in_scale (+-in_scale or 0) and
  acc += out_scale[:, b] * dot(x, tile)   (out_scale on the fp32 dot result)
* several terms or a mean (CGB, mean layouts; FOLD_SCALES): the tile is the fp32 sum over
  terms of sel * in_scale * (out_scale * s + mean), cast once, acc = dot(x, tile, acc):
  one MMA per K tile however many terms (6 separate dots spilled registers on sm_90).

Design trade-offs:
* in_scale is folded into the *weight* tile here, not into x, so x is fed to the MMA
  unrounded. Single term: +-in_scale is exact in the dot dtype when the scales are stored in
  it (fp16 scales, fp16 x). FOLD_SCALES tiles are rounded once to x's dtype (fp16: 2^-11,
  bf16: 2^-8 relative per weight), the usual dequantize-to-16-bit GEMM error; fp32 x is exact
  to fp32. A K tile never straddles a scale block.
* Dot dtype = x's dtype on GPU (fp16/bf16 MMA, fp32 accumulate); fp32 x uses an fp32 dot
  with input_precision="ieee" (no TF32: the fp32 tolerance is 1e-5). The interpreter
  always uses fp32 (its bf16 dot is silently wrong).
* The dense weight tile only ever exists in registers; no dequantized weight in memory.
  Programs are ordered M-fastest so the CTAs reading the same weight columns run together.

Limits: tl.dot needs every tile dim >= 16 on GPU (BLOCK_K >= 32 always holds since
block_size % 32 == 0; configs keep BLOCK_M/BLOCK_N >= 16). x must have unit stride along K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    KernelWeight,
    autotuned,
    check_x,
    float_act_args,
    is_interpreted,
    layout_meta,
    next_pow2,
    pow2_divisor,
    term_plane,
    term_select,
    tile_k,
)

CONFIGS: list[dict] = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
]
CPU_CONFIG: dict = {"BLOCK_M": 64, "BLOCK_N": 64}
BLOCK_K_CAP = 64


@triton.jit
def _binary_gemm_kernel(
    x_ptr, signs_ptr, groups_ptr, out_scale_ptr, in_scale_ptr, mean_ptr, y_ptr,
    M, N, K, K_PAD,
    stride_xm, stride_sp, stride_sn, stride_gn, stride_ot, stride_on, stride_it, stride_ym,
    TERMS: tl.constexpr, N_TERMS: tl.constexpr, N_PLANES: tl.constexpr,
    HAS_GROUP: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
    FOLD_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K_MAX: tl.constexpr,
    M_BUCKET: tl.constexpr,  # next_pow2(M): only an autotune key (retune per size class, not per M)
    REG_BUDGET: tl.constexpr,
):  # fmt: skip
    # x (BLOCK_M, BLOCK_K) and the unpacked weight (BLOCK_K, BLOCK_N) tiles live in registers:
    # (BLOCK_M + BLOCK_N) * BLOCK_K <= REG_BUDGET = 12288 on GPU, half that with a group bitmap
    # (one more unpacked bit tile); measured with ptxas on sm_90: larger tiles spilled, these
    # configs do not. Unbounded in the interpreter (big tiles are what makes it fast).
    BLOCK_K: tl.constexpr = tile_k(BLOCK_K_MAX, REG_BUDGET // 2 if HAS_GROUP else REG_BUDGET, BLOCK_M + BLOCK_N)
    WORDS: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    offs_b = tl.arange(0, 32)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        if DOT_FP32:
            x = x.to(tl.float32)
        blk = k0 // BLOCK_SIZE
        word0 = k0 // 32
        # Weight words transposed to (WORDS, BLOCK_N), unpacked to (BLOCK_K, BLOCK_N): row k = 32 w + bit.
        if HAS_GROUP:
            g = tl.load(
                groups_ptr + offs_n[None, :] * stride_gn + word0 + offs_w[:, None], mask=mask_n[None, :], other=0
            )
            gbits = tl.reshape((g[:, None, :] >> offs_b[None, :, None]) & 1, (BLOCK_K, BLOCK_N)) != 0
        if FOLD_SCALES:
            wsum = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(N_PLANES):
            s = tl.load(
                signs_ptr + p * stride_sp + offs_n[None, :] * stride_sn + word0 + offs_w[:, None],
                mask=mask_n[None, :],
                other=0,
            )
            sbits = tl.reshape((s[:, None, :] >> offs_b[None, :, None]) & 1, (BLOCK_K, BLOCK_N)) != 0
            for t in tl.static_range(N_TERMS):
                if term_plane(TERMS, t) == p:
                    in_s = tl.load(in_scale_ptr + t * stride_it + offs_k).to(tl.float32)[:, None]
                    o_s = tl.load(out_scale_ptr + t * stride_ot + offs_n * stride_on + blk, mask=mask_n, other=0.0)
                    o_s = o_s.to(tl.float32)[None, :]
                    if term_select(TERMS, t) == 1:
                        selb = gbits == 0
                    elif term_select(TERMS, t) == 2:
                        selb = gbits
                    if FOLD_SCALES:
                        # sel * in_scale * (out_scale * s + mean) summed over terms in fp32: one
                        # dense tile and one MMA per K tile whatever the number of terms.
                        v = tl.where(sbits, o_s, -o_s)
                        if HAS_MEAN:
                            mu = tl.load(mean_ptr + t * stride_ot + offs_n * stride_on + blk, mask=mask_n, other=0.0)
                            v = v + mu.to(tl.float32)[None, :]
                        v = v * in_s
                        if term_select(TERMS, t) != 0:
                            v = tl.where(selb, v, 0.0)
                        wsum += v
                    else:
                        # one term, no mean: the tile is +-in_scale (exact in the dot dtype when the
                        # scales are), out_scale is applied to the fp32 dot result.
                        w = tl.where(sbits, in_s, -in_s)
                        if term_select(TERMS, t) != 0:
                            w = tl.where(selb, w, 0.0)
                        if DOT_FP32:
                            part = tl.dot(x, w, input_precision="ieee")
                        else:
                            part = tl.dot(x, w.to(x.dtype))
                        acc += part * o_s
        if FOLD_SCALES:
            if DOT_FP32:
                acc = tl.dot(x, wsum, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, wsum.to(x.dtype), acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


_tuned = None


def kernel_args(
    x: torch.Tensor, kw: KernelWeight, y: torch.Tensor, dot_fp32: bool, interpret: bool = False
) -> tuple[list, dict]:
    """Positional runtime args and layout constexprs of one launch (shared with the compile tests).

    interpret=True lifts the GPU register budgets on tile sizes (the launcher sets it for the
    default CPU config; an explicit config keeps the GPU tiles, so tests exercise them).
    """
    args = float_act_args(x, kw, y)
    meta = {
        **layout_meta(kw),
        "DOT_FP32": dot_fp32,
        "FOLD_SCALES": kw.n_terms > 1 or kw.has_mean,
        "BLOCK_K_MAX": pow2_divisor(kw.block_size, BLOCK_K_CAP),
        "M_BUCKET": next_pow2(max(1, x.shape[0])),
        "REG_BUDGET": 1 << 30 if interpret else 12288,
    }
    return args, meta


def binary_gemm_triton(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """y (M, N) fp32 = x @ W^T for x (M, K) fp32/fp16/bf16 (any M; meant for M > 8)."""
    global _tuned
    x = check_x(x, kw)
    m = x.shape[0]
    y = torch.empty(m, kw.n, dtype=torch.float32, device=x.device)
    if m == 0:
        return y
    interp = is_interpreted(_binary_gemm_kernel)
    args, meta = kernel_args(x, kw, y, dot_fp32=interp or x.dtype == torch.float32, interpret=interp and config is None)
    if config is None and not interp:
        if _tuned is None:
            _tuned = autotuned(
                _binary_gemm_kernel, CONFIGS, key=["M_BUCKET", "N", "K_PAD", "TERMS", "BLOCK_SIZE", "DOT_FP32"]
            )
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(kw.n, c["BLOCK_N"]),)
        _tuned[grid](*args, **meta)
        return y
    cfg = dict(config or CPU_CONFIG)
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(kw.n, cfg["BLOCK_N"]),)
    _binary_gemm_kernel[grid](*args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **launch)
    return y


__all__ = ["CONFIGS", "CPU_CONFIG", "binary_gemm_triton", "kernel_args"]
