"""The calibration pipeline (spec section 1): quantize a model block by block, in place.

For each decoder block:
  1. pass A, quantized stream: hooks accumulate H = 2/T Xq^T Xq for every sublayer at once
     (BiLLM / ARB collect all inputs before any sublayer of the block is quantized);
  2. quantize those sublayers (GPTQ loop, onebit.quant.quantize_layer); the stream uses the
     dequantized weight, which is exactly what the packed layer computes;
  3. OA layers (method oa, roles in config.oa_layers): pass B runs both streams batch by
     batch, pairing the same tokens, to accumulate S = Xq^T X / T and Sq = Xq^T Xq / T after
     the block's other sublayers are quantized (xq_timing=after; `before` collects them in
     pass A instead), then quantize them; roles in config.late_layers (any method) get their
     H from that second pass too;
  4. re-run the block on the quantized stream (and the original block on the FP stream) to
     get the next block's inputs; swap the linears for BinaryLinear; checkpoint the block.

Stats are fp32. Per layer the result reports the relative output error on the quantized
stream, tr((W-Q) Sq (W-Q)^T) / tr(W Sq W^T), and, where both streams exist, the error
against the full-precision output ||X W^T - Xq Q^T||^2 / ||X W^T||^2.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from onebit.calib.capture import GramHooks, block_linears, capture_block0_inputs, decoder_blocks, run_block
from onebit.calib.checkpoint import load_block, save_block
from onebit.config import Method, QuantConfig, XqTiming
from onebit.format import PackedWeight, bits_per_weight, dequantize
from onebit.nn import BinaryLinear
from onebit.quant import quantize_layer

log = logging.getLogger(__name__)


@contextmanager
def _threads(n: int | None):
    # The binarizers are many small elementwise ops: on a shared 2-core CPU, one thread is
    # several times faster than two fighting over the cores.
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _rel_err_q(w: torch.Tensor, q: torch.Tensor, sq: torch.Tensor) -> float:
    e = w - q
    den = float(((w @ sq) * w).sum())
    return float(((e @ sq) * e).sum()) / max(den, 1e-30)


def _rel_err_fp(w, q, S, Sq, Sx) -> float:
    ref = float(((w @ Sx) * w).sum())
    err = ref - 2 * float(((w @ S.T) * q).sum()) + float(((q @ Sq) * q).sum())
    return max(err, 0.0) / max(ref, 1e-30)


@torch.no_grad()
def quantize_calibrated(
    model: nn.Module,
    config: QuantConfig,
    calib_ids: torch.Tensor,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    batch_size: int = 4,
    identity: bool = False,
    quant_threads: int | None = 1,
) -> dict[str, Any]:
    """Quantize every decoder nn.Linear of `model` in place (BinaryLinear.from_packed).

    calib_ids: LongTensor (n, seqlen). identity=True runs the whole two-stream machinery but
    leaves the weights unchanged (a test mode: both streams must then agree exactly).
    Returns {"layers": {name: stats}, "blocks": [...], "seconds": total}.
    """
    if calib_ids.dim() != 2 or calib_ids.dtype not in (torch.long, torch.int):
        raise ValueError(
            f"calib_ids must be a 2-D integer tensor (n, seqlen), got {calib_ids.dtype} {tuple(calib_ids.shape)}"
        )
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    t_start = time.time()
    prefix, blocks, table = decoder_blocks(model)
    was_training = model.training
    model.eval()
    inputs = capture_block0_inputs(model, blocks, calib_ids, batch_size)
    kws = [kw for _, kw in inputs]
    q_stream = [hs for hs, _ in inputs]
    two = identity or config.method is Method.OA
    fp_stream = [hs.clone() for hs in q_stream] if two else None
    tokens = int(calib_ids.numel())
    meta = {"config": config.to_dict(), "calib": [*calib_ids.shape, int(calib_ids.sum())], "identity": identity}
    result: dict[str, Any] = {"layers": {}, "blocks": [], "method": config.method.value}

    plan = []
    for i, block in enumerate(blocks):
        lins = [
            (rel, role, mod)
            for rel, role, mod in block_linears(block, table)
            if not any(f"{prefix}.{i}.{rel}".endswith(s) for s in config.modules_to_not_convert)
        ]
        plan.append(lins)
    total = sum(len(p) for p in plan)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"onebit {config.method.value}", unit="layer")

    for i, block in enumerate(blocks):
        t0 = time.time()
        lins = plan[i]
        ck = load_block(checkpoint_dir, i, meta) if resume else None
        fp_block = copy.deepcopy(block) if two else None
        if ck is not None:
            packed = ck["packed"]
            result["layers"].update(ck["stats"])
            for rel, _, mod in lins:
                mod.weight.data = dequantize(packed[rel]).to(mod.weight.dtype)
            if bar is not None:
                bar.update(len(lins))
        else:
            packed, stats = _quantize_block(
                i, block, fp_block, lins, q_stream, fp_stream, kws, config, tokens, identity, quant_threads, bar
            )
            result["layers"].update({f"{prefix}.{i}.{k}": v for k, v in stats.items()})
        # Next inputs: the quantized block on the quantized stream, the original on the FP one.
        q_stream = [run_block(block, hs, kw) for hs, kw in zip(q_stream, kws)]
        gap = None
        if two:
            fp_stream = [run_block(fp_block, hs, kw) for hs, kw in zip(fp_stream, kws)]
            gap = max(float((a - b).abs().max()) for a, b in zip(q_stream, fp_stream))
        del fp_block
        if not identity:
            for rel, _, mod in lins:
                block.set_submodule(rel, BinaryLinear.from_packed(packed[rel], mod.bias, scale_dtype=config.scale_dtype))
        if checkpoint_dir is not None and ck is None:
            stats_i = {k: v for k, v in result["layers"].items() if k.startswith(f"{prefix}.{i}.")}
            save_block(checkpoint_dir, i, meta, packed, stats_i)
        result["blocks"].append({"block": i, "seconds": time.time() - t0, "stream_gap": gap, "resumed": ck is not None})
    if bar is not None:
        bar.close()
    model.train(was_training)
    result["seconds"] = time.time() - t_start
    return result


def _quantize_block(
    i, block, fp_block, lins, q_stream, fp_stream, kws, config: QuantConfig, tokens, identity, threads, bar
) -> tuple[dict[str, PackedWeight], dict[str, dict]]:
    """Steps 1-3 for block i; returns {rel name: PackedWeight} and per-layer stats."""
    oa_method = config.method is Method.OA
    if identity:
        oa = {rel for rel, _, _ in lins}  # test mode: every layer takes the two-stream path
    else:
        oa = {rel for rel, role, _ in lins if oa_method and role in config.oa_layers}
    late_roles = {rel for rel, role, _ in lins if role in config.late_layers and rel not in oa and not identity}
    base = [(rel, mod) for rel, _, mod in lins if rel not in oa and rel not in late_roles]
    late = [(rel, mod) for rel, _, mod in lins if rel in oa]
    late_h = [(rel, mod) for rel, _, mod in lins if rel in late_roles]  # H only, second pass
    if late and tokens < 2 * max(m.in_features for _, m in late):
        log.warning("OA: %d calibration tokens < 2x layer width; Sq is rank-deficient", tokens)
    packed: dict[str, PackedWeight] = {}
    stats: dict[str, dict] = {}

    def quantize(rel: str, mod: nn.Linear, H, S=None, Sq=None, Sx=None) -> None:
        if bar is not None:
            bar.set_postfix_str(f"block {i} {rel} {config.method.value}")
        t = time.time()
        w = mod.weight.detach().float()
        sq = H / 2
        st: dict[str, Any] = {"shape": list(w.shape)}
        if identity:
            q = w
        else:
            with _threads(threads):
                p, info = quantize_layer(w, config, H=H, S=S, Sq=Sq, is_oa_layer=S is not None, return_info=True)
            packed[rel] = p
            q = dequantize(p)
            mod.weight.data = q.to(mod.weight.dtype)
            st.update(info)
            st["bits_per_weight"] = bits_per_weight(p)
        st["rel_err"] = _rel_err_q(w, q, sq)
        if S is not None:
            st["rel_err_fp"] = _rel_err_fp(w, q, S, Sq, Sx)
            st["s_minus_sq"] = float((S - Sq).abs().max())
        st["seconds"] = time.time() - t
        stats[rel] = st
        if bar is not None:
            bar.update(1)

    # Pass A: H for every base layer (and S/Sq for OA layers when xq_timing=before).
    early_oa = late if config.xq_timing is XqTiming.BEFORE and not identity else []
    pair = _collect(block, fp_block, dict(base), dict(early_oa), q_stream, fp_stream, kws)
    for rel, mod in base:
        quantize(rel, mod, 2 * pair["q"].normalised(rel))
    if early_oa:
        for rel, mod in early_oa:
            quantize(rel, mod, 2 * pair["q"].normalised(rel), *pair["S"][rel])
        late = []
    # Pass B: late layers see the block with its other sublayers already quantized.
    if late or late_h:
        pair = _collect(block, fp_block, dict(late_h), dict(late), q_stream, fp_stream, kws)
        for rel, mod in late_h:
            quantize(rel, mod, 2 * pair["q"].normalised(rel))
        for rel, mod in late:
            quantize(rel, mod, 2 * pair["q"].normalised(rel), *pair["S"][rel])
    return packed, stats


def _collect(block, fp_block, single: dict, paired: dict, q_stream, fp_stream, kws) -> dict:
    """Run the quantized stream through `block` accumulating Grams of `single` and `paired`
    modules; for `paired` ones also run the FP stream through `fp_block` batch by batch and
    accumulate S = Xq^T X (with Sq, in one pass) and Sx = X^T X on the same tokens. Returns
    normalised statistics."""
    qh = GramHooks({**single, **paired}, paired=tuple(paired))
    fp_mods = {rel: fp_block.get_submodule(rel) for rel in paired} if paired else {}
    fh = GramHooks(fp_mods, keep_inputs=True) if paired else None
    try:
        for bi, (hs, kw) in enumerate(zip(q_stream, kws)):
            run_block(block, hs, kw)
            if paired:
                run_block(fp_block, fp_stream[bi], kw)
                for rel in paired:
                    qh.pair(rel, fh.last[rel])
    finally:
        qh.remove()
        if fh is not None:
            fh.remove()
    out: dict[str, Any] = {"q": qh, "S": {}}
    for rel in paired:
        out["S"][rel] = (qh.cross_normalised(rel), qh.normalised(rel), fh.normalised(rel))
    return out
