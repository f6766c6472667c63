"""Packed format version 2: the compact form a weight is stored in (BinaryLinear buffers, checkpoints).

Format v1 (onebit/format.py, `PackedWeight`) is the *execution* layout the kernels read:
every sign plane full width, K padded to a whole block. Storing it as is wastes ~1.2 bits
per weight on a CGB model: plane 1 (the order-2 residual signs) is read only on the ~6% of
columns that are salient, and up to a block of padding columns is kept in every plane.
Version 2 (`CompactWeight`) stores the same weight without them:

    signs          int32 (N, ceil(K/32))          plane 0, K rounded up to a word only
    groups         int32 (N, ceil(K/32))          the group bitmap, likewise (optional)
    salient_cols   int32 (S,)                     sorted columns where planes >= 1 are read
    salient_signs  int32 (P-1, N, ceil(S/32))     planes 1..P-1 on those columns, gathered
    out_scale      (T, N, n_blocks)               as v1
    in_scale       (T, K)                         as v1 without its zero padding
    mean           (T, N, n_blocks)               as v1 (optional)
    scale_exp      int32 (3, T, n_blocks)         only with float8_e4m3fn scales: per term and
                                                  column block, the power of two of its
                                                  out_scale / in_scale / mean values

salient_cols is every logical column on which some term reading a plane >= 1 has a nonzero
in_scale (`format.plane_columns`); planes >= 1 have no other readable bits. `expand()`
rebuilds the v1 layout exactly as the quantizers write it: unread plane bits are 1 (the
quantizers' fill), padding bits 0. `compact()` of a v1 weight and `expand()` back give the
same dequantized weight and the same kernel outputs, and the same bits for quantizer output.

Kernels keep reading v1: BinaryLinear expands once when it binds a backend (the CPU backend
repacks into its own layout and drops the v1 copy; GPU backends keep it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onebit.format import (
    SCALE_DTYPES,
    WORD_BITS,
    WORD_DTYPE,
    Layout,
    PackedWeight,
    check_tensors,
    pack_bits,
    padded_k,
    validate,
)

INDEX_DTYPE = torch.int32
INT_NAMES = ("signs", "groups", "salient_cols", "salient_signs", "scale_exp")

# ---------------------------------------------------------------------------- 8-bit scales

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_fp8(t: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, int32 exponents): t ~= values * 2^e, one e per slice along `dim`.

    e is the smallest power of two with max|slice| <= 448 * 2^e (e4m3's largest finite value;
    0 for an all-zero slice); the values round to nearest, ties to even.
    """
    amax = t.float().abs().amax(dim, keepdim=True)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / FP8_MAX)), torch.zeros_like(amax))
    return (t.float() * torch.exp2(-e)).to(FP8), e.squeeze(dim).to(torch.int32)


def from_fp8(q: torch.Tensor, e: torch.Tensor, dim: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * torch.exp2(e.float().unsqueeze(dim))).to(dtype)


