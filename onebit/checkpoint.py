"""Quantized checkpoints: a normal Hugging Face directory with packed safetensors.

    DIR/config.json          the model's config, plus `quantization_config`
                             {"quant_method": "onebit", "format_version", "onebit_version",
                              "quant": QuantConfig.to_dict(), "layers": {name: layer meta},
                              "head": {"dtype": "int8", "group_size", "tied"} (int8 head only)}
    DIR/model.safetensors    every tensor of the model's state dict; BinaryLinear modules
                             contribute their packed buffers (docs/FORMAT.md). save_pretrained
                             may shard it: model-0000i-of-0000n.safetensors + model.safetensors.index.json
    DIR/tokenizer*           the tokenizer, when one is given

Only safetensors and JSON are read: loading never unpickles anything. Everything read is
checked (format version, tensor names, shapes, dtypes, finiteness) and any mismatch raises
CheckpointError with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onebit.config import QuantConfig
from onebit.compact import STORED_SCALE_DTYPES, all_finite, compact, validate_compact
from onebit.format import COMPACT_FORMAT_VERSION, FORMAT_VERSION, INT8_HEAD_FORMAT_VERSION, Layout, PackedWeight
from onebit.head import Embedding8, Linear8, int8_head_config, int8_head_skeleton, share_tied_int8
from onebit.nn import BinaryLinear

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # sharded checkpoints (save_pretrained)
CONFIG_NAME = "config.json"
QUANT_METHOD = "onebit"


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, truncated, foreign, or from a newer onebit."""


def is_quantized_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def layer_meta(m: BinaryLinear) -> dict[str, Any]:
    scale_name = next(k for k, v in STORED_SCALE_DTYPES.items() if v == m.out_scale.dtype)
    return {
        "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
        "layout": m.layout.to_dict(), "block_size": m.block_size, "scale_dtype": scale_name,
        "n_salient": m.n_salient,
    }  # fmt: skip


def binary_linear_skeleton(lm: dict[str, Any], dtype: torch.dtype | None = None) -> BinaryLinear:
    """A meta-device BinaryLinear shaped by one layer's metadata (KeyError/TypeError/ValueError if malformed)."""
    n_salient = lm.get("n_salient", 0)
    if not isinstance(n_salient, int) or n_salient < 0:
        raise ValueError(f"n_salient must be a non-negative integer, got {n_salient!r}")
    return BinaryLinear(
        lm["in_features"], lm["out_features"], lm["bias"], Layout.from_dict(lm["layout"]), lm["block_size"],
        STORED_SCALE_DTYPES[lm["scale_dtype"]], device="meta", dtype=dtype, n_salient=n_salient,
    )  # fmt: skip


def written_format_version(model: nn.Module) -> int:
    """The lowest format version that reads model's checkpoint: 3 with an int8 head, else 2."""
    return INT8_HEAD_FORMAT_VERSION if int8_head_config(model) else COMPACT_FORMAT_VERSION


def swap_in_int8_head(model: nn.Module, head_cfg) -> None:
    """int8_head_skeleton for a checkpoint's `quantization_config.head`, a bad record as CheckpointError."""
    try:
        int8_head_skeleton(model, head_cfg)
    except ValueError as e:
        raise CheckpointError(f"bad quantization_config.head: {e}") from None


def stored_exactly(model: nn.Module) -> set[str]:
    """State-dict names stored and loaded in their own dtype (never narrowed, never cast): the
    packed buffers and the int8 head's table and scales."""
    exact = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, BinaryLinear) for b, _ in m.named_buffers()}
    exact |= {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (Linear8, Embedding8)) for p in ("weight", "scale")}
    return exact


