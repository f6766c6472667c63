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


def test_dense_any_gather():
    """W's columns are the acts' live gathered columns, whatever the gather: with every act's
    gathered columns shuffled inside their blocks (still a valid weight, another matrix), the
    dense path equals the lookups (which test_backend_cpu checks against the reference)."""
    ext = cpu._load_ext()
    p = make_packed("cgb", 70, 576, seed=11)
    lw = cpu.get_lut_weight(p)
    g = torch.Generator().manual_seed(0)
    gidx = []
    for gi, bo in zip(lw.act_gidx, lw.act_boff):
        gi = gi.clone()
        for b in range(bo.numel() - 1):
            lo, hi = int(bo[b]) * 8, int(bo[b + 1]) * 8
            gi[lo:hi] = gi[lo:hi][torch.randperm(hi - lo, generator=g)]
        gidx.append(gi)
    h = ext.LutWeight(576, 70, gidx, lw.act_gscale, lw.act_boff, lw.act_ecoef, lw.job_kind, lw.job_inv, lw.job_act,
                      lw.job_b, lw.job_g, lw.job_coef)
    x = torch.randn(37, 576, generator=g)
    y_lut = h.forward(x, 16, -1, 0)
    assert not torch.equal(y_lut, lw.handle.forward(x, 16, -1, 0))  # the shuffle changed the matrix
    for isa in SIMD:
        assert_close(h.forward(x, 16, cpu.ISAS[isa], 1), y_lut, torch.float32, f"shuffled gather, {isa}")


def test_auto_stays_on_lookups_when_w_is_much_wider():
    """CGB's two main terms gathered to different columns (one term's in_scale zero on more
    columns, as arb-rc writes some q/k/v_proj) get separate W columns: W ~1.6x wider than x, so
    auto runs the lookups (kDenseMaxWiden) while the forced dense path still computes it."""
    g = torch.Generator().manual_seed(4)
    n, k = 96, 576
    salient = torch.rand(k, generator=g) < 0.15
    c = torch.rand(6, k, generator=g) + 0.5
    in_scale = torch.where(torch.arange(6).unsqueeze(1) < 4, c * salient, c * ~salient)
    in_scale[5] *= torch.rand(k, generator=g) > 0.3
    p = pack(torch.rand(2, n, k, generator=g) < 0.5, torch.rand(6, n, 5, generator=g) * 0.1 + 0.01, in_scale, CGB, 128,
             groups=torch.rand(n, k, generator=g) < 0.3)
    lw = cpu.get_lut_weight(p)
    live: dict[tuple, torch.Tensor] = {}  # W columns: per distinct gather, the columns some act uses
    for gi, gs in zip(lw.act_gidx, lw.act_gscale):
        key = tuple(gi.tolist())
        live[key] = live.get(key, torch.zeros_like(gs, dtype=torch.bool)) | (gs != 0)
    assert sum(int(v.sum()) for v in live.values()) > 1.25 * k
    x = torch.randn(ext_min_m := cpu._load_ext().dense_min_m(k) * 2, k, generator=g)
    y_auto = cpu.binary_linear_isa(x, p, 16)
    assert torch.equal(y_auto, cpu.binary_linear_isa(x, p, 16, dense=False)), f"M={ext_min_m}: not the lookups"
    assert_close(cpu.binary_linear_isa(x, p, 16, dense=True), binary_linear_ref(x, p, 16), torch.float32, "dense, wide W")
    assert_close(y_auto, binary_linear_ref(x, p, 16), torch.float32, "auto, wide W")


def test_dense_is_a16_only():
    p = make_packed("cgb", 32, 128)
    with pytest.raises(RuntimeError, match="A16 only"):
        cpu.binary_linear_isa(torch.randn(2, 128), p, 8, "auto", dense=True)


def test_auto_choice():
    """The auto rule: multi-term weights (CGB's lookups cost ~5x a single term's) go dense from
    dense_min_m(K) tokens, single-term weights never; both give the reference's output."""
    ext = cpu._load_ext()
    cgb, single = make_packed("cgb", 64, 576), make_packed("single", 64, 576)
    assert cpu.get_lut_weight(cgb).handle.lookup_cost() >= 2.0
    assert cpu.get_lut_weight(single).handle.lookup_cost() == pytest.approx(1.0, abs=0.2)
    m = ext.dense_min_m(576)
    assert m <= 256 and ext.dense_min_m(4096) >= m
    x = torch.randn(m, 576)
    for p in (cgb, single):
        assert_close(cpu.binary_linear_isa(x, p, 16), binary_linear_ref(x, p, 16), torch.float32, "auto")


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
