"""Quantizers: pure-torch math from a weight (and calibration statistics) to format v1."""

from __future__ import annotations

import torch

from onebit.config import Method, QuantConfig
from onebit.format import PackedWeight
from onebit.quant.methods import layout_for, quantize_layer
from onebit.quant.rtn import quantize_rtn


def check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features x in_features), got {getattr(w, 'shape', type(w))}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be floating point, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")


def quantize_weight(w: torch.Tensor, config: QuantConfig) -> PackedWeight:
    """Quantize one weight with a method that needs no calibration statistics."""
    check_weight(w)
    if config.method is Method.RTN:
        return quantize_rtn(w, config)
    raise ValueError(f"method {config.method.value!r} needs calibration statistics (see onebit.calib)")


__all__ = ["check_weight", "layout_for", "quantize_layer", "quantize_rtn", "quantize_weight"]
