"""A narrow head: the lm_head (and the embedding tied to it) in fp16 / bf16, or in int8.

Once the decoder's linear layers are 1-bit, the float head is the largest layer a decode step
reads: SmolLM2-135M's tied 49152 x 576 embedding is 113 MB in fp32, more than all its packed
layers, and torch's fp32 GEMV read it at ~10 GB/s on the project's Zen 4 machines.
`compact_head(model, dtype)` keeps one narrow copy of it for both uses and runs the head
through csrc/cpu/dense.cpp on CPU (narrow weights, fp32 accumulation), so a decode step reads
half (16-bit) or a quarter (int8) of the bytes. Activations keep the model's dtype.

It is a precision choice like the checkpoint's `float_dtype`: the head's weights are rounded
to fp16 (11 significant bits) or bf16 (8), or to int8 with an fp32 scale per row and group of
32 columns (symmetric, absmax / 127: 9 bits a weight with the scales, like GGUF's Q8_0 with a
wider scale). A checkpoint saved with `float_dtype=float16` already holds the fp16 values, and
saving a model with a 16-bit head stores the 16-bit copy (loading casts it back to the model's
dtype). A onebit checkpoint stores an int8 head as it is (`onebit quantize --head-dtype int8`;
`quantization_config.head`, docs/FORMAT.md) and loads it as one; a model that is not a onebit
one refuses to be saved with an int8 head, since a float checkpoint cannot hold the int8 rows
and their scales.

Under torch.compile each head is one opaque op (`onebit::dense_linear`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

FLOAT16_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DTYPES = (*FLOAT16_DTYPES, torch.int8)
# Columns per int8 scale. On SmolLM2-135M (onebit eval, wiki, 8192 tokens, KL to the fp32 head,
# head and tied embedding both int8): one scale per row 1.2e-3, groups of 32 1.7e-9 (its GGUF
# source stores the embedding as Q8_0, groups of 32, so these are its exact values); fp16 1.1e-6.
INT8_GROUP = 32
# Rows widened at a time on the F.linear path (bounds the temporary to ~10 MB at K = 576).
_CHUNK_ROWS = 4096


@functools.cache
def _cpu_kernel():
    """onebit.backends.cpu.dense_linear when onebit._C is built, else None (looked up once)."""
    from onebit.backends import cpu

    return cpu.dense_linear if cpu.available("cpu")[0] else None


def _check_weight(weight: torch.Tensor, dtypes: tuple = FLOAT16_DTYPES, what: str = "dense16_linear") -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{what}: weight must be {names}, got {weight.dtype}")


def _n_groups(k: int, group_size: int) -> int:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 16 and group_size < k:
        raise ValueError(
            f"int8 group_size must be a positive multiple of 16, or at least in_features = {k}; got {group_size}"
        )
    return -(-k // group_size)


def _check_scale(weight: torch.Tensor, scale: torch.Tensor, group_size: int) -> None:
    shape = (weight.shape[0], _n_groups(weight.shape[1], group_size))
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != shape:
        got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(
            f"dense8_linear: scale must be float32 of shape {shape} (rows, groups of {group_size}); got {got}"
        )


def _scales_per_column(scale: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(group_size, dim=1)[:, :k]


def _check_x(x: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{what}: x has {x.shape[-1]} features, the weight {weight.shape[1]}")
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")


def _widened_linear(x, weight, scale, group_size, bias) -> torch.Tensor:
    # F.linear over row chunks widened to x's dtype (an int8 chunk times its scales first, so
    # an fp16 x never sees the unscaled integers): never the whole widened weight at once.
    def chunk(i):
        w = weight[i : i + _CHUNK_ROWS]
        if scale is not None:
            w = w.float() * _scales_per_column(scale[i : i + _CHUNK_ROWS], group_size, weight.shape[1])
        return F.linear(x, w.to(x.dtype))

    parts = [chunk(i) for i in range(0, weight.shape[0], _CHUNK_ROWS)]
    y = torch.cat(parts, dim=-1) if len(parts) != 1 else parts[0]
    return y if bias is None else y + bias.to(y.dtype)


def _dense(x, weight, scale, group_size, bias) -> torch.Tensor:
    lead = x.shape[:-1]
    kernel = _cpu_kernel() if x.device.type == "cpu" and weight.device.type == "cpu" else None
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.is_floating_point() and weight.requires_grad)
    if kernel is None or needs_grad:
        return _widened_linear(x, weight, scale, group_size, bias)
    y = kernel(x.reshape(math.prod(lead), x.shape[-1]).contiguous(), weight.contiguous(), scale, group_size)
    y = y.reshape(*lead, weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def dense16_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) in x's dtype with the weight widened chunk by chunk (never whole)."""
    _check_weight(weight)
    return _widened_linear(x, weight, None, 0, bias)


