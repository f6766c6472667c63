"""Where the bits of quantized checkpoints go: true bits per weight split by part.

    python benchmarks/bits.py CKPT_DIR [CKPT_DIR ...]     # -> results/bits_breakdown.{json,csv}

Loads each checkpoint and sums onebit.compact.bits_breakdown over its packed layers (the
stored form, format v2): the sign plane, the second sign plane on its salient columns (the
papers count these two), the group bitmap, padding to whole words, the salient column
index, the scales. Next to it, `execution_bits_per_weight` is the same weights in the v1
layout the kernels read (second plane full width, K padded to a block), with its parts as
`v1_<part>`.

It also reports which fraction of the columns a kernel-native compact second plane keeps:
exactly the used ones (`second_plane_cols`), or each block's used columns padded to whole
groups of 4 (a table-kernel step) or 32 (an int32 word): `second_plane_cols_pad4` / `_pad32`.
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

    from onebit.format import bits_breakdown

    model, _, config = load_quantized(path, tokenizer=False)
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    r = model_report(model)
    v1: dict[str, int] = {}
    for m in layers:
        for part, bits in bits_breakdown(m.packed).items():
            v1[part] = v1.get(part, 0) + bits
    weights = max(r["linear_weights"], 1)
    return {
        "checkpoint": os.path.basename(os.path.normpath(path)), "method": config.method.value, "cgb": config.cgb,
        "block_size": config.block_size, "scale_dtype": config.scale_dtype, "layers": len(layers),
        "quantized_weights": r["linear_weights"], "bits_per_weight": r["bits_per_weight"],
        "execution_bits_per_weight": sum(v1.values()) / weights, **r["bits_per_weight_by_part"],
        **{f"v1_{k}": v / weights for k, v in v1.items()}, **second_plane_stats(layers),
    }  # fmt: skip


PARTS = ["sign", "second_sign", "unused_sign", "group", "padding", "salient_index", "out_scale", "in_scale", "mean",
         "float_linear"]  # fmt: skip


def plot(rows: list[dict], path: str) -> None:
    """Two stacked bars per checkpoint, stored (v2) and execution layout (v1): the papers count the
    first two parts, each bar is everything in that form."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 1.0 * len(rows) + 1.6))
    labels = [f"{r['checkpoint']} ({r['method']}), {form}" for r in rows for form in ("stored v2", "kernels v1")]
    left = [0.0] * len(labels)
    for part in PARTS:
        widths = [r.get(key, 0.0) for r in rows for key in (part, f"v1_{part}")]
        if any(widths):
            ax.barh(labels, widths, left=left, label=part.replace("_", " "))
            left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("bits per weight (everything stored / weights)")
    ax.invert_yaxis()
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06 - 0.6 / len(labels)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
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
