"""Heads when KV heads are few: with one KV head shared by all query heads (MQA, Gemma 3 270M) the units are the
query heads inside the group; the k/v head stays while any query head uses it. Exact math on tiny random Gemma 3
and Llama models: the OBS update of layer 0 equals an fp64 least-squares fit over the kept heads' o_proj columns, a
sliced model computes what the full-size one does with the removed heads' o_proj columns zeroed, through save and
load with a different number of query heads per KV head in every layer."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import CLASSES, keep_query_heads_of, register_auto_classes
from slimgpt_core.base.shapes import describe_layers, is_heterogeneous, keep_channels, layer_shape, update_config
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from tests.tiny_models import tiny_model

register_auto_classes()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _zero_query_heads(layer, heads):
    d = layer.self_attn.head_dim
    with torch.no_grad():
        for h in heads:
            layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0.0


def _kept_heads(q_before: torch.Tensor, q_after: torch.Tensor, d: int) -> list[int]:
    """Which heads' q rows survive (rows are copied unchanged, so they match exactly)."""
    return [int((q_before.reshape(-1, d, q_before.shape[1]) == head).all((1, 2)).nonzero())
            for head in q_after.reshape(-1, d, q_after.shape[1])]


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_mqa_layers_lose_query_heads_and_keep_their_kv_head(arch, tokens):
    model = tiny_model(arch, heads=4, kv=1, ffn=24)
    rows = []
    layer0 = model.model.layers[0]
    handle = layer0.self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    _logits(model, tokens)
    handle.remove()
    X, W = torch.cat(rows), layer0.self_attn.o_proj.weight.detach().double()
    q_before, kv_before = layer0.self_attn.q_proj.weight.detach().clone(), layer0.self_attn.k_proj.weight.clone()
    report = prune_model(model, tokens, PruneSettings(head_ratio=0.5, ffn_ratio=0.0, schedule="uniform", damp=0.0))
    assert [layer_shape(layer)[:2] for layer in model.model.layers] == [(2, 1)] * 3
    assert report.head_ratios == [0.5] * 3
    assert [e.units_total for e in report.modules if e.module == "attn"] == [4, 4, 4]  # query heads are the units
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, kv_before)  # the KV head stays
    d = layer0.self_attn.head_dim
    kept = _kept_heads(q_before, model.model.layers[0].self_attn.q_proj.weight.detach(), d)
    assert len(kept) == 2 and kept == sorted(kept)
    assert kept == sorted(set(range(4)) - set(report.heads[0].removed))
    columns = [c for h in kept for c in range(h * d, (h + 1) * d)]
    fit = torch.linalg.lstsq(X[:, columns], X @ W.T).solution.T
    kept_w = model.model.layers[0].self_attn.o_proj.weight.detach().double()
    assert torch.allclose(kept_w, fit, rtol=0, atol=1e-4 * float(fit.abs().max())), float((kept_w - fit).abs().max())
    assert not torch.allclose(kept_w, W[:, columns], atol=1e-3)  # compensated, not just sliced
    assert torch.isfinite(_logits(model, tokens)).all()


def test_sliced_query_heads_equal_zeroed_columns_through_save_and_load(tokens, tmp_path):
    full = tiny_model("gemma3_text", heads=4, kv=1)
    sliced = copy.deepcopy(full)
    keeps = [[0, 2], [3], [0, 1, 2, 3]]  # 2, 1 and 4 query heads per KV head
    for heads, zeroed, cut in zip(keeps, full.model.layers, sliced.model.layers):
        _zero_query_heads(zeroed, set(range(4)) - set(heads))
        keep_query_heads_of(cut, heads)
        assert layer_shape(cut) == (len(heads), 1, 48) and cut.self_attn.num_key_value_groups == len(heads)
    expected = _logits(full, tokens)
    torch.testing.assert_close(_logits(sliced, tokens), expected, rtol=1e-4, atol=1e-5)
    update_config(sliced)
    assert is_heterogeneous(sliced.config) and sliced.config.layer_num_attention_heads == [2, 1, 4]
    assert sliced.config.layer_num_key_value_heads == [1, 1, 1]
    sliced.save_pretrained(tmp_path / "mqa")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mqa").eval()
    assert type(loaded) is CLASSES["gemma3_text"][1] and describe_layers(loaded) == describe_layers(sliced)
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-4, atol=1e-5)


