"""Quality of every onebit method on SmolLM2-135M under one protocol.

Protocol (defaults; all flags are recorded in the output):
  calibration  c4.utf8, first half by characters (onebit.data.split_text), --nsamples x
               --seqlen random windows, --seeds
  evaluation   on wiki.utf8 (doc markers stripped) and on the held-out second half of
               c4.utf8, --eval-tokens each, windows of --eval-seqlen tokens: perplexity and
               log-perplexity (mean NLL), mean per-token KL(FP || quantized) of the next-token
               distributions and top-1 agreement with the FP model (whose distributions are
               computed once per invocation and cached), and the calibration's per-layer
               relative output error (mean, and per role)
  bits         true bits per weight over the quantized linears (everything stored), and
               the papers' sign-bit figure

Writes benchmarks/results/quality.json, quality.csv and quality.png (ppl vs true bits).
Results are appended per run (one JSON file accumulates rows keyed by run id), so a
long protocol can be split over several invocations.

    python benchmarks/quality.py --methods rtn,billm,arb-x,arb-rc,oa --layers 0-9
    python benchmarks/quality.py --methods arb-rc --ablations compensation=exact
    python benchmarks/quality.py --methods arb-rc --ablations late_layers=down --no-baseline  # fair baseline

benchmarks/report.py turns the rows into the README tables (mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import time
from pathlib import Path

import harness  # benchmarks/harness.py (scripts run from this folder)
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_layers(spec: str, n_blocks: int) -> tuple[str, ...]:
    """--layers -> modules_to_not_convert entries (suffixes of qualified names).

    spec: "all", "mlp", "attn", a block range "a-b", or "mlp:a-b" / "attn:a-b".
    """
    kind, _, rng = spec.partition(":") if ":" in spec else (spec, "", "")
    if kind[:1].isdigit():
        kind, rng = "all", kind
    skip: list[str] = []
    if kind == "mlp":
        skip += ["q_proj", "k_proj", "v_proj", "o_proj"]
    elif kind == "attn":
        skip += ["gate_proj", "up_proj", "down_proj"]
    elif kind != "all":
        raise SystemExit(f"--layers: unknown kind {kind!r}")
    if rng:
        a, _, b = rng.partition("-")
        keep = set(range(int(a), int(b or a) + 1))
        skip += [f"layers.{i}.{s}" for i in range(n_blocks) if i not in keep for s in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    return ("lm_head", *skip)


def parse_ablations(spec: str) -> list[dict]:
    """"compensation=exact;amp=off,b_schedule=sweep" -> [{compensation: exact}, {amp: off, b_schedule: sweep}]"""
    out = []
    for group in filter(None, spec.split(";")):
        d = {}
        for kv in group.split(","):
            k, _, v = kv.partition("=")
            d[k.strip()] = _coerce(v.strip())
        out.append(d)
    return out


def config_overrides(abl: dict) -> dict:
    """Ablation values -> QuantConfig kwargs; tuple fields take '+'-separated items
    (oa_layers=q, late_layers=down, oa_layers=gate+up)."""
    import dataclasses

    from onebit.config import QuantConfig

    tuples = {f.name for f in dataclasses.fields(QuantConfig) if isinstance(f.default, tuple)}
    return {k: tuple(str(v).split("+")) if k in tuples else v for k, v in abl.items()}


def _coerce(v: str):
    if v in ("true", "false"):
        return v == "true"
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return v


def bits_summary(model) -> dict:
    from onebit.format import sign_bits_per_weight
    from onebit.nn import BinaryLinear

    tot_bits = tot_w = sign_bits = 0.0
    for m in model.modules():
        if isinstance(m, BinaryLinear):
            n = m.in_features * m.out_features
            tot_bits += m.bits_per_weight() * n  # as stored (format v2 since it exists)
            sign_bits += sign_bits_per_weight(m.packed) * n
            tot_w += n
    return {
        "quantized_weights": int(tot_w),
        "true_bpw": tot_bits / tot_w if tot_w else 16.0,
        "sign_bpw": sign_bits / tot_w if tot_w else 16.0,
    }


def layer_errors(layers: dict) -> dict:
    """Mean relative output error of the quantized layers, overall and per role (q_proj, ...)."""
    errs = {n: v["rel_err"] for n, v in layers.items()}
    roles: dict[str, list[float]] = {}
    for n, e in errs.items():
        roles.setdefault(n.rsplit(".", 1)[-1], []).append(e)
    return {
        "mean_layer_rel_err": sum(errs.values()) / len(errs),
        "rel_err_by_role": {r: sum(v) / len(v) for r, v in roles.items()},
    }


def densify(model) -> None:
    from torch import nn

    from onebit.nn import BinaryLinear

    for name, m in list(model.named_modules()):
        if isinstance(m, BinaryLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize()
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            model.set_submodule(name, lin)


def layer_timing(out: Path, threads: int = 1, tokens: int = 4096) -> dict:
    """Seconds per quantize_layer call on SmolLM2-135M layer shapes (random weights and
    statistics, one thread), and per decoder block (q,o + k,v + gate,up + down)."""
    from onebit.config import QuantConfig
    from onebit.quant import quantize_layer

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shapes = {"q/o": (576, 576, 2), "k/v": (192, 576, 2), "gate/up": (1536, 576, 2), "down": (576, 1536, 1)}
    stats = {}
    for k in (576, 1536):
        X = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.05 + torch.eye(k))
        Xq = X + 0.1 * torch.randn(tokens, k, generator=g)
        stats[k] = (2 * Xq.T @ Xq / tokens, Xq.T @ X / tokens, Xq.T @ Xq / tokens)
    res: dict = {"device": "cpu", "device_name": harness.device_name("cpu"), "threads": threads, "tokens": tokens,
                 "methods": {}}  # fmt: skip
    for m in ("rtn", "billm", "arb", "arb-x", "arb-rc", "oa"):
        per, block = {}, 0.0
        for name, (n, k, mult) in shapes.items():
            H, S, Sq = stats[k]
            w = torch.randn(n, k, generator=g) * 0.02
            t = time.perf_counter()
            quantize_layer(w, QuantConfig(method=m), H=H, S=S, Sq=Sq, is_oa_layer=name == "down")
            per[name] = time.perf_counter() - t
            block += per[name] * mult
        res["methods"][m] = {"per_layer_s": per, "per_block_s": block}
        print(m, json.dumps(res["methods"][m]), flush=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="fp,rtn,billm,arb,arb-x,arb-rc,oa")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--ablations", default="", help="';'-separated config overrides, each run per method")
    ap.add_argument("--no-baseline", action="store_true", help="with --ablations, skip the default-config run")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant-threads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for forwards / eval (0: torch default)")
    ap.add_argument("--out", default=str(RESULTS / "quality"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "onebit" / "quality"),
                    help="where the FP reference distributions are cached")  # fmt: skip
    ap.add_argument(
        "--eval-packed", action="store_true",
        help="evaluate through BinaryLinear (packed op) instead of dense dequantized weights",
    )  # fmt: skip
    ap.add_argument("--layer-timing", action="store_true", help="only time quantize_layer on SmolLM2 shapes")
    ap.add_argument("--replot", action="store_true", help="only rewrite OUT.csv and OUT.png from OUT.json")
    args = ap.parse_args()
    if args.replot:
        write(json.loads(Path(args.out + ".json").read_text()), args.out)
        return
    if args.layer_timing:
        layer_timing(RESULTS / "quant_timing.json", args.quant_threads)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("ONEBIT_DATA_DIR", "/work/shared/data")
    from onebit.calib import quantize_calibrated
    from onebit.config import QuantConfig
    from onebit.data import calibration_ids, load_text, split_text
    from onebit.models import load_model, quantize_model

    t0 = time.time()
    base, tok = load_model(args.model)
    print(f"loaded {args.model} in {time.time() - t0:.0f}s", flush=True)
    n_blocks = len(base.model.layers)
    calib_text = split_text(load_text("c4"), 0.5)[0]
    evals = eval_texts(tok, args.eval_tokens)
    skip = parse_layers(args.layers, n_blocks)
    ablations = ([] if args.no_baseline else [{}]) + parse_ablations(args.ablations) if args.ablations else [{}]

    env = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "device_name": harness.device_name("cpu"), "cpu_threads": torch.get_num_threads(), "device": "cpu",
    }  # fmt: skip
    refs = {name: cached_reference(base, ids, args, name) for name, ids in evals.items()}

    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        calib = calibration_ids(tok, calib_text, args.nsamples, args.seqlen, seed)
        for method in args.methods.split(","):
            if method in ("fp", "rtn") and seed != seeds[0]:
                continue  # no calibration data: the same model for every seed
            for abl in ablations if method not in ("fp", "rtn") else [{}]:
                row = {
                    "method": method, "seed": seed, "layers": args.layers, "nsamples": args.nsamples,
                    "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen, "ablation": abl, "tag": args.tag,
                    "model": args.model, "block_size": args.block_size,
                }  # fmt: skip
                t = time.time()
                model = copy.deepcopy(base)
                if method == "fp":
                    row.update({"true_bpw": 32.0, "sign_bpw": 32.0, "quant_seconds": 0.0})
                else:
                    cfg = QuantConfig(method=method, block_size=args.block_size, modules_to_not_convert=skip,
                                      **config_overrides(abl))  # fmt: skip
                    row["config"] = cfg.to_dict()
                    if method == "rtn":
                        quantize_model(model, cfg, progress=False)
                    else:
                        stats = quantize_calibrated(
                            model, cfg, calib, progress=False, quant_threads=args.quant_threads
                        )
                        row.update(layer_errors(stats["layers"]))
                        fp_errs = [v["rel_err_fp"] for v in stats["layers"].values() if "rel_err_fp" in v]
                        if fp_errs:
                            row["mean_oa_layer_rel_err_fp"] = sum(fp_errs) / len(fp_errs)
                    row["quant_seconds"] = time.time() - t
                    row.update(bits_summary(model))
                if method != "fp" and not args.eval_packed:
                    # Same weights, dense: the packed op equals x @ dequantize(W)^T (tested in
                    # tests/test_calib.py); the dense path is several times faster on CPU.
                    densify(model)
                row["eval_path"] = "packed" if args.eval_packed else "dense-dequantized"
                t = time.time()
                row.update(evaluate(model, refs))
                row["eval_seconds"] = time.time() - t
                del model
                row["commit"] = harness.git_commit()
                print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
                append_row(row, env, args.out)


METHOD_COLORS = {"rtn": "tab:gray", "billm": "tab:purple", "arb": "tab:orange", "arb-x": "tab:brown",
                 "arb-rc": "tab:red", "oa": "tab:blue"}  # fmt: skip
METRICS = ("true_bpw", "sign_bpw", "ppl_wiki", "nll_wiki", "kl_wiki", "top1_wiki", "ppl_c4", "nll_c4", "kl_c4",
           "top1_c4", "mean_layer_rel_err", "quant_seconds")  # fmt: skip


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of one configuration (method, ablation, layers, calibration size) over seeds ->
    one dict with the mean of every metric, its sample standard deviation (`_sd`), and
    `seeds`. ppl is averaged as exp(mean NLL), the geometric mean, which matches log-ppl."""
    import math
    import statistics

    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], json.dumps(r.get("ablation") or {}, sort_keys=True), r["layers"], r.get("nsamples"),
               r.get("seqlen"))  # fmt: skip
        keyed.setdefault(key, []).append(r)
    out = []
    for (method, abl, layers, ns, sl), rs in keyed.items():
        g = {"method": method, "ablation": json.loads(abl), "layers": layers, "nsamples": ns, "seqlen": sl,
             "seeds": sorted(r["seed"] for r in rs)}  # fmt: skip
        for k in METRICS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                continue
            g[k] = statistics.fmean(vals)
            g[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        for text in ("wiki", "c4"):
            if f"nll_{text}" in g:
                g[f"ppl_{text}"] = math.exp(g[f"nll_{text}"])
        out.append(g)
    return out


def eval_texts(tok, n_tokens: int) -> dict:
    """The protocol's evaluation token ids: wiki.utf8 and the held-out half of c4.utf8."""
    from onebit.data import load_text, split_text, tokenize

    held_out_c4 = split_text(load_text("c4"), 0.5)[1]
    return {"wiki": tokenize(tok, load_text("wiki"), n_tokens), "c4": tokenize(tok, held_out_c4, n_tokens)}


def evaluate(model, refs: dict) -> dict:
    """ppl, log-ppl, KL and top-1 against each text's FP Reference, keyed `<metric>_<text>`."""
    from onebit.eval import score

    res = {}
    for name, ref in refs.items():
        r = score(model, ref=ref, progress=False)
        res.update({f"ppl_{name}": r["ppl"], f"nll_{name}": r["nll"], f"kl_{name}": r["kl"],
                    f"top1_{name}": r["top1_agree"], f"tokens_{name}": r["tokens"]})  # fmt: skip
    return res


def checkpoint_study(doc: str, out_name: str, variants) -> None:
    """CLI of the one-checkpoint studies (a8_cost.py, scale_cost.py): evaluate `variants` of one
    checkpoint against the FP model on the protocol's texts; write results/<out_name>.json.

    variants: [(fields, prepare)]: prepare(model) changes a freshly loaded checkpoint in place
    and returns extra row fields; each row is fields + those + the metrics of `evaluate`.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--reference", default="smollm2-135m", help="the FP model KL / top-1 are measured against")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(harness.RESULTS, f"{out_name}.json"))
    args = ap.parse_args()

    os.environ.setdefault("ONEBIT_DATA_DIR", "/work/shared/data")
    from onebit.eval import reference
    from onebit.models import load_model

    fp, tok = load_model(args.reference)
    refs = {k: reference(fp, ids, args.seqlen, progress=False) for k, ids in eval_texts(tok, args.tokens).items()}
    del fp
    rows = []
    for fields, prepare in variants:
        model, _ = load_model(args.checkpoint)
        row = {**fields, **(prepare(model) or {})}
        t = time.time()
        row.update({**evaluate(model, refs), "eval_seconds": round(time.time() - t, 1)})
        print(json.dumps(row), flush=True)
        rows.append(row)
    config = getattr(model, "onebit_config", None)
    meta = harness.metadata("cpu", checkpoint=str(Path(args.checkpoint).resolve()),
                            method=config.method.value if config else None,
                            config=config.to_dict() if config else None)  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def cached_reference(base, ids, args, text: str):
    """The FP model's next-token distributions on `ids`, cached on disk per model, text,
    token count and window size, so that many short invocations share one computation."""
    import dataclasses

    from onebit.eval import Reference, reference

    path = Path(args.cache_dir) / f"ref_{args.model}_{text}_{args.eval_tokens}_{args.eval_seqlen}.pt"
    if path.exists():
        ref = Reference(**torch.load(path, weights_only=True))
        win = ids[: ids.numel() // args.eval_seqlen * args.eval_seqlen].reshape(-1, args.eval_seqlen)
        if torch.equal(ref.windows, win):
            return ref
        print(f"{path}: cached windows differ from this tokenization; recomputing", flush=True)
    t = time.time()
    ref = reference(base, ids, seqlen=args.eval_seqlen, progress=False)
    print(f"FP reference on {text} in {time.time() - t:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(dataclasses.asdict(ref), tmp)
    os.replace(tmp, path)
    return ref


def append_row(row: dict, env: dict, out: str) -> None:
    """Append one row to OUT.json under a file lock (several invocations may run side by
    side), then rewrite OUT.csv and OUT.png from all rows. The JSON is replaced atomically."""
    import fcntl

    path = Path(out + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
        doc["env"] = env
        doc["rows"].append(row)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        write(doc, out)


def write(doc: dict, out: str) -> None:
    rows = doc["rows"]
    cols = [
        "method", "ablation", "seed", "layers", "nsamples", "seqlen", "true_bpw", "sign_bpw", "ppl_wiki", "nll_wiki",
        "kl_wiki", "top1_wiki", "ppl_c4", "nll_c4", "kl_c4", "top1_c4", "mean_layer_rel_err",
        "mean_oa_layer_rel_err_fp", "quant_seconds", "eval_seconds", "tag",
    ]  # fmt: skip
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "ablation": json.dumps(r.get("ablation", {}))})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [g for g in aggregate(rows) if g["method"] != "fp" and not g["ablation"]]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for col, text in enumerate(("wiki", "c4")):
            for row, (metric, label) in enumerate((("nll", "log-perplexity (nats)"), ("kl", "KL(FP || quantized), nats"))):
                ax = axes[row, col]
                for layers, marker in zip(sorted({g["layers"] for g in groups}), "os^Dv"):
                    for g in (g for g in groups if g["layers"] == layers):
                        m, sd = g.get(f"{metric}_{text}"), g.get(f"{metric}_{text}_sd", 0.0)
                        if m is None:
                            continue
                        ax.errorbar(g["true_bpw"], m, yerr=sd or 0.0, fmt=marker, capsize=3,
                                    color=METHOD_COLORS.get(g["method"], "k"))  # fmt: skip
                        ax.annotate(f"{g['method']} [{layers}]", (g["true_bpw"], m), fontsize=7,
                                    xytext=(4, 2), textcoords="offset points")  # fmt: skip
                fp = [r.get(f"nll_{text}") for r in rows if r["method"] == "fp" and r.get(f"nll_{text}")]
                if metric == "nll" and fp:
                    ax.axhline(fp[0], ls="--", c="gray", label="FP")
                    ax.legend()
                ax.set_xlabel("true bits per weight (quantized linears, everything stored)")
                ax.set_ylabel(f"{label}, {text}")
                if metric == "kl":
                    ax.set_yscale("log")
        fig.suptitle("onebit methods on SmolLM2-135M")
        fig.tight_layout()
        fig.savefig(out + ".png", dpi=120)
        plt.close(fig)
    except Exception as e:  # the plot is a convenience; the JSON/CSV are the results
        print(f"plot failed: {e}")


if __name__ == "__main__":
    main()
