"""The C++ CPU backend (onebit._C, csrc/cpu) against the torch reference, on every ISA path.

Skipped, not failed, when the extension is not built. A8 is compared with the reference
computed from the same quantized activations (the reference quantizes exactly as the kernel).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onebit.format import Layout, PackedWeight, Select, Term, pack
from onebit.ops import binary_linear
from onebit.reference import binary_linear_ref
from onebit.quant.methods import RC_CGB_LAYOUT
from tolerances import REL_TOL, assert_close, max_rel_err

cpu = pytest.importorskip("onebit.backends.cpu")
_ok, _why = cpu.available("cpu")
pytestmark = pytest.mark.skipif(not _ok, reason=f"cpu backend unavailable: {_why}")
ISAS = cpu.supported_isas() if _ok else []

# BiLLM/ARB-RC with CGB: salient columns (orders 2, 2) split by the group bitmap, then the
# non-salient columns (orders 1, 1) split by the same bitmap.
CGB = RC_CGB_LAYOUT  # the layout arb-rc / oa write
MEAN2 = Layout((Term(0, Select.ALL), Term(1, Select.ALL)), has_mean=True)
MEAN_GROUPS = Layout((Term(0, Select.GROUP0), Term(0, Select.GROUP1)), has_mean=True)
FORMATS = ("single", "cgb", "mean", "mean_groups")


def make_packed(fmt: str, n: int, k: int, block_size: int = 128, scale_dtype: str = "float16", seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    nb = -(-k // block_size)
    if fmt == "single":
        layout = Layout((Term(0, Select.ALL),))
        in_scale = torch.ones(1, k)
    elif fmt == "cgb":
        layout = CGB
        salient = torch.rand(k, generator=g) < 0.15
        c = torch.rand(6, k, generator=g) + 0.5
        in_scale = torch.where(torch.arange(6).unsqueeze(1) < 4, c * salient, c * ~salient)
    elif fmt == "mean":
        layout = MEAN2
        in_scale = torch.rand(2, k, generator=g) + 0.5
    else:
        layout = MEAN_GROUPS
        in_scale = torch.ones(2, k)
    nt, npl = layout.n_terms, layout.n_planes
    signs = torch.rand(npl, n, k, generator=g) < 0.5
    out_scale = torch.rand(nt, n, nb, generator=g) * 0.1 + 0.01
    mean = (torch.rand(nt, n, nb, generator=g) - 0.5) * 0.05 if layout.has_mean else None
    groups = torch.rand(n, k, generator=g) < 0.3 if layout.has_group else None
    return pack(signs, out_scale, in_scale, layout, block_size, groups=groups, mean=mean, scale_dtype=scale_dtype)


def check(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert_close(y, ref, torch.float32, what)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_bits", (16, 8))
@pytest.mark.parametrize("m", (1, 2, 3, 7, 16, 33))
def test_isa_grid(isa: str, fmt: str, act_bits: int, m: int) -> None:
    n, k = 77, 300  # neither a multiple of 32 nor of the block size
    p = make_packed(fmt, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m))
    y = cpu.binary_linear_isa(x, p, act_bits, isa)
    ref = binary_linear_ref(x, p, act_bits)
    check(y, ref, f"{isa} {fmt} A{act_bits} M={m}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("act_bits", (16, 8))
def test_dtypes(isa: str, dtype: torch.dtype, act_bits: int) -> None:
    p = make_packed("cgb", 45, 200, block_size=64, scale_dtype="bfloat16", seed=3)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = cpu.binary_linear_isa(x, p, act_bits, isa)
    # The kernel computes in fp32 from the given (rounded) activations: fp32 tolerance.
    check(y, binary_linear_ref(x, p, act_bits), f"{isa} {dtype} A{act_bits}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("act_bits", (16, 8))
def test_op_3d_noncontiguous(fmt: str, dtype: torch.dtype, act_bits: int) -> None:
    p = make_packed(fmt, 50, 97, block_size=32, seed=7)
    base = torch.randn(2, 194, 3, generator=torch.Generator().manual_seed(8)).to(dtype)
    x = base[:, ::2, 1].reshape(2, 97)  # non-contiguous
    x = torch.stack([x, x.flip(0), 2 * x]).transpose(0, 1)  # (2, 3, 97), non-contiguous 3-D
    assert not x.is_contiguous()
    y = binary_linear(x, p, act_bits=act_bits, backend="cpu")
    assert y.shape == (2, 3, 50) and y.dtype == dtype
    ref = binary_linear_ref(x.reshape(-1, 97), p, act_bits).reshape(2, 3, 50)
    assert_close(y, ref.to(dtype), dtype, f"op {fmt} {dtype} A{act_bits}")


@pytest.mark.parametrize("isa", ISAS)
def test_large_k_and_block(isa: str) -> None:
    """K spanning several table chunks; block_size 512 (A8 widens int16 sums inside a block)."""
    for bs in (128, 512):
        p = make_packed("single", 70, 3000, block_size=bs, seed=bs)
        x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1)) * 3
        for act_bits in (16, 8):
            check(cpu.binary_linear_isa(x, p, act_bits, isa), binary_linear_ref(x, p, act_bits), f"{isa} bs={bs}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a8_extreme_block_sums(isa: str, fmt: str) -> None:
    """Every weight +1 and every activation at the int8 maximum: a row's sum over a block of
    512 or 1024 columns (65024, 130048) is far outside int16, so a kernel that widens its int16
    partial sums too late fails here (random signs never get near the limit)."""
    for bs in (512, 1024):
        p = make_packed(fmt, 40, 2 * bs, block_size=bs, seed=bs)
        p = dataclasses.replace(p, signs=torch.full_like(p.signs, -1))  # every bit set: +1
        x = torch.full((3, 2 * bs), 2.5)
        for act_bits in (8, 16):
            check(cpu.binary_linear_isa(x, p, act_bits, isa), binary_linear_ref(x, p, act_bits), f"{isa} {fmt} bs={bs} A{act_bits}")


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def assert_threads_match_one(p: PackedWeight, x: torch.Tensor, act_bits: int, isa: str, threads: int, what: str) -> None:
    """`threads` threads give one thread's output bit for bit (the same arithmetic, split
    differently), and the reference's up to rounding."""
    torch.set_num_threads(threads)
    many = cpu.binary_linear_isa(x, p, act_bits, isa)
    torch.set_num_threads(1)
    one = cpu.binary_linear_isa(x, p, act_bits, isa)
    assert torch.equal(one, many), f"{what}: {threads} threads differ from 1"
    check(many, binary_linear_ref(x, p, act_bits), f"{what} threads={threads}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", (2, 3, 5))
