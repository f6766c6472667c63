"""Where calibration time goes: per method and per stage, on SmolLM2-135M (CPU).

Runs onebit.calib.quantize_calibrated under cProfile on the first --blocks decoder blocks
and attributes time to stages by the functions that implement them:

    forward       decoder-block forward passes of both streams (minus the Gram hooks)
    gram          Gram accumulation in the forward hooks (H, Sq, S)
    mask_search   saliency, salient-column search, group-split search
    oa            output-alignment refinement (OA's layer only)
    binarize      the per-block binarizers and closed forms (what is left of a block)
    gptq          Hessian prep, inverse Cholesky and block compensation
    other         checkpointing, packing, module swaps, Python overhead

and projects the full model's time (x n_blocks / --blocks). cProfile adds some overhead to
Python-heavy stages; totals without the profiler are reported too (`wall_s_unprofiled`).
Writes benchmarks/results/bench_calib_<device>.json.

    python benchmarks/bench_calib.py --methods rtn,billm,arb-x,arb-rc,oa --blocks 2
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import harness  # benchmarks/harness.py (scripts run from this folder)
import torch

RESULTS = Path(__file__).resolve().parent / "results"

# stage -> (file suffix, function name) whose cumulative time it takes
STAGE_FUNCS = {
    "calib_total": [("calib/pipeline.py", "quantize_calibrated")],
    "forward_incl_hooks": [("calib/capture.py", "run_block"), ("calib/capture.py", "capture_block0_inputs")],
    "hooks": [("calib/capture.py", "hook")],  # inside the forwards: Grams + input capture
    "gram": [("calib/capture.py", "_accumulate")],  # in the hooks and in GramHooks.pair
    "mask_search": [("quant/partition.py", "saliency"), ("quant/partition.py", "search_salient"),
                    ("quant/partition.py", "search_split")],  # fmt: skip
    "oa": [("quant/oa.py", "oa_refine")],
    "block_quantizer": [("quant/methods.py", "quantize_block")],
    "gptq_loop": [("quant/gptq.py", "gptq_loop")],
}


def cumtimes(stats: pstats.Stats) -> dict[str, float]:
    out = dict.fromkeys(STAGE_FUNCS, 0.0)
    for (fname, _, func), (_, _, _, ct, _) in stats.stats.items():
        for stage, keys in STAGE_FUNCS.items():
            if any(fname.endswith(suffix) and func == name for suffix, name in keys):
                out[stage] += ct
    return out


def stages(ct: dict[str, float]) -> dict[str, float]:
    s = {
        "forward": ct["forward_incl_hooks"] - ct["hooks"],
        "gram": ct["gram"],
        "mask_search": ct["mask_search"],
        "oa": ct["oa"],
        "binarize": ct["block_quantizer"] - ct["mask_search"] - ct["oa"],
        "gptq": ct["gptq_loop"] - ct["block_quantizer"],
    }
    s["other"] = ct["calib_total"] - sum(s.values())
    s["total"] = ct["calib_total"]
    return {k: round(max(v, 0.0), 3) for k, v in s.items()}


def main() -> None:
    from onebit import QuantConfig
    from onebit.data import calibration_ids, load_text, split_text
    from onebit.models import decoder_layers, load_model, quantize_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="billm,arb,arb-x,arb-rc,oa")
    ap.add_argument("--blocks", type=int, default=2, help="decoder blocks to quantize (projected to the full model)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default="", help="names this run's rows (e.g. which code version)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for method in args.methods.split(","):
        model, tok = load_model("smollm2-135m")
        n_total = len(decoder_layers(model))
        del decoder_layers(model)[args.blocks :]
        model.config.num_hidden_layers = args.blocks
        calib = calibration_ids(tok, split_text(load_text("c4"))[0], args.nsamples, args.seqlen, seed=0)
        config = QuantConfig(method=method)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        quantize_model(model, config, calib if config.needs_calibration else None, progress=False)
        prof.disable()
        wall = time.perf_counter() - t0
        st = stages(cumtimes(pstats.Stats(prof))) if config.needs_calibration else {"total": round(wall, 3)}
        # The same run once more without the profiler, for an honest wall time.
        model, _ = load_model("smollm2-135m", num_layers=args.blocks)
        t0 = time.perf_counter()
        quantize_model(model, config, calib if config.needs_calibration else None, progress=False)
        wall_plain = time.perf_counter() - t0
        import onebit

        row = {"method": method, "label": args.label, "onebit": str(Path(onebit.__file__).parent), "blocks": args.blocks, "tokens": args.nsamples * args.seqlen,
               "wall_s_unprofiled": round(wall_plain, 2), "per_block_s": round(wall_plain / args.blocks, 2),
               "projected_full_model_s": round(wall_plain / args.blocks * n_total, 1), **{f"{k}_s": v for k, v in st.items()}}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)

    meta = {
        "device": "cpu", "device_name": harness.device_name("cpu"), "threads": args.threads,
        "torch": torch.__version__, "model": "smollm2-135m", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": harness.git_commit(),
        "note": "stage times are cProfile cumulative times inside the profiled run; n_blocks of SmolLM2-135M = 30",
    }  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / "bench_calib_cpu.json"
    if args.append and out.exists():
        rows = json.loads(out.read_text())["rows"] + rows
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
