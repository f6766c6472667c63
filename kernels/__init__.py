"""Triton kernels for onebit, installed as `onebit.kernels` (never as a bare `kernels`)."""
