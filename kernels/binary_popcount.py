"""Binary popcount GEMM (W1A8): y (M, N) fp32 = x @ W^T with int8 activations, exact integer inner sums.

What (the W1A8 semantics of onebit.reference): for each term t the activations are
x'_t = in_scale_t * x, quantized per token to q_t in [-127, 127] with scale a_t[m]
(onebit.reference.quantize_act_int8, so the rounding is bit-identical to the oracle). q is
stored as 8 two's-complement bit planes Q_p packed like the weights (int32 words along K):

    q = sum_{p<7} 2^p Q_p - 2^7 Q_7
    sum_j mask_j q_j = sum_{p<7} 2^p popc(mask & Q_p) - 128 popc(mask & Q_7)      (exact in int32)

With pos = sign & sel and sel the term's selector word (ALL: all ones), per K tile in one
scale block b:

    signed = 2 * sum(pos * q) - sum(sel * q)          (= sum sel * s * q, s = +-1)
    y[m, i] += a_t[m] * (out_scale_t[i, b] * signed + mean_t[i, b] * sum(sel * q))

Design trade-offs:
* 8 AND + 8 popcount per 32 weights and activation row (vs 32 select-adds in A16). The
  selector sum for ALL terms is row-independent (popc of the activation planes only).
* popcount is `libdevice.popc` on GPU and a SWAR count in the interpreter (USE_POPC flag).
* Activation quantization runs in torch (exactly the oracle's rounding: IEEE division, half
  to even); the bit planes are packed by a small Triton kernel (`_act_planes_kernel`).

Limits: 8-bit planes only (act_bits=8). BLOCK_K divides block_size (tile_k). Integer tile sums are
at most 127 * BLOCK_K, far from int32 overflow; tiles are combined in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from onebit.reference import quantize_act_int8

from ._common import (
    KernelWeight,
    autotuned,
    check_x,
    is_interpreted,
    layout_meta,
    next_pow2,
    popcount32,
    pow2_divisor,
    term_plane,
    term_select,
    tile_k,
)  # fmt: skip

CONFIGS: list[dict] = [
    {"BLOCK_M": 1, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 2, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 8, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
]
CPU_CONFIG: dict = {"BLOCK_M": 64, "BLOCK_N": 64}
BLOCK_K_CAP = 128
PLANES_CONFIG: dict = {"BLOCK_R": 4, "BLOCK_W": 32, "num_warps": 4}
PLANES_CPU_CONFIG: dict = {"BLOCK_R": 64, "BLOCK_W": 32}
ACT_PLANES = 8


@triton.jit
def _act_planes_kernel(
    q_ptr, planes_ptr, R, KW, stride_qr, stride_pr, stride_pp, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr
):
    """int8 q (R, KW*32) -> int32 bit planes (R, 8, KW): bit p of q[r, 32w + b] at bit b of word [r, p, w]."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_b = tl.arange(0, 32)
    mask = (offs_r[:, None] < R) & (offs_w[None, :] < KW)
    q = tl.load(
        q_ptr + offs_r[:, None, None] * stride_qr + offs_w[None, :, None] * 32 + offs_b[None, None, :],
        mask=mask[:, :, None],
        other=0,
    )
    q = q.to(tl.int32)  # sign-extends: bit 7 is the two's-complement sign
    for p in tl.static_range(8):
        # distinct bits never carry, so the sum is the bitwise OR (bit 31 lands as INT_MIN)
        word = tl.sum(((q >> p) & 1) << offs_b[None, None, :], axis=2)
        tl.store(planes_ptr + offs_r[:, None] * stride_pr + p * stride_pp + offs_w[None, :], word, mask=mask)