def test_decode_tables_built_by_every_thread(isa: str, fmt: str, threads: int, keep_threads) -> None:
    """Fewer token rows than threads and enough tiles for several threads (600 rows = 19 tiles,
    the last partial; at 4500 columns and M <= 2 the minimum chunk is at most 14 tiles): every
    thread builds the rows' tables in its own buffer, then takes tiles."""
    p = make_packed(fmt, 600, 4500, block_size=128, seed=threads)
    for m in (1, 2):
        x = torch.randn(m, 4500, generator=torch.Generator().manual_seed(m)) * 2
        for act_bits in (16, 8):
            # Other inputs through the same threads first: a table byte left unwritten would
            # then hold their values (each thread keeps its table buffer from call to call).
            torch.set_num_threads(threads)
            cpu.binary_linear_isa(torch.randn_like(x) * 5, p, act_bits, isa)
            torch.set_num_threads(1)
            cpu.binary_linear_isa(torch.randn_like(x) * 3, p, act_bits, isa)
            assert_threads_match_one(p, x, act_bits, isa, threads, f"{isa} {fmt} A{act_bits} M={m}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ("single", "cgb"))
@pytest.mark.parametrize("threads", (2, 3))
@pytest.mark.parametrize("group", ("auto", "3"))
def test_prefill_tokens_split_between_threads(isa: str, fmt: str, threads: int, group: str, keep_threads,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """From 8 tokens per thread the threads take groups of tokens and run every tile for them
    (each builds its groups' tables): token counts that leave a short last group, and with
    ONEBIT_CPU_GROUP=3 many groups of 4. Bit for bit one thread's output (the lookups, not the
    dense path: forced), and the reference's up to rounding."""
    if group != "auto":
        monkeypatch.setenv("ONEBIT_CPU_GROUP", group)
    p = make_packed(fmt, 100, 700, block_size=64, seed=threads)
    for m in (8 * threads, 8 * threads + 5, 70):
        x = torch.randn(m, 700, generator=torch.Generator().manual_seed(m))
        for act_bits in (16, 8):
            torch.set_num_threads(threads)
            many = cpu.binary_linear_isa(x, p, act_bits, isa, dense=False)
            torch.set_num_threads(1)
            one = cpu.binary_linear_isa(x, p, act_bits, isa, dense=False)
            what = f"{isa} {fmt} A{act_bits} M={m} group={group}"
            assert torch.equal(one, many), f"{what}: {threads} threads differ from 1"
            check(many, binary_linear_ref(x, p, act_bits), f"{what} threads={threads}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", (2, 3))
def test_tiles_handed_out_in_chunks(isa: str, threads: int, keep_threads) -> None:
    """Enough weight tiles that the threads take them in several shrinking chunks (1000 rows =
    32 tiles, the last one partial; with 4 tokens at 4096 columns the minimum chunk is 4
    tiles): every row written once."""
    p = make_packed("single", 1000, 4096, seed=threads)
    for m in (1, 4):
        x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m))
        for act_bits in (16, 8):
            assert_threads_match_one(p, x, act_bits, isa, threads, f"{isa} A{act_bits} M={m}")


