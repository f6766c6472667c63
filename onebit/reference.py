"""Pure-torch references for the binary linear op: the CPU fallback and the test oracle.

`binary_linear_ref` computes y = x @ W^T for a packed W in fp32, dequantizing a bounded
chunk of rows at a time (never the whole dense fp32 weight of a large layer).

W1A8 semantics (`act_bits=8`), which every A8 kernel must reproduce: for each term t the
activations are scaled by the term's `in_scale` and quantized per token, symmetric, to
int8 (`quantize_act_int8`); the term's inner sums are then exact integer sums of those
int8 values times the +-1 / 0-1 weight bits, scaled afterwards by the token scale and
the term's out_scale (and mean).
"""

from __future__ import annotations

import torch

from onebit.format import PackedWeight, Select, unpack_bits

INT8_MAX = 127


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per row) symmetric int8: x ~= q * scale, q in [-127, 127].

    Returns (q int8 (M, K), scale fp32 (M, 1)). Rounding is torch.round (half to even);
    an all-zero row gets scale 1.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _term_weight_rows(p: PackedWeight, t: int, r0: int, r1: int) -> torch.Tensor:
    """Term t's weight for rows r0:r1 *without* in_scale: sel * (out_scale * s + mean), fp32 (r, K_pad)."""
    term = p.layout.terms[t]
    bs = p.block_size
    s = unpack_bits(p.signs[term.plane, r0:r1]).float() * 2 - 1
    w = p.out_scale[t, r0:r1].float().repeat_interleave(bs, dim=1) * s
    if p.mean is not None:
        w = w + p.mean[t, r0:r1].float().repeat_interleave(bs, dim=1)
    if term.select is not Select.ALL:
        g = unpack_bits(p.groups[r0:r1]).float()
        w = w * (g if term.select is Select.GROUP1 else 1 - g)
    return w


def binary_linear_ref(x: torch.Tensor, p: PackedWeight, act_bits: int = 16, max_elems: int = 1 << 22) -> torch.Tensor:
    """y (M, N) fp32 = x (M, K) @ W^T, W the packed weight; see the module docstring for A8."""
    m, k = x.shape
    k_pad = p.k_pad
    xf = torch.nn.functional.pad(x.float(), (0, k_pad - k))
    y = torch.zeros(m, p.out_features, dtype=torch.float32, device=x.device)
    # Activations per term: in_scale folded in once (and quantized once for A8).
    acts = []
    for t in range(p.layout.n_terms):
        xt = xf * p.in_scale[t].float()
        if act_bits == 8:
            q, s = quantize_act_int8(xt)
            acts.append((q.float(), s))
        else:
            acts.append((xt, None))
    rows = max(1, max_elems // (k_pad * p.layout.n_terms))
    for r0 in range(0, p.out_features, rows):
        r1 = min(p.out_features, r0 + rows)
        for t, (xt, s) in enumerate(acts):
            part = xt @ _term_weight_rows(p, t, r0, r1).T
            y[:, r0:r1] += part if s is None else part * s
    return y