@triton.jit
def _binary_popcount_kernel(
    planes_ptr, a_scale_ptr, signs_ptr, groups_ptr, out_scale_ptr, mean_ptr, y_ptr,
    M, N, K_PAD,
    stride_pt, stride_pm, stride_pp, stride_at, stride_sp, stride_sn, stride_gn, stride_ot, stride_on, stride_ym,
    TERMS: tl.constexpr, N_TERMS: tl.constexpr, N_PLANES: tl.constexpr,
    HAS_GROUP: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K_MAX: tl.constexpr, REG_BUDGET: tl.constexpr,
):  # fmt: skip
    # (BLOCK_M, BLOCK_N, WORDS) words per plane live in registers: BLOCK_M * BLOCK_N * WORDS
    # <= REG_BUDGET = 512 on GPU (sm_90: 4 words at BLOCK_M=4, BLOCK_N=64 spilled at 255
    # registers); unbounded in the interpreter, where big tiles are what makes it fast.
    BLOCK_K: tl.constexpr = tile_k(BLOCK_K_MAX, REG_BUDGET * 32, BLOCK_M * BLOCK_N)
    WORDS: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        blk = k0 // BLOCK_SIZE
        word0 = k0 // 32
        if HAS_GROUP:
            g = tl.load(
                groups_ptr + offs_n[:, None] * stride_gn + word0 + offs_w[None, :], mask=mask_n[:, None], other=0
            )
        for p in tl.static_range(N_PLANES):
            s = tl.load(
                signs_ptr + p * stride_sp + offs_n[:, None] * stride_sn + word0 + offs_w[None, :],
                mask=mask_n[:, None],
                other=0,
            )
            for t in tl.static_range(N_TERMS):
                if term_plane(TERMS, t) == p:
                    if term_select(TERMS, t) == 0:
                        pos = s
                    elif term_select(TERMS, t) == 1:
                        selw = ~g
                        pos = s & selw
                    else:
                        selw = g
                        pos = s & g
                    ipos = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                    isel = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                    irow = tl.zeros((BLOCK_M,), dtype=tl.int32)
                    a_base = planes_ptr + t * stride_pt + offs_m[:, None] * stride_pm + word0 + offs_w[None, :]
                    for b in tl.static_range(8):
                        a = tl.load(a_base + b * stride_pp, mask=mask_m[:, None], other=0)  # (BLOCK_M, WORDS)
                        wgt = (1 << b) if b < 7 else -128
                        c = tl.sum(popcount32(a[:, None, :] & pos[None, :, :], USE_POPC), axis=2)
                        ipos += c * wgt
                        if term_select(TERMS, t) == 0:
                            irow += tl.sum(popcount32(a, USE_POPC), axis=1) * wgt
                        else:
                            isel += tl.sum(popcount32(a[:, None, :] & selw[None, :, :], USE_POPC), axis=2) * wgt
                    if term_select(TERMS, t) == 0:
                        isel = isel + irow[:, None]
                    signed = (2 * ipos - isel).to(tl.float32)
                    o_s = tl.load(out_scale_ptr + t * stride_ot + offs_n * stride_on + blk, mask=mask_n, other=0.0)
                    part = o_s.to(tl.float32)[None, :] * signed
                    if HAS_MEAN:
                        mu = tl.load(mean_ptr + t * stride_ot + offs_n * stride_on + blk, mask=mask_n, other=0.0)
                        part += mu.to(tl.float32)[None, :] * isel.to(tl.float32)
                    a_s = tl.load(a_scale_ptr + t * stride_at + offs_m, mask=mask_m, other=0.0)
                    acc += a_s[:, None] * part
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def quantize_act_planes(x: torch.Tensor, kw: KernelWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-term int8 activations as bit planes: (planes int32 (T, M, 8, K_pad/32), scale fp32 (T, M)).

    q_t, a_t = quantize_act_int8(pad(x) * in_scale_t), exactly as onebit.reference does.
    """
    m = x.shape[0]
    xf = torch.nn.functional.pad(x.float(), (0, kw.k_pad - kw.k))
    xt = xf.unsqueeze(0) * kw.in_scale.float().unsqueeze(1)  # (T, M, K_pad)
    q, a_scale = quantize_act_int8(xt.reshape(kw.n_terms * m, kw.k_pad))
    kwords = kw.k_pad // 32
    planes = torch.empty(kw.n_terms * m, ACT_PLANES, kwords, dtype=torch.int32, device=x.device)
    rows = kw.n_terms * m
    interp = is_interpreted(_act_planes_kernel)
    c = PLANES_CPU_CONFIG if interp else PLANES_CONFIG
    grid = (triton.cdiv(rows, c["BLOCK_R"]), triton.cdiv(kwords, c["BLOCK_W"]))
    launch = {} if interp else {"num_warps": c["num_warps"]}
    _act_planes_kernel[grid](
        q, planes, rows, kwords, q.stride(0), planes.stride(0), planes.stride(1),
        BLOCK_R=c["BLOCK_R"], BLOCK_W=c["BLOCK_W"], **launch,
    )  # fmt: skip
    return planes.view(kw.n_terms, m, ACT_PLANES, kwords), a_scale.view(kw.n_terms, m).contiguous()


_tuned = None


def kernel_args(
    planes: torch.Tensor,
    a_scale: torch.Tensor,
    kw: KernelWeight,
    y: torch.Tensor,
    use_popc: bool,
    interpret: bool = False,
):
    """Positional runtime args and layout constexprs of one launch (shared with the compile tests).

    interpret=True lifts the GPU register budgets on tile sizes (the launcher sets it for the
    default CPU config; an explicit config keeps the GPU tiles, so tests exercise them).
    """
    args = [
        planes, a_scale, kw.signs, kw.groups, kw.out_scale, kw.mean, y,
        planes.shape[1], kw.n, kw.k_pad,
        planes.stride(0), planes.stride(1), planes.stride(2), a_scale.stride(0),
        kw.signs.stride(0), kw.signs.stride(1), kw.groups.stride(0), kw.out_scale.stride(0), kw.out_scale.stride(1),
        y.stride(0),
    ]  # fmt: skip
    meta = {
        **layout_meta(kw),
        "USE_POPC": use_popc,
        "BLOCK_K_MAX": pow2_divisor(kw.block_size, BLOCK_K_CAP),
        "REG_BUDGET": 1 << 30 if interpret else 512,
    }
    return args, meta


def binary_popcount_triton(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """y (M, N) fp32 = W1A8 x @ W^T for x (M, K) fp32/fp16/bf16 (quantized per token and term inside)."""
    global _tuned
    x = check_x(x, kw)
    m = x.shape[0]
    y = torch.empty(m, kw.n, dtype=torch.float32, device=x.device)
    if m == 0:
        return y
    planes, a_scale = quantize_act_planes(x, kw)
    interp = is_interpreted(_binary_popcount_kernel)
    args, meta = kernel_args(planes, a_scale, kw, y, use_popc=not interp, interpret=interp and config is None)
    if config is None and not interp:
        if _tuned is None:
            _tuned = autotuned(_binary_popcount_kernel, CONFIGS, key=["N", "K_PAD", "TERMS", "BLOCK_SIZE"])
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(kw.n, c["BLOCK_N"]),)
        _tuned[grid](*args, **meta)
        return y
    cfg = dict(config or CPU_CONFIG)
    if interp:
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], next_pow2(m))  # no wasted rows in the slow interpreter
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(kw.n, cfg["BLOCK_N"]),)
    _binary_popcount_kernel[grid](*args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **launch)
    return y


__all__ = [
    "CONFIGS",
    "CPU_CONFIG",
    "PLANES_CONFIG",
    "PLANES_CPU_CONFIG",
    "binary_popcount_triton",
    "kernel_args",
    "quantize_act_planes",
]
