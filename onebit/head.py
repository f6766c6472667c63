"""A 16-bit float head: the lm_head (and the embedding it is tied to) in fp16 / bf16.

Once the decoder's linear layers are 1-bit, the float head is the largest layer a decode step
reads: SmolLM2-135M's tied 49152 x 576 embedding is 113 MB in fp32, more than all its packed
layers, and torch's fp32 GEMV read it at ~10 GB/s on the project's Zen 4 machines.
`compact_head(model)` keeps one 16-bit copy of it for both uses and runs the head through
`dense16_linear` (csrc/cpu/dense16.cpp on CPU: 16-bit weights, fp32 accumulation), so a
decode step reads half the bytes. Activations keep the model's dtype.

It is a precision choice like the checkpoint's `float_dtype`: the head's weights are rounded
to fp16 (11 significant bits) or bf16 (8). A checkpoint saved with `float_dtype=float16` already
holds exactly these values, and saving a compacted model stores the 16-bit copy (loading
casts it back to the model's dtype).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DTYPES = (torch.float16, torch.bfloat16)
# Rows widened at a time on the F.linear path (bounds the temporary to ~10 MB at K = 576).
_CHUNK_ROWS = 4096


@functools.cache
def _cpu_kernel():
    """onebit.backends.cpu.dense16_linear when onebit._C is built, else None (looked up once)."""
    from onebit.backends import cpu

    return cpu.dense16_linear if cpu.available("cpu")[0] else None


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"dense16_linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in HEAD_DTYPES:
        raise TypeError(f"dense16_linear: weight must be float16 or bfloat16, got {weight.dtype}")


def dense16_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) in x's dtype with the weight widened chunk by chunk (never whole)."""
    _check_weight(weight)
    parts = [F.linear(x, weight[i : i + _CHUNK_ROWS].to(x.dtype)) for i in range(0, weight.shape[0], _CHUNK_ROWS)]
    y = torch.cat(parts, dim=-1) if len(parts) != 1 else parts[0]
    return y if bias is None else y + bias.to(y.dtype)


def dense16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias) with a float16 / bfloat16 weight, fp32 accumulation, y in x's dtype.

    CPU tensors run onebit._C's kernel (run-time AVX-512 / AVX2 / scalar; on SmolLM2's head it
    beat the widening path below at every token count measured, 1 to 128); elsewhere (GPU, no
    extension, autograd) the weight is widened in row chunks for F.linear.
    """
    _check_weight(weight)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"dense16_linear: x has {x.shape[-1]} features, the weight {weight.shape[1]}")
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dense16_linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    lead = x.shape[:-1]
    m = math.prod(lead)
    kernel = _cpu_kernel() if x.device.type == "cpu" and weight.device.type == "cpu" else None
    if kernel is None or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return dense16_linear_reference(x, weight, bias)
    y = kernel(x.reshape(m, x.shape[-1]).contiguous(), weight.contiguous())
    y = y.reshape(*lead, weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class Linear16(nn.Module):
    """nn.Linear with its weight held in float16 / bfloat16; inputs and outputs keep their dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        _check_weight(weight)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense16_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight dtype={self.weight.dtype}"


class Embedding16(nn.Module):
    """nn.Embedding over a float16 / bfloat16 table whose rows come out in `out_dtype`."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        _check_weight(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight dtype={self.weight.dtype}, out dtype={self.out_dtype}"


def _to_16(weight: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    w = weight.detach().to(dtype).contiguous()
    if not torch.isfinite(w).all():
        hint = " (fp16 tops out at 65504: use bfloat16)" if dtype == torch.float16 and torch.isfinite(weight).all() else ""
        raise ValueError(f"compact_head: {what} has values that are not finite in {dtype}{hint}")
    return w


def compact_head(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace model's lm_head (and the input embedding when it is tied to it) by 16-bit modules.

    Works on Hugging Face causal LMs (`get_output_embeddings` / `get_input_embeddings`). A tied
    embedding shares the one 16-bit copy and returns rows in the embedding's dtype at the time of
    the call, so set the model's float dtype first. Saving the model stores the 16-bit values;
    loading gives the usual float head again (apply this again after loading). Returns model
    (changed in place).
    """
    if dtype not in HEAD_DTYPES:
        raise TypeError(f"compact_head: dtype must be float16 or bfloat16, got {dtype}")
    head = model.get_output_embeddings()
    if isinstance(head, Linear16):
        if head.weight.dtype != dtype:
            raise ValueError(f"compact_head: the head is already {head.weight.dtype}, not {dtype}")
        return model
    if not isinstance(head, nn.Linear):
        raise TypeError(f"compact_head: the model's output embeddings are {type(head).__name__}, not nn.Linear")
    emb = model.get_input_embeddings()
    cfg = getattr(model, "config", None)
    if cfg is not None and not getattr(cfg, "dtype", None):
        # Hugging Face takes a model's dtype from its first float parameter (the embedding, now
        # 16-bit): record the float dtype, so that a saved checkpoint loads as the model it was.
        cfg.dtype = head.weight.dtype
    tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr() and emb.weight.shape == head.weight.shape
    w16 = _to_16(head.weight, dtype, "lm_head.weight")
    bias = None if head.bias is None else head.bias.detach()
    model.set_output_embeddings(Linear16(w16, bias))
    if tied:
        model.set_input_embeddings(Embedding16(model.get_output_embeddings().weight, emb.weight.dtype, emb.padding_idx))
    return model


__all__ = ["HEAD_DTYPES", "Embedding16", "Linear16", "compact_head", "dense16_linear", "dense16_linear_reference"]
