"""End-to-end CPU (or GPU) speed of SmolLM2-135M: FP vs quantized, decode and prefill.

    python benchmarks/bench_e2e.py                        # fp32, rtn A16, rtn A8 on CPU
    python benchmarks/bench_e2e.py --variants fp rtn --decode-tokens 32

Each variant runs in its own subprocess so that its peak memory (ru_maxrss, the whole
process: Python, torch, tokenizer, model) is its own. Per variant:

* prefill tokens/s: one forward over a `--prompt-len` token prompt (batch 1), median of
  `--reps` runs;
* decode tokens/s: greedy decoding of `--decode-tokens` tokens one at a time with the KV
  cache, after the prefill (median of `--reps` runs);
* weight bytes: every parameter and buffer of the model (the tied embedding / lm_head stay
  in `--dtype`, fp32 by default, in all variants);
* agreement: the quantized model's logits on the prompt with the chosen backend vs the
  torch reference backend (max abs difference), so a fast wrong kernel cannot pass;
* where a decode step's time goes (`decode_ms_linear`, `_lm_head`, `_norm`, `_other`), from
  one more decode run with timers around those modules (decode_breakdown).

Variants: fp (fp32 weights), rtn (onebit rtn, single-term format, A16 through the `auto`
backend, i.e. onebit._C on CPU), rtn-a8 (same weights, int8 activations), cgb / cgb-a8
(the 6-term ARB-RC CGB layout that arb-rc / oa produce, filled with *random* signs, groups
and scales as in bench_linear.py: speed and memory only, its text is meaningless; an
arb-rc calibration takes far longer than a benchmark run on 2 cores; q/k/v_proj's second main
term drops some columns, as arb-rc's do: CGB_QKV_MAIN_KEEP), ckpt / ckpt-a8 (a onebit
checkpoint given with `--checkpoint DIR`, e.g. the real arb-rc model `onebit demo --out DIR`
saves; the default variants leave it out).
`--dtype bfloat16` runs everything but the packed weights in bf16 (activations, embedding,
lm_head, norms; on CPUs with AMX / AVX512-BF16 that is the fast float baseline): the
packed layers keep their fp16 scales and read bf16 activations.
`--head-dtype float16` (or bfloat16, or int8 with scales per row and 32 columns) keeps the
tied embedding / lm_head as one narrow copy run through onebit.head's dense kernel
(`compact_head`), in every variant given, fp included; speedups are still against the plain
fp row (head in `--dtype`). `--compile` times decode steps under torch.compile(fullgraph=True)
with a StaticCache instead (rows `decode_mode: compiled`, with `compile_s`, the first pass's
time, compilation included; prefill and the 8-token prompt before decoding stay eager; no
breakdown: its timers would break the graph).
Results: benchmarks/results/bench_e2e_<device>.{json,csv}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

VARIANTS = ("fp", "rtn", "rtn-a8", "cgb", "cgb-a8", "ckpt", "ckpt-a8")
# The cgb variant's q/k/v_proj: the second main term keeps this fraction of the first one's
# columns, as arb-rc's SmolLM2 q/k/v_proj do (0.83-0.93 in block 0 of a demo checkpoint), so
# the CPU backend gathers their main terms differently, as it does for a real checkpoint.
CGB_QKV_MAIN_KEEP = 0.88


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _float_parts_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer except the packed layers' (their scale dtype is part of the format)."""
    from onebit.nn import BinaryLinear

    for m in model.modules():
        if isinstance(m, BinaryLinear):
            continue
        for name, p in m.named_parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_breakdown(model: torch.nn.Module, step: Callable[[], None], n: int) -> dict:
    """ms per decode step spent in the decoder's linear layers (BinaryLinear or nn.Linear), the
    lm_head, the RMSNorms and everything else (attention, rotary, residuals, framework), from
    n steps with a timer around each such module's forward. The timers add ~1 us per call, so
    this is a separate run from the timed one."""
    from onebit.nn import BinaryLinear

    spent: dict[str, float] = {"linear": 0.0, "lm_head": 0.0, "norm": 0.0}
    wrapped = []

    def wrap(mod: torch.nn.Module, key: str) -> None:
        fwd = mod.forward

        def timed(*a, **k):
            t = time.perf_counter()
            out = fwd(*a, **k)
            spent[key] += time.perf_counter() - t
            return out

        wrapped.append((mod, mod.__dict__.get("forward")))  # an instance forward (hooks) to put back
        mod.forward = timed

    head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, BinaryLinear)) and m is not head:
            wrap(m, "linear")
    wrap(head, "lm_head")
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            wrap(m, "norm")
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        total = time.perf_counter() - t0
    finally:
        for m, own in wrapped:
            if own is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = own
    out = {f"decode_ms_{k}": round(v / n * 1e3, 2) for k, v in spent.items()}
    out["decode_ms_other"] = round((total - sum(spent.values())) / n * 1e3, 2)
    out["decode_ms_instrumented"] = round(total / n * 1e3, 2)
    return out


