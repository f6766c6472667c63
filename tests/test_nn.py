"""BinaryLinear and the op contract (reference backend; kernels have their own tests)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, random_packed
from tolerances import assert_close

from onebit import BinaryLinear, QuantConfig, binary_linear
from onebit.format import dequantize, pack
from onebit.ops import BackendUnavailable, resolve_backend
from onebit.reference import binary_linear_ref, quantize_act_int8


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 70), (7, 70), (2, 3, 70)])
def test_forward_equals_dense_dequantized(layout, dtype, shape):
    p = random_packed(33, 70, LAYOUTS[layout], block_size=32, seed=1)
    m = BinaryLinear.from_packed(p, bias=torch.randn(33), backend="torch")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 33)
    ref = F.linear(x.double(), dequantize(p).double(), m.bias.double())
    assert_close(y, ref, dtype, what=f"{layout} {dtype}")


def test_reference_bounded_chunks_equal_one_chunk():
    p = random_packed(50, 100, LAYOUTS["cgb"], block_size=32, seed=3)
    x = torch.randn(4, 100)
    assert_close(binary_linear_ref(x, p, max_elems=256), binary_linear_ref(x, p, max_elems=1 << 30))


def test_a8_reference_uses_quantized_activations():
    # Independent check: quantize x per token by hand, dequantize W by hand, compare.
    g = torch.Generator().manual_seed(4)
    signs, out_scale = torch.randn(1, 9, 64, generator=g), torch.rand(1, 9, 2, generator=g)
    in_scale = torch.rand(1, 64, generator=g) + 0.5
    p = pack(signs, out_scale, in_scale, LAYOUTS["single"], 32, scale_dtype="float32")
    x = torch.randn(3, 64, generator=g)
    xs = x * in_scale  # in_scale is folded into x before quantization
    amax = xs.abs().amax(1, keepdim=True)
    xq = torch.round(xs / (amax / 127)) * (amax / 127)
    w_no_in = dequantize(p) / in_scale
    assert_close(binary_linear_ref(x, p, act_bits=8), xq @ w_no_in.T, torch.float32)
    q, s = quantize_act_int8(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127


def test_meta_construction_and_assign_load():
    p = random_packed(16, 40, LAYOUTS["mean"], block_size=32, seed=5)
    src = BinaryLinear.from_packed(p, bias=torch.randn(16))
    with torch.device("meta"):
        m = BinaryLinear(40, 16, True, LAYOUTS["mean"], 32, scale_dtype=torch.float32, n_salient=src.n_salient)
    for name, buf in src.state_dict().items():
        assert m.state_dict()[name].shape == buf.shape, name
    m.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(2, 40)
    assert torch.equal(m(x), src(x))


def test_from_linear_rtn_and_errors():
    lin = torch.nn.Linear(70, 20)
    m = BinaryLinear.from_linear(lin, QuantConfig(block_size=32))
    w = lin.weight.detach()
    assert torch.equal(torch.sign(m.dequantize()) >= 0, w >= 0)  # signs preserved, sign(0)=+1
    with pytest.raises(ValueError, match="calibration"):
        BinaryLinear.from_linear(lin, QuantConfig(method="arb-rc"))
    lin.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        BinaryLinear.from_linear(lin, QuantConfig())
    with pytest.raises(TypeError):
        BinaryLinear.from_linear(torch.nn.Conv1d(3, 3, 1))


def test_bad_inputs_raise_clear_errors():
    m = BinaryLinear.from_packed(random_packed(8, 40, seed=6))
    with pytest.raises(ValueError, match="in_features=40"):
        m(torch.randn(2, 41))
    with pytest.raises(TypeError, match="activations"):
        m(torch.ones(2, 40, dtype=torch.int64))
    with pytest.raises(ValueError, match="act_bits"):
        binary_linear(torch.randn(2, 40), m.packed, act_bits=4)
    with pytest.raises(ValueError, match="unknown backend"):
        binary_linear(torch.randn(2, 40), m.packed, backend="fpga")
    with pytest.raises(BackendUnavailable, match="cuda"):
        resolve_backend("cuda", torch.device("cpu"), 16)
    with pytest.raises(ValueError):
        BinaryLinear(0, 4)


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("ONEBIT_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu"), 16) == "torch"


def test_opcheck_and_compile():
    p = random_packed(12, 40, LAYOUTS["cgb"], block_size=32, seed=7)
    m = BinaryLinear.from_packed(p, backend="torch")
    x = torch.randn(3, 40)
    t = p.layout.terms
    args = (x, p.signs, p.groups, p.out_scale, p.in_scale, p.mean, [u.plane for u in t], [int(u.select) for u in t],
            40, 32, 16, "torch")  # fmt: skip
    torch.library.opcheck(torch.ops.onebit.binary_linear.default, args)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), m(x))


def _stored_args(m: BinaryLinear, x: torch.Tensor) -> tuple:
    b, t = m._buffers, m.layout.terms
    return (x, b["signs"], b["groups"], b["out_scale"], b["in_scale"], b["mean"], b["salient_cols"], b["salient_signs"],
            b["scale_exp"], [u.plane for u in t], [int(u.select) for u in t], m.out_features, m.in_features,
            m.block_size, m.act_bits, m.backend)  # fmt: skip


@pytest.mark.parametrize("layout", ["single", "cgb"])
def test_stored_op_opcheck(layout):
    m = BinaryLinear.from_packed(random_packed(12, 40, LAYOUTS[layout], block_size=32, seed=3), backend="torch")
    x = torch.randn(3, 40)
    torch.library.opcheck(torch.ops.onebit.binary_linear_stored.default, _stored_args(m, x))
    want = F.linear(x.double(), dequantize(m.packed).double())
    assert_close(torch.ops.onebit.binary_linear_stored(*_stored_args(m, x)), want, torch.float32, what="stored op")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compiled_module_binds_once_and_follows_updates(backend, monkeypatch):
    """Under torch.compile the module is one op over its stored buffers: the backend is bound on
    the first call and reused (no expand / repack per call), and re-bound after a weight update."""
    import onebit.nn as onn

    calls = []
    real_bind = onn.bind
    monkeypatch.setattr(onn, "bind", lambda *a, **k: calls.append(1) or real_bind(*a, **k))
    m = BinaryLinear.from_packed(random_packed(24, 70, LAYOUTS["cgb"], block_size=32, seed=5), bias=torch.randn(24),
                                 backend=backend)  # fmt: skip
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 70)
    with torch.no_grad():
        for _ in range(3):
            y = compiled(x)
            assert y.shape == (2, 3, 24)
            assert_close(y, _expected(m, x), torch.float32, what="compiled")
        assert len(calls) == 1
        assert_close(m(x), _expected(m, x), torch.float32, what="eager after compiled")
        assert len(calls) == 1  # the eager path shares the compiled op's bound call (one prepared copy)
        m.out_scale.mul_(-2)  # in place: the op sees a new version and re-binds
        assert_close(compiled(x), _expected(m, x), torch.float32, what="compiled after update")
        assert len(calls) == 2
        assert_close(m(x), _expected(m, x), torch.float32, what="eager after update")
    assert len(calls) == 2


def test_compiled_module_inductor():
    m = BinaryLinear.from_packed(random_packed(16, 48, LAYOUTS["single"], block_size=32, seed=6), bias=torch.randn(16))
    x = torch.randn(1, 48)
    f = torch.compile(lambda t: torch.relu(m(t)) * 2, fullgraph=True)  # inductor around the opaque op
    with torch.no_grad():
        assert_close(f(x), torch.relu(_expected(m, x)) * 2, torch.float32, what="inductor")


# ---------------------------------------------------------------- the bound eager call


def _expected(m: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), dequantize(m.packed).double(), None if m.bias is None else m.bias.double())


def test_bound_call_follows_weight_changes():
    # forward binds the backend once; every change to what it depends on must re-bind.
    p = random_packed(24, 70, LAYOUTS["cgb"], block_size=32, seed=8)
    m = BinaryLinear.from_packed(p, bias=torch.randn(24))
    x = torch.randn(3, 70)
    assert_close(m(x), _expected(m, x), torch.float32, what="first call")
    with torch.no_grad():
        m.out_scale.mul_(-2)  # in place: same tensor, new version
    assert_close(m(x), _expected(m, x), torch.float32, what="after in-place update")
    # New tensor objects of the same shapes (a module's shapes are fixed: salient columns too).
    other = {k: v.clone() for k, v in m.state_dict().items()}
    other["signs"], other["salient_signs"] = ~other["signs"], ~other["salient_signs"]
    other["out_scale"] = torch.rand_like(other["out_scale"])
    m.load_state_dict(other, assign=True)
    assert_close(m(x), _expected(m, x), torch.float32, what="after load_state_dict(assign=True)")
    m.act_bits = 8
    assert_close(m(x), binary_linear_ref(x, m.packed, act_bits=8) + m.bias, torch.float32, what="act_bits=8")


def test_bound_call_rereads_backend_env(monkeypatch):
    m = BinaryLinear.from_packed(random_packed(8, 40, seed=10))
    x = torch.randn(2, 40)
    y = m(x)
    monkeypatch.setenv("ONEBIT_BACKEND", "cuda")  # unavailable for CPU tensors: proves the env is read again
    with pytest.raises(BackendUnavailable, match="cuda"):
        m(x)
    monkeypatch.setenv("ONEBIT_BACKEND", "torch")
    assert_close(m(x), y.double(), torch.float32)


def test_bound_module_copies_and_pickles():
    import copy
    import io

    m = BinaryLinear.from_packed(random_packed(8, 40, LAYOUTS["mean"], block_size=32, seed=11), bias=torch.randn(8))
    x = torch.randn(2, 40)
    y = m(x)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.out_scale.mul_(3)  # the copy owns its tensors: the original must not change
    assert torch.equal(m(x), y)
    assert_close(c(x), _expected(c, x), torch.float32)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)


def test_bound_call_rejects_input_on_another_device():
    m = BinaryLinear.from_packed(random_packed(8, 40, seed=12))
    with pytest.raises(ValueError, match="device|on meta"):
        m(torch.randn(2, 40, device="meta"))


def test_bound_calls_go_with_their_weight():
    """The store of bound calls (shared by the eager path and the compiled op) keeps no weight alive."""
    import gc
    import weakref

    import onebit.nn as onn

    for backend in ("torch", "auto"):
        m = BinaryLinear.from_packed(random_packed(8, 40, LAYOUTS["cgb"], block_size=32, seed=2), backend=backend)
        m(torch.randn(1, 40))
        ref = weakref.ref(m.signs)
        slots = [k for k, v in onn._stored_bound.items() if v[1]() is m.signs]
        assert len(slots) == 1
        del m
        gc.collect()
        assert ref() is None and slots[0] not in onn._stored_bound, backend


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_eager_input_shapes(backend):
    """The eager path hands the CPU backend (..., K) as it is (no reshape either side): every
    leading shape, empty ones, non-contiguous and narrow inputs give (..., N) in x's dtype."""
    m = BinaryLinear.from_packed(random_packed(24, 70, LAYOUTS["cgb"], block_size=32, seed=9), bias=torch.randn(24),
                                 backend=backend)  # fmt: skip
    base = torch.randn(4, 3, 70, generator=torch.Generator().manual_seed(0))
    cases = [base[0, 0], base[:1, :1], base, base[:2], base.transpose(0, 1), base[:, :, :70].contiguous()[:0],
             base[:1].expand(2, 3, 70), base.reshape(12, 70)]  # fmt: skip
    with torch.no_grad():
        for x in cases:
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                y = m(xd)
                assert y.shape == (*x.shape[:-1], 24) and y.dtype == dtype
                if x.numel():
                    assert_close(y, _expected(m, xd), dtype, what=f"{backend} {tuple(x.shape)} {dtype}")
    from onebit.backends import cpu

    assert m._bound_nd == (backend == "auto" and cpu.available("cpu")[0])  # the CPU backend took x as it came
