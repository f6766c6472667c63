"""What int8 activations (A8, the popcount / AMX path) cost in quality, against exact A16.

    onebit quantize --method arb-rc --out q-arb-rc        # or `onebit demo`, which saves one
    python benchmarks/a8_cost.py q-arb-rc

Evaluates the same checkpoint through the packed kernels with act_bits=16 and 8 on
wiki.utf8 and the held-out half of c4.utf8: perplexity, log-ppl, KL(FP || quantized) and
top-1 agreement with the FP model; writes benchmarks/results/a8_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import harness  # benchmarks/harness.py (scripts run from this folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--reference", default="smollm2-135m", help="the FP model KL / top-1 are measured against")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(harness.RESULTS) + "/a8_cost.json")
    args = ap.parse_args()

    os.environ.setdefault("ONEBIT_DATA_DIR", "/work/shared/data")
    from onebit.cli import set_act_bits
    from onebit.eval import reference
    from onebit.models import load_model
    from quality import eval_texts, evaluate  # the same texts and metrics as the quality tables

    fp, tok = load_model(args.reference)
    refs = {k: reference(fp, ids, args.seqlen, progress=False) for k, ids in eval_texts(tok, args.tokens).items()}
    del fp
    model, _ = load_model(args.checkpoint)
    config = getattr(model, "onebit_config", None)
    rows = []
    for bits in (16, 8):
        set_act_bits(model, bits)
        t = time.time()
        row = {"act_bits": bits, **evaluate(model, refs), "eval_seconds": round(time.time() - t, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = harness.metadata("cpu", checkpoint=str(Path(args.checkpoint).resolve()),
                            method=config.method.value if config else None,
                            config=config.to_dict() if config else None)  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