def dense16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T (+ bias) with a float16 / bfloat16 weight, fp32 accumulation, y in x's dtype.

    CPU tensors run onebit._C's kernel (run-time AVX-512 / AVX2 / scalar; on SmolLM2's head it
    beat the widening path below at every token count measured, 1 to 128); elsewhere (GPU, no
    extension, autograd) the weight is widened in row chunks for F.linear.
    """
    _check_weight(weight)
    _check_x(x, weight, "dense16_linear")
    return _dense(x, weight, None, 0, bias)


def quantize_int8(weight: torch.Tensor, group_size: int = INT8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N, ceil(K / group_size))) with weight[n, k] ~= q[n, k] *
    scale[n, k // group_size]: symmetric, scale = max |group| / 127 (an all-zero group gets
    scale 0 and zeros). group_size >= K gives one scale per row."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8: weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    ng = _n_groups(k, group_size)
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("quantize_int8: the weight has values that are not finite")
    padded = F.pad(w, (0, ng * group_size - k)).reshape(n, ng, group_size)  # zeros do not change a group's max
    scale = padded.abs().amax(dim=2) / 127.0
    q = torch.round(w / _scales_per_column(torch.where(scale > 0, scale, 1.0), group_size, k)).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def dense8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int = INT8_GROUP, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (weight * scales)^T (+ bias) in x's dtype, widened chunk by chunk (never whole)."""
    _check_weight(weight, (torch.int8,), "dense8_linear")
    _check_scale(weight, scale, group_size)
    return _widened_linear(x, weight, scale, group_size, bias)


def dense8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int = INT8_GROUP, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (weight * scales)^T (+ bias) with an int8 weight and float32 scales per row and group
    of `group_size` columns (quantize_int8), fp32 accumulation, y in x's dtype: the CPU kernel
    as for dense16_linear, else widened chunks."""
    _check_weight(weight, (torch.int8,), "dense8_linear")
    _check_scale(weight, scale, group_size)
    _check_x(x, weight, "dense8_linear")
    return _dense(x, weight, scale.contiguous(), group_size, bias)


# Under torch.compile the narrow head is one opaque op (the kernel is a pybind function, which
# dynamo cannot trace); its implementation is the eager dispatch (`_dense`).
_lib = torch.library.Library("onebit", "FRAGMENT")
_lib.define("dense_linear(Tensor x, Tensor weight, Tensor? scale, int group_size) -> Tensor")
for _key in ("CPU", "CUDA"):
    _lib.impl("dense_linear", lambda x, weight, scale, group_size: _dense(x, weight, scale, group_size, None), _key)


@torch.library.register_fake("onebit::dense_linear")
def _(x, weight, scale, group_size):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _compiled(x, weight, scale, group_size, bias) -> torch.Tensor:
    y = torch.ops.onebit.dense_linear(x, weight, scale, group_size)
    return y if bias is None else y + bias.to(y.dtype)


def _held(t: torch.Tensor) -> nn.Parameter:
    # The one Parameter a head and its tied embedding share (a cast or move then applies once).
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


class _NarrowModule(nn.Module):
    """A head module whose tensors keep their dtypes when the model's float dtype changes
    (model.half(), model.to(torch.bfloat16), model.float()): the narrow weight and the int8
    scales (float32) are what the kernels take; moves between devices still apply. An
    embedding's `out_dtype` follows the cast, so its rows keep matching the model."""

    _kept: tuple[str, ...] = ("weight", "scale")

    def _apply(self, fn, recurse=True):
        kept = {id(getattr(self, n)) for n in self._kept if getattr(self, n, None) is not None}

        def apply(t):
            out = fn(t)
            return t.detach().to(out.device) if id(t) in kept and out.dtype != t.dtype else out

        if hasattr(self, "out_dtype"):
            probe = fn(torch.zeros((), dtype=self.out_dtype))
            if probe.is_floating_point():
                self.out_dtype = probe.dtype
        return super()._apply(apply, recurse)


class Linear16(_NarrowModule):
    """nn.Linear with its weight held in float16 / bfloat16; inputs and outputs keep their dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        _check_weight(weight)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _compiled(x, self.weight, None, 0, self.bias)
        return dense16_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight dtype={self.weight.dtype}"


class Embedding16(_NarrowModule):
    """nn.Embedding over a float16 / bfloat16 table whose rows come out in `out_dtype`."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        _check_weight(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = _held(weight)
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight dtype={self.weight.dtype}, out dtype={self.out_dtype}"


