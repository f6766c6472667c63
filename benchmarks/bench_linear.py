"""Binary linear layer benchmark: every available onebit backend vs F.linear, same run.

    python benchmarks/bench_linear.py                      # all shapes, M in 1,4,16,64,256
    python benchmarks/bench_linear.py --shapes 4096x4096 --m 1 16 --formats single
    python benchmarks/bench_linear.py --quick              # a few minutes on 2 cores
    python benchmarks/bench_linear.py --shapes 4096x4096 --m 1 16 --repeat 5 --name bench_linear_targets
    python benchmarks/bench_linear.py --shapes 576x576 1536x576 576x1536 192x576 4096x4096 --m 16 64 256 \
        --act-bits 16 --cpu-isas lut --repeat 3 --name bench_linear_prefill   # dense path vs lookups

Shapes are N x K (out_features x in_features): Llama-2-7B / Llama-3-8B layers and
SmolLM2-135M layers. Formats: `single` (one sign plane + fp16 scale per row and 128-block,
ARB-RC/RTN) and `cgb` (BiLLM/ARB-RC CGB: sign + group bitmap + a second sign plane read
on salient columns, 8 per 128-block here, 6 terms with fp16 scales). Every backend output
is validated against onebit.reference.binary_linear_ref before it is timed (A8 against the
reference's own int8 quantization).

Reported per row: median time and p10/p90 spread; effective GB/s over the bytes a call
must move, written out as `bytes` = stored weight bytes (every plane and scale of the
format) + activations + fp32 outputs (for F.linear: the dense weight in its dtype); bits
per weight of the format; speedup over F.linear fp32 and bf16 (CPU) or cuBLAS fp16/bf16
(CUDA) measured in the same run. CPU rows also give the bytes of the kernel's repacked
layout (`kernel_bytes`). `time_us` is the call BinaryLinear.forward makes: the backend
bound to the weight once (onebit.ops.bind), then called with x; `unbound_us` calls the
backend function, which checks its arguments and looks the repacked weight up on every
call, and `op_us` goes through onebit.ops.binary_linear at M=1. (Result files before
December 2026, benchmarks/results/sapphire_rapids/, timed the backend function as
`time_us`.)

CPU timings are hot-cache medians (the weight is re-read by every call), every
implementation of one (shape, M) timed round robin in five slices so that the shared
machine's slow phases fall on all of them alike. Slower stretches last minutes too:
`--repeat N` runs the grid N times, `--pause` seconds apart, and report.py quotes the
median over runs (bench_linear_targets holds such runs for the kernels issue's targets). On CUDA,
triton.testing.do_bench flushes L2 between calls. Results go to
benchmarks/results/bench_linear_<device>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from onebit.format import Layout, PackedWeight, Select, Term, bits_per_weight, padded_k, stored_bits  # noqa: E402
from onebit.ops import BACKENDS, available_backends  # noqa: E402
from onebit.reference import binary_linear_ref  # noqa: E402
from onebit.quant.methods import RC_CGB_LAYOUT  # noqa: E402

LLAMA_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "14336x4096", "4096x14336", "1024x4096"]
SMOLLM_SHAPES = ["576x576", "192x576", "1536x576", "576x1536"]
M_VALUES = [1, 4, 16, 64, 256]
CGB = RC_CGB_LAYOUT  # the layout arb-rc / oa write
SALIENT_PER_BLOCK = 8


def random_packed(fmt: str, n: int, k: int, block_size: int = 128, scale_dtype=torch.float16, seed: int = 0,
                  main_keep: float = 1.0) -> PackedWeight:
    """A random PackedWeight built straight from random words (pack() is too slow for 14336x4096).

    main_keep < 1 (cgb): the second main term keeps that fraction of the first one's columns,
    the others at in_scale 0, as arb-rc writes some layers (SmolLM2's q/k/v_proj: ~0.83-0.93):
    the CPU backend then gathers the two main terms to different columns."""
    g = torch.Generator().manual_seed(seed)
    k_pad = padded_k(k, block_size)
    nb, kw = k_pad // block_size, k_pad // 32
    col = torch.arange(k_pad)
    valid_words = torch.zeros(kw, dtype=torch.int64)
    for w in range(kw):  # padding columns must be 0 bits
        bits = int(((col[w * 32 : (w + 1) * 32]) < k).sum())
        valid_words[w] = (1 << bits) - 1
    mask = torch.where(valid_words >= 2**31, valid_words - 2**32, valid_words).to(torch.int32)

    def words(*shape):
        return torch.randint(-(2**31), 2**31, (*shape, kw), generator=g, dtype=torch.int64).to(torch.int32) & mask

    if fmt == "single":
        layout, in_scale = Layout((Term(0, Select.ALL),)), torch.ones(1, k_pad)
    elif fmt == "cgb":
        layout = CGB
        salient = torch.zeros(k_pad, dtype=torch.bool)
        for b in range(nb):
            width = min(block_size, k - b * block_size)
            salient[b * block_size + torch.randperm(width, generator=g)[: min(SALIENT_PER_BLOCK, width)]] = True
        c = torch.rand(6, k_pad, generator=g) + 0.5
        in_scale = torch.where(torch.arange(6).unsqueeze(1) < 4, c * salient, c * ~salient)
        if main_keep < 1:
            in_scale[5] *= torch.rand(k_pad, generator=g) < main_keep
    else:
        raise ValueError(f"unknown format {fmt!r}")
    in_scale[:, k:] = 0
    nt = layout.n_terms
    return PackedWeight(
        out_features=n,
        in_features=k,
        block_size=block_size,
        layout=layout,
        signs=words(layout.n_planes, n),
        out_scale=(torch.rand(nt, n, nb, generator=g) * 0.02 + 0.001).to(scale_dtype),
        in_scale=in_scale.to(scale_dtype),
        groups=words(n) if layout.has_group else None,
    )


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).abs().max() / ref.pow(2).mean().sqrt().clamp_min(1e-12))


def parse_shape(s: str) -> tuple[int, int]:
    n, k = s.lower().split("x")
    return int(n), int(k)


def backend_fn(name: str):
    return importlib.import_module(BACKENDS[name].module).binary_linear


def impls(backends: list[str], cpu_isas: list[str]) -> list[tuple[str, object]]:
    """(label, fn) per timed implementation: each backend as dispatched, plus the CPU
    backend forced onto each ISA path in `cpu_isas` (e.g. the LUT kernel next to AMX)."""
    out = [(be, backend_fn(be)) for be in backends]
    if "cpu" in backends:
        from functools import partial

        from onebit.backends.cpu import amx_paths, binary_linear_isa, supported_isas

        # Without AMX the dispatched path is the best ISA: forcing it again would time `cpu` twice.
        dispatched = "amx" if amx_paths() else (supported_isas() or ["none"])[0]
        out += [
            (f"cpu[{isa}]", partial(binary_linear_isa, isa=isa))
            for isa in cpu_isas
            if isa in supported_isas() and isa != dispatched
        ]
        if "lut" in cpu_isas:  # the lookup tables at every M (auto runs A16 multi-term weights densely from ~64 tokens)
            out.append(("cpu[lut]", _lookups_only))
    return out


def _lookups_only(x, p, act_bits):
    from onebit.backends.cpu import binary_linear_isa

    return binary_linear_isa(x, p, act_bits, "auto", dense=False)


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    on_cuda = device.startswith("cuda")

    def time_all(fns: dict) -> dict:
        """Every implementation of one (shape, M), round robin on CPU (harness.time_cpu_interleaved)."""
        if on_cuda:
            return {k: harness.time_cuda(f) for k, f in fns.items()}
        return harness.time_cpu_interleaved(fns, reps=args.reps, max_time_s=args.max_time)

    backends = [b for b in available_backends(device) if b != "torch" or args.include_ref]
    if args.backends:
        backends = [b for b in backends if b in args.backends]
    base_dtypes = [torch.float16, torch.bfloat16] if on_cuda else [torch.float32, torch.bfloat16]
    x_dtype = torch.float16 if on_cuda else torch.float32
    print(f"# device {harness.device_name(device)}, backends {backends}, threads {torch.get_num_threads()}", flush=True)
    rows: list[dict] = []
    validated: dict[tuple, float] = {}
    for shape in args.shapes:
        n, k = parse_shape(shape)
        gen = torch.Generator().manual_seed(n * 7 + k)
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
        dense = {dt: w.to(dt) for dt in base_dtypes}
        packs = {fmt: random_packed(fmt, n, k, seed=n + k).to(device) for fmt in args.formats}
        for m in args.m:
            x = torch.randn(m, k, generator=gen).to(device)
            xb = x.to(x_dtype)
            fns, dense_rows, packed_rows = {}, [], []
            for dt in base_dtypes:
                xd, wd = x.to(dt), dense[dt]
                label = f"F.linear {str(dt).replace('torch.', '')}"
                fns[label] = lambda xd=xd, wd=wd: F.linear(xd, wd)
                nbytes = n * k * wd.element_size() + m * k * xd.element_size() + m * n * xd.element_size()
                dense_rows.append(dict(shape=shape, N=n, K=k, M=m, impl=label, format="dense", act_bits=16,
                                       bits_per_weight=8 * wd.element_size(), bytes=nbytes))  # fmt: skip
            for fmt, p in packs.items():
                for be, fn in impls(backends, args.cpu_isas):
                    for ab in args.act_bits:
                        key = (shape, fmt, be, ab)
                        if key not in validated:  # once per weight and path, on 3 tokens
                            xv = torch.randn(3, k, generator=gen).to(device, x_dtype)
                            validated[key] = max_rel_err(fn(xv, p, ab), binary_linear_ref(xv, p, ab))
                        if validated[key] > args.tol:
                            raise RuntimeError(f"{be} {fmt} A{ab} {shape}: max error {validated[key]:.3g} > {args.tol} vs reference")
                        label = f"{be} A{ab} {fmt}"
                        if be in BACKENDS:  # the bound call BinaryLinear.forward makes, and the plain one
                            from onebit.ops import bind

                            fns[label] = lambda run=bind(p, ab, backend=be): run(xb)
                            fns[label + " unbound"] = lambda fn=fn, p=p, ab=ab: fn(xb, p, ab)
                        else:  # a forced ISA path: only the backend function
                            fns[label] = lambda fn=fn, p=p, ab=ab: fn(xb, p, ab)
                        if m == 1 and not args.no_op and be in BACKENDS:
                            from onebit.ops import binary_linear

                            fns[label + " op"] = lambda p=p, ab=ab, be=be: binary_linear(xb, p, ab, backend=be)
                        packed_rows.append((label, be, fmt, ab, p))
            t = time_all(fns)
            base_us: dict[str, float] = {}
            for row in dense_rows:
                nbytes = row["bytes"]
                row.update(_metrics(t[row["impl"]], nbytes))
                base_us[row["impl"]] = row["time_us"]
                rows.append(row)
                print(_fmt_row(row, base_us), flush=True)
            fp32_label = next(iter(base_us))
            for label, be, fmt, ab, p in packed_rows:
                nbytes = stored_bits(p) // 8 + m * k * xb.element_size() + m * n * 4
                row = dict(shape=shape, N=n, K=k, M=m, impl=f"{be} A{ab}", format=fmt, act_bits=ab,
                           bits_per_weight=round(bits_per_weight(p), 4), bytes=nbytes, **_metrics(t[label], nbytes))
                row["max_rel_err"] = validated[(shape, fmt, be, ab)]
                for base_label, us in base_us.items():
                    row[f"speedup_vs_{base_label.split()[-1]}"] = round(us / row["time_us"], 3)
                if be.startswith("cpu"):
                    from onebit.backends.cpu import get_lut_weight

                    row["kernel_bytes"] = get_lut_weight(p).nbytes()
                if label + " unbound" in t:
                    row["unbound_us"] = round(t[label + " unbound"]["median_us"], 2)
                if label + " op" in t:
                    row["op_us"] = round(t[label + " op"]["median_us"], 2)
                rows.append(row)
                print(_fmt_row(row, base_us, fp32_label), flush=True)
    return rows


def _metrics(t: dict, nbytes: int) -> dict:
    return {
        "time_us": round(t["median_us"], 2),
        "p10_us": round(t["p10_us"], 2),
        "p90_us": round(t["p90_us"], 2),
        "gbps": round(nbytes / (t["median_us"] * 1e-6) / 1e9, 2),
    }


def _fmt_row(r: dict, base: dict, fp32_label: str | None = None) -> str:
    s = (
        f"{r['shape']:>11} M={r['M']:<4} {r['impl']:<16} {r['format']:<6} {r['time_us']:>10.1f} us "
        f"[{r['p10_us']:.1f}, {r['p90_us']:.1f}] {r['gbps']:>7.1f} GB/s {r['bits_per_weight']:>6} b/w"
    )
    if fp32_label:
        s += f"  x{base[fp32_label] / r['time_us']:.1f} vs {fp32_label}"
    return s


def plot(rows: list[dict], path: str, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    threads = rows[0].get("threads")
    rows = [r for r in rows if r.get("threads") == threads]  # one thread count per plot
    ms = sorted({r["M"] for r in rows})
    fig, axes = plt.subplots(1, len(ms), figsize=(4.5 * len(ms), 4.2), squeeze=False)
    for ax, m in zip(axes[0], ms):
        sub = [r for r in rows if r["M"] == m and "speedup_vs_float32" in r or (r["M"] == m and "speedup_vs_float16" in r)]
        shapes = list(dict.fromkeys(r["shape"] for r in rows if r["M"] == m))
        key = "speedup_vs_float32" if device == "cpu" else "speedup_vs_float16"
        for series in dict.fromkeys((r["impl"], r["format"]) for r in sub):
            ys = [next((r[key] for r in sub if (r["impl"], r["format"]) == series and r["shape"] == s), float("nan")) for s in shapes]
            ax.plot(range(len(shapes)), ys, marker="o", label=f"{series[0]} {series[1]}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=60, fontsize=7)
        ax.set_title(f"M={m}, {threads} thread(s)")
        ax.set_ylabel(f"speedup vs F.linear {'fp32' if device == 'cpu' else 'fp16'}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=LLAMA_SHAPES + SMOLLM_SHAPES, help="N x K, e.g. 4096x4096")
    ap.add_argument("--m", nargs="+", type=int, default=M_VALUES)
    ap.add_argument("--formats", nargs="+", default=["single", "cgb"], choices=["single", "cgb"])
    ap.add_argument("--act-bits", nargs="+", type=int, default=[16, 8], choices=[16, 8])
    ap.add_argument("--backends", nargs="+", default=None, help="restrict to these backends")
    ap.add_argument("--cpu-isas", nargs="*", default=["avx512"],
                    help="also time the CPU backend forced onto these ISA paths (avx512 = the LUT kernel, no AMX); "
                    "the path `cpu` dispatches to is not timed twice; `lut`: the lookup tables at every M, never the "
                    "dense A16 prefill path")
    ap.add_argument("--include-ref", action="store_true", help="also time the torch reference backend")
    ap.add_argument("--no-op", action="store_true", help="skip timing through the custom op")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-time", type=float, default=2.0, help="seconds per measurement at most (CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the kernels use torch's pool)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing result file (e.g. another --threads)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max error / rms(ref) allowed in validation")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole grid this many times (rows tagged `run`): on shared machines whose speed "
                         "drifts for minutes, report.py takes the median over runs")
    ap.add_argument("--pause", type=float, default=20.0, help="seconds between repeats")
    ap.add_argument("--quick", action="store_true", help="4096x4096, 4096x11008 and SmolLM2 576x576, 1536x576; M 1 16 64")
    ap.add_argument("--name", default=None, help="result file stem (default bench_linear_<device>)")
    ap.add_argument("--out-dir", default=harness.RESULTS, help="directory for the result files (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes = ["4096x4096", "4096x11008", "576x576", "1536x576"]
        args.m = [1, 16, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for rep in range(args.repeat):
        if rep:
            time.sleep(args.pause)
        rows += [dict(r, run=rep) for r in run(args)]
    for r in rows:
        r["threads"] = torch.get_num_threads()
    dev = "cpu" if args.device == "cpu" else "cuda"
    name = args.name or f"bench_linear_{dev}"
    meta = harness.metadata(args.device, shapes=args.shapes, m=args.m, formats=args.formats, salient_per_block=SALIENT_PER_BLOCK)
    meta, rows = harness.merge_previous(name, meta, rows, args.append, out_dir=args.out_dir)
    paths = harness.write_results(name, meta, rows, out_dir=args.out_dir)
    print("wrote", *paths)
    plot(rows, os.path.join(args.out_dir, f"{name}.png"), dev)


if __name__ == "__main__":
    main()
