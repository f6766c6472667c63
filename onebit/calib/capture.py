"""Model plumbing for calibration: find the decoder blocks, capture what enters block 0,
and accumulate input Grams of linears with forward hooks.

Supported: Llama-family (`model.model.layers[i]`, self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj) and OPT (`model.model.decoder.layers[i]`, self_attn.{q,k,v,out}_proj,
fc1, fc2). Each sublayer also gets a short role name (q, k, v, o, gate, up, down) that
QuantConfig.oa_layers refers to; OPT's fc1/fc2 are "up"/"down".
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

LLAMA_SUBLAYERS = (
    ("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"), ("self_attn.o_proj", "o"),
    ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"), ("mlp.down_proj", "down"),
)  # fmt: skip
OPT_SUBLAYERS = (
    ("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"), ("self_attn.out_proj", "o"),
    ("fc1", "up"), ("fc2", "down"),
)  # fmt: skip


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, tuple]:
    """(qualified prefix, the ModuleList of decoder blocks, the sublayer table)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return "model.layers", inner.layers, LLAMA_SUBLAYERS
    dec = getattr(inner, "decoder", None) if inner is not None else None
    if dec is not None and isinstance(getattr(dec, "layers", None), nn.ModuleList):
        return "model.decoder.layers", dec.layers, OPT_SUBLAYERS
    raise ValueError(
        f"unsupported model {type(model).__name__}: expected Llama-style model.model.layers "
        "or OPT-style model.model.decoder.layers"
    )


def block_linears(block: nn.Module, table: tuple) -> list[tuple[str, str, nn.Linear]]:
    """(relative name, role, module) for the nn.Linear sublayers present in a block, in order."""
    out = []
    for rel, role in table:
        mod = block.get_submodule(rel) if _has(block, rel) else None
        if isinstance(mod, nn.Linear):
            out.append((rel, role, mod))
    return out


def _has(block: nn.Module, rel: str) -> bool:
    try:
        block.get_submodule(rel)
        return True
    except AttributeError:
        return False


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block0_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the model on calib_ids batch by batch, stopping at block 0: returns per batch the
    hidden states entering block 0 and the keyword arguments the block was called with
    (attention mask, position embeddings from model.model.rotary_emb, position ids, ...)."""
    first = blocks[0]
    got: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def pre_hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        # No KV cache during calibration: every block re-runs the full sequences.
        for k in ("past_key_value", "past_key_values", "cache"):
            if k in kw:
                kw[k] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        got.append((hs.detach(), kw))
        raise _Stop

    h = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            try:
                model(calib_ids[i : i + batch_size].to(_device(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    if len(got) * batch_size < calib_ids.shape[0] and len(got) == 0:
        raise RuntimeError("block 0 was never called; cannot capture calibration inputs")
    return got


def run_block(block: nn.Module, hs: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = block(hs, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fused_gram_available(x: torch.Tensor) -> bool:
    """The Triton Gram kernel (onebit.kernels.gram) serves CUDA tensors unless
    ONEBIT_GRAM=torch; elsewhere two torch matmuls are as fast as it gets."""
    if not x.is_cuda or os.environ.get("ONEBIT_GRAM", "auto").lower() == "torch":
        return False
    try:
        importlib.import_module("onebit.kernels.gram")  # needs triton
    except ImportError:
        return False
    return True


class GramHooks:
    """Forward hooks accumulating fp32 input Grams of linears, normalised by token count.

    grams[name] = sum_t x_t^T x_t; tokens[name] = number of rows seen. With keep_inputs the
    current batch's input stays in `last`. Modules named in `paired` only keep their input
    until `pair(name, x_fp)` brings the full-precision stream's input for the same tokens;
    then Sq += Xq^T Xq and S += Xq^T X are accumulated together, in one pass over the
    activations by the fused Triton kernel on CUDA (`fused`: None = auto, True/False force),
    which writes the upper triangle of Sq only (mirrored in normalised()).
    """

    def __init__(
        self, modules: dict[str, nn.Module], keep_inputs: bool = False, paired: tuple[str, ...] = (),
        fused: bool | None = None,
    ) -> None:  # fmt: skip
        self.grams: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.last: dict[str, torch.Tensor] = {}
        self.keep_inputs, self.paired, self.fused = keep_inputs, set(paired), fused
        self._upper: set[str] = set()  # accumulators holding only their upper triangle
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name in self.paired:
                self.last[name] = x
                return
            self._accumulate(name, x)
            if self.keep_inputs:
                self.last[name] = x

        return hook

    def pair(self, name: str, x_fp: torch.Tensor) -> None:
        """Accumulate Sq and S = Xq^T X for a paired module from its kept input and x_fp."""
        self._accumulate(name, self.last[name], x_fp.reshape(-1, x_fp.shape[-1]).float())

    def _accumulate(self, name: str, xq: torch.Tensor, x: torch.Tensor | None = None) -> None:
        k = xq.shape[1]
        if name not in self.grams:
            self.grams[name] = torch.zeros(k, k, device=xq.device)
            if self.fused if self.fused is not None else fused_gram_available(xq):
                self._upper.add(name)
        if x is not None and name not in self.cross:
            self.cross[name] = torch.zeros(k, k, device=xq.device)
        if name in self._upper:
            from onebit.kernels.gram import gram_update_triton

            gram_update_triton(xq, self.grams[name], x, self.cross.get(name) if x is not None else None)
        else:
            self.grams[name] += xq.T @ xq
            if x is not None:
                self.cross[name] += xq.T @ x
        self.tokens[name] = self.tokens.get(name, 0) + xq.shape[0]

    def normalised(self, name: str) -> torch.Tensor:
        g = self.grams[name]
        if name in self._upper:
            from onebit.kernels.gram import symmetrize_upper

            g = symmetrize_upper(g)
        return g / max(1, self.tokens[name])

    def cross_normalised(self, name: str) -> torch.Tensor:
        return self.cross[name] / max(1, self.tokens[name])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "GramHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
