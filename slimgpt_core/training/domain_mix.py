"""Dynamic batch loading (Sheared-LLaMA, Algorithm 1; SPEC §9): every m steps the domain weights move toward
the domains whose held-out loss exceeds their reference loss. Pure tensor functions; the training driver that
calls them (continued pre-training) is not built yet."""
from __future__ import annotations

import torch


def update_domain_weights(weights: torch.Tensor, losses: torch.Tensor, reference: torch.Tensor,
                          variant: str = "paper", smoothing: float = 1e-4) -> torch.Tensor:
    """New domain weights from the current ones and per-domain held-out vs reference losses (nats/token).

    paper: Δ = max(ℓ − ℓ_ref, 0), w ← w·exp(Δ), normalised (a domain at or below its reference keeps its
    relative weight). code (the authors' repository): Δ = ℓ − ℓ_ref without the max, then smoothed
    w ← (1 − c)·w + c/k so that no domain reaches zero."""
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    if not (weights.shape == losses.shape == reference.shape) or weights.dim() != 1:
        raise ValueError("weights, losses and reference losses need one entry per domain")
    gap = losses - reference
    if variant == "paper":
        gap = gap.clamp(min=0)
    logits = torch.log(weights.clamp(min=1e-30)) + gap
    new = torch.softmax(logits, dim=0)
    if variant == "code":
        new = (1 - smoothing) * new + smoothing / len(new)
    return new


def draw_domains(weights: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The domain of each of n sequences, drawn independently from the weights."""
    return torch.multinomial(weights, n, replacement=True, generator=generator)
