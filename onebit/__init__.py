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
    "compact_head": "onebit.head",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onebit' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """Register the "onebit" quantization method with transformers when (and only when) it loads.

    Without this, transformers would skip the unknown quant_method and silently load random
    linears. A one-shot meta-path hook runs onebit.hf after transformers is imported, so
    `import onebit` itself never imports transformers.
    """
    import importlib.abc
    import importlib.util
    import sys

    if "transformers" in sys.modules:
        import onebit.hf  # noqa: F401

        return

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_and_register(module):
                    run(module)
                    import onebit.hf  # noqa: F401

                spec.loader.exec_module = exec_and_register
            return spec

    sys.meta_path.insert(0, _Hook())


_register_with_transformers()

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
