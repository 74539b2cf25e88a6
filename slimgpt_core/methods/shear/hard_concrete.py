"""Hard-concrete gates (Louizos et al. 2018) as Sheared-LLaMA uses them (SPEC §9). Pure tensor functions.

A gate z in [0, 1] is a stretched, clipped binary-concrete sample: exactly 0 or 1 with positive probability, so
the expected number of open gates is differentiable in log α."""
from __future__ import annotations

import math

import torch

LOW, HIGH, BETA = -0.1, 1.1, 2.0 / 3.0  # stretch interval (l, r) and temperature β
LOG_ALPHA_INIT = 5.0
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)  # ±4.605
DETERMINISTIC_SHARPEN = 0.8  # the authors' factor in the deterministic gate value σ(log α / β · 0.8)


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw z = clamp(σ((ln u − ln(1−u) + log α)/β)·(r−l) + l, 0, 1), u ~ U[0, 1), per entry (u = 0 gives
    ln u = −∞ and z = 0, the limit)."""
    where = generator.device if generator is not None else log_alpha.device  # a CPU generator draws on the CPU
    u = torch.rand(log_alpha.shape, generator=generator, device=where, dtype=log_alpha.dtype).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) = σ(log α − β·ln(−l/r)), in closed form (differentiable)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LOW / HIGH))


def deterministic_value(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gate's value at evaluation time, before the top-k cut."""
    return torch.sigmoid(log_alpha / BETA * DETERMINISTIC_SHARPEN)


def top_k_gates(log_alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic gates along the last dimension: the k entries of largest log α keep their value, the rest
    are 0. Every row keeps exactly k."""
    values = deterministic_value(log_alpha)
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep.scatter_(-1, log_alpha.topk(k).indices, True)  # topk: along the last dimension
    return torch.where(keep, values, torch.zeros_like(values))


def clamp_(log_alpha: torch.Tensor) -> None:
    with torch.no_grad():
        log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
