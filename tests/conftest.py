"""Test configuration: the Triton interpreter must be on before any kernel module is imported."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for `import tolerances`


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests that draw from the global RNG (bias vectors, throw-away inputs) see the same
    numbers on every run and in any order: a failure reproduces, and a pass is not luck."""
    torch.manual_seed(0)
