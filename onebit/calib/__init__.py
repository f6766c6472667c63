"""Calibration pipeline: block-by-block quantization of a transformers model (spec section 1)."""

from onebit.calib.pipeline import quantize_calibrated

__all__ = ["quantize_calibrated"]
