"""KFAC curvature of every decoder linear from full-model forward and backward passes (SPEC §8).

Hooks on the linears' outputs collect A = E[x xᵀ] (inputs) and G = E[g gᵀ] (gradients of each sequence's
mean next-token cross-entropy w.r.t. the outputs). Parameters stay frozen: the graph starts at the input
embeddings, so only activation gradients are computed, never weight gradients. The math is in kfac.py."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.kfac import FactorAccumulator

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# modules fed the same input share one A factor, kept under the first of them
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
A_OWNERS = ("q_proj", "o_proj", "gate_proj", "down_proj")


def linears(layer) -> dict[str, torch.nn.Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return {n: getattr(attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp, n) for n in LINEARS}


def factor_bytes(model) -> int:
    """fp32 bytes of every layer's factors (A shared by q/k/v and by gate/up)."""
    total = 0
    for layer in model.model.layers:
        lin = linears(layer)
        total += sum(lin[n].in_features ** 2 for n in A_OWNERS) + sum(m.out_features ** 2 for m in lin.values())
    return 4 * total


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, fisher: str = "empirical",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ over sequences of each sequence's mean next-token cross-entropy: its gradient is, sequence by
    sequence, that of one backward per sequence. Labels from the data (empirical Fisher) or sampled from
    the model's own softmax (true Fisher)."""
    if fisher not in ("empirical", "true"):
        raise SlimGPTError(f"the Fisher must be 'empirical' or 'true', got {fisher!r}")
    pred = logits[:, :-1].float()
    if fisher == "true":
        probs = pred.detach().softmax(-1).reshape(-1, pred.shape[-1])
        labels = torch.multinomial(probs, 1, generator=generator)  # one per position, flattened below
    else:
        labels = ids[:, 1:]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1).sum()


@contextmanager
def frozen(model):
    """Parameters do not require grad inside (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class CurvatureCollector:
    """Per layer: A factors keyed by the module owning the input, G factors keyed by module.

    `positions` (optional) sub-samples that many token positions per sequence, the same for A and G of a
    batch; the backward pass itself stays whole."""
    index: torch.Tensor | slice  # the current batch's sampled rows (or all of them), set by `run` for the hooks

    def __init__(self, model, device: torch.device | str, positions: int | None = None, seed: int = 0):
        self.model = model
        self.positions = positions
        self.generator = torch.Generator().manual_seed(seed)
        self.A = [{n: FactorAccumulator(lin[n].in_features, device) for n in A_OWNERS}
                  for lin in map(linears, model.model.layers)]
        self.G = [{n: FactorAccumulator(m.out_features, device) for n, m in lin.items()}
                  for lin in map(linears, model.model.layers)]

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[self.index]  # a CPU index may select rows of a tensor anywhere

    @contextmanager
    def hooks(self):
        handles = []
        for i, layer in enumerate(self.model.model.layers):
            for name, module in linears(layer).items():
                handles.append(module.register_forward_hook(self._forward_hook(i, name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward_hook(self, i: int, name: str):
        def hook(module, args, out):
            if name in A_OWNERS:
                self.A[i][name].add(self._select(args[0].detach()))
            if out.requires_grad:
                out.register_hook(lambda g: self.G[i][name].add(self._select(g.detach())))
        return hook

    def run(self, tokens: torch.Tensor, batch_size: int, fisher: str = "empirical",
            should_stop: Callable[[], bool] | None = None, progress: Callable[[int, int], None] | None = None):
        """One forward and one backward per micro-batch over `tokens` [N, S]; returns (A, G) per layer."""
        model = self.model
        embed = model.get_input_embeddings()
        dev = embed.weight.device
        starts = range(0, tokens.shape[0], batch_size)
        with frozen(model), self.hooks():
            for b, s in enumerate(starts):
                if should_stop is not None and should_stop():
                    raise JobCancelled()
                ids = tokens[s:s + batch_size].to(dev)
                self.index = self._positions(ids.shape)
                with torch.enable_grad():
                    embeds = embed(ids).detach().requires_grad_(True)
                    # no key/value cache: it would keep every layer's K/V of the batch for nothing
                    logits = model(inputs_embeds=embeds, use_cache=False).logits
                    loss = next_token_loss(logits, ids, fisher, self.generator if dev.type == "cpu" else None)
                    torch.autograd.grad(loss, embeds)
                del logits, loss, embeds
                if progress is not None:
                    progress(b + 1, len(starts))
        return [{n: acc.mean for n, acc in a.items()} for a in self.A], [{n: acc.mean for n, acc in g.items()}
                                                                         for g in self.G]

    def _positions(self, shape) -> torch.Tensor | slice:
        batch, seqlen = shape
        if self.positions is None or self.positions >= seqlen:
            return slice(None)
        picks = [torch.randperm(seqlen, generator=self.generator)[:self.positions] + r * seqlen for r in range(batch)]
        return torch.cat(picks).sort().values