def test_gqa_query_heads_equal_counts_per_group(tokens):
    full = tiny_model("llama", heads=4, kv=2)  # groups (0, 1) and (2, 3)
    sliced = copy.deepcopy(full)
    for zeroed, cut in zip(full.model.layers, sliced.model.layers):
        _zero_query_heads(zeroed, [1, 2])
        keep_query_heads_of(cut, [0, 3])
        assert layer_shape(cut) == (2, 2, 48)
    torch.testing.assert_close(_logits(sliced, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)
    layer = tiny_model("llama", heads=4, kv=2, layers=1).model.layers[0]
    with pytest.raises(ValueError, match="different numbers of query heads"):
        keep_query_heads_of(layer, [0, 1, 2])
    assert layer_shape(layer) == (4, 2, 48)


def test_keep_counts_with_one_kv_head(tokens):
    model = tiny_model("gemma3_text", heads=4, kv=1)
    prune_model(model, tokens, PruneSettings(keep_heads=[3, 1, 4], keep_ffn=[48, 48, 48]))
    assert [layer_shape(layer)[0] for layer in model.model.layers] == [3, 1, 4]
    with pytest.raises(SlimGPTError, match="cannot keep 5"):
        prune_model(tiny_model("gemma3_text", heads=4, kv=1), tokens, PruneSettings(keep_heads=[5, 1, 1]))
    for short in (PruneSettings(keep_heads=[4, 4]), PruneSettings(keep_ffn=[48])):  # one entry per layer
        with pytest.raises(SlimGPTError, match="has [12] entries but the model has 3 layers"):
            prune_model(tiny_model("gemma3_text", heads=4, kv=1), tokens, short)


@pytest.mark.parametrize("arch,kv", [("gemma3_text", 1), ("llama", 2), ("phi3", 2)])
def test_a_layer_without_attention_or_ffn(arch, kv, tokens, tmp_path):
    """Every head (and its k/v heads) or every channel of a layer removed: the layer computes what the full-size layer
    computes with all its o_proj / down_proj columns zeroed, through save and load."""
    full = tiny_model(arch, heads=4, kv=kv)
    sliced = copy.deepcopy(full)
    with torch.no_grad():
        full.model.layers[0].self_attn.o_proj.weight.zero_()
        full.model.layers[1].mlp.down_proj.weight.zero_()
        full.model.layers[2].self_attn.o_proj.weight.zero_()
        full.model.layers[2].mlp.down_proj.weight.zero_()
    for i, layer in enumerate(sliced.model.layers):
        if i in (0, 2):
            keep_query_heads_of(layer, [])
        if i in (1, 2):
            keep_channels(layer, [])
    assert [layer_shape(layer) for layer in sliced.model.layers] == [(0, 0, 48), (4, kv, 0), (0, 0, 0)]
    expected = _logits(full, tokens)
    torch.testing.assert_close(_logits(sliced, tokens), expected, rtol=1e-4, atol=1e-5)
    update_config(sliced)
    assert sliced.config.layer_num_attention_heads == [0, 4, 0] and sliced.config.layer_intermediate_size == [48, 0, 0]
    sliced.save_pretrained(tmp_path / "gone")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gone").eval()
    assert describe_layers(loaded) == describe_layers(sliced)
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-4, atol=1e-5)


def test_the_schedule_can_remove_a_layers_attention_and_ffn(tokens):
    model = tiny_model("gemma3_text", heads=4, kv=1)
    report = prune_model(model, tokens, PruneSettings(keep_heads=[0, 4, 2], keep_ffn=[48, 0, 0]))
    assert [layer_shape(layer) for layer in model.model.layers] == [(0, 0, 48), (4, 1, 0), (2, 1, 0)]
    assert report.params_after < report.params_before
    out = _logits(model, tokens)
    assert torch.isfinite(out).all()
    assert all(done.accumulated_error == done.accumulated_error for done in report.layers)  # measured, not NaN
