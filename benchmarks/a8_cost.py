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
import torch


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
    from onebit.data import load_text, split_text, tokenize
    from onebit.eval import reference, score
    from onebit.models import load_model

    fp, tok = load_model(args.reference)
    texts = {"wiki": load_text("wiki"), "c4": split_text(load_text("c4"), 0.5)[1]}
    refs = {k: reference(fp, tokenize(tok, v, args.tokens), args.seqlen, progress=False) for k, v in texts.items()}
    del fp
    model, _ = load_model(args.checkpoint)
    config = getattr(model, "onebit_config", None)
    rows = []
    for bits in (16, 8):
        set_act_bits(model, bits)
        row = {"act_bits": bits}
        t = time.time()
        for name, ref in refs.items():
            r = score(model, ref=ref, progress=False)
            row.update({f"ppl_{name}": r["ppl"], f"nll_{name}": r["nll"], f"kl_{name}": r["kl"],
                        f"top1_{name}": r["top1_agree"], f"tokens_{name}": r["tokens"]})  # fmt: skip
        row["eval_seconds"] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = harness.metadata("cpu", checkpoint=str(Path(args.checkpoint).resolve()),
                            method=config.method.value if config else None,
                            config=config.to_dict() if config else None)  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