def _refuse_state_dict(module, prefix, keep_vars):
    if module.in_onebit_checkpoint:
        return
    raise RuntimeError(
        f"{prefix or 'this model '}has an int8 head (compact_head(model, torch.int8)), which a float checkpoint cannot "
        "hold; save the model before compact_head, and pass --head-dtype int8 (or call compact_head) after loading. "
        "A onebit-quantized model saves it (save_quantized / save_pretrained)"
    )


def _hold_int8(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor, group_size: int, what: str) -> None:
    # What Linear8 and Embedding8 hold: the int8 table, its scales, and a refusal to be saved
    # into a float checkpoint (in_onebit_checkpoint: the model's checkpoint records the head).
    _check_weight(weight, (torch.int8,), what)
    _check_scale(weight, scale, group_size)
    module.group_size = group_size
    module.weight = _held(weight)
    module.scale = _held(scale)
    module.in_onebit_checkpoint = False
    module.register_state_dict_pre_hook(_refuse_state_dict)


class Linear8(_NarrowModule):
    """nn.Linear over an int8 weight with float32 scales per row and group (quantize_int8);
    inputs and outputs keep their dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        _hold_int8(self, weight, scale, group_size, "Linear8")
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _compiled(x, self.weight, self.scale, self.group_size, self.bias)
        return dense8_linear(x, self.weight, self.scale, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight dtype=int8, "
                f"group_size={self.group_size}")  # fmt: skip


class Embedding8(_NarrowModule):
    """nn.Embedding over an int8 table with float32 scales per row and group; rows come out in `out_dtype`."""

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype: torch.dtype, padding_idx: int | None = None
    ):
        super().__init__()
        _hold_int8(self, weight, scale, group_size, "Embedding8")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scales = _scales_per_column(F.embedding(ids.reshape(-1), self.scale), self.group_size, self.embedding_dim)
        rows = F.embedding(ids, self.weight, self.padding_idx).float() * scales.reshape(*ids.shape, self.embedding_dim)
        return rows.to(self.out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, weight dtype=int8, group_size={self.group_size}, "
                f"out dtype={self.out_dtype}")  # fmt: skip


def _to_16(weight: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    w = weight.detach().to(dtype).contiguous()
    if not torch.isfinite(w).all():
        hint = " (fp16 tops out at 65504: use bfloat16)" if dtype == torch.float16 and torch.isfinite(weight).all() else ""
        raise ValueError(f"compact_head: {what} has values that are not finite in {dtype}{hint}")
    return w


def _set_int8_head(model: nn.Module, head: Linear8, tied_emb: nn.Module | None, in_onebit_checkpoint: bool) -> None:
    model.set_output_embeddings(head)
    if tied_emb is not None:
        dtype = tied_emb.weight.dtype if tied_emb.weight.is_floating_point() else torch.get_default_dtype()
        model.set_input_embeddings(Embedding8(head.weight, head.scale, head.group_size, dtype, tied_emb.padding_idx))
    mark_int8_head(model, in_onebit_checkpoint)


def mark_int8_head(model: nn.Module, in_onebit_checkpoint: bool) -> None:
    """Let model's int8 head modules be saved (a onebit checkpoint records them) or not."""
    for m in (model.get_output_embeddings(), model.get_input_embeddings()):
        if isinstance(m, (Linear8, Embedding8)):
            m.in_onebit_checkpoint = in_onebit_checkpoint


def int8_head_config(model: nn.Module) -> dict | None:
    """What a checkpoint's `quantization_config.head` records of model's head: {"dtype": "int8",
    "group_size": columns per scale, "tied": the input embedding is the same int8 table}, or
    None for a float (or 16-bit) head, which the checkpoint holds as float tensors."""
    head = model.get_output_embeddings()
    if not isinstance(head, Linear8):
        return None
    emb = model.get_input_embeddings()
    # One table for both (the same storage: loading may wrap it in two Parameters).
    tied = isinstance(emb, Embedding8) and all(
        getattr(emb, t).data_ptr() == getattr(head, t).data_ptr() and getattr(emb, t).shape == getattr(head, t).shape
        for t in ("weight", "scale")
    )
    return {"dtype": "int8", "group_size": head.group_size, "tied": tied}


def share_tied_int8(model: nn.Module) -> None:
    """After loading a tied int8 head (load_state_dict(assign=True) wraps each module's copy in
    its own Parameter): make the embedding hold the head's Parameters again, so that a move or
    cast applies to one table and one set of scales."""
    if (int8_head_config(model) or {}).get("tied"):
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        emb.weight, emb.scale = head.weight, head.scale


