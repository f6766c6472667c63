"""onebit: 1-bit post-training quantization of LLMs with real packed weights.

`import onebit` is lean on purpose: it imports neither triton, transformers nor the
compiled extension. Those load on first use.
"""

from __future__ import annotations

from typing import Any

from onebit.config import Method, QuantConfig
from onebit.format import FORMAT_VERSION, PackedWeight, bits_per_weight, dequantize, pack
from onebit.nn import BinaryLinear
from onebit.ops import binary_linear

__version__ = "0.1.0"

# Heavier entry points are resolved lazily (PEP 562) so the import stays lean.
_LAZY = {
    "quantize_model": "onebit.models",
    "load_model": "onebit.models",
    "save_quantized": "onebit.checkpoint",
    "load_quantized": "onebit.checkpoint",
    "perplexity": "onebit.eval",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onebit' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "BinaryLinear",
    "Method",
    "PackedWeight",
    "QuantConfig",
    "binary_linear",
    "bits_per_weight",
    "dequantize",
    "pack",
    *_LAZY,
]
