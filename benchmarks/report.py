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


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def quality_section() -> str:
    path = RESULTS / "quality.json"
    if not path.exists():
        return "_No quality results yet: run `python benchmarks/quality.py`._"
    data = json.loads(path.read_text())
    rows = data["rows"]
    cols = [("method", "method"), ("ablation", "ablation"), ("seed", "seed"), ("layers", "quantized blocks"),
            ("true_bpw", "true bits/w"), ("sign_bpw", "sign bits/w"), ("ppl_wiki", "ppl wiki"),
            ("ppl_c4", "ppl c4 held-out"), ("kl_wiki", "KL wiki"), ("top1_wiki", "top-1 wiki"),
            ("mean_layer_rel_err", "mean layer rel. err")]  # fmt: skip
    cols = [(k, h) for k, h in cols if any(k in r for r in rows)]
    body = []
    for r in rows:
        abl = r.get("ablation") or {}
        r = dict(r, ablation=", ".join(f"{k}={v}" for k, v in abl.items()) or "–")
        body.append([r.get(k) for k, _ in cols])
    first = rows[0]
    proto = (
        f"Protocol: SmolLM2-135M; calibration {first.get('nsamples')} x {first.get('seqlen')} tokens from the "
        f"first half of c4.utf8; perplexity on {first.get('tokens_wiki', '?')} tokens of wiki.utf8 and "
        f"{first.get('tokens_c4', '?')} held-out tokens of c4.utf8 (windows of {first.get('eval_seqlen')})."
    )
    img = "\n\n![quality vs true bits per weight](benchmarks/results/quality.png)" if (RESULTS / "quality.png").exists() else ""
    return proto + "\n\n" + _table([h for _, h in cols], body) + img


def linear_section() -> str:
    path = RESULTS / "bench_linear_cpu.csv"
    if not path.exists():
        return "_No kernel results yet: run `python benchmarks/bench_linear.py`._"
    meta = json.loads((RESULTS / "bench_linear_cpu.json").read_text())["meta"]
    rows = [r for r in csv.DictReader(path.open()) if r["threads"] == "1"]
    keep = [r for r in rows if r["shape"] in ("4096x4096", "11008x4096", "576x1536") and r["M"] in ("1", "16")]
    body = [[r["shape"], r["M"], r["impl"], r["format"], r["bits_per_weight"], r["time_us"], r["speedup_vs_float32"]]
            for r in keep]  # fmt: skip
    head = (f"CPU: {meta['device_name']}, torch {meta['torch']}, 1 thread, median times, `F.linear` measured in the "
            f"same run (commit {meta['git_commit'][:10]}).")  # fmt: skip
    img = "\n\n![kernel speed](benchmarks/results/bench_linear_cpu.png)" if (RESULTS / "bench_linear_cpu.png").exists() else ""
    return head + "\n\n" + _table(["shape (N x K)", "M", "impl", "format", "bits/w", "µs", "speedup vs fp32"], body) + img


def e2e_section() -> str:
    path = RESULTS / "bench_e2e_cpu.csv"
    if not path.exists():
        return "_No end-to-end results yet: run `python benchmarks/bench_e2e.py`._"
    rows = list(csv.DictReader(path.open()))
    body = [[r["variant"], r["backend"], r["threads"], r["prefill_tok_s"], r["decode_tok_s"], r["decode_speedup_vs_fp"],
             int(r["weight_bytes"]) / 2**20, int(r["peak_rss_bytes"]) / 2**20] for r in rows]  # fmt: skip
    return _table(["variant", "backend", "threads", "prefill tok/s", "decode tok/s", "decode vs fp",
                   "weights MiB", "peak RSS MiB"], body)  # fmt: skip


def calib_section() -> str:
    parts = []
    timing = RESULTS / "quant_timing.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        body = [[m, v["per_block_s"], *(v["per_layer_s"].get(k) for k in ("q/o", "k/v", "gate/up", "down"))]
                for m, v in t["methods"].items()]  # fmt: skip
        parts.append(f"Seconds per SmolLM2 decoder block, {t['threads']} thread, {t['tokens']} calibration tokens "
                     "(`benchmarks/quality.py --layer-timing`):\n\n"
                     + _table(["method", "per block", "q / o", "k / v", "gate / up", "down"], body))  # fmt: skip
    path = RESULTS / "bench_calib_cpu.json"
    if path.exists():
        d = json.loads(path.read_text())
        keys = ["method", "tokens", "per_block_s", "projected_full_model_s", "forward_s", "gram_s", "mask_search_s",
                "binarize_s", "oa_s", "gptq_s", "other_s"]  # fmt: skip
        parts.append(f"Stage breakdown of one profiled block ({d['meta']['threads']} thread, `benchmarks/bench_calib.py`; "
                     "stage seconds are cProfile cumulative times, the projection scales the unprofiled time to 30 blocks):"
                     "\n\n" + _table(keys, [[r.get(k) for k in keys] for r in d["rows"]]))  # fmt: skip
    return "\n\n".join(parts) or "_No calibration timing yet: run `python benchmarks/bench_calib.py`._"


SECTIONS = {"quality": quality_section, "linear": linear_section, "e2e": e2e_section, "calib": calib_section}


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
