"""What storing the scales in 8 bits costs (float8 e4m3 times a power of two per term and block).

    onebit quantize --method arb-rc --out q-arb-rc
    python benchmarks/scale_cost.py q-arb-rc

Scales are ~1 bit per weight of a CGB checkpoint in fp16 (out_scale: 6 terms per row and
128-column block). This evaluates one checkpoint as stored and with every out_scale,
in_scale and mean rounded to e4m3 after the fact (onebit.compact.compact(..., "float8_e4m3fn"),
one exponent per term and block; nothing re-fitted around the rounding), on wiki.utf8 and
the held-out half of c4.utf8: perplexity, KL(FP || quantized), top-1 agreement, true bits
per weight; writes benchmarks/results/scale_cost.json. A checkpoint quantized with
`--scale-dtype float8_e4m3fn` (the quantizer rounds each fit before compensating) is
measured the same way: `python benchmarks/scale_cost.py q-fp8 --out results/scale_cost_fp8.json`.
"""

from __future__ import annotations

from quality import checkpoint_study  # the same texts and metrics as the quality tables


def store_scales_in_fp8(model) -> dict:
    """Rewrite every packed layer as if stored with 8-bit scales (what compact() does to a v1 weight)."""
    from onebit.compact import compact
    from onebit.nn import BinaryLinear

    for m in model.modules():
        if isinstance(m, BinaryLinear):
            for name, t in compact(m.packed, "float8_e4m3fn").tensors().items():
                setattr(m, name, t)
    return {}


def bits(model) -> dict:
    from onebit.cli import model_report

    return {"bits_per_weight": model_report(model)["bits_per_weight"]}


VARIANTS = (("as stored", lambda m: bits(m)), ("rounded to e4m3 after quantization", lambda m: store_scales_in_fp8(m) or bits(m)))

if __name__ == "__main__":
    checkpoint_study(__doc__, "scale_cost", [({"scales": label}, fn) for label, fn in VARIANTS])
