"""The CPU backend's dense path (A16 prefill: panels of weight rows expanded to fp32, then a
float GEMM; csrc/cpu DequantRows) against the torch reference, on every ISA path.

The scalar expansion is a plain loop over every weight bit and the SIMD ones are separate
code; all are checked against onebit.reference, not against each other.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from onebit.reference import binary_linear_ref
from onebit.format import pack
from test_backend_cpu import CGB, FORMATS, make_packed
from tolerances import assert_close

cpu = pytest.importorskip("onebit.backends.cpu")
_ok, _why = cpu.available("cpu")
pytestmark = pytest.mark.skipif(not _ok, reason=f"cpu backend unavailable: {_why}")
ISAS = cpu.supported_isas() if _ok else []
SIMD = [i for i in ISAS if i in ("avx512", "avx2", "scalar")]


@pytest.mark.parametrize("isa", SIMD)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k,block", [(70, 200, 64), (33, 576, 128), (96, 300, 32), (40, 1000, 256), (20, 1024, 128)])
def test_dense_matches_reference(isa, fmt, n, k, block):
    """Odd N and K (partial tiles, half blocks, K = 576 where repack_for_lut gathers the main
    terms too), blocks of 32-256 columns, several token counts; K = 1024, whose W rows get 16
    floats of padding (row stride a multiple of 1 KB otherwise), with a single tile."""
    p = make_packed(fmt, n, k, block_size=block, seed=n + k)
    g = torch.Generator().manual_seed(k)
    for m in (1, 5, 37):
        x = torch.randn(m, k, generator=g)
        y = cpu.binary_linear_isa(x, p, 16, isa, dense=True)
        assert_close(y, binary_linear_ref(x, p, 16), torch.float32, f"{isa} {fmt} {n}x{k} bs{block} M={m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_half_inputs_and_nd(dtype):
    """fp16/bf16 activations (converted to fp32 once) and a 3-D non-contiguous input."""
    p = make_packed("cgb", 64, 384, seed=3)
    x = torch.randn(3, 9, 384).to(dtype)
    xt = x.transpose(0, 1)  # (9, 3, 384), not contiguous
    y = cpu.binary_linear_isa(xt.reshape(-1, 384), p, 16, "auto", dense=True)
    assert_close(y, binary_linear_ref(xt.reshape(-1, 384), p, 16), torch.float32, f"{dtype}")
    lw = cpu.get_lut_weight(p).handle
    y3 = lw.forward(x.contiguous(), 16, -1, 1)  # (..., K) straight to the C++ call
    assert y3.shape == (3, 9, 64)
    assert_close(y3.reshape(-1, 64), binary_linear_ref(x.reshape(-1, 384), p, 16), torch.float32, "3-D")


def _regathered(lw, mode: str, g: torch.Generator) -> list[torch.Tensor]:
    """Every act's gathered columns redrawn inside their blocks: shuffled, or drawn with
    replacement (one x column in several slots of an act: the lookups sum them)."""
    gidx = []
    for gi, bo in zip(lw.act_gidx, lw.act_boff):
        gi = gi.clone()
        for b in range(bo.numel() - 1):
            lo, hi = int(bo[b]) * 8, int(bo[b + 1]) * 8
            if mode == "shuffle":
                gi[lo:hi] = gi[lo:hi][torch.randperm(hi - lo, generator=g)]
            else:
                gi[lo:hi] = gi[lo:hi][torch.randint(0, hi - lo, (hi - lo,), generator=g)]
        gidx.append(gi)
    return gidx


def _differing_main_gathers(n: int = 96, k: int = 576, seed: int = 4):
    """CGB whose two main terms have different zero in_scale columns, as arb-rc writes some
    q/k/v_proj: repack_for_lut gathers them differently."""
    g = torch.Generator().manual_seed(seed)
    salient = torch.rand(k, generator=g) < 0.15
    c = torch.rand(6, k, generator=g) + 0.5
    in_scale = torch.where(torch.arange(6).unsqueeze(1) < 4, c * salient, c * ~salient)
    in_scale[5] *= torch.rand(k, generator=g) > 0.3
    return pack(torch.rand(2, n, k, generator=g) < 0.5, torch.rand(6, n, 5, generator=g) * 0.1 + 0.01, in_scale, CGB, 128,
                groups=torch.rand(n, k, generator=g) < 0.3)


@pytest.mark.parametrize("mode", ["shuffle", "replace"])
def test_dense_any_gather(mode):
    """Whatever the gather, the dense path equals the lookups (which test_backend_cpu checks
    against the reference): every act's gathered columns shuffled inside their blocks, or
    drawn with replacement (still valid weights, other matrices)."""
    ext = cpu._load_ext()
    g = torch.Generator().manual_seed(0)
    for p in (make_packed("cgb", 70, 576, seed=11), _differing_main_gathers(70)):
        lw = cpu.get_lut_weight(p)
        h = ext.LutWeight(576, 70, _regathered(lw, mode, g), lw.act_gscale, lw.act_boff, lw.act_ecoef, lw.job_kind,
                          lw.job_inv, lw.job_act, lw.job_b, lw.job_g, lw.job_coef)
        x = torch.randn(37, 576, generator=g)
        y_lut = h.forward(x, 16, -1, 0)
        assert not torch.equal(y_lut, lw.handle.forward(x, 16, -1, 0))  # the gather changed the matrix
        for isa in SIMD:
            assert_close(h.forward(x, 16, cpu.ISAS[isa], 1), y_lut, torch.float32, f"{mode} gather, {isa}")


@pytest.mark.parametrize("case", ["cgb", "differing", "shuffle", "replace", "mean"])
def test_dense_layout(case):
    """The dense path's W layout (csrc/cpu/lut.h DenseActs), checked slot by slot: W's columns
    are distinct columns of x, at most K of them; every live slot (gscale != 0 in some act
    with its gathered columns) has the W column of its own x column, padding none; and the
    pieces of every 16- and 8-lane group place each live lane exactly once, in its W column,
    inside the row. The first set in W's order is direct."""
    ext = cpu._load_ext()
    g = torch.Generator().manual_seed(1)
    p = _differing_main_gathers() if case == "differing" else make_packed("mean" if case == "mean" else "cgb", 70, 576, seed=2)
    lw = cpu.get_lut_weight(p)
    gidx = lw.act_gidx if case in ("cgb", "differing", "mean") else _regathered(lw, case, g)
    h = ext.LutWeight(576, 70, gidx, lw.act_gscale, lw.act_boff, lw.act_ecoef, lw.job_kind, lw.job_inv, lw.job_act,
                      lw.job_b, lw.job_g, lw.job_coef)
    lay = h.dense_layout()
    gather, ldw = lay["gather"], lay["ldw"]
    assert gather.numel() == gather.unique().numel() <= 576 and ldw >= gather.numel()
    sets: dict[tuple, list[int]] = {}  # acts with the same gathered columns
    for a in range(len(lay["acts"])):
        sets.setdefault((tuple(gidx[a].tolist()), tuple(lw.act_boff[a].tolist())), []).append(a)
    live = {m[0]: torch.stack([lw.act_gscale[i] != 0 for i in m]).any(0) for m in sets.values()}
    for a, lv in live.items():
        wcol, direct, _, up16, pc16, up8, pc8 = lay["acts"][a]
        assert torch.equal(wcol >= 0, lv)
        assert torch.equal(gather[wcol[lv].long()], gidx[a][lv].long())
        for width, up, pc in ((16, up16, pc16), (8, up8, pc8)):
            if width == 16 and direct:
                assert pc.numel() == 0
                continue
            for u in range(wcol.numel() // width):
                want = {(int(wcol[width * u + l]), l) for l in range(width) if wcol[width * u + l] >= 0}
                got = []
                for q in range(int(up[u]), int(up[u + 1])):
                    idx, col, mask = pc[q, :16], int(pc[q, 16]), int(pc[q, 17])
                    assert 0 <= col and col + width <= ldw
                    got += [(col + i, int(idx[i])) for i in range(width) if mask >> i & 1]
                assert sorted(got) == sorted(want), f"{width}-lane group {u} of act {a}"
        if direct:  # each unit's live lanes in consecutive W columns
            assert bool(lv.any())
            for u in range(wcol.numel() // 16):
                c = wcol[16 * u : 16 * u + 16]
                c = c[c >= 0]
                if c.numel():
                    assert torch.equal(c, torch.arange(int(c[0]), int(c[0]) + c.numel(), dtype=c.dtype))
    if case in ("cgb", "differing", "mean"):
        biggest = max(live, key=lambda a: int(live[a].sum()))
        assert lay["acts"][biggest][1], "the largest set is direct"


def test_differing_gathers_go_dense():
    """CGB's two main terms gathered to different columns (arb-rc's q/k/v_proj): W still has
    only x's columns (the second main term lands scattered in the first one's), so auto takes
    the dense path from dense_min_m tokens, and it computes the reference's output."""
    p = _differing_main_gathers()
    lw = cpu.get_lut_weight(p)
    assert len({tuple(gi.tolist()) for gi in lw.act_gidx}) == 3  # salient, main term 0, main term 1
    lay = lw.handle.dense_layout()
    assert lay["gather"].numel() <= 576
    assert sum(not direct for _, direct, *_ in lay["acts"]) >= 1  # one set lands scattered
    best = cpu._load_ext().best_isa()  # named: "auto" may hand A16 to AMX-BF16 on CPUs that have it
    x = torch.randn(cpu._load_ext().dense_min_m(576) * 2, 576, generator=torch.Generator().manual_seed(5))
    if best != "scalar":  # the scalar path never goes dense on its own
        y_auto = cpu.binary_linear_isa(x, p, 16, best)
        assert torch.equal(y_auto, cpu.binary_linear_isa(x, p, 16, best, dense=True)), "auto did not take the dense path"
        assert_close(y_auto, binary_linear_ref(x, p, 16), torch.float32, "auto, differing gathers")
    for isa in SIMD:
        assert_close(cpu.binary_linear_isa(x, p, 16, isa, dense=True), binary_linear_ref(x, p, 16), torch.float32, isa)


def test_dense_is_a16_only():
    p = make_packed("cgb", 32, 128)
    with pytest.raises(RuntimeError, match="A16 only"):
        cpu.binary_linear_isa(torch.randn(2, 128), p, 8, "auto", dense=True)


def test_auto_choice():
    """The auto rule: multi-term weights (CGB's lookups cost ~5x a single term's) go dense from
    dense_min_m(K, isa) tokens on each SIMD path (lookups one token below), single-term weights
    never; both give the reference's output."""
    ext = cpu._load_ext()
    cgb, single = make_packed("cgb", 64, 576), make_packed("single", 64, 576)
    assert cpu.get_lut_weight(cgb).handle.lookup_cost() >= 2.0
    assert cpu.get_lut_weight(single).handle.lookup_cost() == pytest.approx(1.0, abs=0.2)
    assert ext.dense_min_m(576) == ext.dense_min_m(576, cpu.ISAS[ext.best_isa()])
    for isa in [i for i in SIMD if i != "scalar"]:
        m = ext.dense_min_m(576, cpu.ISAS[isa])
        assert 2 <= m <= 256 and ext.dense_min_m(4096, cpu.ISAS[isa]) >= m
        for mm, dense in ((m, True), (m - 1, False)):
            x = torch.randn(mm, 576)
            y = cpu.binary_linear_isa(x, cgb, 16, isa)
            assert torch.equal(y, cpu.binary_linear_isa(x, cgb, 16, isa, dense=dense)), f"{isa} M={mm}: dense={not dense}"
            for p in (cgb, single):
                assert_close(cpu.binary_linear_isa(x, p, 16, isa), binary_linear_ref(x, p, 16), torch.float32, f"auto {isa}")


def test_dense_min_m_env():
    """ONEBIT_CPU_DENSE_MIN_M overrides the threshold for every K (0: never), read once."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "from onebit.backends import cpu; e = cpu._load_ext(); print(e.dense_min_m(576), e.dense_min_m(8192))"
    for value, want in (("7", "7 7"), ("0", f"{2**63 - 1} {2**63 - 1}")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, ONEBIT_CPU_DENSE_MIN_M=value),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == want.split()


def test_dense_threads_and_modes():
    """The panels run on torch's worker threads: under torch.inference_mode, with autograd on
    and an input that requires grad (the output is no autograd op, like the lookups')."""
    p = make_packed("cgb", 200, 320, seed=5)  # 7 tiles: 4 + 3 on two threads
    x = torch.randn(70, 320)
    ref = binary_linear_ref(x, p, 16)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            y = cpu.binary_linear_isa(x, p, 16, "auto", dense=True)
        assert_close(y, ref, torch.float32, "inference_mode")
        y = cpu.binary_linear_isa(x.clone().requires_grad_(), p, 16, "auto", dense=True)
        assert not y.requires_grad
        assert_close(y, ref, torch.float32, "requires_grad")
    finally:
        torch.set_num_threads(n)
