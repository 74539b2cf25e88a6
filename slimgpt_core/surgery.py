"""Physically shrink decoder layers and keep the config describing every layer's shape (SPEC §4)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shape(layer) -> tuple[int, int, int]:
    """(query heads, KV heads, FFN channels) of a decoder layer as its weights say."""
    attn = layer.self_attn
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d, layer.mlp.down_proj.in_features


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = linear.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data = w.contiguous()
    if linear.bias is not None:
        b = linear.bias.data
        new.bias.data = (b[rows] if rows is not None else b).contiguous()
    return new


def _rows(units: Sequence[int], size: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(u * size, (u + 1) * size, device=device) for u in units]) if units else \
        torch.zeros(0, dtype=torch.long, device=device)


def keep_kv_groups(layer, keep: Sequence[int]) -> None:
    """Keep only these KV groups (each: one k/v head and its query heads); under MHA a group is a head."""
    attn = layer.self_attn
    d, rep = attn.head_dim, attn.num_key_value_groups
    dev = attn.q_proj.weight.device
    q_rows = _rows(keep, d * rep, dev)
    kv_rows = _rows(keep, d, dev)
    attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)


def keep_channels(layer, keep: Sequence[int]) -> None:
    mlp = layer.mlp
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=mlp.down_proj.weight.device)
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def resize_layer(layer, n_heads: int, n_kv: int, d_ff: int) -> None:
    """Give a freshly built layer the shape of a pruned one (weights are loaded afterwards)."""
    q0, kv0, f0 = layer_shape(layer)
    if (n_heads, n_kv, d_ff) == (q0, kv0, f0):
        return
    if n_heads * kv0 != n_kv * q0:
        raise ValueError(f"layer shape {n_heads}/{n_kv} heads breaks the uniform query-per-KV grouping {q0}/{kv0}")
    keep_kv_groups(layer, list(range(n_kv)))
    keep_channels(layer, list(range(d_ff)))


def describe_layers(model) -> dict[str, list[int]]:
    shapes = [layer_shape(layer) for layer in model.model.layers]
    return {key: [s[i] for s in shapes] for i, key in enumerate(LAYER_KEYS)}


def update_config(model) -> None:
    """Write the per-layer shapes into the config. Uniform shapes become a stock config (no remote code)."""
    config = model.config
    config.head_dim = head_dim(config)
    lists = describe_layers(model)
    uniform = all(len(set(v)) == 1 for v in lists.values())
    # stock configs insist that hidden_size is a multiple of the head count, even with an explicit head_dim
    if uniform and config.hidden_size % lists["layer_num_attention_heads"][0] == 0:
        config.num_attention_heads = lists["layer_num_attention_heads"][0]
        config.num_key_value_heads = lists["layer_num_key_value_heads"][0]
        config.intermediate_size = lists["layer_intermediate_size"][0]
        for key in LAYER_KEYS:
            if hasattr(config, key):
                delattr(config, key)
    else:
        for key, values in lists.items():
            setattr(config, key, values)


def is_heterogeneous(config) -> bool:
    return all(hasattr(config, key) for key in LAYER_KEYS)


def apply_layer_shapes(model, config) -> None:
    for i, layer in enumerate(model.model.layers):
        resize_layer(layer, *(getattr(config, key)[i] for key in LAYER_KEYS))


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied embeddings count once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
