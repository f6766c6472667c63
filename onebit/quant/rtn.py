"""RTN: per-row, per-block sign + mean-abs scale. No calibration; the pipeline's smoke test.

For one row i and column block b: W[i, b] ~= alpha[i, b] * sign(W[i, b]), with
alpha = mean |W[i, b]| (the L2-optimal scale for fixed signs).
"""

from __future__ import annotations

import torch

from onebit.config import QuantConfig
from onebit.format import SINGLE_TERM, PackedWeight, pack, padded_k


def quantize_rtn(w: torch.Tensor, config: QuantConfig) -> PackedWeight:
    n, k = w.shape
    bs = config.block_size
    k_pad = padded_k(k, bs)
    wf = torch.nn.functional.pad(w.float(), (0, k_pad - k)).reshape(n, k_pad // bs, bs)
    # Mean over the real columns only: the last block may be partly padding.
    counts = torch.full((k_pad // bs,), bs, dtype=torch.float32, device=w.device)
    counts[-1] = bs - (k_pad - k)
    alpha = wf.abs().sum(-1) / counts
    return pack(
        signs=(w >= 0).unsqueeze(0),
        out_scale=alpha.unsqueeze(0),
        in_scale=torch.ones(1, k, device=w.device),
        layout=SINGLE_TERM,
        block_size=bs,
        scale_dtype=config.fit_scale_dtype,
    )