def int8_head_skeleton(model: nn.Module, head_cfg: dict) -> None:
    """Swap a meta-device model's lm_head (and, when `head_cfg["tied"]`, its input embedding)
    for int8 modules shaped as `head_cfg` says (a checkpoint's `quantization_config.head`),
    ready for load_state_dict(assign=True) or transformers' loading. ValueError if the record
    or the model does not fit."""
    if not isinstance(head_cfg, dict) or set(head_cfg) != {"dtype", "group_size", "tied"}:
        raise ValueError(f"head must be {{'dtype', 'group_size', 'tied'}}, got {head_cfg!r}")
    if head_cfg["dtype"] != "int8" or not isinstance(head_cfg["tied"], bool):
        raise ValueError(f"head: dtype must be 'int8' and tied a boolean, got {head_cfg!r}")
    old = model.get_output_embeddings()
    if not isinstance(old, nn.Linear):
        raise ValueError(f"head: the model's output embeddings are {type(old).__name__}, not nn.Linear")
    group = head_cfg["group_size"]
    n, k = old.out_features, old.in_features
    if isinstance(group, bool) or not isinstance(group, int):
        raise ValueError(f"head: group_size must be an integer, got {group!r}")
    scale = torch.empty(n, _n_groups(k, group), dtype=torch.float32, device="meta")
    bias = None if old.bias is None else torch.empty(n, dtype=old.bias.dtype, device="meta")
    emb = model.get_input_embeddings()
    if head_cfg["tied"] and not (isinstance(emb, nn.Embedding) and tuple(emb.weight.shape) == (n, k)):
        raise ValueError("head: recorded as tied to the input embedding, which does not have the head's shape")
    _set_int8_head(model, Linear8(torch.empty(n, k, dtype=torch.int8, device="meta"), scale, group, bias),
                   emb if head_cfg["tied"] else None, in_onebit_checkpoint=True)  # fmt: skip


def compact_head(model: nn.Module, dtype: torch.dtype = torch.float16, int8_group: int = INT8_GROUP) -> nn.Module:
    """Replace model's lm_head (and the input embedding when it is tied to it) by narrow modules.

    dtype: float16 / bfloat16 (Linear16 / Embedding16) or int8 with scales per row and group of
    `int8_group` columns (Linear8 / Embedding8). Works on Hugging Face causal LMs (`get_output_embeddings` /
    `get_input_embeddings`). A tied embedding shares the one narrow copy and returns rows in the
    embedding's dtype at the time of the call, so set the model's float dtype first. Saving the
    model stores a 16-bit head's values (loading gives the usual float head again: apply this
    again after loading). An int8 head is saved as it is by a onebit-quantized model (it loads
    back as one) and refused by any other. Returns model (changed in place).
    """
    if dtype not in HEAD_DTYPES:
        raise TypeError(f"compact_head: dtype must be float16, bfloat16 or int8, got {dtype}")
    head = model.get_output_embeddings()
    if isinstance(head, (Linear16, Linear8)):
        if head.weight.dtype != dtype:
            raise ValueError(f"compact_head: the head is already {head.weight.dtype}, not {dtype}")
        return model
    if not isinstance(head, nn.Linear):
        raise TypeError(f"compact_head: the model's output embeddings are {type(head).__name__}, not nn.Linear")
    emb = model.get_input_embeddings()
    cfg = getattr(model, "config", None)
    if cfg is not None and not getattr(cfg, "dtype", None):
        # Hugging Face takes a model's dtype from its first float parameter (the embedding, now
        # narrow): record the float dtype, so that a saved checkpoint loads as the model it was.
        cfg.dtype = head.weight.dtype
    tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr() and emb.weight.shape == head.weight.shape
    bias = None if head.bias is None else head.bias.detach()
    if dtype == torch.int8:
        q, scale = quantize_int8(head.weight, int8_group)
        in_checkpoint = hasattr(model, "onebit_config")  # a onebit model's checkpoint records the head
        _set_int8_head(model, Linear8(q, scale, int8_group, bias), emb if tied else None, in_checkpoint)
        return model
    w16 = _to_16(head.weight, dtype, "lm_head.weight")
    model.set_output_embeddings(Linear16(w16, bias))
    if tied:
        model.set_input_embeddings(Embedding16(model.get_output_embeddings().weight, emb.weight.dtype, emb.padding_idx))
    return model


__all__ = ["HEAD_DTYPES", "Embedding16", "Embedding8", "Linear16", "Linear8", "compact_head", "dense16_linear",
           "dense16_linear_reference", "dense8_linear", "dense8_linear_reference", "INT8_GROUP", "int8_head_config",
           "int8_head_skeleton", "mark_int8_head", "quantize_int8", "share_tied_int8"]
