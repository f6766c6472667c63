"""Regenerate the README's result sections from the committed result files.

    python benchmarks/report.py          # rewrites the blocks between <!-- report:NAME --> markers

Every number in those README sections comes from benchmarks/results/*, written by the
benchmark scripts in this folder; nothing is typed in by hand.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _fmt(v, digits: int = 3) -> str:
    if v in (None, ""):
        return "–"
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if abs(v) >= 1e4:
            return f"{v:.3g}"
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _table(header: list[str], rows: list[list], digits: int = 3) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c, digits) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pm(g: dict, key: str, digits: int = 3) -> str:
    """mean ± sd over seeds (just the value for one seed)."""
    if key not in g:
        return "–"
    if g["method"] == "fp" and key.startswith(("kl_", "top1_")):
        return "ref."  # the FP model is the reference these are measured against
    sd = g.get(key + "_sd", 0.0)
    if key.startswith("ppl_"):  # exp(mean log-ppl): its spread is the log-ppl column's
        sd = 0.0
    return _fmt(g[key], digits) + (f" ± {_fmt(sd, 2)}" if len(g["seeds"]) > 1 and sd else "")


QUALITY_COLS = [
    ("true_bpw", "true bits/w"), ("sign_bpw", "sign bits/w"), ("nll_wiki", "log-ppl wiki"), ("ppl_wiki", "ppl wiki"),
    ("kl_wiki", "KL wiki"), ("top1_wiki", "top-1 wiki"), ("nll_c4", "log-ppl c4"), ("ppl_c4", "ppl c4"),
    ("kl_c4", "KL c4"), ("top1_c4", "top-1 c4"), ("mean_layer_rel_err", "layer rel. err"),
]  # fmt: skip
ORDER = ("oa", "arb-rc", "arb-x", "billm")  # the paper's claim: each better than the next


def _quality_table(groups: list[dict], with_ablation: bool) -> str:
    head = ["method"] + (["ablation"] if with_ablation else []) + ["seeds"] + [h for _, h in QUALITY_COLS]
    body = []
    for g in groups:
        abl = ", ".join(f"{k}={v}" for k, v in g["ablation"].items()) or "–"
        row = [g["method"]] + ([abl] if with_ablation else []) + [len(g["seeds"])]
        row += [_pm(g, k) for k, _ in QUALITY_COLS]
        body.append(row)
    return _table(head, body)


def ordering_summary(rows: list[dict], layers: str) -> str:
    """Per seed and metric, does OA < ARB-RC < ARB-X < BiLLM hold (lower is better)?"""
    base = [r for r in rows if r["layers"] == layers and not r.get("ablation")]
    seeds = sorted({r["seed"] for r in base if r["method"] == "oa"})
    parts = []
    for metric in ("nll_wiki", "nll_c4", "kl_wiki", "kl_c4"):
        holds, pairs = 0, {f"{a}<{b}": 0 for a, b in zip(ORDER, ORDER[1:])}
        n = 0
        for seed in seeds:
            val = {r["method"]: r.get(metric) for r in base if r["seed"] == seed}
            if any(val.get(m) is None for m in ORDER):
                continue
            n += 1
            ok = [val[a] < val[b] for a, b in zip(ORDER, ORDER[1:])]
            holds += all(ok)
            for (a, b), o in zip(zip(ORDER, ORDER[1:]), ok):
                pairs[f"{a}<{b}"] += o
        if n:
            detail = ", ".join(f"{k} {v}/{n}" for k, v in pairs.items())
            parts.append(f"{metric}: full order in {holds}/{n} seeds ({detail})")
    return "; ".join(parts)


def quality_section() -> str:
    path = RESULTS / "quality.json"
    if not path.exists():
        return "_No quality results yet: run `python benchmarks/quality.py`._"
    from quality import aggregate  # benchmarks/quality.py: the same grouping as its plot

    rows = json.loads(path.read_text())["rows"]
    groups = aggregate(rows)
    first = next(r for r in rows if r["method"] != "fp")
    proto = (
        f"Protocol (`benchmarks/quality.py`): SmolLM2-135M; calibration {first['nsamples']} x {first['seqlen']} "
        f"tokens from the first half of c4.utf8 per seed; evaluation on {first['tokens_wiki']} scored tokens of "
        f"wiki.utf8 and {first['tokens_c4']} of the held-out half of c4.utf8 (windows of {first['eval_seqlen']}): "
        "log-ppl = mean NLL in nats, ppl = exp of the mean NLL over seeds, KL = mean per-token KL(FP || quantized), "
        "top-1 = agreement of the argmax with the FP model; mean ± sample standard deviation over calibration "
        "seeds. True bits/w counts everything stored for the quantized linears (signs, group bitmaps, fp16 "
        "scales, padding) in the format of the run: these rows predate format v2 and count v1 (see the bits "
        "section for both forms of the same checkpoints); sign bits/w is the papers' figure. lm_head and embeddings stay in full precision. "
        "Quantization time per method: see the calibration section (these runs shared the CPU)."
    )
    fp = [g for g in groups if g["method"] == "fp"]
    parts = [proto]
    regimes = sorted({g["layers"] for g in groups if g["method"] != "fp"}, key=lambda s: (s != "all", s))
    for layers in regimes:
        main = [g for g in fp + groups if g["layers"] == layers and not g["ablation"] and g["method"] != "fp"]
        main.sort(key=lambda g: ("fp rtn billm arb arb-x arb-rc oa".split() + [g["method"]]).index(g["method"]))
        if not main:
            continue
        title = "all 30 blocks quantized" if layers == "all" else f"blocks {layers} quantized, the rest FP"
        parts.append(f"**{title}**\n\n" + _quality_table(fp[:1] + main, False))
        order = ordering_summary(rows, layers)
        if order:
            parts.append(f"Paper's order OA < ARB-RC < ARB-X < BiLLM (per seed, lower is better): {order}.")
        abl = [g for g in groups if g["layers"] == layers and g["ablation"]]
        if abl:
            # defaults on the same seeds as the ablations, so each comparison is paired
            seeds = {s for a in abl for s in a["seeds"]}
            meths = {a["method"] for a in abl}
            ref = aggregate([r for r in rows if r["layers"] == layers and not r.get("ablation")
                             and r["seed"] in seeds and r["method"] in meths])  # fmt: skip
            parts.append(f"**Ablations, {title}** (rows without an ablation are the defaults)\n\n"
                         + _quality_table(ref + abl, True))  # fmt: skip
    if (RESULTS / "quality.png").exists():
        parts.append("![quality vs true bits per weight](benchmarks/results/quality.png)")
    return "\n\n".join(parts)


SPR = RESULTS / "sapphire_rapids"  # results from the project's earlier CPU machines (Intel, AMX)
AVX2 = RESULTS / "epyc_avx2"  # an AVX2-only AMD EPYC (no AVX-512): the AVX2 kernels' numbers


def _linear_rows(folder: Path, name: str = "bench_linear_cpu") -> tuple[dict, list[dict]] | None:
    """The meta and rows of a bench_linear result file (`--name`), None if absent."""
    path = folder / f"{name}.csv"
    if not path.exists():
        return None
    return json.loads((folder / f"{name}.json").read_text())["meta"], list(csv.DictReader(path.open()))


def _keyed_by_threads(rows: list[dict]) -> tuple[list[str], dict[tuple, dict]]:
    """The thread counts of bench_linear rows, and each row under (shape, M, impl, format, threads)."""
    threads = sorted({r["threads"] for r in rows}, key=int)
    return threads, {(r["shape"], r["M"], r["impl"], r["format"], r["threads"]): r for r in rows}


def _linear_by_threads(rows: list[dict], shapes: dict[str, tuple[str, ...]]) -> str:
    """One line per (shape, M, impl, format): time and speedup vs F.linear fp32 at each thread count."""
    threads, keyed = _keyed_by_threads(rows)
    head = ["shape (N x K)", "M", "impl", "format", "bits/w"]
    for t in threads:
        head += [f"µs, {t} thr.", f"vs fp32, {t} thr."]
    body = []
    for shape, ms in shapes.items():
        for m in ms:
            for impl, fmt in dict.fromkeys((r["impl"], r["format"]) for r in rows if r["shape"] == shape and r["M"] == m):
                line = [shape, int(m), impl, fmt, None]
                for t in threads:
                    r = keyed.get((shape, m, impl, fmt, t))
                    line[4] = line[4] or (r and r["bits_per_weight"])
                    line += [r and r["time_us"], r and r.get("speedup_vs_float32")]
                body.append(line)
    return _table(head, body)


def linear_section() -> str:
    cur = _linear_rows(RESULTS)
    if cur is None:
        return "_No kernel results yet: run `python benchmarks/bench_linear.py`._"
    meta, rows = cur
    img = "\n\n![kernel speed](benchmarks/results/bench_linear_cpu.png)" if (RESULTS / "bench_linear_cpu.png").exists() else ""
    out = (f"CPU: {meta['device_name']}, torch {meta['torch']}, median times, `F.linear` measured in the same run "
           f"(commit {meta['git_commit'][:10]}); `cpu` is the backend as dispatched (the AVX-512 lookup-table kernels "
           "here: this CPU has no AMX). The full grid (Llama shapes, M = 1, 4, 16, 64, 256) is in "
           "`benchmarks/results/bench_linear_cpu.csv`.\n\n"
           + _linear_by_threads(rows, {"4096x4096": ("1", "16", "256"), "576x1536": ("1", "16")}) + img)  # fmt: skip
    old = _linear_rows(SPR)
    if old is not None:
        meta, rows = old
        rows = [r for r in rows if r["threads"] == "1" and not r["impl"].startswith("cpu[")]
        out += (f"\n\nThe same benchmark on the project's earlier machines ({meta['device_name']}, commit "
                f"{meta['git_commit'][:10]}, 1 thread; `benchmarks/results/sapphire_rapids/`), where `cpu` runs A8 on "
                "AMX-INT8 from M = 5 and the CGB format's A16 on AMX-BF16:\n\n"
                + _linear_by_threads(rows, {"4096x4096": ("1", "16", "256")}))  # fmt: skip
    return out


def isa_section() -> str:
    """The same kernels forced onto each ISA path of this CPU, in one run (bench_linear --cpu-isas)."""
    res = _linear_rows(RESULTS, "bench_linear_cpu_isas")
    if res is None:
        return ("_No per-ISA results yet: run `python benchmarks/bench_linear.py --threads 1 --name bench_linear_cpu_isas "
                "--cpu-isas avx2 scalar --m 1 16`._")  # fmt: skip
    meta, rows = res
    shapes = {"4096x4096": ("1", "16"), "576x1536": ("1",)}  # the rest (11008x4096, 576x1536 M=16) is in the csv
    return (f"{meta['device_name']}, 1 thread, commit {meta['git_commit'][:10]} (more shapes in "
            "`benchmarks/results/bench_linear_cpu_isas.csv`): "
            "`cpu` as dispatched (AVX-512 here), `cpu[avx2]` and `cpu[scalar]` the paths a CPU without AVX-512 (or "
            "without AVX2) takes, forced on this one (`binary_linear_isa(..., isa=)`, as `ONEBIT_CPU_ISA` does):\n\n"
            + _linear_by_threads(rows, shapes))  # fmt: skip


def _prefill_table(folder: Path) -> str | None:
    res = _linear_rows(folder, "bench_linear_prefill")
    if res is None:
        return None
    meta, rows = res
    threads, keyed = _median_over_runs(rows)
    runs = max(r["runs"] for r in keyed.values())
    head = ["shape (N x K)", "M", "format", "threads", "F.linear fp32 µs", "lookups µs", "as dispatched µs",
            "dispatched vs lookups", "dispatched vs fp32"]  # fmt: skip
    body = []
    for shape, m, fmt, t in dict.fromkeys((k[0], k[1], k[3], k[4]) for k in keyed if k[2] == "cpu A16"):
        fp, lut, cur = (keyed.get((shape, m, impl, f, t)) for impl, f in
                        (("F.linear float32", "dense"), ("cpu[lut] A16", fmt), ("cpu A16", fmt)))  # fmt: skip
        if not (fp and lut and cur):
            continue
        body.append([shape, int(m), fmt, int(t), fp["time_us"], lut["time_us"], cur["time_us"],
                     f"{lut['time_us'] / cur['time_us']:.2f}x", f"{fp['time_us'] / cur['time_us']:.2f}x"])  # fmt: skip
    rel = folder.relative_to(ROOT)
    return (f"{meta['device_name']} ({', '.join(meta.get('cpu_isas', []))}), exact A16, medians over {runs} runs of "
            f"`bench_linear.py --cpu-isas lut` (commit {meta['git_commit'][:10]}, `{rel}/bench_linear_prefill.csv`): "
            "`lookups` forces the lookup-table kernels at every M, `as dispatched` is the backend's own choice (the "
            "dense path for multi-term weights from `dense_min_m(K, isa)` tokens, as the text above says):\n\n"
            + _table(head, body))  # fmt: skip


def prefill_section() -> str:
    """The CPU backend's dense A16 path against its lookup tables (bench_linear --cpu-isas lut)."""
    cur = _prefill_table(RESULTS)
    if cur is None:
        return ("_No prefill results yet: run `python benchmarks/bench_linear.py --shapes 576x576 1536x576 576x1536 "
                "192x576 4096x4096 --m 16 64 256 --act-bits 16 --cpu-isas lut --repeat 3 --name bench_linear_prefill`._")
    avx2 = _prefill_table(AVX2)
    if avx2 is not None:
        cur += "\n\nOn an AVX2-only machine (no AVX-512: the AVX2 lookups and expansion):\n\n" + avx2
    return cur


