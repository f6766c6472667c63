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


PARTS = ["sign", "second_sign", "unused_sign", "group", "padding", "out_scale", "in_scale", "mean", "float_linear"]


def plot(rows: list[dict], path: str) -> None:
    """One stacked bar per checkpoint: the papers count the first two parts, the bar is what is stored."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.6))
    labels = [f"{r['checkpoint']} ({r['method']})" for r in rows]
    left = [0.0] * len(rows)
    for part in PARTS:
        widths = [r.get(part, 0.0) for r in rows]
        if any(widths):
            ax.barh(labels, widths, left=left, label=part.replace("_", " "))
            left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("bits per weight (everything stored / weights)")
    ax.invert_yaxis()
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.1 / len(rows)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


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
    plot(rows, os.path.join(args.out_dir, "bits_breakdown.png"))


if __name__ == "__main__":
    main()
