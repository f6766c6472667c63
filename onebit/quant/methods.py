"""Per-layer quantization for every calibrated method, producing packed format v1.

Each method is a partition (salient columns, group bitmap) plus a binarizer per group,
run inside the GPTQ block loop. Every group becomes one or two terms of the packed format:

    term = (sign plane, group select, column set)     column set: salient | non-salient

The column set is stored as in_scale (a 0/1 column mask for mean-based methods, c_j * mask
for ARB-RC / OA), the group select picks entries by the group bitmap (g = 1: sparse), the
row scale is out_scale (per row and block) and mu goes in mean. Salient columns' order-2
residual uses sign plane 1. One Layout per partition shape, as named constants below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onebit.compact import round_fp8
from onebit.config import Method, OACgb, QuantConfig
from onebit.format import SCALE_DTYPES, Layout, PackedWeight, Select, Term, pack
from onebit.quant import binarize as bz
from onebit.quant.gptq import gptq_loop
from onebit.quant.oa import oa_refine
from onebit.quant.partition import saliency, search_salient, search_split

SAL, NS = "sal", "ns"

# (plane, select, column set) per term, in the order the block quantizers emit fits.
_BILLM_TERMS = ((0, Select.ALL, SAL), (1, Select.ALL, SAL), (0, Select.GROUP0, NS), (0, Select.GROUP1, NS))
_CGB_TERMS = (
    (0, Select.GROUP0, SAL), (1, Select.GROUP0, SAL), (0, Select.GROUP1, SAL), (1, Select.GROUP1, SAL),
    (0, Select.GROUP0, NS), (0, Select.GROUP1, NS),
)  # fmt: skip
_SPLIT_TERMS = ((0, Select.GROUP0, NS), (0, Select.GROUP1, NS))  # salient=False


def _layout(spec: tuple, has_mean: bool) -> Layout:
    return Layout(tuple(Term(p, s) for p, s, _ in spec), has_mean=has_mean)


# BiLLM / ARB / ARB-X without CGB: salient order 2 on all rows, two order-1 groups elsewhere.
MEAN_LAYOUT = _layout(_BILLM_TERMS, True)
# ARB / ARB-X with CGB: groups with orders [2, 2, 1, 1].
MEAN_CGB_LAYOUT = _layout(_CGB_TERMS, True)
# ARB-RC / OA (r_i c_j b_ij, no mean).
RC_LAYOUT = _layout(_BILLM_TERMS, False)
RC_CGB_LAYOUT = _layout(_CGB_TERMS, False)
# No salient columns: just the group split.
MEAN_SPLIT_LAYOUT = _layout(_SPLIT_TERMS, True)
RC_SPLIT_LAYOUT = _layout(_SPLIT_TERMS, False)

_RC_METHODS = (Method.ARB_RC, Method.OA)


def uses_cgb(config: QuantConfig) -> bool:
    """CGB applies to the ARB-LLM family (ARB, ARB-X, ARB-RC, OA); BiLLM never used it."""
    return config.cgb and config.salient and config.method is not Method.BILLM


def term_spec(config: QuantConfig) -> tuple:
    if not config.salient or config.max_salient < 2:
        return _SPLIT_TERMS
    return _CGB_TERMS if uses_cgb(config) else _BILLM_TERMS


def layout_for(config: QuantConfig) -> Layout:
    return _layout(term_spec(config), config.method not in _RC_METHODS)


@dataclass
class BlockOut:
    fits: list[bz.Fit]  # one per layout term; c = None for mean-based methods
    colmasks: list[torch.Tensor]  # (C,) float per term
    groups: torch.Tensor  # (N, C) bool
    info: dict


def _round(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype).float()


def _block_quantizer(config: QuantConfig, H: torch.Tensor | None, S, Sq, oa: bool):
    spec = term_spec(config)
    cgb = spec is _CGB_TERMS
    method = config.method
    sdt = SCALE_DTYPES[config.fit_scale_dtype]
    fp8 = config.scale_dtype == "float8_e4m3fn"

    def quantize_block(wb: torch.Tensor, ubb: torch.Tensor, b0: int, b1: int):
        n, c = wb.shape
        # ARB-X / OA weight by the block's Gram of Xq: H_bb / 2, H undamped (H = 2/T Xq^T Xq).
        gram = None
        if method is Method.ARB_X and H is not None:
            gram = H[b0:b1, b0:b1].float() / 2
        R = saliency(wb, ubb.diagonal(), config.salient_metric)
        sal = (
            search_salient(R, config.max_salient)
            if spec is not _SPLIT_TERMS
            else torch.zeros(c, dtype=torch.bool, device=wb.device)
        )
        g = search_split(wb, R, sal, config.n_quantiles, cgb, gram)
        gf, salf = g.float(), sal.float()
        sel = {Select.ALL: torch.ones_like(gf), Select.GROUP0: 1 - gf, Select.GROUP1: gf}
        colm = {SAL: salf, NS: 1 - salf}
        masks = [sel[s] * colm[cs].unsqueeze(0) for _, s, cs in spec]
        colmasks = [colm[cs] for _, _, cs in spec]
        fits: list[bz.Fit] = []
        i = 0
        while i < len(spec):
            m = masks[i]
            order2 = i + 1 < len(spec) and spec[i + 1][0] == 1
            if method is Method.BILLM:
                fs = bz.bin2(wb, m) if order2 else [bz.bin1(wb, m)]
            elif method in (Method.ARB, Method.ARB_X):
                fs = bz.arb2(wb, m, config.iters) if order2 else [bz.arb1(wb, m, config.iters)]
            else:
                fs = bz.rc2(wb, m, config.iters) if order2 else [bz.rc1(wb, m, config.iters)]
            fits += fs
            i += len(fs)
        info: dict = {}
        if method is Method.ARB_X and gram is not None:
            free_mu = [spec[t][0] == 0 for t in range(len(spec))]  # ARB order 2 shares mu
            fits = bz.weighted_refine(wb, masks, fits, gram, config.iters_x, free_mu)
        if oa:
            active = [True] * len(spec)
            if config.oa_cgb is OACgb.ORDER1_ONLY:
                active = [spec[t][2] == NS for t in range(len(spec))]
            fits, info = oa_refine(wb, S[b0:b1, b0:b1].float(), Sq[b0:b1, b0:b1].float(), fits, masks, active, config)
        # Scales are stored in scale_dtype: compensate with the weight that is actually stored.
        if fp8:  # one exponent per (term, block): over the rows for a / mu, the term's columns for c
            fits = [bz.Fit(a=round_fp8(f.a), b=f.b, mu=None if f.mu is None else round_fp8(f.mu),
                           c=None if f.c is None else round_fp8(f.c, f.c * cm))
                    for f, cm in zip(fits, colmasks)]  # fmt: skip
        else:
            fits = [bz.Fit(a=_round(f.a, sdt), b=f.b, mu=_round(f.mu, sdt), c=_round(f.c, sdt)) for f in fits]
        q = sum(f.recon(m) for f, m in zip(fits, masks))
        return q, BlockOut(fits, colmasks, g, info)

    return quantize_block


def _assemble(w: torch.Tensor, config: QuantConfig, blocks: list[BlockOut]) -> PackedWeight:
    spec = term_spec(config)
    layout = _layout(spec, config.method not in _RC_METHODS)
    n, k = w.shape
    T, P, nb = len(spec), layout.n_planes, len(blocks)
    bs = config.block_size
    signs = torch.ones(P, n, k, dtype=torch.bool, device=w.device)
    groups = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    out_scale = torch.zeros(T, n, nb, device=w.device)
    mean = torch.zeros(T, n, nb, device=w.device)
    in_scale = torch.zeros(T, k, device=w.device)
    for bi, blk in enumerate(blocks):
        b0, b1 = bi * bs, min(k, (bi + 1) * bs)
        groups[:, b0:b1] = blk.groups
        sel = {Select.ALL: torch.ones_like(blk.groups), Select.GROUP0: ~blk.groups, Select.GROUP1: blk.groups}
        for t, (plane, s, _) in enumerate(spec):
            f, cm = blk.fits[t], blk.colmasks[t]
            where = sel[s] & (cm > 0).unsqueeze(0)
            signs[plane, :, b0:b1] = torch.where(where, f.b >= 0, signs[plane, :, b0:b1])
            out_scale[t, :, bi] = f.a
            if f.mu is not None:
                mean[t, :, bi] = f.mu
            in_scale[t, b0:b1] = cm if f.c is None else cm * f.c
    return pack(
        signs=signs, out_scale=out_scale, in_scale=in_scale, layout=layout, block_size=bs,
        groups=groups if layout.has_group else None, mean=mean if layout.has_mean else None,
        scale_dtype=config.fit_scale_dtype,
    )  # fmt: skip


def quantize_layer(
    w: torch.Tensor,
    config: QuantConfig,
    H: torch.Tensor | None = None,
    S: torch.Tensor | None = None,
    Sq: torch.Tensor | None = None,
    is_oa_layer: bool = False,
    return_info: bool = False,
):
    """Quantize one nn.Linear weight (N x K) with config.method.

    H = 2/T Xq^T Xq, S = Xq^T X / T, Sq = Xq^T Xq / T (normalised by the T calibration
    tokens; fp32). H=None runs without statistics (U = I: no compensation, |W|^2 saliency).
    OA needs S and Sq on its layer (is_oa_layer); every other layer of an OA model is ARB-RC.
    Returns the PackedWeight (and a dict of per-block info when return_info).
    """
    from onebit.quant.rtn import quantize_rtn

    if config.method is Method.RTN:
        p = quantize_rtn(w, config)
        return (p, {}) if return_info else p
    oa = config.method is Method.OA and is_oa_layer
    if oa and (S is None or Sq is None):
        raise ValueError("OA on its layer needs the cross Gram S and the Gram Sq of the layer inputs")
    if config.method is Method.ARB_X and H is None:
        raise ValueError("ARB-X needs the Hessian H (its S_b = H_bb / 2)")
    if oa and H is None:
        H = 2 * Sq
    w = w.detach().float()
    Q, blocks = gptq_loop(w, H, config, _block_quantizer(config, H, S, Sq, oa))
    packed = _assemble(w, config, blocks)
    if not return_info:
        return packed
    info: dict = {}
    if oa:
        info["oa_loss_init"] = sum(b.info.get("loss_init", 0.0) for b in blocks)
        info["oa_loss"] = sum(b.info.get("loss", 0.0) for b in blocks)
    has_sal = term_spec(config) is not _SPLIT_TERMS
    info["salient_cols"] = int(sum(int(b.colmasks[0].sum()) for b in blocks)) if has_sal else 0
    return packed, info
