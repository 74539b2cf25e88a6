"""Decoder LMs whose layers have different head counts and FFN widths, as SlimGPT Studio writes them.

Self-contained (torch + transformers only): exported checkpoints ship this file as `modeling_slimgpt.py`
and load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Inside the project the
classes are registered with the Auto classes, so our own runs load without remote code.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | list[int] | None = None,
                  cols: torch.Tensor | list[int] | None = None) -> nn.Linear:
    """A new Linear holding only the given output rows / input columns of `linear` (index tensors or lists)."""
    w = linear.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data = w.contiguous()
    if linear.bias is not None:
        new.bias.data = (linear.bias.data[rows] if rows is not None else linear.bias.data).contiguous()
    return new


def _unit_rows(units, size: int) -> list[int]:
    """The rows of whole units of `size` consecutive rows, unit by unit (a list: indexing puts it on the weight's
    device)."""
    return [u * size + j for u in units for j in range(size)]


class LayerConfig:
    """The model's config with this layer's own query-head count: Phi-3's attention splits its fused qkv output at
    `config.num_attention_heads` heads. Everything else reads through to the shared config (`base`)."""

    def __init__(self, base, num_attention_heads: int):
        self.base, self.num_attention_heads = base, num_attention_heads

    def __getattr__(self, name):
        if name == "base":  # not set yet (copying): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.base, name)


def _query_width(attn) -> int:
    return attn.o_proj.in_features


def _kv_width(attn) -> int:
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q | k | v] rows of one fused weight
        return (attn.qkv_proj.out_features - _query_width(attn)) // 2
    return attn.k_proj.out_features


def _slice_qkv(attn, q_rows: list[int], kv_rows: list[int]) -> None:
    """Keep these rows of the query and of the key/value projections (separate or fused) and the matching o_proj
    columns; the attention's head counts follow."""
    d = attn.head_dim
    if hasattr(attn, "qkv_proj"):
        nq, nkv = _query_width(attn), _kv_width(attn)
        attn.qkv_proj = sliced_linear(attn.qkv_proj, rows=q_rows + [nq + r for r in kv_rows]
                                      + [nq + nkv + r for r in kv_rows])
    else:
        attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows)
    n_q, n_kv = len(q_rows) // d, len(kv_rows) // d
    attn.num_key_value_groups = n_q // n_kv if n_kv else 0
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = n_kv
    if hasattr(attn, "qkv_proj"):
        attn.config = LayerConfig(getattr(attn.config, "base", attn.config), n_q)
    if n_q == 0:  # no head left: projections to nothing cannot be reshaped into heads
        attn.forward = types.MethodType(_no_attention, attn)


def keep_kv_groups(layer, keep) -> None:
    """Keep only these KV groups (one k/v head and its query heads each; under MHA a group is one head)."""
    attn = layer.self_attn
    d, rep = attn.head_dim, attn.num_key_value_groups
    _slice_qkv(attn, _unit_rows(keep, d * rep), _unit_rows(keep, d))


