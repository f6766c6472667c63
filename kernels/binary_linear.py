"""The `triton` backend of onebit's binary_linear op (see onebit/ops.py).

    binary_linear(x2d, packed, act_bits) -> (M, N) float32

Routes to one kernel family per case:

    act_bits=16, M <= 8    binary_gemv.py      signed masked accumulate, fp32
    act_bits=16, M > 8     binary_gemm.py      weight tiles unpacked in registers + tl.dot
    act_bits=8             binary_popcount.py  int8 bit planes, AND + popcount, exact integers

Runs on CUDA tensors when a GPU is present, and on CPU tensors only under the Triton
interpreter (TRITON_INTERPRET=1 set before this module is imported: tests and CI).
"""

from __future__ import annotations

import os

import torch

from onebit.format import PackedWeight

from ._common import is_interpreted, repack_for_binary_linear
from .binary_gemm import binary_gemm_triton
from .binary_gemv import MAX_M as GEMV_MAX_M
from .binary_gemv import _binary_gemv_kernel, binary_gemv_triton
from .binary_popcount import binary_popcount_triton


def available(device: torch.device | str) -> tuple[bool, str]:
    """(ok, reason): can the Triton kernels run on tensors of this device?"""
    device = torch.device(device)
    interp = is_interpreted(_binary_gemv_kernel)
    if device.type == "cpu":
        if interp:
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        return False, (
            "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing "
            f"onebit.kernels (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} at import)"
        )
    if device.type == "cuda":
        if interp:
            return False, "onebit.kernels was imported under TRITON_INTERPRET=1, which cannot launch on CUDA tensors"
        if not torch.cuda.is_available():
            return False, "torch reports no CUDA device (CPU-only torch build or no GPU)"
        return True, "CUDA GPU"
    return False, f"no Triton support for {device.type} tensors"


def binary_linear(x2d: torch.Tensor, packed: PackedWeight, act_bits: int = 16) -> torch.Tensor:
    """y (M, N) fp32 = x2d (M, K) @ W^T; x2d fp32/fp16/bf16, act_bits 16 (exact) or 8 (W1A8)."""
    kw = repack_for_binary_linear(packed)
    if act_bits == 8:
        return binary_popcount_triton(x2d, kw)
    if act_bits != 16:
        raise ValueError(f"act_bits must be 16 or 8, got {act_bits}")
    if x2d.dim() == 2 and x2d.shape[0] <= GEMV_MAX_M:
        return binary_gemv_triton(x2d, kw)
    return binary_gemm_triton(x2d, kw)


__all__ = ["available", "binary_linear", "repack_for_binary_linear"]
