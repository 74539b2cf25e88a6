"""Physically shrink decoder layers and keep the config describing every layer's shape (SPEC §4).

The slicing helpers live in modeling_slimgpt.py, which exported checkpoints ship as their remote code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from torch import nn
from transformers import AutoConfig

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import (CLASSES, LAYER_KEYS, LayerConfig, keep_channels, keep_kv_groups,  # noqa: F401
                                               layer_shape)

SUPPORTED_ARCHITECTURES = tuple(CLASSES)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 fuses projections that read the same input into one linear: its rows are theirs, block after block
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

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


def context_length(config) -> int | None:
    """The model's context in tokens (None where the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or None


def fits_context(config, seqlen: int) -> bool:
    limit = context_length(config)
    return limit is None or seqlen <= limit


def check_context_length(config, seqlen: int, what: str = "sequence length") -> None:
    """Refuse a sequence longer than the model's context (`what` names the setting in the sentence)."""
    if not fits_context(config, seqlen):
        limit = context_length(config)
        raise SlimGPTError(f"{what} {seqlen} exceeds the model's context of {limit} tokens")


# --- the parameter counter ---------------------------------------------------------------------------------------

def decoder_layer_parameters(q_heads, kv_heads, ffn, hidden, head_dim: int, biases: Collection[str] = (),
                             norms=None):
    """Parameters of one llama-family decoder layer: q/k/v/o and gate/up/down, a bias on each projection that
    `biases` names (`PROJECTIONS`), and `norms` norm weights (None: two norms over the hidden size).

    Works on ints, floats and tensors alike (shear's masks count fractional expected shapes), and adds in the
    same order for each, so a count of a shape without biases is the same float whatever the caller."""
    n = hidden * head_dim * (2 * q_heads + 2 * kv_heads) + 3 * hidden * ffn
    for name in PROJECTIONS:
        if name in biases:
            n = n + {"q_proj": q_heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
                     "gate_proj": ffn, "up_proj": ffn}.get(name, hidden)  # o_proj, down_proj: hidden
    return n + (2 * hidden if norms is None else norms)


def outer_parameters(hidden, vocab: int, tied: bool, head_bias: bool = False):
    """Parameters outside the layers: embedding, untied head (and its bias) and final norm."""
    n = hidden * (vocab * (1 if tied else 2) + 1)
    return n + vocab if head_bias and not tied else n


def model_parameters(layers, q_heads, kv_heads, ffn, hidden, head_dim: int, vocab: int, tied: bool,
                     biases: Collection[str] = (), norms=None, head_bias: bool = False):
    """Parameters of a llama-family model whose layers all have this shape."""
    return (layers * decoder_layer_parameters(q_heads, kv_heads, ffn, hidden, head_dim, biases, norms)
            + outer_parameters(hidden, vocab, tied, head_bias))


@dataclass(frozen=True)
class UnitParameters:
    """A decoder layer's parameters split by unit: the count is fixed + kv_groups·per_kv_group +
    channels·per_channel (a KV group: its query heads, K and V rows and o_proj columns; a channel: its gate and up
    rows and down_proj column)."""
    fixed: int
    per_kv_group: int
    per_channel: int


@dataclass(frozen=True)
class LayerLayout:
    """What a decoder layer's parameter count depends on besides its widths, read from its modules."""
    hidden: int
    head_dim: int
    biases: frozenset[str]  # projections that carry a bias
    norm_sizes: tuple[int, ...]  # every norm weight's length

    def norms(self, hidden: int | None = None) -> int:
        """Norm weights at this hidden size: the norms over the hidden size follow it, any other (over a head,
        say) keeps its length."""
        if hidden is None:
            return sum(self.norm_sizes)
        return sum(hidden if size == self.hidden else size for size in self.norm_sizes)

    def parameters(self, q_heads: int, kv_heads: int, ffn: int) -> int:
        return decoder_layer_parameters(q_heads, kv_heads, ffn, self.hidden, self.head_dim, self.biases, self.norms())

    def units(self, heads_per_group: int) -> UnitParameters:
        fixed = self.parameters(0, 0, 0)
        return UnitParameters(fixed, self.parameters(heads_per_group, 1, 0) - fixed, self.parameters(0, 0, 1) - fixed)