@pytest.mark.parametrize("isa", ISAS)
def test_a8_exact_integer_sums(isa: str) -> None:
    """Weights +-1, in/out scale 1: y / token_scale must be the exact integer dot product."""
    k, n = 256, 40
    p = make_packed("single", n, k, seed=11)
    p = PackedWeight(n, k, 128, p.layout, p.signs, torch.ones_like(p.out_scale), p.in_scale)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2)) * 10
    from onebit.format import dequantize
    from onebit.reference import quantize_act_int8

    q, s = quantize_act_int8(x)
    exact = q.double() @ dequantize(p).double().T  # integers, exact in float64
    y = cpu.binary_linear_isa(x, p, 8, isa).double() / s.double()
    assert torch.equal(torch.round(y), exact)
    assert (y - exact).abs().max() < 1e-3


def test_zero_activations_and_all_zero_in_scale() -> None:
    p = make_packed("cgb", 33, 64, block_size=32, seed=5)
    x = torch.zeros(2, 64)
    for act_bits in (16, 8):
        y = cpu.binary_linear(x, p, act_bits)
        assert torch.equal(y, torch.zeros(2, 33))


def test_repack_cache_and_invalidation() -> None:
    p = make_packed("single", 40, 64, seed=1)
    lw1 = cpu.get_lut_weight(p)
    assert cpu.get_lut_weight(p) is lw1
    x = torch.randn(2, 64)
    y1 = cpu.binary_linear(x, p)
    p.out_scale.mul_(2)  # bumps the tensor version: the cached repack must not be reused
    y2 = cpu.binary_linear(x, p)
    assert cpu.get_lut_weight(p) is not lw1
    assert max_rel_err(y2, 2 * y1) < REL_TOL[torch.float32]


def test_compaction_used_for_salient_terms() -> None:
    p = make_packed("cgb", 64, 512, seed=2)
    lw = cpu.repack_for_lut(p)
    k_a = sorted(g.numel() for g in lw.act_gidx)
    assert k_a[0] < 512  # the salient terms' acts are gathered


def test_bad_inputs_raise() -> None:
    p = make_packed("single", 40, 64, seed=1)
    with pytest.raises(ValueError):
        cpu.binary_linear(torch.randn(2, 63), p)
    with pytest.raises(TypeError):
        cpu.binary_linear(torch.randn(2, 64).double(), p)
    with pytest.raises(ValueError):
        cpu.binary_linear(torch.randn(2, 64), p, act_bits=4)
    with pytest.raises(ValueError):
        cpu.binary_linear_isa(torch.randn(2, 64), p, 16, "neon")
    with pytest.raises(ValueError):
        cpu.binary_linear(torch.randn(2, 64), PackedWeight(40, 64, 128, p.layout, p.signs[:, :30], p.out_scale, p.in_scale))


def test_available_reports_reason() -> None:
    ok, why = cpu.available("meta")
    assert not ok and "CPU" in why


def test_inference_mode_weights() -> None:
    """Buffers created under inference_mode have no version counter; the cache must cope."""
    with torch.inference_mode():
        p = make_packed("single", 40, 64, seed=9)
        x = torch.randn(2, 64)
        y = cpu.binary_linear(x, p)
    check(y, binary_linear_ref(x, p), "inference mode")


