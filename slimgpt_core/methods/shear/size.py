"""How many parameters a model of a given shape has: the studio's target editor shows it as the user types.

Counted from the source model's own modules (which linears carry a bias, whether the head is tied to the
embedding), so it is exactly what the cut will produce, biases and norms included."""
from __future__ import annotations

from slimgpt_core.base.shapes import layer_layout, model_parameters
from slimgpt_core.methods.shear.target import Shape


def parameter_count(model, shape: Shape) -> int:
    """Parameters of `model` cut to `shape` (every layer of one shape, as shear makes it)."""
    inner = model.model
    layout = layer_layout(inner.layers[0])
    vocab = inner.embed_tokens.weight.shape[0]
    tied = model.lm_head.weight is inner.embed_tokens.weight
    return model_parameters(shape.layers, shape.heads, shape.kv_groups, shape.ffn, shape.hidden, layout.head_dim,
                            vocab, tied, layout.biases, layout.norms(shape.hidden), model.lm_head.bias is not None)
