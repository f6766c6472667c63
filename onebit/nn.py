"""BinaryLinear: a drop-in nn.Linear whose weight is stored in packed format v2 (onebit/compact.py)."""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable

import torch
from torch import nn

from onebit.config import QuantConfig
from onebit.compact import INT_NAMES, STORED_SCALE_DTYPES, CompactWeight, compact, compact_shapes, expand, validate_compact
from onebit.format import SINGLE_TERM, Layout, PackedWeight, dequantize
from onebit.ops import ACT_BITS, bind, check_input, layout_args, layout_from_args

_PACKED_NAMES = ("signs", "groups", "out_scale", "in_scale", "mean", "salient_cols", "salient_signs", "scale_exp")
# Environment variables that change which kernel path a bound call takes.
_DISPATCH_ENV = ("ONEBIT_BACKEND", "ONEBIT_CPU_ISA")


def _dispatch_env() -> tuple:
    """The values of _DISPATCH_ENV, read at every eager call. os.environ.get encodes the name and
    decodes the value (~0.8 us each); on POSIX the mapping's own bytes dict answers the same in
    ~0.1 us (os.environ's writes go through it). Elsewhere: os.environ.get."""
    return tuple(_env_get(k) for k in _ENV_KEYS)


_env_data = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_env_data, dict):
    _env_get, _ENV_KEYS = _env_data.get, tuple(os.fsencode(v) for v in _DISPATCH_ENV)
else:  # pragma: no cover
    _env_get, _ENV_KEYS = os.environ.get, _DISPATCH_ENV


def _tensor_key(t: torch.Tensor | None) -> tuple:
    # Identity and version: a replaced buffer (load_state_dict(assign=True), .to()) or an
    # in-place update re-binds. Inference tensors have no version counter; they cannot be
    # updated in place outside inference mode, so -1 stands for "never changes".
    if t is None:
        return ()
    return (id(t), -1 if t.is_inference() else t._version)