def projection_modules(layer) -> dict[str, nn.Linear]:
    """A decoder layer's linears by name as it holds them: q/k/v/o and gate/up/down, or Phi-3's fused qkv_proj and
    gate_up_proj in place of the projections they hold (`FUSED_PROJECTIONS`)."""
    found = {}
    for block in (layer.self_attn, layer.mlp):
        for name in (*PROJECTIONS, *FUSED_PROJECTIONS):
            module = getattr(block, name, None)
            if isinstance(module, nn.Linear):
                found[name] = module
    return found


def has_fused_projections(layer) -> bool:
    return not FUSED_PROJECTIONS.keys().isdisjoint(projection_modules(layer))


def input_projections(layer) -> list[nn.Linear]:
    """The linears that read the hidden state (q/k/v or qkv_proj, gate/up or gate_up_proj): their input columns are
    the hidden dimensions."""
    return [m for name, m in projection_modules(layer).items() if name not in ("o_proj", "down_proj")]


def layer_layout(layer) -> LayerLayout:
    modules = projection_modules(layer)
    biases = set()
    for name, m in modules.items():
        if m.bias is not None:
            biases.update(FUSED_PROJECTIONS.get(name, (name,)))
    return LayerLayout(modules["o_proj"].out_features, layer.self_attn.head_dim, frozenset(biases),
                       tuple(p.numel() for name, p in layer.named_parameters() if "norm" in name))


def layer_parameters(layer, q_heads: int, kv_heads: int, ffn: int) -> int:
    """Parameters `layer` holds once cut to these widths (biases and norms as it has them)."""
    return layer_layout(layer).parameters(q_heads, kv_heads, ffn)


def head_units(q_heads: int, kv_heads: int, by_query_head: bool = True) -> tuple[int, int]:
    """(attention units, query heads per unit) of a layer: its KV groups, or, where one KV head is shared by all
    query heads and the method prunes inside a group (`by_query_head`), its query heads — removing the one group
    would remove the layer's attention."""
    if kv_heads == 1 and by_query_head:
        return q_heads, 1
    return kv_heads, q_heads // max(kv_heads, 1)


def kept_heads(q_heads: int, kv_heads: int, units_removed: int, by_query_head: bool = True) -> tuple[int, int]:
    """(query heads, KV heads) a layer keeps after losing `units_removed` of its `head_units`."""
    units, per_unit = head_units(q_heads, kv_heads, by_query_head)
    kept = units - units_removed
    if per_unit == 1 and kv_heads == 1:  # query heads inside the group: the KV head stays while any uses it
        return kept, int(kept > 0)
    return kept * per_unit, kept


def attention_unit_columns(layer) -> int:
    """o_proj input columns of one attention unit of `layer` (`head_units`: a KV group's query heads, or one query
    head where the layer has one KV head): the column group the pruner and the error curves remove at once."""
    q, kv, _ = layer_shape(layer)
    return layer.self_attn.head_dim * head_units(q, kv)[1]


def unit_parameters(layer) -> UnitParameters:
    """`layer`'s parameters split by attention unit (`head_units`: a KV group with its query heads, or one query
    head where the layer has one KV head) and FFN channel."""
    q, kv, _ = layer_shape(layer)
    layout = layer_layout(layer)
    units, per_unit = head_units(q, kv)
    if kv == 1 and units == q:  # the K/V projections are fixed; a unit is a query head's q rows and o_proj columns
        fixed = layout.parameters(0, 1, 0)
        return UnitParameters(fixed, layout.parameters(1, 1, 0) - fixed, layout.parameters(0, 1, 1) - fixed)
    return layout.units(per_unit)
