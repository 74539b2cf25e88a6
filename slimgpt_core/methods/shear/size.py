"""How many parameters a model of a given shape has: the studio's target editor shows it as the user types.

Counted from the source model's own modules (which linears carry a bias, whether the head is tied to the
embedding), so it is exactly what the cut will produce, biases and norms included."""
from __future__ import annotations

from slimgpt_core.methods.shear.target import Shape


def _bias(linear) -> int:
    return int(linear.bias is not None)


def parameter_count(model, shape: Shape) -> int:
    """Parameters of `model` cut to `shape` (every layer of one shape, as shear makes it)."""
    inner = model.model
    layer = inner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    d, h = attn.head_dim, shape.hidden
    q, kv, f = shape.heads * d, shape.kv_groups * d, shape.ffn
    attention = h * (q + 2 * kv) + q * h + _bias(attn.q_proj) * q + (_bias(attn.k_proj) + _bias(attn.v_proj)) * kv
    attention += _bias(attn.o_proj) * h
    ffn = 3 * h * f + (_bias(mlp.gate_proj) + _bias(mlp.up_proj)) * f + _bias(mlp.down_proj) * h
    source_hidden = model.config.hidden_size
    # norm weights over the hidden size shrink with it; any other norm (over a head, say) keeps its size
    norms = sum(h if p.numel() == source_hidden else p.numel()
                for name, p in layer.named_parameters() if "norm" in name)
    vocab = inner.embed_tokens.weight.shape[0]
    tied = model.lm_head.weight is inner.embed_tokens.weight
    head = 0 if tied else vocab * h + _bias(model.lm_head) * vocab
    return shape.layers * (attention + ffn + norms) + vocab * h + head + h  # + the final norm