class BinaryLinear(nn.Module):
    """y = x W^T + b with W a packed 1-bit weight (see docs/FORMAT.md).

    The buffers hold the stored form (format v2, `compact`): that is what state_dict and
    checkpoints contain and what bits_per_weight counts. Kernels read the v1 execution layout
    (`packed`), expanded from the buffers when a backend is bound. Buffers are allocated in
    their final shapes and dtypes (n_salient: the number of salient columns of a layout with
    a second plane), so the module can be built on the meta device and filled by
    `load_state_dict(..., assign=True)`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        layout: Layout = SINGLE_TERM,
        block_size: int = 128,
        scale_dtype: torch.dtype = torch.float16,
        act_bits: int = 16,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        n_salient: int = 0,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if scale_dtype not in STORED_SCALE_DTYPES.values():
            raise TypeError(f"scale_dtype must be one of {list(STORED_SCALE_DTYPES)}, got {scale_dtype}")
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be one of {ACT_BITS}, got {act_bits}")
        self.in_features, self.out_features = in_features, out_features
        self.layout, self.block_size = layout, block_size
        self.act_bits, self.backend = act_bits, backend
        shapes = compact_shapes(out_features, in_features, block_size, layout, n_salient, scale_dtype)
        for name, shape in shapes.items():
            dt = torch.int32 if name in INT_NAMES else scale_dtype
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        for name in _PACKED_NAMES:
            if not hasattr(self, name):
                self.register_buffer(name, None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self._bound_key: tuple | None = None
        self._bound = None
        self._bound_nd = False

    # ---------------------------------------------------------------- construction

    @property
    def compact(self) -> CompactWeight:
        """The stored weight (format v2): the buffers themselves."""
        return CompactWeight(
            self.out_features, self.in_features, self.block_size, self.layout,
            signs=self.signs, out_scale=self.out_scale, in_scale=self.in_scale, groups=self.groups,
            mean=self.mean, salient_cols=self.salient_cols, salient_signs=self.salient_signs,
            scale_exp=self.scale_exp,
        )  # fmt: skip

    @property
    def packed(self) -> PackedWeight:
        """The execution layout (format v1) the kernels read, expanded from the buffers (a new copy)."""
        return expand(self.compact, check=not torch.compiler.is_compiling())

    @classmethod
    def from_packed(
        cls,
        packed: PackedWeight | CompactWeight,
        bias: torch.Tensor | None = None,
        act_bits: int = 16,
        backend: str = "auto",
        scale_dtype: str | torch.dtype | None = None,
    ) -> "BinaryLinear":
        """scale_dtype: how to store the scales of a v1 `packed` (default: as they are; float8_e4m3fn rounds them)."""
        c = packed if isinstance(packed, CompactWeight) else compact(packed, scale_dtype)
        validate_compact(c)
        m = cls(
            c.in_features, c.out_features, bias is not None, c.layout, c.block_size,
            c.out_scale.dtype, act_bits, backend, device="meta", n_salient=c.n_salient,
        )  # fmt: skip
        for name, t in c.tensors().items():
            setattr(m, name, t)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None, **kw: Any) -> "BinaryLinear":
        """Quantize an nn.Linear with a method that needs no calibration data (e.g. rtn)."""
        from onebit.quant import quantize_weight  # local: quant is heavier and optional here

        config = config or QuantConfig()
        if config.needs_calibration:
            raise ValueError(
                f"method {config.method.value!r} needs calibration data; use onebit.quantize_model(model, config, calib)"
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        packed = quantize_weight(linear.weight.detach(), config)
        return cls.from_packed(packed, linear.bias, scale_dtype=config.scale_dtype, **kw)

    @property
    def n_salient(self) -> int:
        return 0 if self.salient_cols is None else int(self.salient_cols.shape[0])

    # ---------------------------------------------------------------- use

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = self._compiled(x)
        else:
            y = self._eager(x)
        b = self._parameters["bias"]  # (self.bias goes through nn.Module.__getattr__: ~0.6 us)
        if b is not None:
            y = y + (b if b.dtype == y.dtype else b.to(y.dtype))
        return y

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls every layer once with one token, so per-call Python overhead is
        # paid ~200 times a token (SmolLM2): the backend call is bound once per weight and
        # re-bound only when something it depends on changes (the key below).
        check_input(x, self.in_features)
        bufs = self._buffers
        key = (x.device, self.act_bits, self.backend, _dispatch_env(), tuple(_tensor_key(bufs[n]) for n in _PACKED_NAMES))
        if key != self._bound_key:
            self._bound = _shared_bound(
                x.device, *layout_args(self.layout), self.out_features, self.in_features, self.block_size,
                self.act_bits, self.backend, tuple(bufs[n] for n in _PACKED_NAMES),
            )  # fmt: skip
            self._bound_nd = getattr(self._bound, "accepts_nd", False)  # (..., K) in, (..., N) out
            self._bound_key = key
        # Each skipped no-op below (reshape, contiguous, to) is ~0.5-1 us a call.
        nd = x.dim() == 2 or self._bound_nd
        x2 = x if nd else x.reshape(-1, self.in_features)
        y = self._bound(x2 if x2.is_contiguous() else x2.contiguous())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if nd else y.reshape(*x.shape[:-1], self.out_features)

    def _compiled(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile: one opaque op over the stored buffers (see binary_linear_stored).
        check_input(x, self.in_features)
        b = self._buffers
        y = torch.ops.onebit.binary_linear_stored(
            x.reshape(-1, self.in_features), *[b[n] for n in _PACKED_NAMES], *layout_args(self.layout),
            self.out_features, self.in_features, self.block_size, self.act_bits, self.backend,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict[str, Any]:
        # The bound call holds backend objects that cannot be pickled; it is rebuilt on use.
        state = dict(self.__dict__)
        state["_bound"], state["_bound_key"] = None, None
        return state

    def bits_per_weight(self) -> float:
        """True bits per weight of the stored form (what a checkpoint holds)."""
        from onebit.compact import bits_per_weight

        return bits_per_weight(self.compact)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"terms={self.layout.n_terms}, planes={self.layout.n_planes}, salient={self.n_salient}, block_size={self.block_size}, "
            f"act_bits={self.act_bits}"
        )


# ---------------------------------------------------------------------------- under torch.compile
#
# torch.compile sees a BinaryLinear as one opaque op whose inputs are its stored (v2) buffers.
# Tracing `self.packed` instead would put `expand` into the graph and hand the backend new
# tensors at every call, so the CPU backend would repack the weight every step. The op binds
# the backend call once per weight and reuses it while the buffers are the same tensors at the
# same versions; the eager path takes its bound call from the same store, so a model that
# prefills eagerly and decodes compiled holds one prepared copy of each weight (the CPU
# backend's repacked layout), not two. The op is declared with torch.library.Library rather
# than @custom_op: inside an inductor graph on CPU the call measured 5.7 us against 13.4 us,
# paid ~200 times a decode step.

_lib = torch.library.Library("onebit", "FRAGMENT")
_lib.define(
    "binary_linear_stored(Tensor x, Tensor signs, Tensor? groups, Tensor out_scale, Tensor in_scale, Tensor? mean, "
    "Tensor? salient_cols, Tensor? salient_signs, Tensor? scale_exp, int[] term_planes, int[] term_selects, "
    "int out_features, int in_features, int block_size, int act_bits, str backend) -> Tensor"
)
# (id(signs), device, act_bits, backend) -> (key, weakref to signs, bound call); an entry goes
# when its signs tensor does (no backend's bound call refers to the stored tensors: they hold
# the expanded v1 copy or their own repacked layout, so the weakref can die).
_stored_bound: dict[tuple, tuple[tuple, weakref.ref, Callable[[torch.Tensor], torch.Tensor]]] = {}


def _shared_bound(device, term_planes, term_selects, out_features, in_features, block_size, act_bits, backend,
                  tensors: tuple) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """The backend call bound to the stored weight `tensors` (in _PACKED_NAMES order), made once."""
    signs = tensors[0]
    key = (
        device, act_bits, backend, tuple(term_planes), tuple(term_selects), out_features, in_features, block_size,
        _dispatch_env(), *[_tensor_key(t) for t in tensors],
    )  # fmt: skip
    slot = (id(signs), device, act_bits, backend)  # modules sharing a weight may run it differently
    hit = _stored_bound.get(slot)
    if hit is None or hit[0] != key or hit[1]() is not signs:
        layout = layout_from_args(term_planes, term_selects, tensors[_PACKED_NAMES.index("mean")] is not None)
        c = CompactWeight(out_features, in_features, block_size, layout, **dict(zip(_PACKED_NAMES, tensors)))
        # Runs on real tensors (never while tracing), so expand validates them. The expanded v1
        # copy lives only as long as the backend keeps it (the CPU backend keeps its own
        # repacked layout instead).
        ref = weakref.ref(signs, lambda _r, k=slot: _stored_bound.pop(k, None))
        hit = _stored_bound[slot] = (key, ref, bind(expand(c), act_bits, backend, device))
    return hit[2]


def _stored_impl(x, signs, groups, out_scale, in_scale, mean, salient_cols, salient_signs, scale_exp, term_planes,
                 term_selects, out_features, in_features, block_size, act_bits, backend):  # fmt: skip
    tensors = (signs, groups, out_scale, in_scale, mean, salient_cols, salient_signs, scale_exp)
    run = _shared_bound(x.device, term_planes, term_selects, out_features, in_features, block_size, act_bits, backend,
                        tensors)  # fmt: skip
    y = run(x if x.is_contiguous() else x.contiguous())
    return y if y.dtype == x.dtype else y.to(x.dtype)


for _key in ("CPU", "CUDA"):
    _lib.impl("binary_linear_stored", _stored_impl, _key)


@torch.library.register_fake("onebit::binary_linear_stored")
def _(x, signs, groups, out_scale, in_scale, mean, salient_cols, salient_signs, scale_exp, term_planes, term_selects,
      out_features, in_features, block_size, act_bits, backend):  # fmt: skip
    return x.new_empty(x.shape[0], out_features)
