"""Triton kernels for onebit, installed as `onebit.kernels` (never as a bare `kernels`).

One file per kernel family, each with the same anatomy (header -> CONFIGS -> @triton.jit
kernel -> launcher -> __all__):

    binary_linear.py     the `triton` backend of onebit.ops.binary_linear (routes below)
    binary_gemv.py       A16, M <= 8: signed masked accumulate in fp32
    binary_gemm.py       A16, M > 8: weight tiles unpacked in registers + tl.dot
    binary_popcount.py   W1A8: int8 activation bit planes, AND + popcount, exact integers
    gram.py              calibration: Sq += Xq^T Xq (upper triangle), S += Xq^T X, fp32 IEEE
    _common.py           term code, popcount, repack_for_binary_linear() (cached)

Nothing is imported here: importing this package must not import Triton.

Run from the repository root (`python -m pytest`, `python -c`), the root is on sys.path and
this directory would shadow Hugging Face's `kernels` package (which transformers >= 5.25
requires and imports): imported under the bare name, it steps aside and hands over the real
package, or raises ModuleNotFoundError like a missing package would.
"""

if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = list(sys.path)
    del sys.modules["kernels"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    try:
        # The import system returns whatever sys.modules["kernels"] holds once this file has run.
        importlib.import_module("kernels")
    finally:
        sys.path[:] = _saved
