"""The masks of a shear run and the Lagrangian that drives their expected sizes to the target (SPEC §9).

One log α per entry: layers [L], KV groups [L, kv], query heads within a group [L, heads per group] (one mask
shared by the groups of a layer, so every group keeps the same count and GQA stays valid), FFN channels [L, f]
and hidden dimensions [d] (one vector for the whole model). Only structures the target shrinks get a mask."""
from __future__ import annotations

import torch
from torch import nn

from slimgpt_core.base.shapes import decoder_layer_parameters, model_parameters, outer_parameters
from slimgpt_core.methods.shear import hard_concrete as hc
from slimgpt_core.methods.shear.target import Shape


class ShearMasks(nn.Module):
    def __init__(self, source: Shape, target: Shape, head_dim: int, vocab: int, tied: bool):
        super().__init__()
        self.source, self.target = source, target
        self.head_dim, self.vocab, self.tied = head_dim, vocab, tied
        L = source.layers
        sizes = {"layers": (L,), "kv_groups": (L, source.kv_groups), "heads": (L, source.heads_per_group),
                 "ffn": (L, source.ffn), "hidden": (source.hidden,)}
        self.keep = {"layers": target.layers, "kv_groups": target.kv_groups, "heads": target.heads_per_group,
                     "ffn": target.ffn, "hidden": target.hidden}  # entries kept per row (last dimension)
        self.log_alpha = nn.ParameterDict({
            name: nn.Parameter(torch.full(size, hc.LOG_ALPHA_INIT)) for name, size in sizes.items()
            if self.keep[name] < size[-1]})
        # (λ₁, λ₂) per structure, maximised by the optimiser (gradient ascent)
        self.lambdas = nn.ParameterDict({name: nn.Parameter(torch.zeros(2)) for name in self.log_alpha})

    @property
    def names(self) -> list[str]:
        return list(self.log_alpha)

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.log_alpha.values())

    def lambda_parameters(self) -> list[nn.Parameter]:
        return list(self.lambdas.values())

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training gates: one hard-concrete draw per entry (one per micro-batch), from `generator` when given."""
        return {name: hc.sample(la, generator) for name, la in self.log_alpha.items()}

    def deterministic(self) -> dict[str, torch.Tensor]:
        """Evaluation gates: per row exactly the target's count open, at their deterministic values."""
        with torch.no_grad():
            return {name: hc.top_k_gates(la, self.keep[name]) for name, la in self.log_alpha.items()}

    def expected_counts(self) -> dict[str, torch.Tensor]:
        """Expected open entries per row (per layer for 2-D masks)."""
        return {name: hc.keep_probability(la).sum(-1) for name, la in self.log_alpha.items()}

    def target_sparsity(self, name: str) -> float:
        size = self.log_alpha[name].shape[-1]
        return 1.0 - self.keep[name] / size

    def lagrangian(self, warmup: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ_structures mean_rows[λ₁(ŝ − t) + λ₂(ŝ − t)²] with t = warmup · final target sparsity (warmup rises
        from 0 to 1 over the first fifth of the steps). Returns the term and each structure's ŝ − t."""
        total = torch.zeros(())
        gaps = {}
        for name, count in self.expected_counts().items():
            size = self.log_alpha[name].shape[-1]
            gap = (1.0 - count / size) - warmup * self.target_sparsity(name)
            lam1, lam2 = self.lambdas[name]
            total = total + (lam1 * gap + lam2 * gap ** 2).mean()
            gaps[name] = float(gap.detach().mean())
        return total, gaps

    def expected_shape(self) -> dict[str, float]:
        """Expected counts as whole-model numbers (means over layers), for progress and reports."""
        counts = {name: float(c.detach().mean()) for name, c in self.expected_counts().items()}
        s = self.source
        out = {"layers": counts.get("layers", s.layers), "kv_groups": counts.get("kv_groups", s.kv_groups),
               "heads_per_group": counts.get("heads", s.heads_per_group), "ffn": counts.get("ffn", s.ffn),
               "hidden": counts.get("hidden", s.hidden)}
        out["heads"] = out["kv_groups"] * out["heads_per_group"]
        return out

    def expected_parameters(self) -> float:
        """Expected parameter count, taking the structures as independent (layer-wise products)."""
        s = self.source
        with torch.no_grad():
            p = {name: hc.keep_probability(la) for name, la in self.log_alpha.items()}
            layer_p = p.get("layers", torch.ones(s.layers))
            # per layer (the 2-D masks' rows summed over dimension 1)
            kv = p["kv_groups"].sum(1) if "kv_groups" in p else torch.full((s.layers,), float(s.kv_groups))
            rep = p["heads"].sum(1) if "heads" in p else torch.full((s.layers,), float(s.heads_per_group))
            ffn = p["ffn"].sum(1) if "ffn" in p else torch.full((s.layers,), float(s.ffn))
            hidden = p["hidden"].sum() if "hidden" in p else torch.tensor(float(s.hidden))
            per_layer = decoder_layer_parameters(kv * rep, kv, ffn, hidden, self.head_dim)
            return float((layer_p * per_layer).sum() + outer_parameters(hidden, self.vocab, self.tied))

    def target_parameters(self) -> int:
        t = self.target
        return int(model_parameters(t.layers, t.heads, t.kv_groups, t.ffn, t.hidden, self.head_dim, self.vocab,
                                    self.tied))

    def clamp_(self) -> None:
        for la in self.log_alpha.values():
            hc.clamp_(la)
