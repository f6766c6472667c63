"""Per-block checkpoints of a calibration run, so a long run can resume.

One file per finished block, `block_0007.pt`, written to a temporary name and moved into
place with os.replace (atomic on POSIX): a crash never leaves a half-written block that a
resume would trust. Each file records the QuantConfig and a fingerprint of the calibration
ids; resuming with a different config or different data raises instead of mixing runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from onebit.format import Layout, PackedWeight, validate

CKPT_VERSION = 1


def block_path(checkpoint_dir: str | os.PathLike, i: int) -> Path:
    return Path(checkpoint_dir) / f"block_{i:04d}.pt"


def save_block(
    checkpoint_dir: str | os.PathLike, i: int, meta: dict[str, Any], packed: dict[str, PackedWeight], stats: dict
) -> Path:
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    layers = {
        rel: {
            "out_features": p.out_features, "in_features": p.in_features, "block_size": p.block_size,
            "layout": p.layout.to_dict(), "tensors": {k: v.detach().cpu() for k, v in p.tensors().items()},
        }  # fmt: skip
        for rel, p in packed.items()
    }
    obj = {"version": CKPT_VERSION, "block": i, "meta": meta, "layers": layers, "stats": stats}
    path = block_path(d, i)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_block(checkpoint_dir: str | os.PathLike | None, i: int, meta: dict[str, Any]) -> dict | None:
    """The finished block i ({"packed": {rel: PackedWeight}, "stats": ...}) or None if absent."""
    if checkpoint_dir is None:
        return None
    path = block_path(checkpoint_dir, i)
    if not path.exists():
        return None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if obj.get("version") != CKPT_VERSION or obj.get("block") != i:
        raise ValueError(f"{path}: not a onebit block checkpoint v{CKPT_VERSION} for block {i}")
    if obj["meta"] != meta:
        raise ValueError(
            f"{path} was written by a run with a different config or calibration data; "
            "use a fresh checkpoint_dir or resume=False"
        )
    packed = {}
    for rel, d in obj["layers"].items():
        layout = Layout.from_dict(d["layout"])
        p = PackedWeight(d["out_features"], d["in_features"], d["block_size"], layout, **d["tensors"])
        validate(p)
        packed[rel] = p
    return {"packed": packed, "stats": obj["stats"]}
