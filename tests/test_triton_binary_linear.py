"""Triton kernels (onebit.kernels) against onebit.reference in the Triton interpreter.

Shapes stay tiny (the interpreter costs per program and per loop iteration); K and N are
not multiples of 32 or of the block size. A16 is compared under the tolerance policy; A8
is compared with the reference built from the same quantized activations, and exactly
(torch.equal) on inputs whose integer sums are exactly representable.
"""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, random_packed
from tolerances import REL_TOL, assert_close, max_rel_err

from onebit.format import Layout, Select, Term, pack
from onebit.reference import binary_linear_ref

kernels = pytest.importorskip("onebit.kernels.binary_linear", reason="triton is not installed")

from onebit.kernels import binary_gemm, binary_gemv, binary_popcount
from onebit.kernels._common import pow2_divisor, repack_for_binary_linear, term_code

DEVICE = "cpu" if kernels.available("cpu")[0] else "cuda"
if not kernels.available(DEVICE)[0]:
    pytest.skip(f"Triton kernels cannot run here: {kernels.available(DEVICE)[1]}", allow_module_level=True)

N, K, BS = 45, 100, 64  # N, K not multiples of 32; K not a multiple of the block size
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


def _packed(layout: str, n: int = N, k: int = K, bs: int = BS, seed: int = 0, scale_dtype: str = "float16"):
    return random_packed(n, k, LAYOUTS[layout], bs, seed=seed, scale_dtype=scale_dtype).to(DEVICE)


def _check(y: torch.Tensor, x: torch.Tensor, p, what: str, act_bits: int = 16) -> None:
    ref = binary_linear_ref(x, p, act_bits=act_bits)
    # Kernels return fp32 and both paths see the same x, so the fp32 (summation order) bound
    # applies, except for the GPU tensor-core GEMM (M > 8, 16-bit x): it feeds +-in_scale to
    # the MMA in x's dtype, which rounds bf16 / fp32 scales once -> x's dtype bound.
    tol = torch.float32
    if DEVICE == "cuda" and act_bits == 16 and x.shape[0] > binary_gemv.MAX_M and x.dtype != torch.float32:
        tol = x.dtype
    assert_close(y, ref, dtype=tol, what=what)


# ------------------------------------------------------------------------------- A16


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a16_matches_reference(layout, m, dtype):
    p = _packed(layout, seed=m)
    x = _x(m, K, dtype, seed=m)
    y = kernels.binary_linear(x, p, 16)
    assert y.dtype == torch.float32 and y.shape == (m, N)
    _check(y, x, p, f"a16 {layout} M={m} {dtype}")


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gemm_path_small_m_agrees_with_gemv(layout, m):
    """The GEMM kernel takes any M: on M <= 8 it must agree with the GEMV kernel."""
    p = _packed(layout, seed=11)
    kw = repack_for_binary_linear(p)
    x = _x(m, K, torch.float32, seed=12)
    y1 = binary_gemv.binary_gemv_triton(x, kw)
    y2 = binary_gemm.binary_gemm_triton(x, kw)
    assert max_rel_err(y1, y2) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("block_size", [32, 96, 128, 512])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_block_sizes_and_scale_dtypes(block_size, scale_dtype):
    """Non-power-of-two blocks (96: K tiles of 32) and blocks larger than the K cap (512)."""
    k = 200
    p = _packed("cgb", n=37, k=k, bs=block_size, seed=block_size, scale_dtype=scale_dtype)
    for m in (2, 12):
        x = _x(m, k, torch.bfloat16, seed=m)
        _check(kernels.binary_linear(x, p, 16), x, p, f"a16 bs={block_size} {scale_dtype} M={m}")
    _check(kernels.binary_linear(x, p, 8), x, p, f"a8 bs={block_size} {scale_dtype}", act_bits=8)


def test_non_contiguous_inputs():
    p = _packed("mean", seed=3)
    xt = _x(K, 5, torch.float16, seed=4).t()  # stride along K != 1
    assert not xt.is_contiguous()
    _check(kernels.binary_linear(xt, p, 16), xt, p, "a16 transposed x")
    wide = _x(20, 2 * K, torch.float32, seed=5)[::2, 10 : 10 + K]  # row stride != K, unit stride along K
    _check(kernels.binary_linear(wide, p, 16), wide, p, "a16 strided rows (gemm)")
    _check(kernels.binary_linear(wide[:3], p, 16), wide[:3], p, "a16 strided rows (gemv)")
    _check(kernels.binary_linear(wide, p, 8), wide, p, "a8 strided rows", act_bits=8)


