"""Where the bits of quantized checkpoints go: true bits per weight split by part.

    python benchmarks/bits.py CKPT_DIR [CKPT_DIR ...]     # -> results/bits_breakdown.{json,csv}

Reads only the safetensors headers and the in_scale tensors (onebit.hf.checkpoint_info),
so it is instant on any checkpoint. Parts (onebit.format.bits_breakdown): the sign plane,
the second sign plane on the columns its terms use (the papers count these two), the
second plane's stored-but-unused bits, the group bitmap, K padding, and the scales.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import RESULTS, metadata, write_results  # noqa: E402


def rows_for(dirs: list[str]) -> list[dict]:
    from onebit.hf import checkpoint_info

    rows = []
    for d in dirs:
        info = checkpoint_info(d)
        opts = info["options"]
        rows.append({
            "checkpoint": os.path.basename(os.path.normpath(d)), "method": info["method"],
            "cgb": opts.get("cgb"), "block_size": opts.get("block_size"), "scale_dtype": opts.get("scale_dtype"),
            "model_type": info["model_type"], "quantized_weights": info["quantized_weights"],
            "bits_per_weight": info["bits_per_weight"], **info["bits_per_weight_by_part"],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="directories written by `onebit quantize` / `onebit demo`")
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args(argv)
    rows = rows_for(args.checkpoints)
    for r in rows:
        print(f"{r['checkpoint']}: {r['method']} {r['bits_per_weight']:.3f} bits/w")
    paths = write_results("bits_breakdown", metadata("cpu"), rows, args.out_dir)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