# The CPU targets of the kernels issue (4096x4096, single-term format unless said).
TARGETS = [
    ("exact A16, M=1", "<= 100 µs, >= 35x", ("4096x4096", "1", "cpu A16", "single"), 100.0, 35.0),
    ("A8, M=1", "<= 50 µs, >= 70x", ("4096x4096", "1", "cpu A8", "single"), 50.0, 70.0),
    ("A8, M=16", "<= 750 µs", ("4096x4096", "16", "cpu A8", "single"), 750.0, None),
    ("exact A16, M=16", "<= 750 µs", ("4096x4096", "16", "cpu A16", "single"), 750.0, None),
    ("CGB format A16, M=1", ">= 10x", ("4096x4096", "1", "cpu A16", "cgb"), None, 10.0),
    ("CGB format A8, M=1", ">= 10x", ("4096x4096", "1", "cpu A8", "cgb"), None, 10.0),
]  # fmt: skip


def _median_over_runs(rows: list[dict]) -> tuple[list[str], dict[tuple, dict]]:
    """bench_linear rows of one or more runs (`run` column): per (shape, M, impl, format, threads)
    the median time and speedup over the runs, and the runs' time range."""
    threads = sorted({r["threads"] for r in rows}, key=int)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["M"], r["impl"], r["format"], r["threads"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        us = sorted(float(r["time_us"]) for r in rs)
        xs = sorted(float(r["speedup_vs_float32"]) for r in rs if r.get("speedup_vs_float32"))
        out[key] = dict(time_us=statistics.median(us), speedup_vs_float32=statistics.median(xs) if xs else None,
                        lo=us[0], hi=us[-1], runs=len(rs))  # fmt: skip
    return threads, out


def targets_section() -> str:
    cur = _linear_rows(RESULTS, "bench_linear_targets") or _linear_rows(RESULTS)
    if cur is None:
        return "_No kernel results yet._"
    meta, rows = cur
    threads, keyed = _median_over_runs(rows)
    head = ["target", "asked"] + [f"{t} thread{'s' if t != '1' else ''}" for t in threads]
    body = []
    for name, asked, key, max_us, min_x in TARGETS:
        line = [name, asked]
        for t in threads:
            r = keyed.get(key + (t,))
            if r is None:
                line.append(None)
                continue
            us, x = r["time_us"], r["speedup_vs_float32"]
            ok = (max_us is None or us <= max_us) and (min_x is None or x >= min_x)
            spread = f" ({_fmt(r['lo'])}-{_fmt(r['hi'])})" if r["runs"] > 1 else ""
            line.append(f"{_fmt(us)} µs{spread}, {_fmt(x)}x: {'met' if ok else 'not met'}")
        body.append(line)
    stream = RESULTS / "bench_stream_cpu.csv"
    stream_runs = 1
    if stream.exists():
        srows = list(csv.DictReader(stream.open()))
        for shape in dict.fromkeys(r["shape"] for r in srows):
            for ab in ("16", "8"):
                line = [f"{shape} A{ab}, M=1, weights from DRAM", "<= 1.3x the streaming limit"]
                for t in threads:
                    rs = [r for r in srows if r["shape"] == shape and r["act_bits"] == ab and r["threads"] == t]
                    if not rs:
                        line.append(None)
                        continue
                    # Median over the runs (bench_stream --repeat) of the time and of its ratio to
                    # the same run's streaming read, with the ratio's range.
                    ratio = sorted(float(r["vs_stream"]) for r in rs)
                    med = statistics.median
                    spread = f", {_fmt(ratio[0])}-{_fmt(ratio[-1])}x" if len(rs) > 1 else ""
                    stream_runs = max(stream_runs, len(rs))
                    line.append(f"{_fmt(med(float(r['time_us']) for r in rs))} µs = {_fmt(med(ratio))}x ("
                                f"{_fmt(med(float(r['stream_gbps']) for r in rs))} GB/s{spread}): "
                                f"{'met' if med(ratio) <= 1.3 else 'not met'}")
                body.append(line)
    runs = max(r["runs"] for r in keyed.values())
    how = (f"medians over {runs} runs of `bench_linear.py --repeat` a few minutes apart (range of the runs' times in "
           f"parentheses; commit {meta['git_commit'][:10]}, `benchmarks/results/bench_linear_targets.csv`)"
           if runs > 1 else "`bench_linear.py`")  # fmt: skip
    return (f"{meta['device_name']}, speedups against `F.linear` fp32 in the same run and thread count "
            f"({how}; DRAM rows: `bench_stream.py`, each layer in copies 4x the last-level cache called round "
            "robin, against `torch.sum`'s read bandwidth over 512 MB in the same run"
            + (f", medians over {stream_runs} runs with the range of the ratio" if stream_runs > 1 else "")
            + "):\n\n" + _table(head, body))


def _head(r: dict) -> str:
    dt = r.get("head_dtype") or r.get("dtype") or "float32"
    return dt + (" dense" if r.get("head_kernel") in ("dense", "dense16") else "")  # dense16: rows before int8 heads


def _variant(r: dict) -> str:
    return r["variant"] + (" compiled" if r.get("decode_mode") == "compiled" else "")


def _e2e_table(folder: Path) -> str | None:
    path = folder / "bench_e2e_cpu.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    meta = json.loads((folder / "bench_e2e_cpu.json").read_text())["meta"]
    body = [[_variant(r), r.get("dtype") or "float32", _head(r), r["backend"],
             r["threads"], r["prefill_tok_s"], r["decode_tok_s"],
             r["decode_speedup_vs_fp"], r["prefill_speedup_vs_fp"], int(r["weight_bytes"]) / 2**20,
             int(r["peak_rss_bytes"]) / 2**20] for r in rows]  # fmt: skip
    out = (f"CPU: {meta['device_name']}, commit {meta['git_commit'][:10]}; speedups against the fp row with the same "
           "float dtype and threads whose lm_head is an nn.Linear in that dtype (`lm_head`: its dtype, and `dense` where "
           "`--head-dtype` made it onebit's narrow head; `compiled`: decode steps under torch.compile with a static "
           "KV cache, `--compile`, prefill eager):\n\n"
           + _table(["variant", "float dtype", "lm_head", "backend", "threads", "prefill tok/s", "decode tok/s", "decode vs fp",
                     "prefill vs fp", "weights MiB", "peak RSS MiB"], body))  # fmt: skip
    parts = [r for r in rows if r.get("decode_ms_lm_head")]
    if parts:
        body = [[r["variant"], r.get("dtype") or "float32", _head(r), r["threads"],
                 r["decode_ms_instrumented"], r["decode_ms_linear"],
                 r["decode_ms_lm_head"], r["decode_ms_norm"], r["decode_ms_other"]] for r in parts]  # fmt: skip
        out += ("\n\nWhere a decode step's time goes (ms per token, one more decode run with a timer around each "
                "decoder linear layer, the lm_head and the RMSNorms; `other` is attention, rotary embedding, residuals "
                "and the framework):\n\n"
                + _table(["variant", "float dtype", "lm_head", "threads", "ms / token", "linear layers", "lm_head", "norms",
                          "other"], body))  # fmt: skip
    # Earlier code versions run back to back with the table above (bench_e2e_cpu_<commit>.json).
    for old in sorted(folder.glob("bench_e2e_cpu_*.json")):
        d = json.loads(old.read_text())
        body = [[r["variant"], r["threads"], r["prefill_tok_s"], r["decode_tok_s"], r.get("decode_speedup_vs_fp")]
                for r in d["rows"]]  # fmt: skip
        out += (f"\n\nThe same benchmark on commit {d['meta']['git_commit'][:7]}, run in the same session on the same "
                f"machine ({old.name}, run {d['meta'].get('date_utc', '?')}; the table above: "
                f"{meta.get('date_utc', '?')}):\n\n" + _table(["variant", "threads", "prefill tok/s", "decode tok/s", "decode vs fp"], body))
    return out


def e2e_section() -> str:
    cur = _e2e_table(RESULTS)
    if cur is None:
        return "_No end-to-end results yet: run `python benchmarks/bench_e2e.py`._"
    avx2 = _e2e_table(AVX2)
    if avx2 is not None:
        cur += ("\n\nOn an AVX2-only machine (an AMD EPYC without AVX-512, so the AVX2 kernels; "
                "`benchmarks/results/epyc_avx2/`), with `ckpt` the real arb-rc checkpoint that `onebit demo` saves "
                "(`--variants ckpt --checkpoint DIR`):\n\n" + avx2)
    old = _e2e_table(SPR)
    if old is not None:
        cur += "\n\nOn the project's earlier machines (`benchmarks/results/sapphire_rapids/`):\n\n" + old
    return cur


def _calib_parts(folder: Path) -> list[str]:
    parts = []
    timing = folder / "quant_timing.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        body = [[m, v["per_block_s"], *(v["per_layer_s"].get(k) for k in ("q/o", "k/v", "gate/up", "down"))]
                for m, v in t["methods"].items()]  # fmt: skip
        parts.append(f"Seconds per SmolLM2 decoder block, {t['threads']} thread, {t['tokens']} calibration tokens "
                     f"(`benchmarks/quality.py --layer-timing`, {t.get('device_name', 'CPU')}):\n\n"
                     + _table(["method", "per block", "q / o", "k / v", "gate / up", "down"], body))  # fmt: skip
    path = folder / "bench_calib_cpu.json"
    if path.exists():
        d = json.loads(path.read_text())
        keys = ["label", "method", "tokens", "per_block_s", "projected_full_model_s", "forward_s", "gram_s",
                "mask_search_s", "binarize_s", "oa_s", "gptq_s", "other_s"]  # fmt: skip
        parts.append(f"Stage breakdown of one profiled block ({d['meta']['threads']} thread, `benchmarks/bench_calib.py`, "
                     f"{d['meta'].get('device_name', 'CPU')}; runs labelled by code version, each before / after pair "
                     "back to back on the same machine; stage seconds are cProfile cumulative times, the projection "
                     "scales the unprofiled time to 30 blocks):\n\n"
                     + _table(keys, [[r.get(k) for k in keys] for r in d["rows"]]))  # fmt: skip
    return parts