@pytest.mark.parametrize("isa", ISAS)
def test_env_isa_switch(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEBIT_CPU_ISA", isa)
    p = make_packed("mean_groups", 40, 96, block_size=32, seed=4)
    x = torch.randn(3, 96)
    check(cpu.binary_linear(x, p, 8), binary_linear_ref(x, p, 8), f"env {isa}")
    monkeypatch.setenv("ONEBIT_CPU_ISA", "sse9")
    with pytest.raises(ValueError):
        cpu.binary_linear(x, p)


def test_import_onebit_does_not_load_extension() -> None:
    import subprocess
    import sys

    code = "import sys, onebit; assert 'onebit._C' not in sys.modules, 'onebit._C loaded at import'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_term_with_all_zero_in_scale() -> None:
    """A term whose in_scale is zero everywhere gathers no columns and contributes nothing."""
    p = make_packed("cgb", 50, 200, block_size=64, seed=12)
    in_scale = p.in_scale.clone()
    in_scale[1] = 0
    p = PackedWeight(p.out_features, p.in_features, p.block_size, p.layout, p.signs, p.out_scale, in_scale, p.groups)
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(3))
    for isa in ISAS:
        for act_bits in (16, 8):
            check(cpu.binary_linear_isa(x, p, act_bits, isa), binary_linear_ref(x, p, act_bits), f"{isa} zero term")


def test_cache_entry_dropped_with_weight() -> None:
    import gc

    p = make_packed("single", 40, 64, seed=13)
    cpu.get_lut_weight(p)
    key = cpu._key(p)
    assert key in cpu._cache
    del p
    gc.collect()
    assert key not in cpu._cache


def test_group_pair_fused_for_shared_in_scale() -> None:
    """GROUP0/GROUP1 on one plane with a shared in_scale become two +-1 lookups (no SEL job)."""
    p = make_packed("mean_groups", 64, 256, seed=14)
    lw = cpu.repack_for_lut(p)
    assert cpu.KIND_SEL not in lw.job_kind
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(15))
    for isa in ISAS:
        for act_bits in (16, 8):
            check(cpu.binary_linear_isa(x, p, act_bits, isa), binary_linear_ref(x, p, act_bits), f"{isa} fused pair")


def test_coefficients_fp16_only_when_exact() -> None:
    p16 = make_packed("single", 40, 128, scale_dtype="float16", seed=16)
    assert cpu.repack_for_lut(p16).job_coef[0].dtype == torch.float16
    p32 = make_packed("single", 40, 128, scale_dtype="float32", seed=16)
    assert cpu.repack_for_lut(p32).job_coef[0].dtype == torch.float32
    x = torch.randn(3, 128)
    for isa in ISAS:
        for p in (p16, p32):
            check(cpu.binary_linear_isa(x, p, 16, isa), binary_linear_ref(x, p), f"{isa} coef dtype")


