"""The one tolerance policy for onebit's tests.

Outputs are compared with the max absolute error normalised by the reference's RMS
(a scale-free "max relative error"); reports give the max, not only the mean. Bounds by
the dtype the kernel *computes or returns in*:

* float32: reductions in a different order only -> 1e-5 relative (K up to a few thousand).
* float16 / bfloat16 outputs: 2 ulps at the output scale (rms) for the arithmetic, plus the
  final rounding of each element, half an ulp of that element (|ref| * 2^-11 for fp16,
  2^-8 for bf16): an element several times the rms may round by more than 2 ulps of rms.
* int8 activation (A8) paths are compared against a reference built from the *same*
  quantized activations, so they get the float32 bound of the final scaling.
"""

from __future__ import annotations

import torch

REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # half an ulp, relative


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    scale = ref.pow(2).mean().sqrt().clamp_min(1e-12)
    return float((y.float() - ref).abs().max() / scale)


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Assert y ~= ref under the policy above; dtype defaults to y's dtype."""
    if y.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(y.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(y).all():
        raise AssertionError(f"{what}: non-finite values in the output")
    dtype = dtype or y.dtype
    tol = REL_TOL[dtype]
    if dtype in ROUNDING:
        ref64 = ref.double()
        excess = ((y.double() - ref64).abs() - ROUNDING[dtype] * ref64.abs()).clamp_min(0)
        err = float(excess.max() / ref64.pow(2).mean().sqrt().clamp_min(1e-12))
    else:
        err = max_rel_err(y, ref)
    if err > tol:
        raise AssertionError(f"{what}: max error / rms(ref) = {err:.3g} > {tol:.3g}")
