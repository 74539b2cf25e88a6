"""The model page's facts about a loaded model: architecture, shape, parameters, dtype, context."""
from __future__ import annotations

from dataclasses import dataclass

from slimgpt_core.base.shapes import count_parameters, layer_shape
from slimgpt_core.models import LoadedModel


@dataclass
class ModelInfo:
    name: str
    path: str
    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    parameters: int
    layer_parameters: int
    dtype: str
    context: int | None


def describe_model(loaded: LoadedModel) -> ModelInfo:
    m, c = loaded.model, loaded.model.config
    q, kv, f = layer_shape(m.model.layers[0])
    return ModelInfo(loaded.name, loaded.path, c.model_type, len(m.model.layers), c.hidden_size, q, kv,
                     m.model.layers[0].self_attn.head_dim, f, c.vocab_size, count_parameters(m),
                     count_parameters(m.model.layers), str(next(m.parameters()).dtype).replace("torch.", ""),
                     getattr(c, "max_position_embeddings", None))
