"""Packed 1-bit weight format, version 1: the executable form of docs/FORMAT.md.

A weight W (N x K, out x in) is stored as bit planes packed along K plus a list of terms.
Term t names a sign plane and a group selector and carries per-row, per-block
`out_scale` (N x n_blocks), a per-column `in_scale` (K_pad) and optionally `mean`
(N x n_blocks). The dequantized weight is

    W[i, j] = sum_t sel_t[i, j] * in_scale_t[j] * (out_scale_t[i, j // B] * s_t[i, j] + mean_t[i, j // B])

with s = 2*bit - 1 (bit 1 = +1, so sign(0) = +1), sel = 1 (ALL), 1 - g (GROUP0) or g
(GROUP1), g the group bitmap. Everything here is pure torch and fp32: this module is the
spec the kernels are tested against, not a fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Iterator

import torch

# The checkpoint / stored format: 2 = onebit/compact.py (compact salient planes, no block
# padding); 3 = 2 plus an int8 lm_head (`quantization_config.head`, onebit/head.py). A
# checkpoint records the lowest version that reads it (3 only with an int8 head), so a onebit
# that reads 2 still reads every other checkpoint. Version 1 stored this module's execution
# layout as is; such checkpoints still load (onebit.load_quantized converts them).
FORMAT_VERSION = 3
COMPACT_FORMAT_VERSION = 2  # the first stored (compact) form; what a checkpoint without an int8 head records
INT8_HEAD_FORMAT_VERSION = 3
WORD_BITS = 32
WORD_DTYPE = torch.int32
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Select(IntEnum):
    ALL = 0
    GROUP0 = 1  # weights whose group bit is 0
    GROUP1 = 2  # weights whose group bit is 1


@dataclass(frozen=True)
class Term:
    plane: int
    select: Select


@dataclass(frozen=True)
class Layout:
    """Which terms a packed weight has. Fixed per method, so buffers can be allocated early."""

    terms: tuple[Term, ...]
    has_mean: bool = False

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a Layout needs at least one term")
        planes = sorted({t.plane for t in self.terms})
        if planes != list(range(len(planes))):
            raise ValueError(f"term planes must be 0..P-1 without gaps, got {planes}")
        object.__setattr__(self, "terms", tuple(Term(int(t.plane), Select(t.select)) for t in self.terms))

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    @property
    def n_planes(self) -> int:
        return 1 + max(t.plane for t in self.terms)

    @property
    def has_group(self) -> bool:
        return any(t.select is not Select.ALL for t in self.terms)

    def to_dict(self) -> dict[str, Any]:
        return {"terms": [[t.plane, int(t.select)] for t in self.terms], "has_mean": self.has_mean}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layout":
        try:
            return cls(tuple(Term(int(p), Select(int(s))) for p, s in d["terms"]), bool(d["has_mean"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed packed layout {d!r}: {e}") from None


SINGLE_TERM = Layout((Term(0, Select.ALL),))


def padded_k(in_features: int, block_size: int) -> int:
    return -(-in_features // block_size) * block_size


@dataclass
class PackedWeight:
    """Tensors of one packed weight. Shapes are checked by `validate()`."""

    out_features: int
    in_features: int
    block_size: int
    layout: Layout
    signs: torch.Tensor  # int32 (n_planes, N, K_pad // 32)
    out_scale: torch.Tensor  # (n_terms, N, n_blocks), scale dtype
    in_scale: torch.Tensor  # (n_terms, K_pad), scale dtype, zero in the padding
    groups: torch.Tensor | None = None  # int32 (N, K_pad // 32)
    mean: torch.Tensor | None = None  # (n_terms, N, n_blocks), scale dtype

    @property
    def k_pad(self) -> int:
        return padded_k(self.in_features, self.block_size)

    @property
    def n_blocks(self) -> int:
        return self.k_pad // self.block_size

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"signs": self.signs, "out_scale": self.out_scale, "in_scale": self.in_scale}
        if self.groups is not None:
            out["groups"] = self.groups
        if self.mean is not None:
            out["mean"] = self.mean
        return out

    def to(self, device: torch.device | str) -> "PackedWeight":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return PackedWeight(self.out_features, self.in_features, self.block_size, self.layout, **moved)


def expected_shapes(
    out_features: int, in_features: int, block_size: int, layout: Layout
) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a packed weight (the buffers of BinaryLinear)."""
    k_pad = padded_k(in_features, block_size)
    n_blocks = k_pad // block_size
    shapes = {
        "signs": (layout.n_planes, out_features, k_pad // WORD_BITS),
        "out_scale": (layout.n_terms, out_features, n_blocks),
        "in_scale": (layout.n_terms, k_pad),
    }
    if layout.has_group:
        shapes["groups"] = (out_features, k_pad // WORD_BITS)
    if layout.has_mean:
        shapes["mean"] = (layout.n_terms, out_features, n_blocks)
    return shapes


def validate(p: PackedWeight) -> None:
    """Raise ValueError unless every tensor has the shape and dtype the format requires."""
    if p.block_size <= 0 or p.block_size % WORD_BITS:
        raise ValueError(f"block_size must be a positive multiple of {WORD_BITS}, got {p.block_size}")
    if p.out_features <= 0 or p.in_features <= 0:
        raise ValueError(f"bad logical shape {p.out_features} x {p.in_features}")
    want = expected_shapes(p.out_features, p.in_features, p.block_size, p.layout)
    check_tensors(p.tensors(), want, ("signs", "groups"), SCALE_DTYPES.values())


def check_tensors(have: dict, want: dict, int_names: tuple, scale_dtypes) -> None:
    """Names and shapes as `want`; int32 for int_names, one dtype from scale_dtypes for the rest."""
    if set(want) != set(have):
        raise ValueError(f"packed weight has tensors {sorted(have)}, layout needs {sorted(want)}")
    for name, shape in want.items():
        t = have[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"packed tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if name in int_names:
            if t.dtype != WORD_DTYPE:
                raise ValueError(f"packed tensor {name!r} must be int32, got {t.dtype}")
        elif t.dtype not in scale_dtypes:
            raise ValueError(f"scale tensor {name!r} has unsupported dtype {t.dtype}")
    used = {t.dtype for n, t in have.items() if n not in int_names}
    if len(used) != 1:
        raise ValueError(f"all scale tensors must share one dtype, got {used}")


# ---------------------------------------------------------------------------- bit packing


def pack_bits(bits: torch.Tensor, k_pad: int | None = None) -> torch.Tensor:
    """Pack a bool tensor (..., K) into int32 words along the last dim, LSB first.

    Column j lands in bit (j % 32) of word (j // 32); padding columns are 0.
    """
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    k = bits.shape[-1]
    k_pad = -(-k // WORD_BITS) * WORD_BITS if k_pad is None else k_pad
    if k_pad < k or k_pad % WORD_BITS:
        raise ValueError(f"k_pad={k_pad} must be a multiple of {WORD_BITS} and >= K={k}")
    b = torch.nn.functional.pad(bits.to(torch.int64), (0, k_pad - k))
    b = b.reshape(*bits.shape[:-1], k_pad // WORD_BITS, WORD_BITS)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=bits.device) << torch.arange(
        WORD_BITS, device=bits.device
    )
    words = (b * weights).sum(-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(WORD_DTYPE)


def unpack_bits(words: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of pack_bits: int32 words (..., W) -> bool (..., k or 32*W)."""
    if words.dtype != WORD_DTYPE:
        raise TypeError(f"unpack_bits expects int32 words, got {words.dtype}")
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool()
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)
    return bits if k is None else bits[..., :k]


# ---------------------------------------------------------------------------- pack / unpack


def pack(
    signs: torch.Tensor,
    out_scale: torch.Tensor,
    in_scale: torch.Tensor,
    layout: Layout,
    block_size: int = 128,
    groups: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    scale_dtype: str | torch.dtype = "float16",
) -> PackedWeight:
    """Pack dense quantizer output into format v1.

    signs:     (n_planes, N, K), bool (True = +1) or real (>= 0 means +1: sign(0) = +1)
    groups:    (N, K) bool group bitmap, required iff the layout selects groups
    out_scale: (n_terms, N, ceil(K / block_size)); mean likewise
    in_scale:  (n_terms, K); padded with zeros to K_pad
    """
    if isinstance(scale_dtype, str):
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {list(SCALE_DTYPES)}, got {scale_dtype!r}")
        scale_dtype = SCALE_DTYPES[scale_dtype]
    if signs.dim() != 3:
        raise ValueError(f"signs must be (n_planes, N, K), got shape {tuple(signs.shape)}")
    _, n, k = signs.shape
    k_pad = padded_k(k, block_size)
    sign_bits = signs if signs.dtype == torch.bool else signs >= 0
    if layout.has_group and groups is None:
        raise ValueError("layout selects groups but no group bitmap was given")
    for name, t in (("out_scale", out_scale), ("in_scale", in_scale), ("mean", mean)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf")
    packed = PackedWeight(
        out_features=n,
        in_features=k,
        block_size=block_size,
        layout=layout,
        signs=pack_bits(sign_bits, k_pad),
        out_scale=out_scale.to(scale_dtype).contiguous(),
        in_scale=torch.nn.functional.pad(in_scale.float(), (0, k_pad - k)).to(scale_dtype).contiguous(),
        groups=pack_bits(groups.bool(), k_pad) if layout.has_group else None,
        mean=mean.to(scale_dtype).contiguous() if layout.has_mean else None,
    )
    validate(packed)
    return packed


def iter_dequantized_rows(p: PackedWeight, max_elems: int = 1 << 22) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (row0, fp32 rows of W (r x K)) in chunks of at most ~max_elems weights.

    Bounded memory: the op's torch reference uses this so a large layer is never held as a
    dense fp32 matrix at once.
    """
    rows = max(1, max_elems // p.k_pad)
    for r0 in range(0, p.out_features, rows):
        yield r0, _dequantize_rows(p, r0, min(p.out_features, r0 + rows))


def _dequantize_rows(p: PackedWeight, r0: int, r1: int) -> torch.Tensor:
    k, bs = p.in_features, p.block_size
    s = unpack_bits(p.signs[:, r0:r1]).float() * 2 - 1  # (P, r, K_pad)
    g = unpack_bits(p.groups[r0:r1]).float() if p.groups is not None else None
    w = torch.zeros(r1 - r0, p.k_pad, dtype=torch.float32, device=p.signs.device)
    for t, term in enumerate(p.layout.terms):
        out = p.out_scale[t, r0:r1].float().repeat_interleave(bs, dim=1)
        contrib = out * s[term.plane]
        if p.mean is not None:
            contrib = contrib + p.mean[t, r0:r1].float().repeat_interleave(bs, dim=1)
        contrib = contrib * p.in_scale[t].float()
        if term.select is Select.GROUP0:
            contrib = contrib * (1 - g)
        elif term.select is Select.GROUP1:
            contrib = contrib * g
        w += contrib
    return w[:, :k]


def dequantize(p: PackedWeight) -> torch.Tensor:
    """The full dense fp32 weight (N x K). For tests and small layers."""
    return _dequantize_rows(p, 0, p.out_features)


# ---------------------------------------------------------------------------- accounting


def stored_bits(p: PackedWeight) -> int:
    """Every bit the format stores for this weight: planes, scales, padding."""
    return sum(t.numel() * t.element_size() * 8 for t in p.tensors().values())


def bits_per_weight(p: PackedWeight) -> float:
    """True bits per weight: everything stored divided by the N*K logical weights."""
    return stored_bits(p) / (p.out_features * p.in_features)


def plane_columns(p: PackedWeight, plane: int) -> torch.Tensor:
    """Bool (K_pad,): the columns on which some term reading `plane` has a nonzero in_scale."""
    cols = torch.zeros(p.k_pad, dtype=torch.bool, device=p.in_scale.device)
    for t, term in enumerate(p.layout.terms):
        if term.plane == plane:
            cols |= p.in_scale[t] != 0
    return cols


def bits_breakdown(p: PackedWeight) -> dict[str, int]:
    """Where the stored bits of a packed weight go; the values sum to stored_bits(p).

    sign            plane 0 on the K logical columns (the papers' 1 bit per weight)
    second_sign     planes >= 1 on the columns their terms use (BiLLM/CGB salient columns)
    unused_sign     planes >= 1 on the other logical columns: stored so that every plane has
                    the same shape, never read (a compact salient plane would drop them)
    group           the group bitmap on the K logical columns
    padding         every plane and the group bitmap on the padding columns K..K_pad-1
    out_scale, in_scale, mean   the scale tensors, whole (their padding entries included)

    Needs only the shapes of the planes and the values of in_scale, so `signs`, `groups`,
    `out_scale` and `mean` may be meta tensors (checkpoint headers).
    """
    n, k = p.out_features, p.in_features
    n_planes = p.signs.shape[0]
    used = sum(int(plane_columns(p, plane)[:k].sum()) for plane in range(1, n_planes))
    planes = n_planes + (p.groups is not None)
    out = {
        "sign": n * k,
        "second_sign": n * used,
        "unused_sign": n * ((n_planes - 1) * k - used),
        "group": n * k if p.groups is not None else 0,
        "padding": planes * n * (p.signs.shape[-1] * WORD_BITS - k),
    }
    for name in ("out_scale", "in_scale", "mean"):
        t = getattr(p, name)
        out[name] = t.numel() * t.element_size() * 8 if t is not None else 0
    return out


def sign_bits_per_weight(p: PackedWeight) -> float:
    """The papers' figure: sign bits actually used, per weight (no group bits, no scales).

    Plane 0 holds one used bit per weight; higher planes count only on the columns where a
    term reading them has a nonzero in_scale (BiLLM's salient columns).
    """
    used = p.out_features * p.in_features
    for plane in range(1, p.layout.n_planes):
        used += p.out_features * int(plane_columns(p, plane)[: p.in_features].sum())
    return used / (p.out_features * p.in_features)