def test_op_contract_with_cpu_backend() -> None:
    """opcheck and torch.compile(fullgraph=True) on the op with the cpu backend."""
    from onebit.ops import _binary_linear_op

    p = make_packed("cgb", 40, 100, block_size=32, seed=17)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(18))
    t = p.layout.terms
    args = (x, p.signs, p.groups, p.out_scale, p.in_scale, p.mean, [a.plane for a in t], [int(a.select) for a in t],
            p.in_features, p.block_size, 16, "cpu")  # fmt: skip
    torch.library.opcheck(_binary_linear_op, args)
    f = torch.compile(lambda x: binary_linear(x, p, backend="cpu"), fullgraph=True)
    assert torch.equal(f(x), binary_linear(x, p, backend="cpu"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", ("auto", "3"))
def test_many_tiles_and_token_groups(isa: str, fmt: str, group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """N spanning several 16-tile sub-ranges with a partial last tile, K with a partial block and
    word, token counts that leave partial passes of 4; ONEBIT_CPU_GROUP=3 forces several token
    groups per call (each group re-streams the block-major weights)."""
    if group != "auto":
        monkeypatch.setenv("ONEBIT_CPU_GROUP", group)
    n, k = 1100, 700
    p = make_packed(fmt, n, k, block_size=64, seed=21)
    for m in (1, 6, 21):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(22 + m))
        for act_bits in (16, 8):
            y = cpu.binary_linear_isa(x, p, act_bits, isa)
            check(y, binary_linear_ref(x, p, act_bits), f"{isa} {fmt} A{act_bits} M={m} group={group}")


def test_block_major_unit_layout() -> None:
    """Planes are stored block by block over all tiles (the kernels' streaming order), each
    tile's block in 16-column units: row r's two bytes of unit u side by side (lut.h)."""
    p = make_packed("single", 70, 256, block_size=128, seed=23)  # 3 tiles, 2 blocks of 16 bytes
    lw = cpu.repack_for_lut(p)
    plane = lw.job_b[0].tolist()
    assert len(plane) == 3 * 32 * 32
    from onebit.format import unpack_bits

    bits = unpack_bits(p.signs[0]).tolist()  # (70, 256) bool
    for r in range(96):  # rows past 70 are zero padding
        t = r // 32
        for kb in range(32):
            b, kbb = divmod(kb, 16)
            off = (b * 3 + t) * 16 * 32 + ((kbb // 2) * 32 + r % 32) * 2 + kbb % 2
            expect = sum(int(bits[r][8 * kb + i]) << i for i in range(8)) if r < 70 else 0
            assert plane[off] == expect, (r, kb)


def test_gathered_blocks_are_whole_units() -> None:
    """A gathered act (CGB's salient columns, a few per block) pads every block to a multiple
    of 16 columns, with scale 0 on the padding."""
    p = make_packed("cgb", 40, 300, block_size=128, seed=24)
    lw = cpu.repack_for_lut(p)
    for boff, scale in zip(lw.act_boff, lw.act_gscale):
        widths = (boff[1:] - boff[:-1]).tolist()
        assert all(w % 2 == 0 for w in widths), widths
        assert scale.numel() == int(boff[-1]) * 8
    assert any(int(b[-1]) * 8 < 384 for b in lw.act_boff)  # some act is gathered


# ---------------------------------------------------------------------------- AMX-INT8 (A8)

HAS_AMX = "amx" in ISAS
needs_amx = pytest.mark.skipif(not HAS_AMX, reason=f"AMX-INT8 path not runnable here: {cpu.amx_status() if _ok else _why}")


@needs_amx
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", (4, 7, 16, 33))
@pytest.mark.parametrize("nk_bs", ((77, 300, 128), (1100, 700, 64), (50, 97, 32), (40, 200, 96)))
def test_amx_grid(fmt: str, m: int, nk_bs: tuple[int, int, int]) -> None:
    """Forced AMX (every A8 job on TDPBSSD) against the reference: N not a multiple of 16/32,
    K not a multiple of 64 or the block, M not a multiple of 16 (partial m-tiles), every format
    (gathered salient acts give blocks of a few columns, padded to a 64-column chunk)."""
    n, k, bs = nk_bs
    p = make_packed(fmt, n, k, block_size=bs, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(200 + m)) * 2
    ref = binary_linear_ref(x, p, 8)
    check(cpu.binary_linear_isa(x, p, 8, "amx"), ref, f"amx {fmt} M={m} {nk_bs}")
    # Auto mode at these M mixes AMX (wide acts) and the LUT kernel (narrow gathered acts).
    check(cpu.binary_linear_isa(x, p, 8, "auto"), ref, f"auto {fmt} M={m} {nk_bs}")


@needs_amx
def test_amx_exact_integer_sums() -> None:
    """Weights +-1, scales 1: y / token scale is the exact integer dot product on AMX too."""
    k, n = 320, 48
    p = make_packed("single", n, k, seed=31)
    p = PackedWeight(n, k, 128, p.layout, p.signs, torch.ones_like(p.out_scale), p.in_scale)
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(32)) * 10
    from onebit.format import dequantize
    from onebit.reference import quantize_act_int8

    q, s = quantize_act_int8(x)
    exact = q.double() @ dequantize(p).double().T
    y = cpu.binary_linear_isa(x, p, 8, "amx").double() / s.double()
    assert torch.equal(torch.round(y), exact)
    assert (y - exact).abs().max() < 1e-3


@needs_amx
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_amx_3d_op_and_env(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """3-D non-contiguous input through the op with ONEBIT_CPU_ISA=amx; many token groups and
    tiles (M above the AMX group of 256 tokens, N over several tile chunks)."""
    monkeypatch.setenv("ONEBIT_CPU_ISA", "amx")
    p = make_packed("cgb", 300, 333, block_size=64, seed=41)
    base = torch.randn(3, 2 * 333, 110, generator=torch.Generator().manual_seed(42)).to(dtype)
    x = base[:, ::2, :].transpose(1, 2)  # (3, 110, 333), non-contiguous; 330 tokens
    y = binary_linear(x, p, act_bits=8, backend="cpu")
    ref = binary_linear_ref(x.reshape(-1, 333), p, 8).reshape(3, 110, 300)
    assert y.shape == (3, 110, 300) and y.dtype == dtype
    assert_close(y, ref.to(dtype), dtype, f"amx op {dtype}")
    # A16 under a forced "amx" runs on AMX-BF16.
    assert_close(binary_linear(x, p, act_bits=16, backend="cpu"), binary_linear_ref(x.reshape(-1, 333), p).reshape(3, 110, 300).to(dtype), dtype)


@needs_amx
def test_amx_auto_threshold_and_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto picks AMX from amx_min_m() tokens on; ONEBIT_CPU_ISA=avx512 never uses it (same
    int8 activations either way, so the outputs agree to fp32 rounding)."""
    p = make_packed("single", 64, 256, seed=51)
    m = cpu._load_ext().amx_min_m()
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(52))
    y_auto = cpu.binary_linear(x, p, 8)
    monkeypatch.setenv("ONEBIT_CPU_ISA", "avx512")
    y_lut = cpu.binary_linear(x, p, 8)
    check(y_auto, y_lut, "auto (amx) vs avx512 (lut)")


def test_amx_forced_without_amx_raises() -> None:
    """Forcing amx where it cannot run raises like any other unsupported ISA (the same
    RuntimeError the avx512 path raises on a CPU without AVX-512); emulated with the
    ONEBIT_CPU_AMX=0 kill switch in a fresh process."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, pytest\n"
        "from onebit.backends import cpu\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_backend_cpu import make_packed\n"
        "assert 'amx' not in cpu.supported_isas(), cpu.supported_isas()\n"
        "assert cpu.amx_status().startswith('unavailable') or cpu.amx_status().startswith('not built')\n"
        "assert cpu.amx_paths() == []\n"
        "p = make_packed('single', 40, 64, seed=1)\n"
        "x = torch.randn(8, 64)\n"
        "for act_bits in (8, 16):\n"
        "    with pytest.raises(RuntimeError, match='amx'):\n"
        "        cpu.binary_linear_isa(x, p, act_bits, 'amx')\n"
        "import os; os.environ['ONEBIT_CPU_ISA'] = 'amx'\n"
        "with pytest.raises(RuntimeError, match='amx'):\n"
        "    cpu.binary_linear(x, p, 8)\n"
        "os.environ['ONEBIT_CPU_ISA'] = 'auto'\n"
        "cpu.binary_linear(x, p, 8)  # auto falls back to the LUT kernel\n"
        "cpu.binary_linear(x, p, 16)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ONEBIT_CPU_AMX="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ONEBIT_CPU_ISA", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


# ---------------------------------------------------------------------------- AMX-BF16 (exact A16)

HAS_AMX_A16 = _ok and "a16" in cpu.amx_paths()
needs_amx_a16 = pytest.mark.skipif(not HAS_AMX_A16, reason=f"AMX-BF16 path not runnable here: {cpu.amx_status() if _ok else _why}")


@needs_amx_a16
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", (4, 7, 16, 33, 70))
@pytest.mark.parametrize("nk_bs", ((77, 300, 128), (1100, 700, 64), (50, 97, 32), (40, 200, 96)))
def test_amx_a16_grid(fmt: str, m: int, nk_bs: tuple[int, int, int]) -> None:
    """Forced AMX-BF16 (every A16 job on TDPBF16PS) and auto against the fp32 reference: N not a
    multiple of 16/32, K not a multiple of 32 or the block, token counts that leave partial
    m-tiles (5 tokens of 3 bf16 parts per tile) and, at 70, two token groups."""
    n, k, bs = nk_bs
    p = make_packed(fmt, n, k, block_size=bs, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(300 + m)) * 2
    ref = binary_linear_ref(x, p)
    check(cpu.binary_linear_isa(x, p, 16, "amx"), ref, f"amx A16 {fmt} M={m} {nk_bs}")
    check(cpu.binary_linear_isa(x, p, 16, "auto"), ref, f"auto A16 {fmt} M={m} {nk_bs}")


@needs_amx_a16
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("scale_dtype", ("float16", "bfloat16", "float32"))
def test_amx_a16_3d_dtypes(fmt: str, dtype: torch.dtype, scale_dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """3-D non-contiguous fp32/fp16/bf16 input through the op with ONEBIT_CPU_ISA=amx. The
    input dtype and the in_scale set how many bf16 parts x' needs (bf16 x with unit in_scale:
    1, fp16 x: 2, any x times an fp16/fp32 column scale: 3): too few would drop bits."""
    monkeypatch.setenv("ONEBIT_CPU_ISA", "amx")
    p = make_packed(fmt, 70, 333, block_size=64, scale_dtype=scale_dtype, seed=61)
    base = torch.randn(3, 2 * 333, 12, generator=torch.Generator().manual_seed(62)).to(dtype)
    x = base[:, ::2, :].transpose(1, 2)  # (3, 12, 333), non-contiguous
    assert not x.is_contiguous()
    y = binary_linear(x, p, act_bits=16, backend="cpu")
    ref = binary_linear_ref(x.reshape(-1, 333), p).reshape(3, 12, 70)
    assert y.shape == (3, 12, 70) and y.dtype == dtype
    assert_close(y, ref.to(dtype), dtype, f"amx A16 op {fmt} {dtype} scales {scale_dtype}")
    # The fp32 result before the output cast, at the fp32 bound.
    check(cpu.binary_linear_isa(x.reshape(-1, 333), p, 16, "amx"), ref.reshape(-1, 70), f"amx A16 {fmt} {dtype} fp32")


@needs_amx_a16
@pytest.mark.parametrize("fmt", ("single", "cgb", "mean"))
@pytest.mark.parametrize("exp", (100, -118, -124))
def test_amx_a16_large_and_tiny(fmt: str, exp: int) -> None:
    """Activations scaled by 2^exp, some elements 2^-30 below their token's maximum. TDPBF16PS
    flushes denormal inputs and results to zero: at 2^-118 the lo parts (2^-16 below x') are
    denormal, and the kernel's per-token power-of-two scaling must keep them. Compared after
    scaling back by 2^-exp (exact), so the error is relative to the output's own scale."""
    p = make_packed(fmt, 77, 300, block_size=128, seed=71)
    x = torch.randn(9, 300, generator=torch.Generator().manual_seed(72))
    x[0, :5] *= 2.0**-30
    xs = x * 2.0**exp
    ref = binary_linear_ref(xs, p).double() * 2.0**-exp
    for isa in ("amx", "avx512"):
        y = cpu.binary_linear_isa(xs, p, 16, isa).double() * 2.0**-exp
        check(y.float(), ref.float(), f"{isa} A16 {fmt} x 2^{exp}")


@needs_amx_a16
def test_amx_a16_exact_sums() -> None:
    """Weights +-1, scales 1, activations on a 2^-8 grid within +-2^7: every partial sum is
    exact in fp32 whatever the order, so the AMX result must equal the float64 product."""
    k, n = 320, 48
    p = make_packed("single", n, k, seed=81)
    p = PackedWeight(n, k, 128, p.layout, p.signs, torch.ones_like(p.out_scale), p.in_scale)
    g = torch.Generator().manual_seed(82)
    x = torch.randint(-(2**15), 2**15, (20, k), generator=g).float() * 2.0**-8
    from onebit.format import dequantize

    exact = (x.double() @ dequantize(p).double().T).float()
    assert torch.equal(cpu.binary_linear_isa(x, p, 16, "amx"), exact)


@needs_amx_a16
def test_amx_a16_auto_matches_lut(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the auto threshold a CGB weight's group-select acts go to AMX-BF16; the result
    agrees with the LUT kernel (forced avx512) to fp32 summation order."""
    p = make_packed("cgb", 64, 512, seed=91)
    m = cpu._load_ext().amx_a16_min_m()
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(92))
    y_auto = cpu.binary_linear(x, p)
    monkeypatch.setenv("ONEBIT_CPU_ISA", "avx512")
    check(y_auto, cpu.binary_linear(x, p), "auto (amx-bf16) vs avx512 (lut)")


def test_amx_thresholds_from_env() -> None:
    """ONEBIT_CPU_AMX_MIN_M / ONEBIT_CPU_AMX_A16_MIN_M override the auto thresholds (read once)."""
    import os
    import subprocess
    import sys

    code = "from onebit.backends import cpu; e = cpu._load_ext(); assert (e.amx_min_m(), e.amx_a16_min_m()) == (7, 3)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ONEBIT_CPU_AMX_MIN_M="7", ONEBIT_CPU_AMX_A16_MIN_M="3")
    env["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
