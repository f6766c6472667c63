"""Shared pieces of onebit's Triton kernels: term encoding, popcount, the cached repack.

The packed format v1 (onebit/format.py) is already the layout the kernels read: sign and
group words run along K (LSB first), so a program that owns BLOCK_N output rows reads
BLOCK_N contiguous word runs. What the kernels need on top is derived once per weight by
`repack_for_binary_linear()` and cached: the term list folded into one compile-time
integer (so every term loop is unrolled and specialised per layout: no runtime branches,
each sign plane and the group bitmap loaded once per K tile), contiguous tensors, and
dummy pointers for the optional group bitmap / mean.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from onebit.format import PackedWeight, validate

TERM_BITS = 8  # per term in the code: bits 0-5 plane, bits 6-7 select (Select.ALL/GROUP0/GROUP1)
MAX_TERMS = 16
MAX_PLANES = 64


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction) or isinstance(getattr(kernel, "fn", None), InterpretedFunction)


def term_code(packed: PackedWeight) -> int:
    """Fold the term list into one int: term t at bits [8t, 8t+8) = plane | select << 6."""
    terms = packed.layout.terms
    if len(terms) > MAX_TERMS or packed.layout.n_planes > MAX_PLANES:
        raise ValueError(f"the Triton kernels support <= {MAX_TERMS} terms and <= {MAX_PLANES} planes")
    code = 0
    for t, term in enumerate(terms):
        code |= (term.plane | int(term.select) << 6) << (TERM_BITS * t)
    return code


@triton.constexpr_function
def term_plane(terms, t):
    """Plane of term t in a term code (evaluated at compile time, so `if`s on it are static)."""
    return (terms >> (TERM_BITS * t)) & 63


@triton.constexpr_function
def term_select(terms, t):
    """Selector of term t (0 ALL, 1 GROUP0, 2 GROUP1), at compile time."""
    return (terms >> (TERM_BITS * t + 6)) & 3


@triton.constexpr_function
def tile_k(bk_max, budget, per_k):
    """K tile at compile time: the largest power of two <= bk_max with per_k * BLOCK_K <= budget, >= 32.

    bk_max divides block_size (pow2_divisor) and so does every smaller power of two >= 32:
    the tile still never straddles a scale block. Keeps register tiles bounded per config.
    """
    bk = bk_max
    while bk > 32 and per_k * bk > budget:
        bk //= 2
    return bk


def pow2_divisor(block_size: int, cap: int) -> int:
    """Largest power of two <= cap that divides block_size (>= 32 since block_size % 32 == 0).

    A K tile never straddles a scale block, so out_scale/mean are applied once per tile and
    row, never per weight.
    """
    b = 32
    while b * 2 <= cap and block_size % (b * 2) == 0:
        b *= 2
    return b


@dataclass(frozen=True)
class KernelWeight:
    """What the kernels read: format-v1 tensors made contiguous plus compile-time metadata."""

    n: int
    k: int
    k_pad: int
    block_size: int
    n_terms: int
    n_planes: int
    terms: int  # term_code()
    has_group: bool
    has_mean: bool
    signs: torch.Tensor  # int32 (P, N, K_pad/32)
    groups: torch.Tensor  # int32 (N, K_pad/32), or `signs` as a dummy pointer
    out_scale: torch.Tensor  # (T, N, n_blocks) scale dtype
    in_scale: torch.Tensor  # (T, K_pad) scale dtype
    mean: torch.Tensor  # (T, N, n_blocks), or out_scale as a dummy pointer


_CACHE: dict[int, tuple[tuple, KernelWeight]] = {}


def _version(t: torch.Tensor) -> int:
    # Inference-mode tensors carry no version counter; they are keyed by storage alone.
    return -1 if t.is_inference() else t._version


def _key(packed: PackedWeight) -> tuple:
    ts = list(packed.tensors().values())
    return (
        packed.out_features,
        packed.in_features,
        packed.block_size,
        packed.layout,
        tuple((t.data_ptr(), _version(t), t.dtype, tuple(t.shape), t.device) for t in ts),
    )


def repack_for_binary_linear(packed: PackedWeight) -> KernelWeight:
    """Derive (once per weight, cached) the kernel view of a packed weight.

    The cache is keyed by the identity of the `signs` tensor and evicted when that tensor
    dies (weakref.finalize), and re-derived when any tensor changed (data_ptr / version).
    """
    key = _key(packed)
    hit = _CACHE.get(id(packed.signs))
    if hit is not None and hit[0] == key:
        return hit[1]
    validate(packed)
    devices = {t.device for t in packed.tensors().values()}
    if len(devices) != 1:
        raise ValueError(f"packed weight tensors live on several devices: {devices}")
    out_scale = packed.out_scale.contiguous()
    kw = KernelWeight(
        n=packed.out_features,
        k=packed.in_features,
        k_pad=packed.k_pad,
        block_size=packed.block_size,
        n_terms=packed.layout.n_terms,
        n_planes=packed.layout.n_planes,
        terms=term_code(packed),
        has_group=packed.groups is not None,
        has_mean=packed.mean is not None,
        signs=packed.signs.contiguous(),
        groups=packed.groups.contiguous() if packed.groups is not None else packed.signs,
        out_scale=out_scale,
        in_scale=packed.in_scale.contiguous(),
        mean=packed.mean.contiguous() if packed.mean is not None else out_scale,
    )
    first = id(packed.signs) not in _CACHE
    _CACHE[id(packed.signs)] = (key, kw)
    if first:
        try:
            weakref.finalize(packed.signs, _CACHE.pop, id(packed.signs), None)
        except TypeError:  # not weak-referenceable (should not happen for tensors): do not cache
            _CACHE.pop(id(packed.signs), None)
    return kw



def layout_meta(kw: "KernelWeight") -> dict:
    """The layout constexprs every binary-linear kernel takes (terms, planes, groups, mean, block)."""
    return {
        "TERMS": kw.terms,
        "N_TERMS": kw.n_terms,
        "N_PLANES": kw.n_planes,
        "HAS_GROUP": kw.has_group,
        "HAS_MEAN": kw.has_mean,
        "BLOCK_SIZE": kw.block_size,
    }


def float_act_args(x: torch.Tensor, kw: "KernelWeight", y: torch.Tensor) -> list:
    """Runtime args shared by the float-activation kernels (GEMV and GEMM): pointers, sizes, strides."""
    return [
        x, kw.signs, kw.groups, kw.out_scale, kw.in_scale, kw.mean, y,
        x.shape[0], kw.n, kw.k, kw.k_pad,
        x.stride(0), kw.signs.stride(0), kw.signs.stride(1), kw.groups.stride(0),
        kw.out_scale.stride(0), kw.out_scale.stride(1), kw.in_scale.stride(0), y.stride(0),
    ]  # fmt: skip

def check_x(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """x must be (M, K) fp32/fp16/bf16 on the weight's device; returns it with unit stride along K."""
    if x.dim() != 2 or x.shape[1] != kw.k:
        raise ValueError(f"x must be (M, in_features={kw.k}), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    if x.device != kw.signs.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {kw.signs.device}")
    if x.shape[0] == 0:
        return x
    return x if x.stride(1) == 1 else x.contiguous()


def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@triton.jit
def popcount32(x, USE_POPC: tl.constexpr):
    """Population count of int32 words.

    On GPU `libdevice.popc` (one POPC instruction); the interpreter has no libdevice, so a
    SWAR count on uint32 (logical shifts, wrapping multiply) stands in. LLVM recognises the
    SWAR form and also emits popc for it, so both compile to the same PTX.
    """
    if USE_POPC:
        return libdevice.popc(x)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = (u * 0x01010101) >> 24
        return u.to(tl.int32, bitcast=True)


def autotuned(kernel, configs: list[dict], key: list[str], reset_to_zero: list[str] | None = None):
    """Wrap `kernel` in @triton.autotune over `configs` (dicts incl. num_warps/num_stages).

    Only for compiled (GPU) launches: autotune does not run in the interpreter, which calls
    the raw kernel with a fixed config instead.
    """
    tconfigs = []
    for c in configs:
        c = dict(c)
        nw, ns = c.pop("num_warps", 4), c.pop("num_stages", 2)
        tconfigs.append(triton.Config(c, num_warps=nw, num_stages=ns))
    return triton.autotune(configs=tconfigs, key=key, reset_to_zero=reset_to_zero)(kernel)


TRITON_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int8: "i8",
}
