"""A physically sliced layer computes exactly what the full-size layer computes with the removed units zeroed."""
import copy

import pytest
import torch

from conftest import tiny_model
from slimgpt_core.base.shapes import describe_layers, keep_channels, keep_kv_groups, layer_shape, update_config

CASES = [("llama", 4, 4, [[0, 2], [1, 2, 3], [3]]), ("llama", 4, 2, [[1], [0, 1], [0]]),
         ("qwen2", 4, 2, [[0], [1], [0, 1]]), ("mistral", 6, 3, [[0, 2], [1], [0, 1, 2]])]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("arch,heads,kv,keep_groups", CASES)
def test_sliced_model_equals_zeroed_full_size_model(arch, heads, kv, keep_groups, tokens):
    full = tiny_model(arch, heads, kv, hidden=24 if heads == 6 else 32)
    if arch == "qwen2":  # non-zero q/k/v biases: a removed head's bias must go with it
        with torch.no_grad():
            for layer in full.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.1)
    sliced = copy.deepcopy(full)
    g = torch.Generator().manual_seed(3)
    keep_channel_lists = [sorted(torch.randperm(48, generator=g)[:n].tolist()) for n in (40, 17, 5)]
    for i, (zeroed, cut) in enumerate(zip(full.model.layers, sliced.model.layers)):
        attn = zeroed.self_attn
        per_group = attn.head_dim * attn.num_key_value_groups
        with torch.no_grad():  # zero the inputs of o_proj / down_proj that the removed units feed
            for u in set(range(kv)) - set(keep_groups[i]):
                attn.o_proj.weight[:, u * per_group:(u + 1) * per_group] = 0.0
            for c in set(range(48)) - set(keep_channel_lists[i]):
                zeroed.mlp.down_proj.weight[:, c] = 0.0
        keep_kv_groups(cut, keep_groups[i])
        keep_channels(cut, keep_channel_lists[i])
        assert layer_shape(cut) == (len(keep_groups[i]) * heads // kv, len(keep_groups[i]), len(keep_channel_lists[i]))
    update_config(sliced)
    assert describe_layers(sliced)["layer_intermediate_size"] == [40, 17, 5]
    torch.testing.assert_close(_logits(sliced, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)
    # and the zeroing matters: the untouched model computes something else
    assert not torch.allclose(_logits(tiny_model(arch, heads, kv, hidden=24 if heads == 6 else 32), tokens),
                              _logits(full, tokens), atol=1e-3)


def test_kept_units_keep_their_order_and_weights():
    model = tiny_model("llama", 4, 2)
    layer = model.model.layers[0]
    q0, k0, o0 = (layer.self_attn.q_proj.weight.clone(), layer.self_attn.k_proj.weight.clone(),
                  layer.self_attn.o_proj.weight.clone())
    d0, g0 = layer.mlp.down_proj.weight.clone(), layer.mlp.gate_proj.weight.clone()
    keep_kv_groups(layer, [1])
    keep_channels(layer, [3, 7, 40])
    d = layer.self_attn.head_dim
    assert torch.equal(layer.self_attn.q_proj.weight, q0[2 * d:4 * d])  # group 1 = query heads 2 and 3
    assert torch.equal(layer.self_attn.k_proj.weight, k0[d:2 * d])
    assert torch.equal(layer.self_attn.o_proj.weight, o0[:, 2 * d:4 * d])
    assert torch.equal(layer.mlp.down_proj.weight, d0[:, [3, 7, 40]])
    assert torch.equal(layer.mlp.gate_proj.weight, g0[[3, 7, 40]])
