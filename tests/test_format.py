"""Packed format v1: exact round trips against obviously-correct implementations."""

import pytest
import torch
from helpers import LAYOUTS, random_dense
from hypothesis import given, settings
from hypothesis import strategies as st

from onebit.format import (
    FORMAT_VERSION,
    SINGLE_TERM,
    Layout,
    PackedWeight,
    Select,
    Term,
    bits_per_weight,
    dequantize,
    iter_dequantized_rows,
    pack,
    pack_bits,
    sign_bits_per_weight,
    unpack_bits,
    validate,
)


def pack_bits_obvious(bits: torch.Tensor) -> list[list[int]]:
    """One Python int per 32 columns, built bit by bit: column j -> bit j % 32 of word j // 32."""
    rows = []
    for row in bits.tolist():
        words = []
        for w in range(-(-len(row) // 32)):
            v = 0
            for b in range(32):
                j = 32 * w + b
                if j < len(row) and row[j]:
                    v |= 1 << b
            words.append(v - (1 << 32) if v >= 1 << 31 else v)  # as int32
        rows.append(words)
    return rows


def dequantize_obvious(d: dict, layout: Layout, block_size: int) -> torch.Tensor:
    """The FORMAT.md formula written per element on the dense inputs (no bit planes)."""
    _, n, k = d["signs"].shape
    w = torch.zeros(n, k, dtype=torch.float64)
    for t, term in enumerate(layout.terms):
        for i in range(n):
            for j in range(k):
                g = bool(d["groups"][i, j])
                sel = {Select.ALL: 1.0, Select.GROUP0: float(not g), Select.GROUP1: float(g)}[term.select]
                s = 1.0 if d["signs"][term.plane, i, j] >= 0 else -1.0
                mu = float(d["mean"][t, i, j // block_size]) if layout.has_mean else 0.0
                w[i, j] += sel * float(d["in_scale"][t, j]) * (float(d["out_scale"][t, i, j // block_size]) * s + mu)
    return w


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 100), seed=st.integers(0, 2**31))
def test_pack_bits_matches_obvious(n, k, seed):
    bits = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)) < 0.5
    words = pack_bits(bits)
    assert words.dtype == torch.int32
    assert words.tolist() == pack_bits_obvious(bits)
    assert torch.equal(unpack_bits(words, k), bits)


def test_bit_order_and_sign_of_zero():
    # Column 0 -> least significant bit; column 31 -> the sign bit of the int32 word.
    bits = torch.zeros(1, 32, dtype=torch.bool)
    bits[0, 0] = True
    assert pack_bits(bits).item() == 1
    bits[0, 31] = True
    assert pack_bits(bits).item() == 1 - 2**31
    # sign(0) = +1: a zero weight packs as bit 1.
    p = pack(torch.tensor([[[0.0, -0.0, -1.0, 2.0]]]), torch.ones(1, 1, 1), torch.ones(1, 4), SINGLE_TERM, 32)
    assert p.signs.item() == 0b1011
    assert dequantize(p).tolist() == [[1.0, 1.0, -1.0, 1.0]]


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("n,k,bs", [(3, 5, 32), (7, 70, 32), (5, 129, 64), (2, 256, 128)])
def test_dequantize_matches_obvious(layout_name, n, k, bs):
    layout = LAYOUTS[layout_name]
    d = random_dense(n, k, layout, bs, torch.Generator().manual_seed(n * 1000 + k))
    p = pack(d["signs"], d["out_scale"], d["in_scale"], layout, bs, d["groups"], d["mean"], "float32")
    validate(p)
    assert p.signs.shape == (layout.n_planes, n, -(-k // bs) * bs // 32)
    assert p.in_scale[:, k:].abs().sum() == 0  # padding columns contribute nothing
    want = dequantize_obvious(d, layout, bs)
    torch.testing.assert_close(dequantize(p).double(), want, rtol=1e-6, atol=1e-6)
    chunks = torch.cat([w for _, w in iter_dequantized_rows(p, max_elems=2 * p.k_pad)])
    assert torch.equal(chunks, dequantize(p))


def test_bits_per_weight_counts_everything():
    n, k, bs = 64, 200, 128  # K pads to 256: 8 words per row
    p = pack(torch.ones(1, n, k), torch.ones(1, n, 2), torch.ones(1, k), SINGLE_TERM, bs, scale_dtype="float16")
    stored = n * 8 * 32 + n * 2 * 16 + 256 * 16  # sign words + out_scale + in_scale (fp16)
    assert bits_per_weight(p) == pytest.approx(stored / (n * k))
    assert sign_bits_per_weight(p) == 1.0


def test_sign_bits_count_second_plane_only_on_used_columns():
    layout = Layout((Term(0, Select.ALL), Term(1, Select.ALL)))
    in_scale = torch.zeros(2, 64)
    in_scale[0] = 1
    in_scale[1, :8] = 1  # 8 "salient" columns use the second plane
    p = pack(torch.ones(2, 4, 64), torch.ones(2, 4, 1), in_scale, layout, 64)
    assert sign_bits_per_weight(p) == pytest.approx(1 + 8 / 64)


def test_validate_rejects_bad_tensors():
    p = pack(torch.ones(1, 4, 40), torch.ones(1, 4, 1), torch.ones(1, 40), SINGLE_TERM, 64)
    bad = PackedWeight(4, 40, 64, SINGLE_TERM, p.signs[:, :3], p.out_scale, p.in_scale)
    with pytest.raises(ValueError, match="signs"):
        validate(bad)
    bad = PackedWeight(4, 40, 64, SINGLE_TERM, p.signs.float(), p.out_scale, p.in_scale)
    with pytest.raises(ValueError, match="int32"):
        validate(bad)
    bad = PackedWeight(4, 40, 64, LAYOUTS["cgb"], p.signs, p.out_scale, p.in_scale)
    with pytest.raises(ValueError):
        validate(bad)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        pack(torch.ones(1, 2, 4), torch.full((1, 2, 1), float("nan")), torch.ones(1, 4), SINGLE_TERM, 32)
    with pytest.raises(ValueError, match="group"):
        pack(torch.ones(1, 2, 4), torch.ones(6, 2, 1), torch.ones(6, 4), LAYOUTS["cgb"], 32)
    with pytest.raises(ValueError, match="scale_dtype"):
        pack(torch.ones(1, 2, 4), torch.ones(1, 2, 1), torch.ones(1, 4), SINGLE_TERM, 32, scale_dtype="int8")
    with pytest.raises(ValueError):
        Layout((Term(1, Select.ALL),))  # planes must start at 0


def test_layout_round_trip():
    for layout in LAYOUTS.values():
        assert Layout.from_dict(layout.to_dict()) == layout
    assert FORMAT_VERSION == 3


def test_bits_breakdown_counts_each_component():
    # 3 x 40 weight, blocks of 32 (K_pad 64): two planes, a group bitmap, the second plane
    # used by its terms on 5 columns only.
    from onebit.format import Layout, Select, Term, bits_breakdown, stored_bits

    layout = Layout((Term(0, Select.GROUP0), Term(0, Select.GROUP1), Term(1, Select.GROUP0), Term(1, Select.GROUP1)))
    g = torch.Generator().manual_seed(0)
    in_scale = torch.zeros(4, 40)
    in_scale[:2] = 1
    in_scale[2, [1, 7, 33]] = 0.5
    in_scale[3, [7, 20, 39]] = 0.25  # union with term 2: columns 1, 7, 20, 33, 39
    p = pack(torch.randn(2, 3, 40, generator=g), torch.rand(4, 3, 2, generator=g), in_scale, layout, 32,
             groups=torch.rand(3, 40, generator=g) > 0.5, scale_dtype="float16")  # fmt: skip
    b = bits_breakdown(p)
    assert b == {
        "sign": 3 * 40, "second_sign": 3 * 5, "unused_sign": 3 * 35, "group": 3 * 40,
        "padding": 3 * 3 * 24,  # two planes + the bitmap, 24 padding columns each
        "out_scale": 4 * 3 * 2 * 16, "in_scale": 4 * 64 * 16, "mean": 0,
    }  # fmt: skip
    assert sum(b.values()) == stored_bits(p)
