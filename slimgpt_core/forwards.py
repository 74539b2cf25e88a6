"""Decoder-layer forwards over calibration activations: capture a layer's inputs, run it, collect one linear
layer's input statistics. Micro-batched; activations may live in (pinned) CPU memory while the layer is on the GPU."""
from __future__ import annotations

import torch

from . import obs


class _StopForward(Exception):
    """Raised in a hook once the needed inputs are captured, to skip the rest of the forward."""


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def capture_layer_inputs(model, tokens: torch.Tensor, batch_size: int, device: torch.device):
    """Hidden states entering layer 0 for every calibration sample, and the layer's other kwargs.

    Uses a forward pre-hook with kwargs (transformers 5 passes position_embeddings etc. as kwargs).
    Kwargs come from a batch of one so that they broadcast over any batch size; caches are dropped."""
    layer0 = model.model.layers[0]
    embed_device = model.get_input_embeddings().weight.device
    captured: dict = {}
    chunks: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                                          "past_key_value", "use_cache")})
        else:
            chunks.append(hidden.detach().to(device))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in [-1] + list(range(0, tokens.shape[0], batch_size)):
                ids = tokens[:1] if start < 0 else tokens[start:start + batch_size]
                try:
                    model(ids.to(embed_device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(chunks), _to(captured, device)


class _TF32:
    """TF32 for the layer forwards only; restored afterwards."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _layer_device(layer) -> torch.device:
    return next(layer.parameters()).device


def run_layer(layer, x: torch.Tensor, kwargs: dict, batch_size: int, out: torch.Tensor | None = None,
              tf32: bool = False) -> torch.Tensor:
    """Layer outputs for every sample; x may live in CPU memory while the layer is on the GPU."""
    out = torch.empty_like(x) if out is None else out
    dev = _layer_device(layer)
    with torch.no_grad(), _TF32(tf32):
        for s in range(0, x.shape[0], batch_size):
            y = layer(x[s:s + batch_size].to(dev, non_blocking=True), **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            out[s:s + batch_size].copy_(y, non_blocking=True)
    return out


def collect_hessian(layer, linear: torch.nn.Linear, x: torch.Tensor, kwargs: dict, batch_size: int,
                    tf32: bool = False) -> torch.Tensor:
    """H = 2XXᵀ/N of `linear`'s inputs when `layer` runs on x; the forward stops at `linear`."""
    acc = obs.HessianAccumulator(linear.in_features, device=linear.weight.device)

    def hook(module, args):
        with _TF32(False):  # statistics in full fp32 whatever the forwards use
            acc.add_batch(args[0])
        raise _StopForward

    handle = linear.register_forward_pre_hook(hook)
    dev = _layer_device(layer)
    try:
        with torch.no_grad(), _TF32(tf32):
            for s in range(0, x.shape[0], batch_size):
                try:
                    layer(x[s:s + batch_size].to(dev, non_blocking=True), **kwargs)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    acc.all_reduce()  # torch.distributed: every rank ends with the statistics of all shards
    return acc.H
