"""The `cuda` backend of onebit's binary_linear op: csrc/cuda built as `onebit._C_cuda`.

    binary_linear(x2d, packed, act_bits) -> (M, N) float32

The extension is loaded lazily (first `available()` / call), never at `import onebit`.
It exists only when onebit was installed against a CUDA build of torch with nvcc present
(`pip install --no-build-isolation .`; the build compiles csrc/cuda/*.cu + *.cpp as a torch
CUDAExtension named `onebit._C_cuda`). Kernels: one warp per output row, up to 8 tokens
per pass, A16 signed select-and-add in fp32 and W1A8 AND + __popc on int8 bit planes
(exact integers), any term list (single term, CGB groups / 2 planes, mean).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from onebit.format import PackedWeight, validate

EXTENSION = "onebit._C_cuda"
GEMM_MIN_M = 16  # above this many rows, A16 prefers the Triton GEMM (weights read once per 64-128 rows, MMA)

_ext: ModuleType | None = None
_err: str | None = None


def _extension() -> ModuleType | None:
    global _ext, _err
    if _ext is None and _err is None:
        try:
            _ext = importlib.import_module(EXTENSION)
        except ImportError as e:
            _err = str(e)
    return _ext


def available(device: torch.device | str) -> tuple[bool, str]:
    """(ok, reason): can the compiled CUDA kernels run on tensors of this device?"""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the CUDA kernels run on CUDA tensors, not {device.type}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build, so {EXTENSION} cannot be built or loaded"
    if not torch.cuda.is_available():
        return False, "torch reports no usable CUDA device"
    if _extension() is None:
        return False, (
            f"{EXTENSION} is not built ({_err}); reinstall onebit with `pip install --no-build-isolation .` "
            "against a CUDA torch with nvcc on PATH"
        )
    return True, f"{EXTENSION} loaded"


def _triton_gemm():
    """The Triton tensor-core GEMM for prefill-sized A16 batches, or None when Triton can't run here."""
    global _gemm
    if _gemm is None:
        try:
            from onebit.kernels import binary_linear as tk

            _gemm = tk.binary_linear if tk.available("cuda")[0] else False
        except ImportError:
            _gemm = False
    return _gemm or None


_gemm = None


def binary_linear(x2d: torch.Tensor, packed: PackedWeight, act_bits: int = 16) -> torch.Tensor:
    """y (M, N) fp32 = x2d (M, K) @ W^T; x2d fp32/fp16/bf16 on a CUDA device; act_bits 16 or 8.

    The CUDA kernels are GEMVs (8 tokens per pass, no tensor cores): an A16 batch of more than
    GEMM_MIN_M rows goes to the Triton tensor-core GEMM when Triton can run on this device.
    """
    ext = _extension()
    if ext is None:
        raise RuntimeError(available(x2d.device)[1])
    if act_bits == 16 and x2d.dim() == 2 and x2d.shape[0] > GEMM_MIN_M:
        gemm = _triton_gemm()
        if gemm is not None:
            return gemm(x2d, packed, act_bits)
    validate(packed)
    terms = packed.layout.terms
    return ext.binary_linear(
        x2d,
        packed.signs.contiguous(),
        packed.groups.contiguous() if packed.groups is not None else None,
        packed.out_scale.contiguous(),
        packed.in_scale.contiguous(),
        packed.mean.contiguous() if packed.mean is not None else None,
        [t.plane for t in terms],
        [int(t.select) for t in terms],
        packed.in_features,
        packed.block_size,
        act_bits,
    )


__all__ = ["EXTENSION", "available", "binary_linear"]