def calib_section() -> str:
    parts = _calib_parts(RESULTS)
    old = _calib_parts(SPR)
    if old:
        parts.append("On the project's earlier Sapphire Rapids machines (`benchmarks/results/sapphire_rapids/`), "
                     "with the history of the calibration speed-ups:")
        parts += old
    return "\n\n".join(parts) or "_No calibration timing yet: run `python benchmarks/bench_calib.py`._"


def a8_section() -> str:
    path = RESULTS / "a8_cost.json"
    if not path.exists():
        return "_No A8 cost measured yet: run `python benchmarks/a8_cost.py CHECKPOINT`._"
    d = json.loads(path.read_text())
    keys = [("act_bits", "activations"), ("nll_wiki", "log-ppl wiki"), ("ppl_wiki", "ppl wiki"), ("kl_wiki", "KL wiki"),
            ("top1_wiki", "top-1 wiki"), ("nll_c4", "log-ppl c4"), ("ppl_c4", "ppl c4"), ("kl_c4", "KL c4"),
            ("top1_c4", "top-1 c4")]  # fmt: skip
    body = [[("int8 (A8)" if r["act_bits"] == 8 else "float (A16, exact)")] + [r[k] for k, _ in keys[1:]]
            for r in d["rows"]]  # fmt: skip
    m = d["meta"]
    head = (f"One {m.get('method')} checkpoint of SmolLM2-135M (all 30 blocks) run through the packed CPU kernels "
            f"with float and with per-token int8 activations, {d['rows'][0]['tokens_wiki']} scored tokens per text, "
            "KL and top-1 against the FP model (`benchmarks/a8_cost.py`):")  # fmt: skip
    return head + "\n\n" + _table([h for _, h in keys], body, digits=5)  # the differences are small


