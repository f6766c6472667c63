"""The binary linear op: one torch.library declaration, one explicit backend registry.

    binary_linear(x, packed, act_bits=16|8, backend="auto") -> x @ W^T   (no bias)

Backends (`BACKENDS`; `auto` tries AUTO_ORDER for the tensor's device):

    cuda    csrc/cuda, built into onebit._C when a CUDA torch and nvcc exist   (CUDA tensors)
    triton  kernels/ (onebit.kernels), Triton GPU kernels                       (CUDA tensors)
    cpu     csrc/cpu, C++ with run-time AVX-512 / AVX2 / scalar dispatch        (CPU tensors)
    torch   onebit.reference, pure torch, any device: the oracle and fallback

Each backend is a function `fn(x2d, packed, act_bits) -> (M, N) float32` loaded lazily on
first use, so `import onebit` never imports Triton or the extension. A backend may also
offer `bind(packed, act_bits) -> run(x2d)`, the same call with its per-weight preparation
(repacked layout, path choice) done once: `bind()` below hands that to eager loops. `auto` resolves once
per (device, act_bits) and logs why it skipped a backend; asking for a backend explicitly
that cannot run raises BackendUnavailable naming what is missing. `ONEBIT_BACKEND=<name>`
overrides `auto` (e.g. `torch` to force the reference while debugging).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from onebit.format import Layout, PackedWeight, Select, Term
from onebit.reference import binary_linear_ref

log = logging.getLogger(__name__)

BackendFn = Callable[[torch.Tensor, PackedWeight, int], torch.Tensor]
ACT_BITS = (16, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported lazily; must define `binary_linear(x, packed, act_bits)` and `available(device)`
    devices: tuple[str, ...]


BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", "onebit.backends.cuda", ("cuda",)),
    # Triton also accepts CPU tensors under TRITON_INTERPRET=1 (tests), but only by explicit request.
    "triton": Backend("triton", "onebit.kernels.binary_linear", ("cuda", "cpu")),
    "cpu": Backend("cpu", "onebit.backends.cpu", ("cpu",)),
    "torch": Backend("torch", "onebit.reference", ("cpu", "cuda", "meta", "mps", "xpu")),
}
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_loaded: dict[str, BackendFn] = {"torch": binary_linear_ref}
_binders: dict[str, Callable[[PackedWeight, int], Callable[[torch.Tensor], torch.Tensor]]] = {}
_auto_cache: dict[tuple[str, int], str] = {}


def _load(name: str, device: torch.device) -> BackendFn:
    """Import a backend and check it can run on `device`; raise BackendUnavailable with the reason."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'")
    b = BACKENDS[name]
    if device.type not in b.devices:
        raise BackendUnavailable(f"backend {name!r} runs on {b.devices}, not on {device.type} tensors")
    if name in _loaded:
        return _loaded[name]
    try:
        mod = importlib.import_module(b.module)
    except ImportError as e:
        raise BackendUnavailable(f"backend {name!r} needs {b.module}, which failed to import: {e}") from None
    ok, why = mod.available(device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {why}")
    _loaded[name] = mod.binary_linear
    if hasattr(mod, "bind"):
        _binders[name] = mod.bind
    return mod.binary_linear


def resolve_backend(backend: str, device: torch.device, act_bits: int) -> str:
    """Turn 'auto' (or ONEBIT_BACKEND) into a concrete backend name for this device."""
    env = os.environ.get("ONEBIT_BACKEND", "").strip()
    if backend == "auto" and env and env != "auto":
        backend = env
    if backend != "auto":
        _load(backend, device)
        return backend
    key = (device.type, act_bits)
    if key not in _auto_cache:
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            try:
                _load(name, device)
            except BackendUnavailable as e:
                log.debug("onebit auto backend: skipping %s (%s)", name, e)
                continue
            _auto_cache[key] = name
            break
    return _auto_cache[key]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    out = []
    for name in BACKENDS:
        try:
            _load(name, device)
            out.append(name)
        except BackendUnavailable:
            pass
    return out


# ---------------------------------------------------------------------------- the custom op


def layout_args(layout: Layout) -> tuple[list[int], list[int]]:
    """A Layout's terms as the two int lists an op schema can carry: planes and selects."""
    return [t.plane for t in layout.terms], [int(t.select) for t in layout.terms]


def layout_from_args(term_planes: list[int], term_selects: list[int], has_mean: bool) -> Layout:
    """The Layout that layout_args described."""
    return Layout(tuple(Term(p, Select(s)) for p, s in zip(term_planes, term_selects)), has_mean)


@torch.library.custom_op("onebit::binary_linear", mutates_args=())
def _binary_linear_op(
    x: torch.Tensor,
    signs: torch.Tensor,
    groups: torch.Tensor | None,
    out_scale: torch.Tensor,
    in_scale: torch.Tensor,
    mean: torch.Tensor | None,
    term_planes: list[int],
    term_selects: list[int],
    in_features: int,
    block_size: int,
    act_bits: int,
    backend: str,
) -> torch.Tensor:
    layout = layout_from_args(term_planes, term_selects, mean is not None)
    packed = PackedWeight(signs.shape[1], in_features, block_size, layout, signs, out_scale, in_scale, groups, mean)
    fn = _load(resolve_backend(backend, x.device, act_bits), x.device)
    return fn(x.contiguous(), packed, act_bits).to(x.dtype)


@_binary_linear_op.register_fake
def _(x, signs, groups, out_scale, in_scale, mean, term_planes, term_selects, in_features, block_size, act_bits, backend):
    return x.new_empty(x.shape[0], signs.shape[1])


def check_input(x: torch.Tensor, in_features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"binary_linear supports {[str(d) for d in FLOAT_DTYPES]} activations, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input's last dim must be in_features={in_features}, got shape {tuple(x.shape)}")


def bind(
    packed: PackedWeight, act_bits: int = 16, backend: str = "auto", device: torch.device | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """run(x2d) -> (M, N) float32 for contiguous (M, K) x2d on `device`: the backend resolved once.

    For eager loops over the same weight (BinaryLinear.forward): everything that does not
    depend on x (backend choice, the backend's own preparation of the weight) is done here,
    so a call costs the kernel plus a few microseconds. The caller re-binds when the weight's
    tensors, act_bits, the device or the ONEBIT_* environment change.
    """
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {ACT_BITS}, got {act_bits}")
    device = packed.signs.device if device is None else torch.device(device)
    if device != packed.signs.device:
        raise ValueError(f"input on {device} but the packed weight is on {packed.signs.device}; move one of them")
    name = resolve_backend(backend, device, act_bits)
    fn = _load(name, device)
    if name in _binders:
        return _binders[name](packed, act_bits)
    return lambda x2d: fn(x2d, packed, act_bits)


def binary_linear(x: torch.Tensor, packed: PackedWeight, act_bits: int = 16, backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T for x (..., K) in fp32/fp16/bf16; returns (..., N) in x's dtype."""
    check_input(x, packed.in_features)
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {ACT_BITS}, got {act_bits}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    if not torch.compiler.is_compiling():
        # Eager: call the backend directly. The custom-op dispatch costs ~30 us a call, which
        # is a sixth of a SmolLM2 decode step; torch.compile still sees the opaque op below.
        y = bind(packed, act_bits, backend, x.device)(x2.contiguous())
        return y.to(x.dtype).reshape(*lead, packed.out_features)
    planes, selects = layout_args(packed.layout)
    y = _binary_linear_op(
        x2,
        packed.signs,
        packed.groups,
        packed.out_scale,
        packed.in_scale,
        packed.mean,
        planes,
        selects,
        packed.in_features,
        packed.block_size,
        act_bits,
        backend,
    )
    return y.reshape(*lead, packed.out_features)
