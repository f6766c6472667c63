"""transformers integration: the `onebit` quantization method for from_pretrained / save_pretrained.

    import onebit.hf                                   # registers "onebit" with transformers
    model = AutoModelForCausalLM.from_pretrained(dir)  # BinaryLinear modules, packed buffers
    model.save_pretrained(out)                         # same directory format as save_quantized

One directory format serves both paths (onebit/checkpoint.py is its definition): config.json
with `quantization_config` {quant_method, format_version, onebit_version, quant, layers} and
safetensors whose metadata carries the tied-weight `aliases` and a `content_sha256` over every
stored tensor. A directory written by either path loads bit-identically with the other.

Loading a pre-quantized directory: the quantizer swaps the listed nn.Linear modules for
BinaryLinear on the meta device (buffers in final packed shapes), then checks the safetensors
files against that skeleton before transformers reads them (content hash, names, shapes,
packed dtypes, finiteness): a mismatch raises CheckpointError instead of transformers'
usual warning + random init. `dtype` applies to the float tensors (embeddings, norms, bias,
lm_head); packed buffers keep their stored dtypes. Passing `quantization_config=OnebitConfig(...)`
for a float model quantizes it on the fly after loading (methods without calibration only).

This module imports transformers; `import onebit` does not import it.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from onebit.checkpoint import (
    QUANT_METHOD,
    binary_linear_skeleton,
    CheckpointError,
    check_metadata,
    content_hash,
    layer_meta,
    stored_exactly,
    swap_in_int8_head,
    tensors_and_metadata,
    validate_layers,
    written_format_version,
)
from onebit.config import QuantConfig
from onebit import format as format_v1
from onebit.compact import CompactWeight, all_finite
from onebit.compact import bits_breakdown as compact_bits_breakdown
from onebit.format import COMPACT_FORMAT_VERSION, FORMAT_VERSION, Layout, PackedWeight
from onebit.head import int8_head_config, mark_int8_head, share_tied_int8
from onebit.nn import BinaryLinear

__all__ = ["OnebitConfig", "OnebitHfQuantizer", "attach", "register"]

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "F8_E4M3": torch.float8_e4m3fn, "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}  # fmt: skip


class OnebitConfig(QuantizationConfigMixin):
    """`quantization_config` of a onebit model; `to_dict()` is exactly what config.json stores.

    OnebitConfig(method="rtn", block_size=64) builds one from QuantConfig fields (on-the-fly
    quantization in from_pretrained); from_dict(config.json's dict) reads a checkpoint's.
    """

    def __init__(
        self,
        quant: QuantConfig | dict | None = None,
        layers: dict[str, dict] | None = None,
        format_version: int = FORMAT_VERSION,
        onebit_version: str | None = None,
        quant_method: str = QUANT_METHOD,
        head: dict | None = None,
        **quant_fields: Any,
    ) -> None:
        from onebit import __version__

        if quant_method != QUANT_METHOD:
            raise CheckpointError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if not isinstance(format_version, int) or isinstance(format_version, bool):
            raise CheckpointError(f"quantization_config.format_version must be an integer, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise CheckpointError(
                f"packed format version {format_version} is newer than this onebit understands "
                f"({FORMAT_VERSION}); upgrade onebit (pip install -U onebit)"
            )
        if layers is not None and not isinstance(layers, dict):
            raise CheckpointError("quantization_config.layers must be a mapping of module name -> layer metadata")
        if head is not None and not isinstance(head, dict):
            raise CheckpointError(f"quantization_config.head must be a mapping, got {head!r}")
        try:
            if isinstance(quant, QuantConfig):
                q = quant.replace(**quant_fields) if quant_fields else quant
            else:
                q = QuantConfig.from_dict({**(quant or {}), **quant_fields})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad quantization_config.quant: {e}") from None
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.onebit_version = onebit_version or __version__
        self.quant = q.to_dict()
        self.layers = dict(layers or {})
        self.head = head  # int8 head (format v3): {"dtype": "int8", "group_size", "tied"}; None: float head

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.quant)

    @property
    def modules_to_not_convert(self) -> list[str]:
        return list(self.quant["modules_to_not_convert"])

    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": self.quant_method, "format_version": self.format_version,
            "onebit_version": self.onebit_version, "quant": self.quant, "layers": self.layers,
        }  # fmt: skip
        if self.head:
            d["head"] = self.head
        return json.loads(json.dumps(d))


def _layers_of(model: nn.Module) -> dict[str, dict]:
    return {n: layer_meta(m) for n, m in model.named_modules() if isinstance(m, BinaryLinear)}


def _swap_in_binary_linears(model: nn.Module, layers: dict[str, dict]) -> None:
    """Replace the nn.Linear named in `layers` by meta-device BinaryLinear skeletons."""
    from onebit.models import set_module

    for name, lm in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name!r} of quantization_config is not in the model architecture") from None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"layer {name!r} is a {type(old).__name__}, expected nn.Linear")
        try:
            layer = binary_linear_skeleton(lm, dtype=old.weight.dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"layer {name!r}: bad metadata ({e})") from None
        if (old.in_features, old.out_features, old.bias is not None) != (
            lm["in_features"],
            lm["out_features"],
            lm["bias"],
        ):
            raise CheckpointError(f"layer {name!r} does not match the model architecture in config.json")
        set_module(model, name, layer)


OPTIONAL_NAMES = ("groups", "mean", "salient_cols", "salient_signs", "scale_exp")


class _LazyTensors:
    """name -> tensor, read on access from open safetensors files (one at a time) and checked."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self._handles = handles
        self.info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.nonfinite: list[str] = []

    def __iter__(self):
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._handles[name].get_tensor(name)
        self.info[name] = (t.dtype, tuple(t.shape))
        if not all_finite(t):
            self.nonfinite.append(name)
        return t


def verify_checkpoint_files(model: nn.Module, files: list[str]) -> None:
    """Check safetensors files against a (meta) model before transformers loads them.

    Raises CheckpointError unless the files hold exactly the model's state dict (tied weights
    as aliases), with the packed dtypes and shapes, finite floats, and the recorded content hash.
    """
    from safetensors import safe_open

    expected = model.state_dict()
    exact = stored_exactly(model)
    with contextlib.ExitStack() as stack:
        handles, hashes, aliases = {}, set(), {}
        for path in files:
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                meta = f.metadata() or {}
                file_aliases = json.loads(meta.get("aliases", "{}"))
            except Exception as e:  # safetensors raises several types for truncated / garbled files
                raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
            check_metadata(meta, path)
            if "content_sha256" not in meta:
                raise CheckpointError(f"{path}: no content_sha256 in the metadata (not written by onebit?)")
            if not isinstance(file_aliases, dict):
                raise CheckpointError(f"{path}: malformed tied-weight aliases in the metadata")
            hashes.add(meta["content_sha256"])
            aliases.update(file_aliases)
            for k in f.keys():
                handles[k] = f
        if len(hashes) != 1:
            raise CheckpointError(f"{files[0]}: shards disagree on the content hash (mixed checkpoints?)")
        lazy = _LazyTensors(handles)
        try:
            digest = content_hash(lazy)
        except Exception as e:
            raise CheckpointError(f"{files[0]}: unreadable tensor data ({type(e).__name__}: {e})") from None
    where = files[0] if len(files) == 1 else f"{len(files)} shards in {files[0].rsplit('/', 1)[0]}"
    if digest != hashes.pop():
        raise CheckpointError(f"{where}: content hash mismatch (the file is corrupted or was modified)")
    if not all(isinstance(v, str) and v in handles for v in aliases.values()):
        raise CheckpointError(f"{where}: malformed tied-weight aliases in the metadata")
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tied_names = set(tied) | set(tied.values())
    for alias, target in aliases.items():
        if alias not in tied_names:
            raise CheckpointError(
                f"{where}: {alias!r} is stored as an alias of {target!r} but config.json does not tie them "
                "(tie_word_embeddings); load it with onebit.load_quantized"
            )
    names = set(handles) | set(aliases)
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, (dtype, shape) in lazy.info.items():
        e = expected[k]
        dtype_ok = dtype == e.dtype or (dtype.is_floating_point and e.is_floating_point() and k not in exact)
        if shape != tuple(e.shape) or not dtype_ok:
            raise CheckpointError(f"{where}: tensor {k!r} is {dtype}{shape}, expected {e.dtype}{tuple(e.shape)}")
    if lazy.nonfinite:
        raise CheckpointError(f"{where}: tensor {lazy.nonfinite[0]!r} contains NaN or Inf")


def _tie_int8_scales(model: nn.Module) -> None:
    """A tied int8 head stores its scales once, like its table: tell transformers' loading that
    the head's `.scale` is tied to the embedding's, as config.json's tie_word_embeddings does
    for `.weight` (it then fills the head's from the embedding's)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict) or not (int8_head_config(model) or {}).get("tied"):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied[f"{names[id(head)]}.scale"] = f"{names[id(emb)]}.scale"


class OnebitHfQuantizer(HfQuantizer):
    """Loads onebit checkpoints (pre-quantized) or quantizes float models on load (rtn)."""

    requires_calibration = False
    quantization_config: OnebitConfig

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("onebit models cannot be offloaded to disk; use a device_map without 'disk'")
        if not self.pre_quantized and self.quantization_config.quant_config.needs_calibration:
            method = self.quantization_config.quant["method"]
            raise ValueError(
                f"method {method!r} needs calibration data, which from_pretrained cannot provide: use "
                "onebit.quantize_model(model, config, calib) or `onebit quantize`, then load the directory"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        if self.quantization_config.format_version < COMPACT_FORMAT_VERSION:
            raise CheckpointError(
                f"this checkpoint is in packed format v{self.quantization_config.format_version}, which "
                "from_pretrained cannot read: load it with onebit.load_quantized(path) (it converts) and "
                "save it again (onebit.save_quantized or save_pretrained) to get a current checkpoint"
            )
        _swap_in_binary_linears(model, self.quantization_config.layers)
        if self.quantization_config.head is not None:
            swap_in_int8_head(model, self.quantization_config.head)
            _tie_int8_scales(model)
        if checkpoint_files:
            files = [str(f) for f in checkpoint_files]
            if not all(f.endswith(".safetensors") for f in files):
                raise CheckpointError(f"onebit checkpoints are safetensors only; refusing to load {files[0]}")
            verify_checkpoint_files(model, files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
            if left:
                raise CheckpointError(f"checkpoint does not provide {left[:5]}")
            validate_layers(model)
            share_tied_int8(model)
        else:
            from onebit.models import quantize_model

            quantize_model(model, self.quantization_config.quant_config, progress=False)
            self.quantization_config.layers = _layers_of(model)
        model.onebit_config = self.quantization_config.quant_config
        return model

    def get_state_dict_and_metadata(self, model):
        """save_pretrained: the same tensors and metadata as onebit.checkpoint.save_quantized."""
        from onebit import __version__

        qc = self.quantization_config
        qc.layers, qc.head, qc.onebit_version = _layers_of(model), int8_head_config(model), __version__
        qc.format_version = written_format_version(model)
        tensors, meta = tensors_and_metadata(model)
        meta.pop("format")  # save_pretrained adds it
        return tensors, meta

    def is_serializable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        # Under torch.compile a BinaryLinear is one opaque op over its stored buffers
        # (onebit::binary_linear_stored) and a narrow head another (onebit::dense_linear).
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register "onebit" with transformers' quantizer registry (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not OnebitConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reloaded module
        from transformers.quantizers.auto import register_quantization_config

        register_quantization_config(QUANT_METHOD)(OnebitConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not OnebitHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        from transformers.quantizers.auto import register_quantizer

        register_quantizer(QUANT_METHOD)(OnebitHfQuantizer)


def attach(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Make a model quantized in memory (quantize_model, load_quantized) save with save_pretrained."""
    register()
    config = config or getattr(model, "onebit_config", None)
    if config is None:
        raise ValueError("no QuantConfig given and the model has no `onebit_config` (was it quantized by onebit?)")
    mark_int8_head(model, True)  # a onebit checkpoint holds an int8 head as it is
    qc = OnebitConfig(quant=config, layers=_layers_of(model), head=int8_head_config(model),
                      format_version=written_format_version(model))  # fmt: skip
    model.config.quantization_config = qc
    model.hf_quantizer = OnebitHfQuantizer(qc, pre_quantized=True)
    model.is_quantized, model.quantization_method = True, QUANT_METHOD
    model.onebit_config = config
    return model


# ---------------------------------------------------------------------------- onebit info


def checkpoint_info(path: str) -> dict:
    """What a checkpoint directory holds, read from config.json and the safetensors headers only."""
    import os
    import re
    from pathlib import Path

    from safetensors import safe_open

    from onebit.checkpoint import read_quantization_config

    cfg, qc = read_quantization_config(path)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file")
    numel, nbytes, aliases = {}, {}, {}
    # Header shapes as meta tensors, plus the (small) in_scale values: enough for bits_breakdown.
    headers: dict[str, torch.Tensor] = {}
    for fp in files:
        try:
            with safe_open(str(fp), framework="pt", device="cpu") as f:
                aliases.update(json.loads((f.metadata() or {}).get("aliases", "{}")))
                for k in f.keys():
                    sl = f.get_slice(k)
                    dtype = _ST_DTYPES[sl.get_dtype()]
                    numel[k] = math.prod(sl.get_shape())
                    nbytes[k] = numel[k] * dtype.itemsize
                    is_in_scale = k.endswith(".in_scale") and k.rsplit(".", 1)[0] in qc["layers"]
                    headers[k] = f.get_tensor(k) if is_in_scale else torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        except Exception as e:
            raise CheckpointError(f"{fp}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    layers, q_bytes, q_weights, breakdown = {}, 0, 0, {}
    for name, lm in qc["layers"].items():
        b = sum(v for k, v in nbytes.items() if k.startswith(name + ".") and k != f"{name}.bias")
        w = lm["in_features"] * lm["out_features"]
        layers[name] = {"shape": [lm["out_features"], lm["in_features"]], "bytes": b, "bits_per_weight": 8 * b / w,
                        "terms": len(lm["layout"]["terms"]), "block_size": lm["block_size"]}  # fmt: skip
        q_bytes, q_weights = q_bytes + b, q_weights + w
        try:
            t = {k: headers[f"{name}.{k}"] for k in ("signs", "out_scale", "in_scale")}
            t.update({k: headers[f"{name}.{k}"] for k in OPTIONAL_NAMES if f"{name}.{k}" in headers})
            shape = (lm["out_features"], lm["in_features"], lm["block_size"], Layout.from_dict(lm["layout"]))
            if qc["format_version"] == 1:
                parts = format_v1.bits_breakdown(PackedWeight(*shape, **t))
            else:
                parts = compact_bits_breakdown(CompactWeight(*shape, **t))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"layer {name!r}: tensors or metadata missing ({e})") from None
        for part, bits in parts.items():
            breakdown[part] = breakdown.get(part, 0) + bits
    quantized = set(qc["layers"])
    packed = {k for k in numel if k.rsplit(".", 1)[0] in quantized and not k.endswith(".bias")}
    head = qc.get("head")
    # An int8 head's modules: the ones with a stored `.scale` (lm_head, and its tied embedding).
    int8_modules = {k.rsplit(".", 1)[0] for k in list(numel) + list(aliases) if k.endswith(".scale")} if head else set()
    float_modules: dict[str, int] = {}
    for k in list(numel) + list(aliases):
        mod = k.rsplit(".", 1)[0]
        if mod not in quantized and mod not in int8_modules:
            pattern = re.sub(r"\.\d+\.", ".*.", mod)  # model.layers.3.input_layernorm -> model.layers.*.input_layernorm
            float_modules[pattern] = float_modules.get(pattern, 0) + 1
    fp16_model = 2 * (q_weights + sum(n for k, n in numel.items() if k not in packed and not k.endswith(".scale")))
    return {
        "dir": str(path), "method": qc["quant"].get("method"), "options": qc["quant"],
        "format_version": qc["format_version"], "onebit_version": qc.get("onebit_version"),
        "model_type": cfg.get("model_type"), "n_quantized_layers": len(layers),
        "bits_per_weight": 8 * q_bytes / max(q_weights, 1), "quantized_weights": q_weights,
        "bits_per_weight_by_part": {k: v / max(q_weights, 1) for k, v in breakdown.items()},
        "quantized_linear_bytes": q_bytes, "fp16_linear_bytes": 2 * q_weights,
        "bytes_on_disk": sum(os.path.getsize(f) for f in files), "fp16_model_bytes": fp16_model,
        "float_modules": sorted(float_modules), "tied": aliases, "layers": layers,
        "head": head, "int8_modules": sorted(int8_modules),
        "int8_head_bytes": sum(nbytes.get(f"{m}.{p}", 0) for m in int8_modules for p in ("weight", "scale")),
    }  # fmt: skip


def print_info(path: str, as_json: bool = False) -> int:
    info = checkpoint_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    mb = lambda n: f"{n / 1e6:.2f} MB"
    print(
        f"{info['dir']}: onebit {info['method']} checkpoint, packed format v{info['format_version']} "
        f"(written by onebit {info['onebit_version']}), model_type {info['model_type']}"
    )
    opts = {k: v for k, v in info["options"].items() if k != "version"}
    print("options: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    print(f"\n{'layer':<44} {'out x in':>12} {'terms':>5} {'bytes':>10} {'bits/w':>7}")
    for name, l in info["layers"].items():
        shape = f"{l['shape'][0]}x{l['shape'][1]}"
        print(f"{name:<44} {shape:>12} {l['terms']:>5} {l['bytes']:>10} {l['bits_per_weight']:>7.3f}")
    ratio = info["quantized_linear_bytes"] / max(info["fp16_linear_bytes"], 1)
    print(
        f"\nquantized linears: {info['n_quantized_layers']} layers, {info['quantized_weights']} weights, "
        f"{info['bits_per_weight']:.3f} bits per weight (all stored bits: signs, group bitmaps, scales)"
    )
    parts = {k: v for k, v in info["bits_per_weight_by_part"].items() if v}
    print("bits per weight by part: " + " + ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in parts.items()))
    print(
        f"linear layers: {mb(info['quantized_linear_bytes'])} packed vs {mb(info['fp16_linear_bytes'])} in FP16 "
        f"({ratio:.1%})"
    )
    print(
        f"whole checkpoint: {mb(info['bytes_on_disk'])} on disk vs {mb(info['fp16_model_bytes'])} as an FP16 model "
        f"({info['bytes_on_disk'] / max(info['fp16_model_bytes'], 1):.1%})"
    )
    tied = ", ".join(f"{a} = {t}" for a, t in info["tied"].items())
    print("kept in floating point: " + ", ".join(info["float_modules"]) + (f" (tied: {tied})" if tied else ""))
    if info["head"]:
        print(f"int8 head: {', '.join(info['int8_modules'])}, a scale per {info['head']['group_size']} columns"
              f"{' (one shared table)' if info['head']['tied'] else ''}, {mb(info['int8_head_bytes'])}")
    return 0


register()