def scales_section() -> str:
    path, fp8 = RESULTS / "scale_cost.json", RESULTS / "scale_cost_fp8.json"
    if not path.exists():
        return "_No scale cost measured yet: run `python benchmarks/scale_cost.py CHECKPOINT`._"
    d = json.loads(path.read_text())
    rows = [dict(r, scales=f"{d['meta']['config']['scale_dtype']}, {r['scales']}") for r in d["rows"]]
    if fp8.exists():  # a checkpoint quantized with 8-bit scales (fits rounded before compensation)
        rows += [dict(r, scales="float8_e4m3fn, rounded inside the quantizer") for r in json.loads(fp8.read_text())["rows"]
                 if r["scales"] == "as stored"]  # fmt: skip
    keys = [("scales", "scales"), ("bits_per_weight", "true bits/w"), ("nll_wiki", "log-ppl wiki"), ("kl_wiki", "KL wiki"),
            ("top1_wiki", "top-1 wiki"), ("nll_c4", "log-ppl c4"), ("kl_c4", "KL c4"), ("top1_c4", "top-1 c4")]  # fmt: skip
    body = [[r[k] for k, _ in keys] for r in rows]
    m = d["meta"]
    head = (f"{m.get('method')} on SmolLM2-135M (all 30 blocks, seed 0), scales in fp16 as quantized, the same "
            "checkpoint with its scales rounded to float8 e4m3 (times a power of two per term and block) after "
            "quantization, and a checkpoint quantized with `--scale-dtype float8_e4m3fn` (each fit rounded before the "
            f"GPTQ update sees it); {rows[0]['tokens_wiki']} scored tokens per text, KL and top-1 against the FP model "
            "(`benchmarks/scale_cost.py`):")  # fmt: skip
    return head + "\n\n" + _table([h for _, h in keys], body, digits=4)