def quantization_config(model: nn.Module, config: QuantConfig) -> dict[str, Any]:
    from onebit import __version__

    layers = {n: layer_meta(m) for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    qc = {
        "quant_method": QUANT_METHOD, "format_version": written_format_version(model), "onebit_version": __version__,
        "quant": config.to_dict(), "layers": layers,
    }  # fmt: skip
    head = int8_head_config(model)
    if head:
        qc["head"] = head
    return qc


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: flipped bits in tensor data are caught on load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    part = path.with_name(path.name + ".part")
    write(part)
    os.replace(part, path)


SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _narrowed(t: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
    """t in float_dtype if it is a wider float tensor that fits there, else t."""
    if float_dtype is None or not t.is_floating_point() or t.element_size() <= float_dtype.itemsize:
        return t
    n = t.to(float_dtype)
    return n if torch.isfinite(n).all() else t  # out of fp16's range: keep it exact


def tensors_and_metadata(
    model: nn.Module, float_dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors written to the safetensors file and its metadata (shared with onebit.hf's save_pretrained).

    float_dtype (float16 / bfloat16) stores the float tensors outside the packed layers
    (embeddings, norms, biases, lm_head) narrower than the model holds them; loading casts
    them back to the model's dtype. Packed tensors and an int8 head's are always stored as they are.
    """
    exact = stored_exactly(model)
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied weights (e.g. lm_head = embed_tokens): safetensors stores one copy
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach()
        tensors[name] = (t if name in exact else _narrowed(t, float_dtype)).contiguous().cpu()
    meta = {
        "format": "pt", "onebit_format_version": str(written_format_version(model)), "aliases": json.dumps(aliases),
        "content_sha256": content_hash(tensors),
    }  # fmt: skip
    return tensors, meta


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: QuantConfig | None = None,
    tokenizer=None,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write model (with BinaryLinear modules) as a quantized checkpoint directory.

    float_dtype: see tensors_and_metadata (None keeps every tensor bit-exact).
    """
    from safetensors.torch import save_file

    config = config or getattr(model, "onebit_config", None)
    if config is None:
        raise ValueError("no QuantConfig given and the model has no `onebit_config` (was it quantized by onebit?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, meta = tensors_and_metadata(model, float_dtype)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(model, config)
    if not cfg.get("dtype"):  # else from_pretrained(dtype="auto") guesses from the first float tensor (a scale)
        cfg["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(cfg, indent=2, sort_keys=True)))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def read_quantization_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """(model config dict, quantization_config dict), checked for origin and version."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; not a checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: not a onebit checkpoint (quantization_config.quant_method != 'onebit')")
    version = qc.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: quantization_config has no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: packed format version {version} is newer than this onebit understands "
            f"({FORMAT_VERSION}); upgrade onebit (pip install -U onebit)"
        )
    if not isinstance(qc.get("layers"), dict):
        raise CheckpointError(f"{path}: quantization_config.layers missing or malformed")
    return cfg, qc


def _build_skeleton(cfg: dict, qc: dict) -> tuple[nn.Module, QuantConfig]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from onebit.models import set_module

    try:
        quant = QuantConfig.from_dict(qc["quant"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad quantization_config.quant: {e}") from None
    model_cfg = dict(cfg)
    model_cfg.pop("quantization_config")
    hf_config = AutoConfig.for_model(**model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    for name, lm in qc["layers"].items():
        try:
            old = model.get_submodule(name)
            layer = binary_linear_skeleton(lm)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"layer {name!r}: bad metadata ({e})") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (layer.in_features, layer.out_features):
            raise CheckpointError(f"layer {name!r} does not match the model architecture in config.json")
        set_module(model, name, layer)
    if "head" in qc:
        swap_in_int8_head(model, qc["head"])
    return model, quant


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the file: recompute them on CPU."""
    for name, mod in model.named_modules():
        if any(b.is_meta for b in mod.buffers(recurse=False)) and "Rotary" in type(mod).__name__:
            from onebit.models import set_module

            set_module(model, name, type(mod)(config=model.config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint does not provide {left[:5]}{'...' if len(left) > 5 else ''}")


def check_metadata(meta: dict, where) -> None:
    """The safetensors metadata outside the content hash must be exactly what onebit writes."""
    version = meta.get("onebit_format_version")
    if meta.get("format") != "pt" or not isinstance(version, str) or not version.isdigit():
        raise CheckpointError(f"{where}: safetensors metadata is not onebit's (format / onebit_format_version)")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{where}: packed format version {version} is newer than this onebit ({FORMAT_VERSION})")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """model.safetensors, or the shards listed by model.safetensors.index.json (save_pretrained's layout)."""
    d = Path(path)
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    if not (d / INDEX_NAME).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    try:
        names = set(json.loads((d / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"].values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{d / INDEX_NAME}: malformed shard index ({e})") from None
    bad = [n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or not n.endswith(".safetensors")]
    if bad or not names:
        raise CheckpointError(f"{d / INDEX_NAME}: shard names must be plain .safetensors file names, got {bad[:3]}")
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"{path}: shards listed in {INDEX_NAME} are missing: {sorted(missing)[:3]}")
    return [d / n for n in sorted(names)]


def validate_layers(model: nn.Module) -> None:
    """Check every BinaryLinear's stored tensors against the format; CheckpointError names the layer."""
    for name, m in model.named_modules():
        if isinstance(m, BinaryLinear):
            try:
                validate_compact(m.compact)
            except ValueError as e:
                raise CheckpointError(f"layer {name!r}: {e}") from None


V1_NAMES = ("signs", "groups", "out_scale", "in_scale", "mean")


def upgrade_v1(sd: dict[str, torch.Tensor], qc: dict) -> None:
    """Rewrite a format-v1 state dict (every plane full width) into v2 in place, layer by layer.

    qc["layers"] gains each layer's n_salient. CheckpointError names a layer whose v1 tensors
    are malformed.
    """
    for name, lm in qc["layers"].items():
        try:
            t = {k: sd.pop(f"{name}.{k}") for k in V1_NAMES if f"{name}.{k}" in sd}
            p = PackedWeight(lm["out_features"], lm["in_features"], lm["block_size"], Layout.from_dict(lm["layout"]), **t)
            c = compact(p)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"layer {name!r}: bad format-v1 tensors or metadata ({e})") from None
        sd.update({f"{name}.{k}": v for k, v in c.tensors().items()})
        lm["n_salient"] = c.n_salient


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer: bool = True):
    """(model, tokenizer or None, QuantConfig) from a directory written by save_quantized."""
    from safetensors import safe_open

    cfg, qc = read_quantization_config(path)
    files = weight_files(path)
    weights = files[0] if len(files) == 1 else Path(path) / INDEX_NAME
    sd, hashes = {}, set()
    for wf in files:
        try:
            with safe_open(str(wf), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                sd.update({k: f.get_tensor(k) for k in f.keys()})
            aliases = json.loads(meta.get("aliases", "{}"))
        except Exception as e:  # safetensors raises several types for truncated / garbled files
            raise CheckpointError(f"{wf}: unreadable safetensors file ({type(e).__name__}: {e})") from None
        check_metadata(meta, wf)
        hashes.add(meta.get("content_sha256"))
    if len(hashes) != 1 or hashes.pop() != content_hash(sd):
        raise CheckpointError(f"{weights}: content hash mismatch (the file is corrupted or was modified)")
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in sd for v in aliases.values()):
        raise CheckpointError(f"{weights}: malformed tied-weight aliases in the metadata")
    for alias, target in aliases.items():
        sd[alias] = sd[target]
    if qc["format_version"] == 1:
        upgrade_v1(sd, qc)
    model, quant = _build_skeleton(cfg, qc)
    expected = model.state_dict()
    exact = stored_exactly(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in sd.items():
        e = expected[k]
        # Packed (and int8 head) tensors must match exactly; float parameters may be saved in another float dtype.
        dtype_ok = t.dtype == e.dtype or (t.is_floating_point() and e.is_floating_point() and k not in exact)
        if tuple(t.shape) != tuple(e.shape) or not dtype_ok:
            raise CheckpointError(f"{weights}: tensor {k!r} is {t.dtype}{tuple(t.shape)}, expected {e.dtype}{tuple(e.shape)}")
        if not all_finite(t):
            raise CheckpointError(f"{weights}: tensor {k!r} contains NaN or Inf")
        if t.dtype != e.dtype:  # a float tensor stored narrower (float_dtype): back to the model's dtype
            sd[k] = t.to(e.dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    if aliases:
        model.tie_weights()
    share_tied_int8(model)
    _rebuild_meta_buffers(model)
    validate_layers(model)
    model.onebit_config = quant
    from onebit.hf import attach  # so that model.save_pretrained() writes this same format

    attach(model, quant)
    model.to(device).eval()
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tok = None
    return model, tok, quant
