"""Test configuration: the Triton interpreter must be on before any kernel module is imported."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for `import tolerances`

