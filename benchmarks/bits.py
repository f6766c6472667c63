"""Where the bits of quantized checkpoints go: true bits per weight split by part.

    python benchmarks/bits.py CKPT_DIR [CKPT_DIR ...]     # -> results/bits_breakdown.{json,csv}

Loads each checkpoint and sums onebit.format.bits_breakdown over its packed layers: the
sign plane, the second sign plane on the columns its terms use (the papers count these
two), the second plane's stored-but-unused bits, the group bitmap, K padding, the scales.

For a compact second plane (format v2) it also reports which fraction of the columns the
second plane would have to keep: exactly the used ones (`second_plane_cols`), or each
block's used columns padded to whole groups of 4 (a table-kernel step) or 32 (an int32
word): `second_plane_cols_pad4` / `_pad32`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import RESULTS, metadata, write_results  # noqa: E402


def second_plane_stats(layers) -> dict[str, float]:
    """Fraction of logical columns a compact second plane keeps, exact and padded per block."""
    from onebit.format import plane_columns

    cols = {"second_plane_cols": 0, "second_plane_cols_pad4": 0, "second_plane_cols_pad32": 0}
    total = 0
    for m in layers:
        p = m.packed
        total += p.in_features * p.out_features
        for plane in range(1, p.layout.n_planes):
            per_block = plane_columns(p, plane).reshape(p.n_blocks, p.block_size).sum(1).tolist()
            for key, step in (("second_plane_cols", 1), ("second_plane_cols_pad4", 4), ("second_plane_cols_pad32", 32)):
                cols[key] += p.out_features * sum(-(-c // step) * step for c in per_block)
    return {k: v / max(total, 1) for k, v in cols.items()}


def row_for(path: str) -> dict:
    from onebit.checkpoint import load_quantized
    from onebit.cli import model_report  # the same parts `onebit demo` / `onebit eval` print
    from onebit.nn import BinaryLinear

    model, _, config = load_quantized(path, tokenizer=False)
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    r = model_report(model)
    return {
        "checkpoint": os.path.basename(os.path.normpath(path)), "method": config.method.value, "cgb": config.cgb,
        "block_size": config.block_size, "scale_dtype": config.scale_dtype, "layers": len(layers),
        "quantized_weights": r["linear_weights"], "bits_per_weight": r["bits_per_weight"],
        **r["bits_per_weight_by_part"], **second_plane_stats(layers),
    }  # fmt: skip


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
    rows = [row_for(d) for d in args.checkpoints]
    for r in rows:
        print(f"{r['checkpoint']}: {r['method']} {r['bits_per_weight']:.3f} bits/w")
    paths = write_results("bits_breakdown", metadata("cpu"), rows, args.out_dir)
    print("wrote", *paths)
    plot(rows, os.path.join(args.out_dir, "bits_breakdown.png"))


if __name__ == "__main__":
    main()
