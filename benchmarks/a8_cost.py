"""What int8 activations (A8, the popcount / AMX path) cost in quality, against exact A16.

    onebit quantize --method arb-rc --out q-arb-rc        # or `onebit demo`, which saves one
    python benchmarks/a8_cost.py q-arb-rc

Evaluates the same checkpoint through the packed kernels with act_bits=16 and 8 on
wiki.utf8 and the held-out half of c4.utf8: perplexity, log-ppl, KL(FP || quantized) and
top-1 agreement with the FP model; writes benchmarks/results/a8_cost.json.
"""

from __future__ import annotations

from quality import checkpoint_study  # the same texts and metrics as the quality tables


def act_bits(bits: int):
    def prepare(model) -> None:
        from onebit.cli import set_act_bits

        set_act_bits(model, bits)

    return prepare


if __name__ == "__main__":
    checkpoint_study(__doc__, "a8_cost", [({"act_bits": b}, act_bits(b)) for b in (16, 8)])
