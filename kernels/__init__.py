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
"""
