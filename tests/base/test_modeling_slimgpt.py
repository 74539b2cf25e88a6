"""The slicing helpers and per-layer-shape classes (base/modeling_slimgpt.py) where methods/test_surgery.py and the
architecture tests leave them open: Phi-3's per-layer head count (LayerConfig) through a second slicing, a copy and
a new config, and the refusal of query heads that leave KV groups uneven, sentence and counts."""
import copy

import pytest
import torch

from slimgpt_core.base.modeling_slimgpt import (LayerConfig, keep_kv_groups, keep_query_heads, keep_query_heads_of,
                                                layer_shape)
from slimgpt_core.base.shapes import update_config
from tests.tiny_models import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_a_fused_layer_sliced_twice_reads_through_to_the_new_config():
    """KV groups, then query heads per group (as loading a sheared Phi-3 does): the layer's own head count is the
    last one, and after update_config everything else is read from the model's new config, not the old one."""
    model = tiny_model("phi3", heads=4, kv=2)
    attn = model.model.layers[1].self_attn
    keep_kv_groups(model.model.layers[1], [1])
    keep_query_heads(model.model.layers[1], 1)
    assert layer_shape(model.model.layers[1])[:2] == (1, 1) and attn.config.num_attention_heads == 1
    old = model.config
    update_config(model)
    assert model.config is not old and attn.config.base is model.config
    assert attn.config.num_attention_heads == 1 and attn.config.hidden_size == model.config.hidden_size


def test_a_sliced_fused_model_copies(tokens):
    """copy.deepcopy builds each LayerConfig without __init__ and asks it for __setstate__ before `base` is set:
    that must be a plain missing attribute, not a recursion."""
    model = tiny_model("phi3", heads=4, kv=2)
    keep_kv_groups(model.model.layers[0], [0])
    twin = copy.deepcopy(model)
    assert isinstance(twin.model.layers[0].self_attn.config, LayerConfig)
    assert twin.model.layers[0].self_attn.config.num_attention_heads == 2
    assert torch.equal(_logits(twin, tokens), _logits(model, tokens))
    half_made = LayerConfig.__new__(LayerConfig)
    with pytest.raises(AttributeError, match="^base$"):
        half_made.base
    assert not hasattr(half_made, "num_attention_heads")


def test_uneven_query_heads_are_refused_with_their_counts():
    layer = tiny_model("llama", heads=6, kv=3, hidden=24, layers=1).model.layers[0]  # groups (0 1) (2 3) (4 5)
    for heads, counts in [([0, 1, 2], "{0: 2, 1: 1}"), ([5, 0, 2, 3], "{0: 1, 1: 2, 2: 1}")]:
        with pytest.raises(ValueError) as err:
            keep_query_heads_of(layer, heads)
        assert str(err.value) == (f"query heads {sorted(heads)} leave KV groups with different numbers of query heads "
                                  f"{counts}")
        assert layer_shape(layer) == (6, 3, 48)  # refused before anything was cut
    keep_query_heads_of(layer, [5, 0, 1, 4])  # two in groups 0 and 2
    assert layer_shape(layer) == (4, 2, 48)
