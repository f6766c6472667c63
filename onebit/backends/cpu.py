"""CPU backend: onebit._C lookup-table kernels (csrc/cpu), run-time AVX-512 / AVX2 / scalar.

    binary_linear(x2d, packed, act_bits) -> (M, N) float32

x2d is a contiguous (M, K) fp32/fp16/bf16 CPU tensor. The kernel never forms a dense
weight: every term of the packed format becomes (once, cached, by `repack_for_lut()`) a
"job" that reads the original sign / group bit planes through 16-entry lookup tables of the
activations (T-MAC style: one table lookup per 4 weights and 16 rows), times a per-row,
per-block fp32 coefficient:

    ALL    term: o * sum s x'                       (+-1 table, 1 lookup per 4 weights)
    GROUP1 term: o * (T01[b & g] - T01[~b & g])      (0/1 table, 2 lookups)
    GROUP0 term: o * (T01[b & ~g] - T01[~b & ~g])
    mean       : m * X (block sum) for ALL, m * T01[g or ~g] for group terms
    GROUP0 + GROUP1 on one plane sharing in_scale (mean-based methods):
                 (o0+o1)/2 T+-[b] + (o1-o0)/2 T+-[~(b ^ g)]   (2 lookups for both terms)

with x' = x * in_scale of the term and o/m its out_scale/mean. Terms with the same in_scale
share x' and tables. When in_scale is zero on many columns (BiLLM/CGB salient columns),
the act's columns and the planes it reads are gathered to the nonzero columns per block,
so salient terms cost what their columns cost; acts with the same nonzero pattern share
the gathered planes.

A8 (act_bits=8) quantizes each x' per token exactly like onebit.reference.quantize_act_int8;
S and X are then exact integer sums.

With enough tokens the tile unit takes over when CPUID and the OS allow it (`amx_status()`;
the bit planes above are expanded to weight tiles on the fly, no second copy of the weights):

* A8 from `_C.amx_min_m()` tokens on: AMX-INT8 (csrc/cpu/amx_int8.cpp), TDPBSSD against the
  same int8 activations, exact int32 sums per block.
* A16 on AMX-BF16 (csrc/cpu/amx_bf16.cpp), still exact: each x' (fp32) is split into bf16
  parts hi + mid + lo that add up to it exactly (fewer when the input dtype and in_scale need
  fewer: bf16 x with a power-of-two in_scale is one part), the +-1/0 weights are exact in
  bf16, TDPBF16PS sums in fp32: the result differs from the reference by summation order only,
  like the LUT kernel. Tokens are scaled by a power of two first, so the instruction's flushing
  of denormal inputs and results stays far below fp32 rounding. Auto uses it from
  `_C.amx_a16_min_m()` tokens on for acts with group-select terms (CGB) or whose x' fits one
  bf16 part; single-term acts with fp32/fp16 x stay on the LUT kernel, which AMX beats by
  at most 1.2x and loses to on small layers (measurements in csrc/cpu/binary_linear.cpp).

In both, acts whose columns fill the tile chunks go to AMX, narrow gathered (salient) acts
stay on the LUT kernel.

`ONEBIT_CPU_ISA=scalar|avx2|avx512|amx` (or `isa=` on `binary_linear_isa`) forces an ISA path:
`amx` runs every job on AMX at any M (A8 on AMX-INT8, A16 on AMX-BF16; it needs both);
`scalar`/`avx2`/`avx512` never use AMX. Forcing a path the CPU/OS cannot run raises
RuntimeError. `ONEBIT_CPU_AMX=0` turns AMX detection off (read once per process);
`ONEBIT_CPU_AMX_MIN_M` / `ONEBIT_CPU_AMX_A16_MIN_M` override the auto thresholds.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from onebit.format import PackedWeight, Select, unpack_bits, validate

TILE_ROWS = 32
# Columns per weight unit: a row's 16 columns are stored as one 16-bit lane (_pair_tiles), so a
# gathered act pads each block to a multiple of 16 columns.
UNIT_COLUMNS = 16
ISAS = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}
# Gather an act's columns only when that saves at least this fraction of its work.
COMPACT_MIN_SAVING = 0.1
CACHE_SIZE = 4096

_ext = None
_ext_error: str | None = None


def _load_ext():
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from onebit import _C  # type: ignore[attr-defined]

            _ext = _C
        except ImportError as e:
            _ext_error = (
                f"onebit._C is not built ({e}); reinstall with `pip install --no-build-isolation -e .` "
                "with torch installed and a C++ compiler available"
            )
    return _ext


def available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, not {device.type}"
    if _load_ext() is None:
        return False, str(_ext_error)
    return True, f"onebit._C with ISA paths {list(_ext.supported_isas())}"


def supported_isas() -> list[str]:
    return list(_load_ext().supported_isas()) if _load_ext() is not None else []


def amx_status() -> str:
    """Which AMX paths run here ('available: AMX-INT8 (A8) and AMX-BF16 (A16)', 'partly
    available: ...'), or why none can ('unavailable (...)', 'not built (...)')."""
    ext = _load_ext()
    return str(ext.amx_status()) if ext is not None else str(_ext_error)


def amx_paths() -> list[str]:
    """The activation paths with an AMX kernel here: 'a8' (AMX-INT8), 'a16' (AMX-BF16)."""
    ext = _load_ext()
    return list(ext.amx_paths()) if ext is not None else []


# ---------------------------------------------------------------------------- repack


KIND_PM, KIND_SEL, KIND_S01 = 0, 1, 2


@dataclass
class LutWeight:
    """A packed weight rewritten for the LUT kernels (see csrc/cpu/lut.h for the layouts)."""

    out_features: int
    act_gidx: list[torch.Tensor]  # int32 (K_a,), K_a % 8 == 0
    act_gscale: list[torch.Tensor]  # fp32 (K_a,)
    act_boff: list[torch.Tensor]  # int32 (n_blocks + 1,), in bytes of 8 columns
    act_ecoef: list[torch.Tensor]  # fp32 (n_blocks, n_tiles, 32) or empty
    job_kind: list[int]
    job_inv: list[int]
    job_act: list[int]
    job_b: list[torch.Tensor]  # uint8 (n_tiles * K_a / 8 * 32,), block-major (see _block_major)
    job_g: list[torch.Tensor]  # same, or empty
    job_coef: list[torch.Tensor]  # fp32 or (when exact) fp16 (n_blocks, n_tiles, 32)
    handle: object = None  # onebit._C.LutWeight: validated once, holds the tensors and their pointers

    def nbytes(self) -> int:
        """Bytes the kernel streams per call (shared planes counted once)."""
        seen, total = set(), 0
        for t in self.act_gidx + self.act_gscale + self.act_boff + self.act_ecoef + self.job_b + self.job_g + self.job_coef:
            if t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _tile_rows(t: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """(N, C) -> (n_tiles, C, 32): rows padded with zeros to whole tiles, row index fastest."""
    n, c = t.shape
    t = torch.nn.functional.pad(t, (0, 0, 0, n_tiles * TILE_ROWS - n))
    return t.reshape(n_tiles, TILE_ROWS, c).transpose(1, 2).contiguous()


def _block_tiles(t: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Per-row, per-block values (N, n_blocks) -> (n_blocks, n_tiles, 32), block-major."""
    return _tile_rows(t, n_tiles).transpose(0, 1).contiguous()


def _pair_tiles(bytes_: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """uint8 (N, C), C even -> (n_tiles, C / 2, 64): for each 16-column unit u, the 32 rows of
    the tile, each row's two bytes (columns 16u..16u+7, then 16u+8..16u+15) side by side.

    Why pairs: a row's 16 columns are one 16-bit lane, so the AVX-512 A8 kernel indexes its
    64-entry tables (6 columns) straight from the loaded weights (see lut.h).
    """
    n, c = bytes_.shape
    t = torch.nn.functional.pad(bytes_, (0, 0, 0, n_tiles * TILE_ROWS - n))
    return t.reshape(n_tiles, TILE_ROWS, c // 2, 2).transpose(1, 2).reshape(n_tiles, c // 2, 2 * TILE_ROWS).contiguous()


def _block_major(tiles: torch.Tensor, boff: torch.Tensor) -> torch.Tensor:
    """Plane tiles (n_tiles, K_a / 16, 64) -> flat, block-major: block b of every tile, then b + 1.

    The kernels run one column block over all tiles at a time; this order makes that one
    sequential stream (and keeps a block's tables in L1 for all tiles).
    """
    bo = (boff // 2).tolist()  # in 16-column units
    width = {bo[b + 1] - bo[b] for b in range(len(bo) - 1)}
    if len(width) == 1 and tiles.shape[1] > 0:  # every block the same width: a plain transpose
        nt, nu, row_bytes = tiles.shape
        w = width.pop()
        return tiles.reshape(nt, nu // w, w, row_bytes).transpose(0, 1).contiguous().reshape(-1)
    return torch.cat([tiles[:, bo[b] : bo[b + 1]].reshape(-1) for b in range(len(bo) - 1)])


def _coef_tiles(coef: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Coefficient tiles in fp16 when that is exact (fp16 scales: 1/8 fewer bytes to stream)."""
    t = _block_tiles(coef, n_tiles)
    h = t.half()
    return h if torch.isfinite(h).all() and torch.equal(h.float(), t) else t


def _bytes_of_words(words: torch.Tensor) -> torch.Tensor:
    """int32 words (N, W) -> uint8 (N, 4W): byte kb holds columns 8kb..8kb+7, LSB first."""
    w = words.contiguous()
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    return ((w.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(w.shape[0], -1)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """bool (N, C), C % 8 == 0 -> uint8 (N, C / 8), LSB first."""
    n, c = bits.shape
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    return (bits.reshape(n, c // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _act_columns(
    in_scale: torch.Tensor, block_size: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.Tensor]:
    """The columns an act needs: (gidx, gscale, boff, compacted, real slot mask).

    All columns unless gathering pays.

    Padding columns (>= in_features) read column in_features - 1 with scale 0: x has no padding.
    """
    k_pad = in_scale.numel()
    in_scale = in_scale.clone()
    in_scale[in_features:] = 0
    nb = k_pad // block_size
    nz = (in_scale != 0).reshape(nb, block_size)
    counts = nz.sum(1)
    padded = (counts + UNIT_COLUMNS - 1) // UNIT_COLUMNS * UNIT_COLUMNS
    if int(padded.sum()) > (1 - COMPACT_MIN_SAVING) * k_pad:
        gidx = torch.arange(k_pad, dtype=torch.int32).clamp_(max=in_features - 1)
        boff = torch.arange(0, k_pad + 1, block_size, dtype=torch.int32) // 8
        return gidx, in_scale.clone(), boff, False, torch.arange(k_pad) < in_features
    idx, scale = [], []
    for b in range(nb):
        cols = torch.nonzero(nz[b]).flatten() + b * block_size
        pad = int(padded[b]) - cols.numel()
        idx.append(torch.cat([cols, torch.full((pad,), b * block_size, dtype=cols.dtype)]))
        scale.append(torch.cat([in_scale[cols], torch.zeros(pad)]))
    boff = torch.zeros(nb + 1, dtype=torch.int32)
    boff[1:] = torch.cumsum(padded // 8, 0)
    gidx = torch.cat(idx).to(torch.int32)
    scale = torch.cat(scale)
    return gidx, scale, boff, True, scale != 0


def repack_for_lut(p: PackedWeight) -> LutWeight:
    """Rewrite a format-v1 PackedWeight into LUT jobs (pure torch, CPU; run once per weight)."""
    validate(p)
    n, bs = p.out_features, p.block_size
    n_tiles = -(-n // TILE_ROWS)
    signs = p.signs.cpu()
    groups = p.groups.cpu() if p.groups is not None else None
    out_scale = p.out_scale.cpu().float()
    mean = p.mean.cpu().float() if p.mean is not None else None
    in_scale = p.in_scale.cpu().float()

    acts: list[torch.Tensor] = []
    term_act = []
    for t in range(p.layout.n_terms):
        for a, s in enumerate(acts):
            if torch.equal(s, in_scale[t]):
                term_act.append(a)
                break
        else:
            acts.append(in_scale[t])
            term_act.append(len(acts) - 1)

    # Jobs keyed by (act, kind, plane, inv); equal keys add their coefficients.
    jobs: dict[tuple[int, int, int, int], torch.Tensor] = {}
    ecoef: dict[int, torch.Tensor] = {}

    def add(d: dict, key, v: torch.Tensor) -> None:
        d[key] = d[key] + v if key in d else v.clone()

    for t, term in enumerate(p.layout.terms):
        a, o = term_act[t], out_scale[t]
        if term.select is Select.ALL:
            add(jobs, (a, KIND_PM, term.plane, 0), o)
            if mean is not None:
                add(ecoef, a, mean[t])
        else:
            inv = int(term.select is Select.GROUP0)
            add(jobs, (a, KIND_SEL, term.plane, inv), o)
            if mean is not None:
                add(jobs, (a, KIND_S01, -1, inv), mean[t])  # plane -1: the group bitmap

    # A GROUP0/GROUP1 pair on one plane and one act (mean-based methods, whose in_scale is a
    # 0/1 column mask shared by both groups) needs 2 lookups instead of 4 on +-1 tables:
    #   o0 sum_{g=0} s x + o1 sum_{g=1} s x = (o0+o1)/2 T+-[b] + (o1-o0)/2 T+-[~(b ^ g)]
    # (~(b ^ g) is +1 exactly where g = 1 and s = +1 or g = 0 and s = -1). The xnor plane is
    # stored as its own plane (key -2 - p).
    for a, kind, plane, inv in list(jobs):
        if kind == KIND_SEL and inv == 1 and (a, KIND_SEL, plane, 0) in jobs:
            o0, o1 = jobs.pop((a, KIND_SEL, plane, 1)), jobs.pop((a, KIND_SEL, plane, 0))
            add(jobs, (a, KIND_PM, plane, 0), (o0 + o1) / 2)
            add(jobs, (a, KIND_PM, -2 - plane, 0), (o1 - o0) / 2)

    # Column sets: acts with the same nonzero in_scale pattern share gathered planes.
    colsets: list[tuple[torch.Tensor, tuple]] = []
    act_cs = []
    for s in acts:
        nz = s != 0
        nz[p.in_features :] = False
        for c, (pat, _) in enumerate(colsets):
            if torch.equal(pat, nz):
                act_cs.append(c)
                break
        else:
            colsets.append((nz, _act_columns(s, bs, p.in_features)))
            act_cs.append(len(colsets) - 1)

    planes: dict[tuple[int, int], torch.Tensor] = {}  # (colset, plane | -1 group | -2-p xnor) -> tiles

    def plane_tiles(c: int, plane: int) -> torch.Tensor:
        if (c, plane) not in planes:
            words = groups if plane == -1 else signs[plane] if plane >= 0 else ~(signs[-2 - plane] ^ groups)
            gidx, _, _, compacted, real = colsets[c][1]
            if compacted:
                # Padding slots point at a real column: clear their bits.
                bytes_ = _bits_to_bytes(unpack_bits(words)[:, gidx.long()] & real)
            else:
                bytes_ = _bytes_of_words(words)
            planes[(c, plane)] = _block_major(_pair_tiles(bytes_, n_tiles), colsets[c][1][2])
        return planes[(c, plane)]

    out = LutWeight(n, [], [], [], [], [], [], [], [], [], [])
    for a, s in enumerate(acts):
        gidx, cols_scale, boff, compacted, real = colsets[act_cs[a]][1]
        scale = s.clone()
        scale[p.in_features :] = 0
        out.act_gidx.append(gidx.contiguous())
        out.act_gscale.append((scale[gidx.long()] * real).contiguous())
        out.act_boff.append(boff.contiguous())
        e = ecoef.get(a)
        out.act_ecoef.append(_block_tiles(e, n_tiles) if e is not None else torch.empty(0))
    empty = torch.empty(0, dtype=torch.uint8)
    for (a, kind, plane, inv), coef in jobs.items():
        c = act_cs[a]
        out.job_kind.append(kind)
        out.job_inv.append(inv)
        out.job_act.append(a)
        out.job_b.append(plane_tiles(c, plane))
        out.job_g.append(plane_tiles(c, -1) if kind == KIND_SEL else empty)
        out.job_coef.append(_coef_tiles(coef, n_tiles))
    ext = _load_ext()
    if ext is not None:
        out.handle = ext.LutWeight(
            p.in_features,
            n,
            out.act_gidx,
            out.act_gscale,
            out.act_boff,
            out.act_ecoef,
            out.job_kind,
            out.job_inv,
            out.job_act,
            out.job_b,
            out.job_g,
            out.job_coef,
        )
    return out


# ---------------------------------------------------------------------------- cache

_cache: "OrderedDict[tuple, tuple[weakref.ref, LutWeight]]" = OrderedDict()
# Re-entrant: a weakref callback (run by the garbage collector at any allocation) may fire
# while this thread holds the lock.
_cache_lock = threading.RLock()


def _version(t: torch.Tensor) -> int:
    # Inference tensors (created under torch.inference_mode) have no version counter; they
    # cannot be updated in place outside inference mode, so -1 stands for "never changes".
    return -1 if t.is_inference() else t._version


def _key(p: PackedWeight) -> tuple:
    # Called on every forward: kept to attribute reads. Shapes and layout are part of the key
    # because a PackedWeight can be rebuilt around the same tensors with other metadata.
    key = [p.out_features, p.in_features, p.block_size, p.layout]
    for t in (p.signs, p.out_scale, p.in_scale, p.groups, p.mean):
        if t is not None:
            key += (t.data_ptr(), _version(t), t.shape, t.dtype)
    return tuple(key)


def _drop(key: tuple) -> None:
    with _cache_lock:
        _cache.pop(key, None)


def get_lut_weight(p: PackedWeight) -> LutWeight:
    """repack_for_lut(p), cached on the tensors' data pointers and versions.

    An entry holds only a weak reference to the sign tensor and is dropped when that tensor
    dies, so a new tensor at the same address cannot hit a stale entry and the repacked
    copy of a freed layer does not outlive it.
    """
    key = _key(p)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is not None:
            _cache.move_to_end(key)
            return hit[1]
    lw = repack_for_lut(p)
    with _cache_lock:
        _cache[key] = (weakref.ref(p.signs, lambda _r, key=key: _drop(key)), lw)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return lw


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# ---------------------------------------------------------------------------- the op


def _isa_from_env() -> str:
    isa = os.environ.get("ONEBIT_CPU_ISA", "auto").strip().lower() or "auto"
    if isa not in ISAS:
        raise ValueError(f"ONEBIT_CPU_ISA must be one of {sorted(ISAS)}, got {isa!r}")
    return isa


_supported: frozenset[str] | None = None


def _check_call(packed: PackedWeight, act_bits: int, isa: str) -> None:
    global _supported
    if _supported is None:
        ext = _load_ext()
        if ext is None:
            raise RuntimeError(_ext_error)
        _supported = frozenset(ext.supported_isas()) | {"auto"}
    if isa not in _supported:
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
        raise RuntimeError(f"this CPU cannot run the {isa} path (supported: {sorted(_supported)})")
    if packed.signs.device.type != "cpu":
        raise ValueError("the cpu backend needs x and the packed weight on the CPU")
    if act_bits != 16 and act_bits != 8:
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits}")


def binary_linear_isa(
    x2d: torch.Tensor, packed: PackedWeight, act_bits: int = 16, isa: str = "auto", dense: bool | None = None
) -> torch.Tensor:
    """binary_linear on an explicit ISA path ('auto', 'amx', 'avx512', 'avx2', 'scalar').

    dense: None lets the kernel choose (multi-term weights with many tokens expand panels of
    rows to fp32 and run a float GEMM: the prefill path), True forces that path, False the
    lookup tables."""
    _check_call(packed, act_bits, isa)
    if x2d.device.type != "cpu":
        raise ValueError("the cpu backend needs x and the packed weight on the CPU")
    if x2d.dim() != 2 or x2d.shape[1] != packed.in_features:
        raise ValueError(f"x must be (M, {packed.in_features}), got {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32/float16/bfloat16, got {x2d.dtype}")
    if x2d.shape[0] == 0:
        return torch.zeros(0, packed.out_features, dtype=torch.float32)
    lw = get_lut_weight(packed)
    return lw.handle.forward(x2d if x2d.is_contiguous() else x2d.contiguous(), act_bits, ISAS[isa],
                             -1 if dense is None else int(bool(dense)))


_env_isa: tuple[str, str] | None = None


def binary_linear(x2d: torch.Tensor, packed: PackedWeight, act_bits: int = 16) -> torch.Tensor:
    """(M, K) fp32/fp16/bf16 CPU x -> (M, N) fp32 = x @ W^T (registry entry of backend 'cpu')."""
    global _env_isa
    raw = os.environ.get("ONEBIT_CPU_ISA", "")
    if _env_isa is None or _env_isa[0] != raw:
        _env_isa = (raw, _isa_from_env())
    return binary_linear_isa(x2d, packed, act_bits, _env_isa[1])


def bind(packed: PackedWeight, act_bits: int = 16):
    """run(x) for eager loops (onebit.ops.bind): repack and ISA choice done once, so a call
    is the C++ kernel plus ~1 us. x must be a contiguous (M, K) float CPU tensor (the caller
    checks; the C++ side checks again); run.accepts_nd: (..., K) works too, giving (..., N)
    without a reshape on either side (~1 us each). The caller re-binds when the weight or
    ONEBIT_CPU_ISA changes."""
    isa = _isa_from_env()
    _check_call(packed, act_bits, isa)
    handle, run_isa, n = get_lut_weight(packed).handle, ISAS[isa], packed.out_features

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return torch.zeros(*x.shape[:-1], n, dtype=torch.float32)
        return handle.forward(x, act_bits, run_isa)

    run.accepts_nd = True
    return run


def dense_linear(
    x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, group: int = 0, isa: str = "auto"
) -> torch.Tensor:
    """(M, K) contiguous float CPU x2d @ weight^T with a contiguous (N, K) weight in float16 /
    bfloat16, or in int8 times `scale` (N, ceil(K / group)) float32, one per row and group of
    `group` columns (a multiple of 16, or >= K): onebit._C's dense kernel
    (csrc/cpu/dense.cpp), fp32 accumulation, y in x2d's dtype. onebit.head wraps it (shapes,
    dtypes, fallbacks); `isa` forces a path like binary_linear_isa."""
    ext = _load_ext()
    if ext is None:
        raise RuntimeError(str(_ext_error))
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
    return ext.dense_linear(x2d, weight, scale, group, ISAS[isa])


__all__ = ["available", "amx_status", "amx_paths", "bind", "binary_linear", "binary_linear_isa", "dense_linear", "repack_for_lut",
           "get_lut_weight", "clear_cache"]  # fmt: skip