def round_fp8(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """t rounded to e4m3 x 2^e, float32, one exponent for the whole tensor, taken from max|like|
    (default t): what storing one (term, block) slice in 8 bits gives (the quantizers round their
    fits with it, so that compensation sees the stored weight)."""
    amax = (t if like is None else like).float().abs().max()
    e = torch.ceil(torch.log2(amax / FP8_MAX)) if amax > 0 else amax.new_zeros(())
    return (t.float() * torch.exp2(-e)).to(FP8).float() * torch.exp2(e)


def _per_block(name: str, t: torch.Tensor, block_size: int) -> torch.Tensor:
    """A scale tensor as (T, n_blocks, values of one block): the slices that share an exponent."""
    if name == "in_scale":  # (T, K): a block's columns
        nb = -(-t.shape[1] // block_size)
        return F.pad(t.float(), (0, nb * block_size - t.shape[1])).reshape(t.shape[0], nb, block_size)
    return t.transpose(1, 2)  # (T, N, n_blocks): a block's rows


def _from_blocks(name: str, v: torch.Tensor, k: int) -> torch.Tensor:
    if name == "in_scale":
        return v.reshape(v.shape[0], -1)[:, :k].contiguous()
    return v.transpose(1, 2).contiguous()


# Stored scale dtypes: v1's plus float8_e4m3fn with a power-of-two exponent per term and tensor.
STORED_SCALE_DTYPES = {**SCALE_DTYPES, "float8_e4m3fn": FP8}
SCALE_NAMES = ("out_scale", "in_scale", "mean")  # the rows of scale_exp


def all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in a float tensor (8-bit floats included); True for integer tensors."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


def n_words(k: int) -> int:
    return -(-k // WORD_BITS)


@dataclass
class CompactWeight:
    out_features: int
    in_features: int
    block_size: int
    layout: Layout
    signs: torch.Tensor
    out_scale: torch.Tensor
    in_scale: torch.Tensor
    groups: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    salient_cols: torch.Tensor | None = None
    salient_signs: torch.Tensor | None = None
    scale_exp: torch.Tensor | None = None

    @property
    def n_salient(self) -> int:
        return 0 if self.salient_cols is None else int(self.salient_cols.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"signs": self.signs, "out_scale": self.out_scale, "in_scale": self.in_scale}
        for name in ("groups", "mean", "salient_cols", "salient_signs", "scale_exp"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out


def compact_shapes(
    out_features: int, in_features: int, block_size: int, layout: Layout, n_salient: int,
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """The shape of every stored tensor (the buffers of BinaryLinear)."""
    n, k, t = out_features, in_features, layout.n_terms
    nb = padded_k(k, block_size) // block_size
    shapes = {"signs": (n, n_words(k)), "out_scale": (t, n, nb), "in_scale": (t, k)}
    if layout.has_group:
        shapes["groups"] = (n, n_words(k))
    if layout.has_mean:
        shapes["mean"] = (t, n, nb)
    if layout.n_planes > 1:
        shapes["salient_cols"] = (n_salient,)
        shapes["salient_signs"] = (layout.n_planes - 1, n, n_words(n_salient))
    elif n_salient:
        raise ValueError("a single-plane layout has no salient columns")
    if scale_dtype == FP8:
        shapes["scale_exp"] = (len(SCALE_NAMES), t, nb)
    return shapes


def _salient_mask(layout: Layout, in_scale: torch.Tensor) -> torch.Tensor:
    """Bool (K,): columns where a term reading a plane >= 1 has a nonzero in_scale."""
    cols = torch.zeros(in_scale.shape[-1], dtype=torch.bool, device=in_scale.device)
    for t, term in enumerate(layout.terms):
        if term.plane >= 1:
            cols |= in_scale[t].float() != 0  # float(): 8-bit floats have no comparisons
    return cols


def validate_compact(c: CompactWeight) -> None:
    """Raise ValueError unless the stored tensors have the shapes, dtypes and invariants of v2.

    Value checks (salient_cols sorted and in range, planes >= 1 read nowhere else) are skipped
    for meta tensors (checkpoint headers).
    """
    if c.block_size <= 0 or c.block_size % WORD_BITS:
        raise ValueError(f"block_size must be a positive multiple of {WORD_BITS}, got {c.block_size}")
    if c.out_features <= 0 or c.in_features <= 0:
        raise ValueError(f"bad logical shape {c.out_features} x {c.in_features}")
    want = compact_shapes(c.out_features, c.in_features, c.block_size, c.layout, c.n_salient, c.out_scale.dtype)
    check_tensors(c.tensors(), want, INT_NAMES, STORED_SCALE_DTYPES.values())
    if c.in_scale.is_meta or (c.salient_cols is not None and c.salient_cols.is_meta):
        return
    if c.scale_exp is not None and not c.scale_exp.is_meta and (c.scale_exp.abs() > 64).any():
        raise ValueError("scale_exp out of range (|e| > 64)")
    if c.salient_cols is not None and c.n_salient:
        cols = c.salient_cols.long()
        if cols.min() < 0 or cols.max() >= c.in_features or (cols[1:] <= cols[:-1]).any():
            raise ValueError("salient_cols must be strictly increasing column indices in [0, in_features)")
    if c.layout.n_planes > 1:
        read = _salient_mask(c.layout, c.in_scale)
        stored = torch.zeros_like(read)
        if c.n_salient:
            stored[c.salient_cols.long()] = True
        if (read & ~stored).any():
            raise ValueError("a term reads plane >= 1 on a column missing from salient_cols")


def _word_mask(k: int, kw: int, device) -> torch.Tensor:
    """int64 (kw,): the bits of columns < k in each word."""
    valid = (k - torch.arange(kw, device=device) * WORD_BITS).clamp(0, WORD_BITS)
    return (torch.ones(kw, dtype=torch.int64, device=device) << valid) - 1


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(WORD_DTYPE)


def _trim(words: torch.Tensor, k: int) -> torch.Tensor:
    """Words (..., W) -> the first ceil(k/32) words with bits of columns >= k cleared."""
    kw = n_words(k)
    w = words[..., :kw].long() & 0xFFFFFFFF
    return _to_int32(w & _word_mask(k, kw, words.device))


def compact(p: PackedWeight, scale_dtype: str | torch.dtype | None = None) -> CompactWeight:
    """The v2 stored form of a v1 weight (see the module docstring).

    scale_dtype: the stored scales' dtype (default: p's); float8_e4m3fn rounds every term's
    scales to e4m3 times a power of two per (term, column block) (to_fp8), the rest are exact casts.
    """
    validate(p)
    if isinstance(scale_dtype, str):
        if scale_dtype not in STORED_SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {list(STORED_SCALE_DTYPES)}, got {scale_dtype!r}")
        scale_dtype = STORED_SCALE_DTYPES[scale_dtype]
    scales = {"out_scale": p.out_scale, "in_scale": p.in_scale[:, : p.in_features], "mean": p.mean}
    exp = None
    if scale_dtype == FP8:
        exp = torch.zeros(len(SCALE_NAMES), p.layout.n_terms, p.n_blocks, dtype=torch.int32, device=p.signs.device)
        for r, name in enumerate(SCALE_NAMES):
            if scales[name] is not None:
                q, exp[r] = to_fp8(_per_block(name, scales[name], p.block_size))
                scales[name] = _from_blocks(name, q, p.in_features)
    elif scale_dtype is not None:
        scales = {n: v.to(scale_dtype) if v is not None else None for n, v in scales.items()}
    k, layout = p.in_features, p.layout
    cols = sal = None
    if layout.n_planes > 1:
        cols = torch.nonzero(_salient_mask(layout, p.in_scale[:, :k])).flatten()
        word, bit = cols // WORD_BITS, (cols % WORD_BITS).to(torch.int32)
        bits = ((p.signs[1:, :, word] >> bit) & 1).bool()  # (P-1, N, S)
        sal = pack_bits(bits) if cols.numel() else p.signs.new_zeros(layout.n_planes - 1, p.out_features, 0)
        cols = cols.to(INDEX_DTYPE)
    c = CompactWeight(
        p.out_features, k, p.block_size, layout,
        signs=_trim(p.signs[0], k), out_scale=scales["out_scale"], in_scale=scales["in_scale"].contiguous(),
        groups=_trim(p.groups, k) if p.groups is not None else None, mean=scales["mean"],
        salient_cols=cols, salient_signs=sal, scale_exp=exp,
    )  # fmt: skip
    validate_compact(c)
    return c


def expand(c: CompactWeight, check: bool = True) -> PackedWeight:
    """The v1 execution layout of a stored weight: what every kernel reads.

    check=False skips the value checks of validate_compact (inside torch.compile, where they
    would be data-dependent branches); BinaryLinear validates its buffers when they are loaded.
    """
    if check:
        validate_compact(c)
    k, n, layout = c.in_features, c.out_features, c.layout
    k_pad = padded_k(k, c.block_size)
    kw_pad, dev = k_pad // WORD_BITS, c.signs.device
    pad = lambda w: F.pad(w, (0, kw_pad - w.shape[-1]))  # noqa: E731
    planes = [pad(_trim(c.signs, k)).unsqueeze(0)]  # _trim: padding bits 0 whatever is stored
    if layout.n_planes > 1:
        # Unread bits are 1 (what the quantizers leave there), padding 0; then the salient bits.
        words = _word_mask(k, kw_pad, dev).expand(layout.n_planes - 1, n, kw_pad).clone()
        if c.n_salient:
            cols = c.salient_cols.long()
            word, bit = cols // WORD_BITS, cols % WORD_BITS
            clear = torch.zeros(kw_pad, dtype=torch.int64, device=dev).index_add_(0, word, 1 << bit)
            words &= ~clear
            s = torch.arange(c.n_salient, device=dev)
            bits = (c.salient_signs[..., s // WORD_BITS].long() >> (s % WORD_BITS)) & 1  # (P-1, N, S)
            words.index_add_(2, word, bits << bit)  # distinct bit positions: add == or
        planes.append(_to_int32(words))
    scales = {name: getattr(c, name) for name in SCALE_NAMES}
    if c.scale_exp is not None:  # 8-bit scales: e4m3 x 2^e, exact in float16 unless tiny, always in float32
        scales = {n: _from_blocks(n, from_fp8(_per_block(n, t.float(), c.block_size), c.scale_exp[r]), k)
                  if t is not None else None for r, (n, t) in enumerate(scales.items())}  # fmt: skip
        half = {n: t.half() if t is not None else None for n, t in scales.items()}
        if all(t is None or torch.equal(half[n].float(), t) for n, t in scales.items()):
            scales = half
    p = PackedWeight(
        n, k, c.block_size, layout,
        signs=torch.cat(planes).contiguous(), out_scale=scales["out_scale"],
        in_scale=F.pad(scales["in_scale"], (0, k_pad - k)).contiguous(),
        groups=pad(_trim(c.groups, k)).contiguous() if c.groups is not None else None, mean=scales["mean"],
    )  # fmt: skip
    validate(p)
    return p


def stored_bits(c: CompactWeight) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in c.tensors().values())


def bits_per_weight(c: CompactWeight) -> float:
    """True bits per weight as stored: every stored bit / (N * K)."""
    return stored_bits(c) / (c.out_features * c.in_features)


def bits_breakdown(c: CompactWeight) -> dict[str, int]:
    """Where the stored bits go (same parts as format.bits_breakdown; they sum to stored_bits).

    sign           plane 0 on the K columns
    second_sign    planes >= 1 on the salient columns
    unused_sign    0 (v2 stores no unread plane bits; kept so v1 and v2 tables line up)
    group          the group bitmap on the K columns
    padding        plane 0, the bitmap and the gathered planes up to whole words
    salient_index  salient_cols (32 bits per salient column, per layer, not per row)
    out_scale, in_scale, mean   the scale tensors
    scale_exp      the exponents of 8-bit scales (3 x 32 bits per term and column block, per layer)

    Needs only shapes: every tensor may be a meta tensor (checkpoint headers).
    """
    n, k, s = c.out_features, c.in_features, c.n_salient
    extra = c.layout.n_planes - 1
    planes0 = 1 + (c.groups is not None)
    out = {
        "sign": n * k,
        "second_sign": extra * n * s,
        "unused_sign": 0,
        "group": n * k if c.groups is not None else 0,
        "padding": planes0 * n * (c.signs.shape[-1] * WORD_BITS - k)
        + (extra * n * (c.salient_signs.shape[-1] * WORD_BITS - s) if extra else 0),
        "salient_index": s * c.salient_cols.element_size() * 8 if c.salient_cols is not None else 0,
    }
    for name in ("out_scale", "in_scale", "mean", "scale_exp"):
        t = getattr(c, name)
        out[name] = t.numel() * t.element_size() * 8 if t is not None else 0
    return out


def dequantize(c: CompactWeight) -> torch.Tensor:
    from onebit.format import dequantize as dequantize_v1

    return dequantize_v1(expand(c))