BIT_PARTS = [("sign", "sign"), ("second_sign", "2nd sign, used"), ("unused_sign", "2nd sign, unused"),
             ("group", "group bitmap"), ("padding", "padding"), ("salient_index", "salient index"),
             ("out_scale", "out_scale"), ("in_scale", "in_scale"), ("mean", "mean"), ("scale_exp", "scale exponents")]  # fmt: skip


def bits_section() -> str:
    path = RESULTS / "bits_breakdown.json"
    if not path.exists():
        return "_No breakdown yet: run `python benchmarks/bits.py CHECKPOINT...`._"
    rows = json.loads(path.read_text())["rows"]
    forms = [("stored (v2)", ""), ("kernels (v1)", "v1_")]
    parts = [(k, h) for k, h in BIT_PARTS if any(r.get(pre + k) for r in rows for _, pre in forms)]
    body = [[r["checkpoint"], r["method"], form, r["bits_per_weight" if not pre else "execution_bits_per_weight"],
             *(r.get(pre + k, 0) for k, _ in parts)] for r in rows for form, pre in forms]  # fmt: skip
    cfg = (" or ".join(sorted({r["scale_dtype"] for r in rows})) + " scales, blocks of "
           + " or ".join(sorted({str(r["block_size"]) for r in rows})) + " columns")  # fmt: skip
    parts_table = _table(["checkpoint", "method", "form", "true bits/w", *(h for _, h in parts)], body)
    sal = [r for r in rows if r.get("second_plane_cols")]
    sal_table = _table(
        ["checkpoint", "method", "used columns", "padded to 4 per block", "padded to 32 per block"],
        [[r["checkpoint"], r["method"], r["second_plane_cols"], r["second_plane_cols_pad4"], r["second_plane_cols_pad32"]]
         for r in sal],
    )  # fmt: skip
    return (f"Bits per weight of quantized checkpoints, split by part (`benchmarks/bits.py`; {cfg}). "
            "`stored (v2)` is what the checkpoint and the module buffers hold; `kernels (v1)` is the layout the "
            "kernels read, expanded when a backend is bound (the CPU backend then keeps only its own repacked "
            f"copy):\n\n{parts_table}\n\n"
            "Fraction of the columns a kernel-native compact second sign plane would keep: exactly the used ones, "
            "or each block's used columns padded to whole groups of 4 or 32:\n\n" + sal_table)  # fmt: skip


