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

import torch
from quality import checkpoint_study  # the same texts and metrics as the quality tables

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


def scales_in_fp8(names: tuple[str, ...]):
    def prepare(model) -> dict:
        bpw = stored_bits_with_fp8(model, names)
        round_scales(model, names)
        return {"bits_per_weight": bpw}

    return prepare


VARIANTS = (("as stored", ()), ("out_scale in e4m3", ("out_scale",)), ("all scales in e4m3", SCALES))

if __name__ == "__main__":
    checkpoint_study(__doc__, "scale_cost", [({"scales": label}, scales_in_fp8(names)) for label, names in VARIANTS])
