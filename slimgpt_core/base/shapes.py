"""Physically shrink decoder layers and keep the config describing every layer's shape (SPEC §4).

The slicing helpers live in modeling_slimgpt.py, which exported checkpoints ship as their remote code."""
from __future__ import annotations

from torch import nn
from transformers import AutoConfig

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import (CLASSES, LAYER_KEYS, LayerConfig, keep_channels, keep_kv_groups,  # noqa: F401
                                               layer_shape)

SUPPORTED_ARCHITECTURES = tuple(CLASSES)
# config fields that mark mixture-of-experts FFNs (Mixtral, Qwen MoE, DeepSeek, OLMoE, ...)
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def check_prunable(config, name: str) -> None:
    """One sentence naming the supported architectures when the engine cannot prune this model's layers (before
    any weights are read)."""
    mt = base_model_type(config)
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if any(getattr(config, key, None) for key in _EXPERT_FIELDS):
        raise SlimGPTError(f"{name} ({mt}) has mixture-of-experts FFN layers, which the engine cannot prune: "
                           f"supported are dense decoders ({supported})")
    if mt not in SUPPORTED_ARCHITECTURES:
        raise SlimGPTError(f"unsupported architecture: {mt} in {name} (supported: {supported})")


def check_prunable_layers(model, name: str) -> None:
    """The loaded layers have the structure the engine prunes: attention with an o_proj and a dense FFN with a
    down_proj (a supported model type with swapped-in expert layers, say, does not)."""
    for i, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not (isinstance(getattr(attn, "o_proj", None), nn.Linear)
                and isinstance(getattr(mlp, "down_proj", None), nn.Linear)):
            raise SlimGPTError(f"layer {i} of {name} is not an attention block and a dense FFN (experts?), which "
                               f"the engine cannot prune (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def base_model_type(config) -> str | None:
    mt = config.model_type
    return mt[len("slimgpt_"):] if mt and mt.startswith("slimgpt_") else mt


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def describe_layers(model) -> dict[str, list[int]]:
    shapes = [layer_shape(layer) for layer in model.model.layers]
    return {key: [s[i] for s in shapes] for i, key in enumerate(LAYER_KEYS)}


def _replace_config(model, new) -> None:
    old = model.config
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is old:
            module.config = new
        elif isinstance(config, LayerConfig) and config.base is old:  # a layer's own head count over the shared config
            config.base = new


def update_config(model) -> None:
    """Describe the layers' shapes in the config.

    Uniform shapes: a stock config (loads anywhere without remote code). Otherwise the model becomes the
    SlimGPT subclass of its architecture, whose config carries per-layer lists."""
    config = model.config
    base = base_model_type(config)
    config_cls, model_cls = CLASSES[base]
    lists = describe_layers(model)
    d = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", *LAYER_KEYS):
        d.pop(key, None)
    d["head_dim"] = head_dim(config)
    uniform = all(len(set(v)) == 1 for v in lists.values())
    # stock configs insist that hidden_size is a multiple of the head count, even with an explicit head_dim
    heads = lists["layer_num_attention_heads"][0]
    if uniform and heads and config.hidden_size % heads == 0:  # no attention left anywhere: per-layer lists
        d.update(num_attention_heads=lists["layer_num_attention_heads"][0],
                 num_key_value_heads=lists["layer_num_key_value_heads"][0],
                 intermediate_size=lists["layer_intermediate_size"][0])
        new = AutoConfig.for_model(base, **d)
        model.__class__ = next(c for c in type(model).__mro__ if c.__name__.endswith("ForCausalLM")
                               and not c.__name__.startswith("SlimGPT"))
    else:
        new = config_cls(**d, **lists)
        model.__class__ = model_cls
    new._attn_implementation = config._attn_implementation
    _replace_config(model, new)


def is_heterogeneous(config) -> bool:
    return all(getattr(config, key, None) is not None for key in LAYER_KEYS)


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied embeddings count once: parameters() yields a shared one once)."""
    return sum(p.numel() for p in module.parameters())


def target_shape(target_config: dict, model) -> tuple[list[int], list[int]]:
    """Per-layer query heads and FFN widths to keep so that `model` takes the shape of `target_config`
    (another model's config.json: per-layer lists or uniform num_attention_heads / intermediate_size)."""

    n = len(model.model.layers)
    tn = target_config.get("num_hidden_layers", n)
    if tn != n:
        raise SlimGPTError(f"target architecture has {tn} layers but the model has {n}: only widths can be pruned")
    heads = target_config.get("layer_num_attention_heads") or [target_config.get("num_attention_heads")] * n
    ffn = target_config.get("layer_intermediate_size") or [target_config.get("intermediate_size")] * n
    if None in heads or None in ffn:
        raise SlimGPTError("target config needs num_attention_heads and intermediate_size (or per-layer lists)")
    src_dim = head_dim(model.config)
    tgt_dim = target_config.get("head_dim") or target_config.get("hidden_size", 0) // max(1, heads[0])
    if tgt_dim and tgt_dim != src_dim:
        raise SlimGPTError(f"target head size {tgt_dim} differs from the model's {src_dim}: heads cannot be resized")
    return [int(h) for h in heads], [int(f) for f in ffn]


def check_context_length(config, seqlen: int, what: str = "sequence length") -> None:
    """Refuse a sequence longer than the model's context (`what` names the setting in the sentence)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise SlimGPTError(f"{what} {seqlen} exceeds the model's context of {limit} tokens")