def head_section() -> str:
    path = RESULTS / "bench_head_cpu.csv"
    if not path.exists():
        return "_No head results yet: run `python benchmarks/bench_head.py`._"
    rows = list(csv.DictReader(path.open()))
    meta = json.loads((RESULTS / "bench_head_cpu.json").read_text())["meta"]
    threads = sorted({r["threads"] for r in rows}, key=int)
    keyed = {(r["head"], r["M"], r["impl"], r["threads"]): r for r in rows}
    order = list(dict.fromkeys((r["head"], r["M"], r["impl"]) for r in rows))
    head = ["head (N x K)", "M", "impl", "weight bytes"]
    for t in threads:
        head += [f"µs, {t} thr.", f"vs stream, {t} thr.", f"vs fp32, {t} thr."]
    body = []
    for h, m, impl in order:
        first = next(keyed[(h, m, impl, t)] for t in threads if (h, m, impl, t) in keyed)
        line = [f"{h} ({first['N']}x{first['K']})", m, impl, f"{int(first['weight_bytes']) / 2**20:.0f} MiB"]
        for t in threads:
            r = keyed.get((h, m, impl, t))
            line += [r["time_us"], r["vs_stream"], r["speedup_vs_fp32"]] if r else ["–"] * 3
        body.append(line)
    return (f"{meta['device_name']}, commit {meta['git_commit'][:10]} (`benchmarks/bench_head.py`, "
            "`benchmarks/results/bench_head_cpu.csv`): median times, the implementations timed round robin in one "
            f"process, {_cache_note(rows)}; `vs stream` is the time over what reading the weight bytes (int8: with "
            "its scales) at `torch.sum`'s streaming bandwidth (measured in the same run) takes:\n\n" + _table(head, body))


def _cache_note(rows: list[dict]) -> str:
    caches = {r.get("cache") or "hot" for r in rows}
    if caches == {"evicted"}:
        return "each call with the caches evicted first (as in a decode step)"
    return "back-to-back calls (weights partly in cache)" if caches == {"hot"} else "mixed cache states (see the csv)"


SECTIONS = {"quality": quality_section, "bits": bits_section, "linear": linear_section, "targets": targets_section,
            "e2e": e2e_section, "calib": calib_section, "a8": a8_section,
            "scales": scales_section, "isa": isa_section, "head": head_section, "prefill": prefill_section}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
