"""Per-layer pruning ratios (SPEC §2.5): log increase, linear, uniform, custom.

The log schedule is r_i = r_0 + (r_{n-1} - r_0) * ln(i+1)/ln(n) for any layer count n; its mean is
r_0 + (r_{n-1} - r_0) * kappa_n with kappa_n = ln(n!)/(n ln n). Given a target mean and a shape
s = r_{n-1}/r_0 we solve for r_0.
"""
from __future__ import annotations

import math
from typing import Sequence

from slimgpt_core.base.errors import SlimGPTError

SCHEDULES = ("log", "linear", "uniform", "auto")  # auto: chosen for a budget (refine.py)
AUTO_FITNESS_SAMPLES = 32  # calibration windows (other than the statistics') auto's KL is measured on: its search's pool


def kappa(n: int, kind: str = "log") -> float:
    """Mean of the schedule's 0..1 profile over n layers."""
    if n <= 1:
        return 0.0
    if kind == "log":
        return math.lgamma(n + 1) / (n * math.log(n))
    if kind == "linear":
        return 0.5
    raise ValueError(kind)


def profile(n: int, kind: str) -> list[float]:
    """The 0..1 shape of the increase across n layers."""
    if n == 1:
        return [0.0]
    if kind == "log":
        return [math.log(i + 1) / math.log(n) for i in range(n)]
    if kind == "linear":
        return [i / (n - 1) for i in range(n)]
    raise ValueError(kind)


def check_ratio(ratio: float, what: str = "ratio") -> float:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise SlimGPTError(f"{what} must be in [0, 1), got {ratio}")
    return float(ratio)


def layer_ratios(n_layers: int, target: float, kind: str = "log", shape: float = 4.0) -> list[float]:
    """Ratios whose mean is `target`; for log/linear the last is `shape` times the first."""
    check_ratio(target, "target ratio")
    if kind not in SCHEDULES:
        raise SlimGPTError(f"unknown schedule {kind!r} (choose from {', '.join(SCHEDULES)}, or a custom list)")
    if kind == "auto":
        raise SlimGPTError("the auto schedule has no formula: it is found by a search for a parameter budget "
                           "(prune --schedule auto, or slimgpt_core.schedules.refine.auto_schedule)")
    if kind == "uniform" or n_layers == 1 or target == 0.0:
        return [target] * n_layers
    if shape < 1.0:
        raise SlimGPTError(f"schedule shape must be >= 1 (last/first ratio), got {shape}")
    r0 = target / (1.0 + (shape - 1.0) * kappa(n_layers, kind))
    ratios = [r0 + (shape * r0 - r0) * p for p in profile(n_layers, kind)]
    if ratios[-1] >= 1.0:
        raise SlimGPTError(
            f"a {kind} schedule with mean {target} and shape {shape} asks the last layer for "
            f"{ratios[-1]:.3f} >= 1: lower the shape or the ratio"
        )
    return ratios


def custom_ratios(values: Sequence[float], n_layers: int) -> list[float]:
    if len(values) != n_layers:
        raise SlimGPTError(f"custom schedule has {len(values)} ratios but the model has {n_layers} layers")
    return [check_ratio(float(v), f"ratio of layer {i}") for i, v in enumerate(values)]


def parse_ratio_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise SlimGPTError(f"cannot read a list of ratios from {text!r} (write e.g. 0.1,0.2,0.3)") from None


def units_to_remove(n_units: int, ratio: float, keep_min: int = 1) -> int:
    """Whole units (heads, KV groups, channels) to remove; at least `keep_min` stay."""
    return max(0, min(int(round(ratio * n_units)), n_units - keep_min))


def balanced_targets(target: float, balance: float, attn_params: int, mlp_params: int,
                     ffn_target: float | None = None) -> tuple[float, float]:
    """(head mean ratio, FFN mean ratio) for a parameter cut of `target` of the decoder layers: the heads take
    `balance` × target and the FFN what keeps the cut (both at most 0.9); with `ffn_target`, the two targets as
    given."""
    if ffn_target is not None:
        return target, ffn_target
    head = min(0.9, balance * target)
    return head, min(0.9, max(0.0, (target * (attn_params + mlp_params) - head * attn_params) / mlp_params))
