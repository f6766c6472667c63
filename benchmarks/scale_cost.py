"""What storing the scales in 8 bits (float8 e4m3, a power-of-two exponent per term) would cost.

    onebit quantize --method arb-rc --out q-arb-rc
    python benchmarks/scale_cost.py q-arb-rc

Scales are ~1 bit per weight of a CGB checkpoint in fp16 (out_scale: 6 terms per row and
128-column block). This evaluates one checkpoint as stored and with every out_scale,
in_scale and mean rounded to e4m3 after the fact (onebit.compact.to_fp8 / from_fp8; no
re-calibration around the rounding), on wiki.utf8 and the held-out half of c4.utf8:
perplexity, KL(FP || quantized), top-1 agreement; writes benchmarks/results/scale_cost.json
with the bits per weight each choice would store.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import harness  # benchmarks/harness.py (scripts run from this folder)
import torch

SCALES = ("out_scale", "in_scale", "mean")


def round_scales(model, names: tuple[str, ...]) -> None:
    from onebit.compact import from_fp8, to_fp8
    from onebit.nn import BinaryLinear

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryLinear):
                for n in names:
                    t = getattr(m, n)
                    if t is not None:
                        t.copy_(from_fp8(*to_fp8(t), dtype=t.dtype))


def stored_bits_with_fp8(model, names: tuple[str, ...]) -> float:
    """Bits per weight if the named scales were stored in 8 bits plus a 32-bit exponent per term."""
    from onebit.nn import BinaryLinear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, BinaryLinear):
            for n, t in m.compact.tensors().items():
                bits += t.numel() * (8 if n in names else t.element_size() * 8) + (32 * t.shape[0] if n in names else 0)
            weights += m.in_features * m.out_features
    return bits / weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--reference", default="smollm2-135m", help="the FP model KL / top-1 are measured against")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(harness.RESULTS) + "/scale_cost.json")
    args = ap.parse_args()

    os.environ.setdefault("ONEBIT_DATA_DIR", "/work/shared/data")
    from onebit.eval import reference
    from onebit.models import load_model
    from quality import eval_texts, evaluate  # the same texts and metrics as the quality tables

    fp, tok = load_model(args.reference)
    refs = {k: reference(fp, ids, args.seqlen, progress=False) for k, ids in eval_texts(tok, args.tokens).items()}
    del fp
    rows = []
    for label, names in (("as stored", ()), ("out_scale in e4m3", ("out_scale",)), ("all scales in e4m3", SCALES)):
        model, _ = load_model(args.checkpoint)
        bpw = stored_bits_with_fp8(model, names)
        round_scales(model, names)
        t = time.time()
        row = {"scales": label, "bits_per_weight": bpw, **evaluate(model, refs), "eval_seconds": round(time.time() - t, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    config = getattr(model, "onebit_config", None)
    meta = harness.metadata("cpu", checkpoint=str(Path(args.checkpoint).resolve()),
                            method=config.method.value if config else None,
                            config=config.to_dict() if config else None)  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