@torch.inference_mode()
def run_variant(variant: str, args: argparse.Namespace) -> dict:
    import onebit
    from onebit.nn import BinaryLinear

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if variant.startswith("ckpt"):
        if not args.checkpoint:
            raise SystemExit("variant ckpt needs --checkpoint DIR (a onebit checkpoint, e.g. from `onebit demo --out DIR`)")
        model, tok = onebit.load_model(args.checkpoint)
    else:
        model, tok = onebit.load_model(args.model)
    load_s = time.perf_counter() - t0
    quant_s = 0.0
    if variant.startswith("rtn"):
        t0 = time.perf_counter()
        onebit.quantize_model(model, onebit.QuantConfig(method="rtn"), progress=False)
        quant_s = time.perf_counter() - t0
    elif variant.startswith("cgb"):
        from bench_linear import random_packed

        from onebit.models import decoder_linears, set_module

        for i, (name, lin) in enumerate(decoder_linears(model)):
            keep = CGB_QKV_MAIN_KEEP if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") else 1.0
            packed = random_packed("cgb", lin.out_features, lin.in_features, seed=i, main_keep=keep)
            set_module(model, name, BinaryLinear.from_packed(packed, lin.bias))
    if variant != "fp":
        for m in model.modules():
            if isinstance(m, BinaryLinear):
                m.act_bits = 8 if variant.endswith("a8") else 16
    dtype = getattr(torch, args.dtype)
    _float_parts_to(model, dtype)
    if args.head_dtype:
        from onebit.head import compact_head

        compact_head(model, getattr(torch, args.head_dtype))
    model.to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(args.device)

    agree = None
    if variant != "fp":
        ref_logits = None
        for backend in ("torch", "auto"):
            for m in model.modules():
                if isinstance(m, BinaryLinear):
                    m.backend = backend
            logits = model(prompt[:, :16]).logits.float()
            if ref_logits is None:
                ref_logits = logits
        agree = float((logits - ref_logits).abs().max())
        from onebit.ops import resolve_backend

        backend_used = resolve_backend("auto", torch.device(args.device), 8 if variant.endswith("a8") else 16)
    else:
        backend_used = "F.linear"

    def prefill():
        out = model(prompt, use_cache=True)
        _sync(args.device)
        return out

    def decode():
        out = model(prompt[:, :8], use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(args.device)
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(args.device)
        return time.perf_counter() - t

    def breakdown() -> dict:
        out = model(prompt[:, :8], use_cache=True)
        state = {"past": out.past_key_values, "nxt": out.logits[:, -1:].argmax(-1)}

        def step() -> None:
            o = model(state["nxt"], past_key_values=state["past"], use_cache=True)
            state["past"], state["nxt"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
            _sync(args.device)

        return decode_breakdown(model, step, args.decode_tokens)

    compile_s = None
    if args.compile:
        decode, compile_s = _compiled_decode(model, prompt, args)

    prefill()  # warm-up (also builds the cpu backend's repacked weights)
    decode_times, prefill_times = [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        prefill()
        prefill_times.append(time.perf_counter() - t)
        decode_times.append(decode())
    pre, dec = statistics.median(prefill_times), statistics.median(decode_times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {
        "variant": variant,
        "dtype": args.dtype,
        "head_dtype": args.head_dtype or args.dtype,
        "head_kernel": "dense" if args.head_dtype else "F.linear",
        "decode_mode": "compiled" if args.compile else "eager",
        "compile_s": compile_s,
        "backend": backend_used,
        "threads": torch.get_num_threads(),
        "prefill_tok_s": round(args.prompt_len / pre, 1),
        "prefill_ms": round(pre * 1e3, 2),
        "prefill_spread_ms": [round(min(prefill_times) * 1e3, 2), round(max(prefill_times) * 1e3, 2)],
        "decode_tok_s": round(args.decode_tokens / dec, 2),
        "decode_ms_per_token": round(dec / args.decode_tokens * 1e3, 2),
        "decode_spread_ms_per_token": [round(min(decode_times) / args.decode_tokens * 1e3, 2),
                                       round(max(decode_times) / args.decode_tokens * 1e3, 2)],
        "weight_bytes": _model_bytes(model),
        "peak_rss_bytes": peak,
        "load_s": round(load_s, 1),
        "quantize_s": round(quant_s, 1),
        "max_abs_logit_diff_vs_torch_backend": agree,
    }
    if args.device.startswith("cuda"):
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    if not args.compile:  # the timers would break the compiled graph
        row.update(breakdown())
    return row


def _compiled_decode(model: torch.nn.Module, prompt: torch.Tensor, args: argparse.Namespace):
    """(decode() -> seconds for args.decode_tokens steps, compile seconds): the decode step under
    torch.compile(fullgraph=True) with a StaticCache (fixed shapes: one graph for every step);
    the 8-token prompt before it runs eagerly into the same cache."""
    from transformers import StaticCache

    n_pre = 8
    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=n_pre + args.decode_tokens + 1,
                        device=args.device, dtype=getattr(torch, args.dtype))  # fmt: skip

    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def decode() -> float:
        cache.reset()
        pos = torch.arange(n_pre, device=args.device)
        out = model(prompt[:, :n_pre], past_key_values=cache, cache_position=pos, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(args.device)
        t = time.perf_counter()
        for i in range(args.decode_tokens):
            nxt = compiled(nxt, torch.tensor([n_pre + i], device=args.device))[:, -1:].argmax(-1)
        _sync(args.device)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    decode()  # compiles on the first step
    return decode, round(time.perf_counter() - t0, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if not v.startswith("ckpt")], choices=VARIANTS)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="activations and float weights")
    ap.add_argument("--head-dtype", default=None, choices=("float16", "bfloat16", "int8"),
                    help="keep the lm_head (and the embedding tied to it) in this narrow dtype (onebit.head.compact_head)")
    ap.add_argument("--compile", action="store_true",
                    help="decode with torch.compile(fullgraph=True) and a StaticCache (prefill stays eager)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing result file (e.g. another --threads)")
    ap.add_argument("--out-dir", default=harness.RESULTS)
    ap.add_argument("--checkpoint", default=None, help="a onebit checkpoint directory for the ckpt / ckpt-a8 variants")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("@@RESULT@@" + json.dumps(run_variant(args.child, args)), flush=True)
        return
    rows = []
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--model", args.model, "--device", args.device,
               "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens), "--reps", str(args.reps), "--dtype", args.dtype]
        if args.head_dtype:
            cmd += ["--head-dtype", args.head_dtype]
        if args.compile:
            cmd += ["--compile"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"variant {v} failed")
        row = json.loads(lines[-1][len("@@RESULT@@"):])
        rows.append(row)
        print(f"{v:>7} {args.dtype} head {row['head_dtype']} ({row['head_kernel']}) [{row['backend']}]: prefill {row['prefill_tok_s']:8.1f} tok/s, decode {row['decode_tok_s']:7.2f} tok/s "
              f"({row['decode_ms_per_token']} ms/token), weights {row['weight_bytes'] / 2**20:.1f} MiB, "
              f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    dev = "cpu" if args.device == "cpu" else "cuda"
    meta = harness.metadata(args.device, model=args.model, checkpoint=args.checkpoint, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                            reps=args.reps)
    for r in rows:
        for k in ("prefill_spread_ms", "decode_spread_ms_per_token"):
            r[k] = "/".join(str(v) for v in r[k])
    meta, rows = harness.merge_previous(f"bench_e2e_{dev}", meta, rows, args.append, args.out_dir)
    # Speedups against the plain fp row (its head an nn.Linear in the float dtype) with the same threads and
    # dtype (the latest one).
    for r in rows:
        fp = next((f for f in reversed(rows) if f["variant"] == "fp" and f.get("threads") == r.get("threads")
                   and f.get("dtype", "float32") == r.get("dtype", "float32")
                   and f.get("head_kernel", "F.linear") == "F.linear"), None)  # fmt: skip
        if fp:
            r["decode_speedup_vs_fp"] = round(r["decode_tok_s"] / fp["decode_tok_s"], 3)
            r["prefill_speedup_vs_fp"] = round(r["prefill_tok_s"] / fp["prefill_tok_s"], 3)
    print("wrote", *harness.write_results(f"bench_e2e_{dev}", meta, rows, args.out_dir))


if __name__ == "__main__":
    main()