def test_through_the_op_3d_input():
    from onebit.ops import binary_linear

    p = _packed("cgb", seed=5)
    x = _x(6, K, torch.bfloat16, seed=6).reshape(2, 3, K)
    for act_bits in (16, 8):
        y = binary_linear(x, p, act_bits, backend="triton")
        ref = binary_linear(x, p, act_bits, backend="torch")
        assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
        assert_close(y, ref, what=f"op 3-D act_bits={act_bits}")


def test_empty_input():
    p = _packed("single")
    for act_bits in (16, 8):
        assert kernels.binary_linear(torch.zeros(0, K, device=DEVICE), p, act_bits).shape == (0, N)
    kw = repack_for_binary_linear(p)
    assert binary_gemm.binary_gemm_triton(torch.zeros(0, K, device=DEVICE), kw).shape == (0, N)


# ------------------------------------------------------------------------------- A8


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (2, torch.bfloat16), (7, torch.float16), (33, torch.float32)])
def test_a8_matches_reference(layout, m, dtype):
    p = _packed(layout, seed=20 + m)
    x = _x(m, K, dtype, seed=m)
    y = kernels.binary_linear(x, p, 8)
    _check(y, x, p, f"a8 {layout} M={m} {dtype}", act_bits=8)


@pytest.mark.parametrize("layout", ["single", "cgb"])
def test_a8_integer_sums_are_exact(layout):
    """Unit scales and integer activations with |x|max = 127 (token scale exactly 1): y is an exact integer."""
    g = torch.Generator().manual_seed(7)
    lay = LAYOUTS[layout]
    n, k, m = 40, 200, 5
    signs = torch.rand(lay.n_planes, n, k, generator=g) < 0.5
    groups = torch.rand(n, k, generator=g) < 0.4
    ones_out = torch.ones(lay.n_terms, n, -(-k // 64))
    p = pack(signs, ones_out, torch.ones(lay.n_terms, k), lay, 64, groups=groups, scale_dtype="float32").to(DEVICE)
    q = torch.randint(-127, 128, (m, k), generator=g)
    q[:, 0] = 127
    y = kernels.binary_linear(q.float().to(DEVICE), p, 8)
    # exact integer reference: sum over terms of sel * s * q
    s = signs.long() * 2 - 1
    want = torch.zeros(m, n, dtype=torch.long)
    for term in lay.terms:
        sel = torch.ones(n, k, dtype=torch.long)
        if term.select is Select.GROUP0:
            sel = (~groups).long()
        elif term.select is Select.GROUP1:
            sel = groups.long()
        want += q @ (sel * s[term.plane]).T
    assert torch.equal(y.cpu(), want.float())


def test_act_planes_roundtrip():
    """The bit planes of int8 activations reassemble to q (two's complement, bit 7 = -128)."""
    p = _packed("single", k=70)
    kw = repack_for_binary_linear(p)
    x = _x(3, 70, torch.float32, seed=1)
    planes, a_scale = binary_popcount.quantize_act_planes(x, kw)
    planes, a_scale, x = planes.cpu(), a_scale.cpu(), x.cpu()
    bits = (planes.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # (T, M, 8, KW, 32)
    bits = bits.reshape(*planes.shape[:3], -1).long()
    wgt = torch.tensor([1, 2, 4, 8, 16, 32, 64, -128]).view(1, 1, 8, 1)
    q = (bits * wgt).sum(2)
    from onebit.reference import quantize_act_int8

    q_ref, s_ref = quantize_act_int8(torch.nn.functional.pad(x, (0, kw.k_pad - 70)) * kw.in_scale[0].float().cpu())
    assert torch.equal(q[0], q_ref.long()) and torch.equal(a_scale[0], s_ref[:, 0])


# ------------------------------------------------------------------------------- configs as data


@pytest.mark.parametrize("cfg", binary_gemv.CONFIGS, ids=lambda c: str(c))
def test_every_gemv_config(cfg):
    p = _packed("cgb", n=70, seed=8)
    x = _x(3, K, torch.float16, seed=8)
    _check(binary_gemv.binary_gemv_triton(x, repack_for_binary_linear(p), config=cfg), x, p, f"gemv {cfg}")


@pytest.mark.parametrize("cfg", binary_gemm.CONFIGS, ids=lambda c: str(c))
def test_every_gemm_config(cfg):
    p = _packed("mean", n=70, seed=9)
    x = _x(20, K, torch.float32, seed=9)
    _check(binary_gemm.binary_gemm_triton(x, repack_for_binary_linear(p), config=cfg), x, p, f"gemm {cfg}")


@pytest.mark.parametrize("cfg", binary_popcount.CONFIGS, ids=lambda c: str(c))
def test_every_popcount_config(cfg):
    p = _packed("mean", n=70, seed=10)
    x = _x(3, K, torch.float32, seed=10)
    y = binary_popcount.binary_popcount_triton(x, repack_for_binary_linear(p), config=cfg)
    _check(y, x, p, f"popcount {cfg}", act_bits=8)


# ------------------------------------------------------------------------------- contract


def test_available_explains():
    ok, why = kernels.available(DEVICE)
    assert ok and why
    ok, why = kernels.available("meta")
    assert not ok and "meta" in why


def test_bad_inputs_raise():
    p = _packed("single")
    with pytest.raises(ValueError, match="in_features"):
        kernels.binary_linear(torch.zeros(2, K + 1, device=DEVICE), p, 16)
    with pytest.raises(TypeError, match="float"):
        kernels.binary_linear(torch.zeros(2, K, dtype=torch.int32, device=DEVICE), p, 16)
    with pytest.raises(ValueError, match="act_bits"):
        kernels.binary_linear(torch.zeros(2, K, device=DEVICE), p, 4)
    with pytest.raises(ValueError, match="M <= 8"):
        binary_gemv.binary_gemv_triton(torch.zeros(9, K, device=DEVICE), repack_for_binary_linear(p))
    bad = _packed("single")
    bad.signs = bad.signs[:, :, :-1]
    with pytest.raises(ValueError, match="shape"):
        kernels.binary_linear(torch.zeros(2, K, device=DEVICE), bad, 16)


def test_repack_is_cached_and_invalidated():
    p = _packed("cgb")
    a = repack_for_binary_linear(p)
    assert repack_for_binary_linear(p) is a
    p.out_scale.mul_(2)  # in-place change bumps the version: re-derived, and the result follows
    b = repack_for_binary_linear(p)
    assert b is not a
    x = _x(2, K, torch.float32, seed=0)
    _check(kernels.binary_linear(x, p, 16), x, p, "after in-place scale change")


def test_inference_mode_weights():
    """Buffers created under inference_mode have no version counter: the repack cache must cope."""
    with torch.inference_mode():
        p = _packed("mean", seed=13)
        x = _x(3, K, torch.float16, seed=13)
        y = kernels.binary_linear(x, p, 16)
        y8 = kernels.binary_linear(x, p, 8)
    _check(y, x, p, "inference_mode a16")
    _check(y8, x, p, "inference_mode a8", act_bits=8)


def test_term_code_and_tiles():
    lay = Layout((Term(1, Select.GROUP1), Term(0, Select.ALL)))
    p = random_packed(8, 40, lay, 32)
    code = term_code(p)
    assert code & 0xFF == 1 | 2 << 6 and (code >> 8) & 0xFF == 0
    assert pow2_divisor(96, 256) == 32 and pow2_divisor(128, 64) == 64 and pow2_divisor(512, 256) == 256


def test_op_under_torch_compile_fullgraph():
    """The triton backend behind the custom op traces without graph breaks (eager backend: no inductor codegen)."""
    from onebit.ops import binary_linear

    p = _packed("single", seed=14)
    x = _x(3, K, torch.float32, seed=14)
    fn = torch.compile(lambda t: binary_linear(t, p, 16, backend="triton"), fullgraph=True, backend="eager")
    assert_close(fn(x), binary_linear_ref(x, p), what="torch.compile(fullgraph) triton")
