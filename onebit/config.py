"""QuantConfig: every knob of every onebit quantizer, frozen and versioned.

Fields marked *(choice)* in ../shared/spec/method.md are config fields here, with the
spec's default. The config is serialised into checkpoints (`to_dict`) and must round-trip
exactly (`from_dict`), so every field is a plain JSON value or a `str` Enum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

CONFIG_VERSION = 1


class Method(str, Enum):
    RTN = "rtn"  # per-row, per-block sign + mean-abs scale; no calibration
    BILLM = "billm"
    ARB = "arb"
    ARB_X = "arb-x"
    ARB_RC = "arb-rc"
    OA = "oa"  # ARB-RC + CGB everywhere, output alignment + AMP on the last FC of a block


class Compensation(str, Enum):
    OFF = "off"
    PUBLISHED = "published"  # E = (W_b - Q_b) / diag(U_bb)  (BiLLM / ARB-LLM code)
    EXACT = "exact"  # E = (W_b - Q_b) U_bb^-1  (exact for a block fixed as a whole)


class AmpGate(str, Enum):
    OFF = "off"
    A = "A"  # accept a new value only where dL_AMP/dx > 0
    B = "B"  # accept only where the step direction agrees with the gradient sign


class BSchedule(str, Enum):
    TWO_COLUMNS = "two"  # the paper: two columns with largest pre-sign energy per iteration
    SWEEP = "sweep"  # every column, in order, each iteration


class OACgb(str, Enum):
    BCD = "bcd"  # OA per group, other groups' reconstruction subtracted (block-coordinate)
    ORDER1_ONLY = "order1"  # ARB-RC for the order-2 salient groups, OA on the order-1 groups


class XqTiming(str, Enum):
    AFTER = "after"  # collect Xq for the OA layer after the block's other layers are quantized
    BEFORE = "before"  # with the other sublayers' inputs, before any is quantized (fair baseline)


class SalientMetric(str, Enum):
    HESSIAN = "hessian"
    MAGNITUDE = "magnitude"


# float8_e4m3fn is a storage choice (onebit/compact.py: e4m3 with a power-of-two exponent per
# term and column block): the quantizers round their fits to it (compensating the stored
# weight) and hand them on in float32, which holds those values exactly.
SCALE_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn")
OA_LAYER_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class QuantConfig:
    method: Method = Method.RTN
    block_size: int = 128
    scale_dtype: str = "float16"  # stored scales; see SCALE_DTYPES
    # partition (BiLLM / ARB-LLM)
    cgb: bool = True  # ARB-RC / OA: split salient columns by the group bitmap too
    salient: bool = True  # use order-2 salient columns (BiLLM partition)
    max_salient: int = 50
    n_quantiles: int = 81
    salient_metric: SalientMetric = SalientMetric.HESSIAN
    iters: int = 15  # T for ARB refinement
    iters_x: int = 15  # T2 for ARB-X
    # GPTQ loop
    compensation: Compensation = Compensation.PUBLISHED
    percdamp: float = 0.01
    # OA
    oa_layers: tuple[str, ...] = ("down",)
    amp: AmpGate = AmpGate.A
    b_schedule: BSchedule = BSchedule.TWO_COLUMNS
    oa_iters: int = 15
    oa_k: int = 5
    oa_cgb: OACgb = OACgb.BCD
    xq_timing: XqTiming = XqTiming.AFTER
    # Roles whose input statistics are collected after the block's other sublayers are
    # quantized (a second pass), as OA does for its own layers with xq_timing=after.
    # method=arb-rc with late_layers=("down",) is the fair baseline for OA: the same down
    # projection, the same statistics point, only the objective differs.
    late_layers: tuple[str, ...] = ()
    oa_ridge: float = 1e-4
    # which nn.Linear modules are never converted (matched by suffix of the qualified name)
    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        # Coerce strings into enums so users can write QuantConfig(method="arb-rc").
        for f in dataclasses.fields(self):
            kind = _ENUM_FIELDS.get(f.name)
            value = getattr(self, f.name)
            if kind is not None and not isinstance(value, kind):
                try:
                    object.__setattr__(self, f.name, kind(value))
                except ValueError:
                    allowed = ", ".join(repr(m.value) for m in kind)
                    raise ValueError(f"QuantConfig.{f.name}={value!r}: expected one of {allowed}") from None
        for name in ("oa_layers", "late_layers", "modules_to_not_convert"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"QuantConfig version {self.version} is not supported by this onebit "
                f"(understands version {CONFIG_VERSION}); upgrade onebit"
            )
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 32:
            raise ValueError(f"block_size must be a positive multiple of 32 (the word size), got {self.block_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        for name in ("iters", "iters_x", "oa_iters", "oa_k", "n_quantiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_salient < 0:
            raise ValueError(f"max_salient must be >= 0, got {self.max_salient}")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")
        for name in ("oa_layers", "late_layers"):
            bad = [n for n in getattr(self, name) if n not in OA_LAYER_NAMES]
            if bad:
                raise ValueError(f"{name} {bad} not in {OA_LAYER_NAMES}")

    @property
    def needs_calibration(self) -> bool:
        return self.method is not Method.RTN

    @property
    def fit_scale_dtype(self) -> str:
        """The scale dtype of the quantizers' fits and of format v1 (no 8-bit scales there)."""
        return "float32" if self.scale_dtype == "float8_e4m3fn" else self.scale_dtype

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if not isinstance(d, dict):
            raise TypeError(f"QuantConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown} (written by a newer onebit?)")
        return cls(**d)

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


_ENUM_FIELDS: dict[str, type[Enum]] = {
    "method": Method,
    "compensation": Compensation,
    "amp": AmpGate,
    "b_schedule": BSchedule,
    "oa_cgb": OACgb,
    "xq_timing": XqTiming,
    "salient_metric": SalientMetric,
}
