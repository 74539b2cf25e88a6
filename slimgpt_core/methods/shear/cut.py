"""The cut (SPEC §9): keep the open entries of the deterministic gates, fold their values into the weights and
slice the model physically. The result computes the same function as the gated model in eval mode."""
from __future__ import annotations

import torch
from torch import nn

from slimgpt_core.base.modeling_slimgpt import keep_query_heads_of, sliced_linear
from slimgpt_core.base.shapes import input_projections, keep_channels, layer_shape, update_config


def _open(gate: torch.Tensor | None, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of open entries and their values (all entries at value 1, made on `device`, when the structure is
    not masked; a gate is on the model's device already)."""
    if gate is None:
        return torch.arange(size, device=device), torch.ones(size, device=device)
    idx = torch.nonzero(gate).flatten()
    return idx, gate[idx].float()


def _scale(linear: nn.Linear, out_scale: torch.Tensor, in_scale: torch.Tensor) -> None:
    """Gate values folded into a weight, in place (an fp32 scale multiplies a bf16 weight in fp32, no cast)."""
    linear.weight.data.mul_(in_scale[None, :]).mul_(out_scale[:, None])


def _slice_norm(norm, dims: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    w = norm.weight.data[dims]  # a copy (advanced indexing)
    if scale is not None:
        w.mul_(scale)
    norm.weight = nn.Parameter(w)


def cut_model(model, gates: dict[str, torch.Tensor]) -> None:
    """Slice `model` in place to the open entries of `gates` (as ShearMasks.deterministic() gives them). The
    query-head gate is one row per layer shared by its groups, or one row per group ([L, groups, per group],
    Minitron); every group must keep the same count. Gates are on the model's device."""
    with torch.no_grad():
        _cut(model, gates)


def _slice_inputs(layer, dims: torch.Tensor) -> None:
    """Keep the hidden dimensions `dims` of every linear that reads the hidden state (separate or fused)."""
    readers = {id(m) for m in input_projections(layer)}
    for block in (layer.self_attn, layer.mlp):
        for name, module in list(block.named_children()):
            if id(module) in readers:
                setattr(block, name, sliced_linear(module, cols=dims))


def _cut_attention(layer, i: int, gates: dict[str, torch.Tensor], dims: torch.Tensor, out_scale: torch.Tensor,
                   device: torch.device) -> None:
    """Layer i's attention cut to its open KV groups and heads within them (the layer surgery's
    `keep_query_heads_of`, separate or fused q/k/v); hidden dimensions are cut by `_slice_inputs`, and the gates'
    values (and `out_scale`) folded into o_proj, whose rows keep `dims`."""
    attn = layer.self_attn
    d = attn.head_dim
    n_heads, n_kv, _ = layer_shape(layer)
    rep = n_heads // n_kv
    groups, group_scale = _open(gates["kv_groups"][i] if "kv_groups" in gates else None, n_kv, device)
    head_gate = gates["heads"][i] if "heads" in gates else None  # [heads per group], or [groups, per group]
    rows = [_open(head_gate if head_gate is None or head_gate.dim() == 1 else head_gate[g], rep, device)
            for g in groups.tolist()]
    heads = torch.cat([g * rep + idx for g, (idx, _) in zip(groups.tolist(), rows)])
    head_scale = torch.cat([gs * val for gs, (_, val) in zip(group_scale, rows)])
    keep_query_heads_of(layer, heads.tolist())  # ascending: groups ascending, heads ascending within each
    attn.o_proj = sliced_linear(attn.o_proj, rows=dims)
    _scale(attn.o_proj, out_scale, head_scale.repeat_interleave(d))


def _cut_mlp(layer, i: int, gates: dict[str, torch.Tensor], dims: torch.Tensor, out_scale: torch.Tensor,
             device: torch.device) -> None:
    """Layer i's MLP cut to its open channels (the layer surgery's `keep_channels`, separate or fused gate/up); the
    gates folded into down_proj, whose rows keep `dims`."""
    mlp = layer.mlp
    channels, channel_scale = _open(gates["ffn"][i] if "ffn" in gates else None, mlp.down_proj.in_features, device)
    keep_channels(layer, channels.tolist())
    mlp.down_proj = sliced_linear(mlp.down_proj, rows=dims)
    _scale(mlp.down_proj, out_scale, channel_scale)


def _cut(model, gates: dict[str, torch.Tensor]) -> None:
    # (not a decorated function: mutation testing skips those)
    inner = model.model
    config = model.config
    device = inner.embed_tokens.weight.device  # on a GPU: index and scale tensors are made there too
    dims, hidden_scale = _open(gates.get("hidden"), config.hidden_size, device)  # ones when not masked
    layer_idx, layer_scale = _open(gates.get("layers"), len(inner.layers), device)
    kept_layers = []
    for pos, i in enumerate(layer_idx.tolist()):
        layer = inner.layers[i]
        out_scale = layer_scale[pos] * hidden_scale  # folded into the rows of o_proj and down_proj
        _cut_attention(layer, i, gates, dims, out_scale, device)
        _cut_mlp(layer, i, gates, dims, out_scale, device)
        _slice_inputs(layer, dims)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _slice_norm(norm, dims, hidden_scale)
        layer.self_attn.layer_idx = pos
        kept_layers.append(layer)
    inner.layers = nn.ModuleList(kept_layers)
    # embedding: the hidden gate folds into it; a tied head then shares it, so the final norm stays unscaled
    tied = model.lm_head.weight is inner.embed_tokens.weight
    emb = inner.embed_tokens.weight.data[:, dims].contiguous()
    emb.mul_(hidden_scale[None, :])
    inner.embed_tokens.weight = nn.Parameter(emb)
    inner.embed_tokens.embedding_dim = len(dims)
    model.lm_head = sliced_linear(model.lm_head, cols=dims)
    if tied:
        model.lm_head.weight = inner.embed_tokens.weight
        _slice_norm(inner.norm, dims)
    else:
        _slice_norm(inner.norm, dims, hidden_scale)
    config.hidden_size = len(dims)
    config.num_hidden_layers = len(kept_layers)
    kept = layer_idx.tolist()
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    update_config(model)
