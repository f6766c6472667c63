"""The `onebit` command line: quantize, eval, info, demo.

Every QuantConfig field is a `onebit quantize` option (`--block-size`, `--amp`, ...), built
from the dataclass so the CLI can never drift from the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from enum import Enum
from pathlib import Path

from onebit.config import QuantConfig


def _add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantizer options (QuantConfig fields)")
    for f in dataclasses.fields(QuantConfig):
        if f.name == "version":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, Enum):
            g.add_argument(flag, choices=[m.value for m in type(default)], default=None, help=f"default {default.value}")
        elif isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {default}")
        elif isinstance(default, tuple):
            g.add_argument(flag, default=None, help=f"comma-separated, default {','.join(default) or 'none'}")
        else:
            g.add_argument(flag, type=type(default), default=None, help=f"default {default}")


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    kw = {}
    for f in dataclasses.fields(QuantConfig):
        v = getattr(args, f.name, None)
        if v is None or f.name == "version":
            continue
        kw[f.name] = tuple(s for s in v.split(",") if s) if isinstance(f.default, tuple) else v
    return QuantConfig(**kw)


def _calib_ids(args, tokenizer):
    from onebit.data import calibration_ids, load_text, split_text

    text = load_text(args.calib_text)
    if args.calib_text == "c4":  # keep the second half of c4 held out for evaluation
        text = split_text(text)[0]
    return calibration_ids(tokenizer, text, args.nsamples, args.seqlen, args.seed)


def _eval_ids(tokenizer, source: str, max_tokens: int | None):
    from onebit.data import load_text, split_text, tokenize

    if source == "c4-heldout":
        return tokenize(tokenizer, split_text(load_text("c4"))[1], max_tokens)
    return tokenize(tokenizer, load_text(source), max_tokens)


def _save_dtype(args):
    from onebit.checkpoint import SAVE_DTYPES

    return SAVE_DTYPES.get(args.save_dtype)


def save_option(sp) -> None:
    sp.add_argument("--save-dtype", choices=["float16", "bfloat16", "keep"], default="float16",
                    help="dtype of the float tensors outside the packed layers (embeddings, norms) in the checkpoint; "
                         "loading casts them back. keep: as the model holds them (default float16)")  # fmt: skip


def cmd_quantize(args) -> int:
    from onebit.checkpoint import save_quantized
    from onebit.models import load_model, quantize_model

    config = _config_from_args(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, num_layers=args.num_layers)
    calib = _calib_ids(args, tokenizer) if config.needs_calibration else None
    kw = {}
    if config.needs_calibration:
        kw = {"checkpoint_dir": Path(args.out) / ".calib", "resume": args.resume}
    t1 = time.perf_counter()
    quantize_model(model, config, calib, **kw)
    if args.head_dtype == "int8":
        import torch

        from onebit.head import compact_head

        compact_head(model, torch.int8)
    t2 = time.perf_counter()
    save_quantized(model, args.out, config, tokenizer, float_dtype=_save_dtype(args))
    if "checkpoint_dir" in kw:  # the finished checkpoint supersedes the per-block resume files
        shutil.rmtree(kw["checkpoint_dir"], ignore_errors=True)
    print(json.dumps({"out": str(args.out), "method": config.method.value, "load_s": round(t1 - t0, 2),
                      "quantize_s": round(t2 - t1, 2), "save_s": round(time.perf_counter() - t2, 2)}))  # fmt: skip
    return 0


def model_report(model) -> dict:
    """Sizes of the decoder linears (packed or float) and true bits per weight."""
    from torch import nn

    from onebit.compact import bits_breakdown
    from onebit.models import decoder_layers
    from onebit.nn import BinaryLinear

    linear_bytes = linear_weights = 0
    parts: dict[str, int] = {}
    for m in decoder_layers(model).modules():
        if isinstance(m, BinaryLinear):
            stored = m.compact
            linear_bytes += sum(t.numel() * t.element_size() for t in stored.tensors().values())
            linear_weights += m.in_features * m.out_features
            for part, bits in bits_breakdown(stored).items():
                parts[part] = parts.get(part, 0) + bits
        elif isinstance(m, nn.Linear):  # left in floating point (e.g. --num-layers)
            linear_bytes += m.weight.numel() * m.weight.element_size()
            linear_weights += m.weight.numel()
            parts["float_linear"] = parts.get("float_linear", 0) + m.weight.numel() * m.weight.element_size() * 8
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:  # tied embeddings count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {
        "total_bytes": total, "linear_bytes": linear_bytes, "linear_weights": linear_weights,
        "bits_per_weight": 8 * linear_bytes / max(linear_weights, 1), "fp16_linear_bytes": 2 * linear_weights,
        "bits_per_weight_by_part": {k: v / max(linear_weights, 1) for k, v in parts.items()},
    }  # fmt: skip


def cmd_eval(args) -> int:
    from onebit.eval import compare_to_reference, perplexity, speed
    from onebit.models import load_model

    model, tokenizer = load_model(args.target)  # FP model or quantized checkpoint
    config = getattr(model, "onebit_config", None)
    ids = _eval_ids(tokenizer, args.text, args.max_tokens)
    res = {"target": args.target, "text": args.text}
    if args.act_bits is not None:
        res["act_bits"] = set_act_bits(model, args.act_bits)
    if args.head_dtype:
        import torch

        from onebit.head import compact_head

        compact_head(model, getattr(torch, args.head_dtype))
        res["head_dtype"] = args.head_dtype
    res.update(perplexity(model, ids, args.seqlen, batch_size=args.batch_size, progress=not args.json))
    res.update(model_report(model))
    res["method"] = config.method.value if config else "fp"
    res["options"] = config.to_dict() if config else None
    if args.compare_to:
        ref, _ = load_model(args.compare_to)
        res.update(compare_to_reference(model, ref, ids, args.seqlen, batch_size=args.batch_size, progress=not args.json))
    if args.speed:
        res.update(speed(model))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            if k != "options":
                print(f"{k:>20}: {v}")
    return 0


def set_act_bits(model, act_bits: int) -> int:
    """Run every BinaryLinear of `model` with A16 (exact) or A8 (int8 activations) kernels."""
    from onebit.nn import BinaryLinear

    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    if not layers:
        raise ValueError("--act-bits applies to quantized checkpoints; this model has no BinaryLinear layers")
    for m in layers:
        m.act_bits = act_bits
    return act_bits


def cmd_info(args) -> int:
    from onebit.hf import print_info  # method, options, format version, per-layer bits, sizes, float modules

    return print_info(args.dir, as_json=args.json)


def cmd_demo(args) -> int:
    """The README's first command: quantize the default model; show perplexity, size and speed."""
    import torch

    from onebit.checkpoint import load_quantized, save_quantized
    from onebit.eval import perplexity, speed
    from onebit.head import compact_head
    from onebit.models import load_model, quantize_model

    config = _config_from_args(args)
    model, tokenizer = load_model(args.model)
    ids = _eval_ids(tokenizer, args.text, args.max_tokens)
    rows = {}
    rows["fp"] = perplexity(model, ids, args.eval_seqlen) | model_report(model) | speed(model)
    calib = _calib_ids(args, tokenizer) if config.needs_calibration else None
    t0 = time.perf_counter()
    quantize_model(model, config, calib)
    qtime = time.perf_counter() - t0
    save_quantized(model, args.out, config, tokenizer, float_dtype=_save_dtype(args))
    model, _, _ = load_quantized(args.out)  # evaluate what was saved, not what is in memory
    rows[config.method.value] = perplexity(model, ids, args.eval_seqlen) | model_report(model) | speed(model)
    rows[config.method.value]["quantize_s"] = qtime
    # The same checkpoint with its float head as one int8 copy (`--head-dtype int8` on eval / generate / serve).
    compact_head(model, torch.int8)
    rows[config.method.value + " h8"] = perplexity(model, ids, args.eval_seqlen) | model_report(model) | speed(model)
    print(f"\nonebit demo: {args.model}, {ids.numel()} tokens of {args.text}, seqlen {args.eval_seqlen}; saved to {args.out}")
    print(f"{'model':>10} {'ppl':>10} {'linear MB':>10} {'bits/w':>7} {'total MB':>9} {'prefill t/s':>12} {'decode t/s':>11}")
    for name, r in rows.items():
        lin, bpw = r["linear_bytes"] / 1e6, f"{r['bits_per_weight']:.3f}"
        print(f"{name:>10} {r['ppl']:>10.2f} {lin:>10.2f} {bpw:>7} {r['total_bytes'] / 1e6:>9.1f} "
              f"{r['prefill_tok_s']:>12.1f} {r['decode_tok_s']:>11.1f}")  # fmt: skip
    print(f"{config.method.value} h8: the lm_head and its tied embedding as one int8 copy, a scale per 32 columns "
          "(onebit.compact_head)")
    parts = {k: v for k, v in rows[config.method.value]["bits_per_weight_by_part"].items() if v}
    print(f"{config.method.value} bits per weight by part: " + " + ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in parts.items()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onebit", description="1-bit post-training quantization with packed weights")
    sub = p.add_subparsers(dest="cmd", required=True)

    def calib_options(sp):
        sp.add_argument("--calib-text", default="c4", help="path, corpus name (c4, wiki, tiny) or hf:NAME")
        sp.add_argument("--nsamples", type=int, default=32, help="calibration sequences (papers: 128)")
        sp.add_argument("--seqlen", type=int, default=512, help="calibration sequence length (papers: 2048)")
        sp.add_argument("--seed", type=int, default=0)

    from onebit import generate, serve  # their subcommands: generate (text + tokens/s), serve (HTTP API)

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint directory")
    q.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a HF model id or a local directory")
    q.add_argument("--out", required=True)
    q.add_argument("--resume", action="store_true", help="continue an interrupted calibration run")
    q.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder blocks")
    q.add_argument("--head-dtype", choices=["int8"], default=None,
                   help="store the lm_head (and the embedding tied to it) as int8 with a scale per 32 columns; "
                        "it loads as such (checkpoint format v3)")  # fmt: skip
    calib_options(q)
    save_option(q)
    _add_config_options(q)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, size (and speed, KL) of a model or checkpoint")
    e.add_argument("target", help="checkpoint directory, smollm2-135m, or a HF model")
    e.add_argument("--text", default="wiki", help="path, corpus name, c4-heldout or hf:NAME")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=32768)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--compare-to", default=None, help="reference model for KL and top-1 agreement")
    e.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens per second")
    e.add_argument("--act-bits", type=int, choices=[16, 8], default=None,
                   help="run the packed layers with float (16) or int8 (8) activations")  # fmt: skip
    e.add_argument("--json", action="store_true", help="print one JSON object")
    generate.add_head_option(e)
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(fn=cmd_info)

    generate.add_parser(sub)
    serve.add_parser(sub)

    d = sub.add_parser("demo", help="quantize the default model and compare it with the FP model")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--out", default="onebit-demo")
    d.add_argument("--text", default="wiki")
    d.add_argument("--eval-seqlen", type=int, default=512)
    d.add_argument("--max-tokens", type=int, default=16384)
    d.add_argument("--json-out", default=None)
    calib_options(d)
    save_option(d)
    _add_config_options(d)
    # The demo shows a real 1-bit method: arb-rc was the best full-model method in
    # benchmarks/quality.py and takes ~5 minutes on 2 CPU cores; --method rtn is instant.
    d.set_defaults(fn=cmd_demo, method="arb-rc")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, OSError) as e:  # bad input, bad files, missing models: no traceback
        print(f"onebit: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
