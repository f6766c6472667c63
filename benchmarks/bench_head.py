"""The float head of a decode step: torch's F.linear vs onebit.head's narrow kernels, on CPU.

    python benchmarks/bench_head.py                  # SmolLM2 and Llama heads, M = 1, 4, 16
    python benchmarks/bench_head.py --threads 2 --append

A quantized model keeps its lm_head in float (the papers do too), and with 1-bit decoder
layers that head is the largest layer a decode step reads. Per shape and token count, timed
round robin in one process (harness.time_cpu_interleaved): `F.linear` with fp32 weights and x
(the fp32 model), `F.linear` with bf16 weights and x (torch's 16-bit path), and
`onebit.head.dense16_linear` with fp16 and bf16 weights and fp32 x, and `dense8_linear` with
int8 weights and fp32 scales per 32 columns (`compact_head`). Each is checked against a
float64 matmul of the same (rounded) weights first. Reported: median time, weight GB/s (scales
counted), and `vs_stream` = time / (weight bytes / streaming read bandwidth), with the
streaming read (`torch.sum` over 512 MB) measured in the same run and thread count.

Every timed call starts with the caches evicted (a 128 MB write, untimed), as inside a decode
step, where the 1-bit layers run between two calls of the head: SmolLM2's fp16 head (57 MB)
called back to back keeps part of itself in the 32 MB L3 of these machines and looked ~1.5x
faster than it runs in the model, and its int8 head (32 MB) would fit almost whole. `--hot`
times back-to-back calls instead (rows marked `cache: hot`).

Results: benchmarks/results/bench_head_cpu.{json,csv}.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_stream import stream_gbps  # noqa: E402

# (name, vocab N, hidden K): the tied SmolLM2-135M head, Llama-2-7B's and Llama-3-8B's heads.
HEADS = {"smollm2-135m": (49152, 576), "llama-2-7b": (32000, 4096), "llama-3-8b": (128256, 4096)}


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, label: str) -> float:
    ref = x.double() @ w.double().T
    err = float(((y.double() - ref).abs().max() / ref.abs().max()).item())
    if err > 2e-2:  # bf16 x / outputs round at 2^-8; anything near this is a wrong kernel
        raise SystemExit(f"{label}: max error {err:.3g} of the largest output: wrong result, not timing it")
    return err


def run(args: argparse.Namespace) -> list[dict]:
    from onebit.head import INT8_GROUP, dense8_linear, dense16_linear, quantize_int8

    if args.threads:
        torch.set_num_threads(args.threads)
    bw = stream_gbps()
    print(f"streaming read: {bw:.1f} GB/s, {torch.get_num_threads()} thread(s)", flush=True)
    rows = []
    before = None if args.hot else harness.CacheEvictor()
    g = torch.Generator().manual_seed(0)
    for name in args.heads:
        n, k = HEADS[name]
        w32 = torch.randn(n, k, generator=g) * 0.02
        q, scale = quantize_int8(w32, INT8_GROUP)
        weights = {"float32": w32, "bfloat16": w32.bfloat16(), "float16": w32.half(),
                   "int8": (q.double() * scale.double().repeat_interleave(INT8_GROUP, 1)[:, :k])}  # fmt: skip
        nbytes_of = {"float32": 4 * n * k, "bfloat16": 2 * n * k, "float16": 2 * n * k, "int8": n * k + scale.numel() * 4}
        for m in args.m:
            x = torch.randn(m, k, generator=g)
            impls = {
                "F.linear float32": (lambda x=x: F.linear(x, w32), "float32", x),
                "F.linear bfloat16": (lambda xb=x.bfloat16(), wb=weights["bfloat16"]: F.linear(xb, wb), "bfloat16", x.bfloat16()),
                "dense16 float16": (lambda x=x, w=weights["float16"]: dense16_linear(x, w), "float16", x),
                "dense16 bfloat16": (lambda x=x, w=weights["bfloat16"]: dense16_linear(x, w), "bfloat16", x),
                "dense8 int8": (lambda x=x: dense8_linear(x, q, scale, INT8_GROUP), "int8", x),
            }
            errs = {lab: _check(fn(), xx, weights[wd], f"{name} M={m} {lab}") for lab, (fn, wd, xx) in impls.items()}
            times = harness.time_cpu_interleaved({lab: fn for lab, (fn, _, _) in impls.items()}, rounds=args.rounds, before=before)
            base = times["F.linear float32"]["median_us"]
            for lab, (_, wd, _) in impls.items():
                t = times[lab]
                nbytes = nbytes_of[wd]
                row = {
                    "head": name, "N": n, "K": k, "M": m, "impl": lab, "weight_dtype": wd, "threads": torch.get_num_threads(),
                    "cache": "hot" if args.hot else "evicted",
                    "time_us": round(t["median_us"], 1), "p10_us": round(t["p10_us"], 1), "p90_us": round(t["p90_us"], 1),
                    "weight_bytes": nbytes, "gbps": round(nbytes / t["median_us"] / 1e3, 2), "stream_gbps": round(bw, 2),
                    "vs_stream": round(t["median_us"] / (nbytes / bw / 1e3), 3),
                    "speedup_vs_fp32": round(base / t["median_us"], 3), "max_rel_err": errs[lab],
                }  # fmt: skip
                rows.append(row)
                print(f"{name:>13} M={m:<3} {lab:<18} {row['time_us']:>10.1f} us {row['gbps']:6.1f} GB/s "
                      f"{row['vs_stream']:5.2f}x stream  x{row['speedup_vs_fp32']:.2f} vs fp32", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin slices per timing (harness.time_cpu_interleaved)")
    ap.add_argument("--hot", action="store_true", help="time back-to-back calls (no cache eviction before each)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing result file (e.g. another --threads)")
    ap.add_argument("--out-dir", default=harness.RESULTS)
    args = ap.parse_args(argv)
    rows = run(args)
    meta = harness.metadata("cpu", stream="torch.sum over 512 MB, best of 7")
    meta, rows = harness.merge_previous("bench_head_cpu", meta, rows, args.append, args.out_dir)
    print("wrote", *harness.write_results("bench_head_cpu", meta, rows, args.out_dir))


if __name__ == "__main__":
    main()
