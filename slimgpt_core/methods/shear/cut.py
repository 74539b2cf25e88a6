"""The cut (SPEC §9): keep the open entries of the deterministic gates, fold their values into the weights and
slice the model physically. The result computes the same function as the gated model in eval mode."""
from __future__ import annotations

import torch
from torch import nn

from slimgpt_core.export.modeling_slimgpt import sliced_linear
from slimgpt_core.methods.surgery import update_config


def _open(gate: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of open entries and their values (all entries at value 1 when the structure is not masked)."""
    if gate is None:
        return torch.arange(size), torch.ones(size)
    idx = torch.nonzero(gate != 0).flatten()
    return idx, gate[idx].float()


def _scale_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data.mul_(scale.to(linear.weight.dtype)[:, None])


def _scale_cols(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data.mul_(scale.to(linear.weight.dtype)[None, :])


def _slice_norm(norm, dims: torch.Tensor, scale: torch.Tensor | None) -> None:
    w = norm.weight.data[dims]
    if scale is not None:
        w = w * scale.to(w.dtype)
    norm.weight = nn.Parameter(w.contiguous())


def cut_model(model, gates: dict[str, torch.Tensor]) -> None:
    """Slice `model` in place to the open entries of `gates` (as ShearMasks.deterministic() gives them). The
    query-head gate is one row per layer shared by its groups, or one row per group ([L, groups, per group],
    Minitron); every group must keep the same count."""
    with torch.no_grad():
        _cut(model, gates)


def _cut(model, gates: dict[str, torch.Tensor]) -> None:
    # (not a decorated function: mutation testing skips those)
    inner = model.model
    config = model.config
    dims, hidden_scale = _open(gates.get("hidden"), config.hidden_size)
    masked_hidden = "hidden" in gates
    layer_idx, layer_scale = _open(gates.get("layers"), len(inner.layers))
    kept_layers = []
    for pos, i in enumerate(layer_idx.tolist()):
        layer = inner.layers[i]
        out_scale = layer_scale[pos] * hidden_scale  # folded into the rows of o_proj and down_proj
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        n_heads = attn.q_proj.out_features // d
        n_kv = attn.k_proj.out_features // d
        rep = n_heads // n_kv
        groups, group_scale = _open(gates["kv_groups"][i] if "kv_groups" in gates else None, n_kv)
        head_gate = gates["heads"][i] if "heads" in gates else None  # [heads per group], or [groups, per group]
        rows = [_open(head_gate if head_gate is None or head_gate.dim() == 1 else head_gate[g], rep)
                for g in groups.tolist()]
        within = rows[0][0]
        heads = torch.cat([g * rep + idx for g, (idx, _) in zip(groups.tolist(), rows)])
        head_scale = torch.cat([gs * val for gs, (_, val) in zip(group_scale, rows)])
        q_rows = (heads[:, None] * d + torch.arange(d)[None, :]).flatten()
        kv_rows = (groups[:, None] * d + torch.arange(d)[None, :]).flatten()
        attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows, cols=dims)
        attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows, cols=dims)
        attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows, cols=dims)
        attn.o_proj = sliced_linear(attn.o_proj, rows=dims, cols=q_rows)
        _scale_cols(attn.o_proj, head_scale.repeat_interleave(d))
        _scale_rows(attn.o_proj, out_scale)
        attn.num_key_value_groups = len(within)
        channels, channel_scale = _open(gates["ffn"][i] if "ffn" in gates else None, mlp.down_proj.in_features)
        mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=channels, cols=dims)
        mlp.up_proj = sliced_linear(mlp.up_proj, rows=channels, cols=dims)
        mlp.down_proj = sliced_linear(mlp.down_proj, rows=dims, cols=channels)
        _scale_cols(mlp.down_proj, channel_scale)
        _scale_rows(mlp.down_proj, out_scale)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _slice_norm(norm, dims, hidden_scale if masked_hidden else None)
        attn.layer_idx = pos
        kept_layers.append(layer)
    inner.layers = nn.ModuleList(kept_layers)
    # embedding: the hidden gate folds into it; a tied head then shares it, so the final norm stays unscaled
    tied = model.lm_head.weight is inner.embed_tokens.weight
    emb = inner.embed_tokens.weight.data[:, dims]
    if masked_hidden:
        emb = emb * hidden_scale.to(emb.dtype)[None, :]
    inner.embed_tokens.weight = nn.Parameter(emb.contiguous())
    inner.embed_tokens.embedding_dim = len(dims)
    if tied:
        model.lm_head = sliced_linear(model.lm_head, cols=dims)
        model.lm_head.weight = inner.embed_tokens.weight
        _slice_norm(inner.norm, dims, None)
    else:
        model.lm_head = sliced_linear(model.lm_head, cols=dims)
        _slice_norm(inner.norm, dims, hidden_scale if masked_hidden else None)
    config.hidden_size = len(dims)
    config.num_hidden_layers = len(kept_layers)
    kept = layer_idx.tolist()
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    update_config(model)