def keep_channels(layer, keep) -> None:
    mlp = layer.mlp
    idx = list(keep)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: [gate | up] rows of one fused weight
        width = mlp.down_proj.in_features
        mlp.gate_up_proj = sliced_linear(mlp.gate_up_proj, rows=idx + [width + i for i in idx])
    else:
        mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=idx)
        mlp.up_proj = sliced_linear(mlp.up_proj, rows=idx)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def layer_shape(layer) -> tuple[int, int, int]:
    """(query heads, KV heads, FFN channels) as the layer's weights say."""
    attn = layer.self_attn
    return (_query_width(attn) // attn.head_dim, _kv_width(attn) // attn.head_dim, layer.mlp.down_proj.in_features)


def resize_layer(layer, n_heads: int, n_kv: int, d_ff: int) -> None:
    """Give a freshly built layer a pruned shape (its weights are loaded afterwards). 0 heads and 0 KV heads: the
    layer has no attention; 0 channels: no FFN."""
    q0, kv0, f0 = layer_shape(layer)
    if (n_heads, n_kv, d_ff) == (q0, kv0, f0):
        return
    rep0, rep = layer.self_attn.num_key_value_groups, n_heads // max(n_kv, 1)
    no_attention = n_heads == n_kv == 0
    if not no_attention and (n_heads != rep * n_kv or not (1 <= n_kv <= kv0 and 1 <= rep <= rep0)) \
            or not 0 <= d_ff <= f0:
        raise ValueError(f"layer shape {n_heads} heads / {n_kv} KV heads / {d_ff} channels does not fit {q0}/{kv0}/{f0}")
    keep_kv_groups(layer, list(range(n_kv)))
    if not no_attention:
        keep_query_heads(layer, rep)  # fewer query heads per KV group (sheared models); all of them is a plain copy
    keep_channels(layer, list(range(d_ff)))


def _no_attention(self, hidden_states, *args, **kwargs):
    """A layer whose every head was removed: the attention adds nothing to the residual stream."""
    return torch.zeros_like(hidden_states), None


def keep_query_heads(layer, per_group: int) -> None:
    """Keep the first `per_group` query heads of every KV group."""
    attn = layer.self_attn
    d, rep = attn.head_dim, attn.num_key_value_groups
    n_kv = _kv_width(attn) // d
    heads = [g * rep + j for g in range(n_kv) for j in range(per_group)]
    _slice_qkv(attn, _unit_rows(heads, d), list(range(n_kv * d)))


def keep_query_heads_of(layer, heads) -> None:
    """Keep these query heads (indices in the layer's order); every KV group that keeps any keeps the same number
    (repeat_kv shares each k/v head with a fixed count of query heads), the others go with their k/v head. With a
    single KV head (MQA, Gemma 3 270M) this prunes heads without removing the layer's attention."""
    attn = layer.self_attn
    d, rep = attn.head_dim, attn.num_key_value_groups
    heads = sorted(heads)
    groups = sorted({h // rep for h in heads})
    counts = {g: sum(1 for h in heads if h // rep == g) for g in groups}
    if len(set(counts.values())) > 1:
        raise ValueError(f"query heads {heads} leave KV groups with different numbers of query heads {counts}")
    _slice_qkv(attn, _unit_rows(heads, d), _unit_rows(groups, d))


def _shrink_layers(model) -> None:
    config = model.config
    lists = [getattr(config, key) for key in LAYER_KEYS]
    for i, layer in enumerate(model.model.layers):
        resize_layer(layer, lists[0][i], lists[1][i], lists[2][i])


def _check_layers(config) -> None:
    """Per-layer lists replace the stock check that hidden_size is a multiple of the (global) head count: with an
    explicit head_dim a pruned hidden size need not be."""
    heads, kv = config.layer_num_attention_heads, config.layer_num_key_value_heads
    if heads and kv and any(h % k if k else h for h, k in zip(heads, kv)):
        raise ValueError("every layer's query heads must be a multiple of its KV heads")  # 0 and 0: no attention


def _validate(config) -> None:
    """transformers' save-time validation, with the per-layer check in place of the global head-count rule."""
    for check in type(config).__class_validators__:
        if check.__name__ != "validate_architecture":
            check(config)
    _check_layers(config)


class SlimGPTLlamaConfig(LlamaConfig):
    model_type = "slimgpt_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTMistralConfig(MistralConfig):
    model_type = "slimgpt_mistral"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTQwen2Config(Qwen2Config):
    model_type = "slimgpt_qwen2"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTQwen3Config(Qwen3Config):
    model_type = "slimgpt_qwen3"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTGemma2Config(Gemma2Config):
    model_type = "slimgpt_gemma2"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTGemma3TextConfig(Gemma3TextConfig):
    model_type = "slimgpt_gemma3_text"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTPhi3Config(Phi3Config):
    model_type = "slimgpt_phi3"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    validate = _validate


class SlimGPTLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlimGPTLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


class SlimGPTMistralForCausalLM(MistralForCausalLM):
    config_class = SlimGPTMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


class SlimGPTQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = SlimGPTQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


class SlimGPTQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = SlimGPTQwen3Config

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


class SlimGPTGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = SlimGPTGemma2Config

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


class SlimGPTGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = SlimGPTGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


class SlimGPTPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = SlimGPTPhi3Config

    def __init__(self, config):
        super().__init__(config)
        _shrink_layers(self)


# base model_type -> (config class, model class)
CLASSES = {"llama": (SlimGPTLlamaConfig, SlimGPTLlamaForCausalLM),
           "mistral": (SlimGPTMistralConfig, SlimGPTMistralForCausalLM),
           "qwen2": (SlimGPTQwen2Config, SlimGPTQwen2ForCausalLM),
           "qwen3": (SlimGPTQwen3Config, SlimGPTQwen3ForCausalLM),
           "gemma2": (SlimGPTGemma2Config, SlimGPTGemma2ForCausalLM),
           "gemma3_text": (SlimGPTGemma3TextConfig, SlimGPTGemma3ForCausalLM),
           "phi3": (SlimGPTPhi3Config, SlimGPTPhi3ForCausalLM)}


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load our checkpoints in-process without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_cls, model_cls in CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass
