"""Layer surgery (methods/surgery.py) and the per-layer-shape classes (export/modeling_slimgpt.py): a physically sliced
layer computes exactly what the full-size layer computes with the removed units zeroed. Checked against plain torch:
a sliced Linear against indexing by hand, sliced layers against the full-size model with the removed units' inputs
zeroed, configs against what a fresh load builds from them (save_pretrained / from_pretrained round trips of tiny
random models)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import (CLASSES, SlimGPTLlamaConfig, SlimGPTLlamaForCausalLM,
                                                  keep_query_heads, register_auto_classes, resize_layer,
                                                  sliced_linear)
from slimgpt_core.base.shapes import (base_model_type, count_parameters, decoder_layer_parameters, describe_layers,
                                          head_dim, is_heterogeneous, keep_channels, keep_kv_groups, layer_layout,
                                          layer_parameters, layer_shape, model_parameters, target_shape,
                                          unit_parameters, update_config)
from tests import ROOT
from tests.tiny_models import tiny_model

register_auto_classes()

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


# --- layer surgery and the per-layer-shape classes against plain torch and save / load round trips ----------------
def _round_trip(model, folder):
    """What a fresh load of the saved model computes (our classes are registered: no remote code)."""
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _zero_heads(layer, heads):
    """Zero the o_proj input columns that these query heads feed: the full-size layer then computes what a layer
    without them computes."""
    d = layer.self_attn.head_dim
    with torch.no_grad():
        for h in heads:
            layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0.0


def _zero_channels(layer, channels):
    with torch.no_grad():
        for c in channels:
            layer.mlp.down_proj.weight[:, c] = 0.0


def test_sliced_linear_against_indexing_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7, dtype=torch.float64)
    rows, cols = [6, 0, 3], [4, 1]
    x = torch.randn(3, 5, dtype=torch.float64)
    w_by_hand = torch.stack([torch.stack([lin.weight[r, c] for c in cols]) for r in rows])
    b_by_hand = torch.stack([lin.bias[r] for r in rows])
    both = sliced_linear(lin, rows=torch.tensor(rows), cols=cols)
    assert (both.in_features, both.out_features) == (2, 3) and torch.equal(both.weight, w_by_hand)
    assert torch.equal(both.bias, b_by_hand) and both.weight.is_contiguous()
    torch.testing.assert_close(both(x[:, cols]), x[:, cols] @ w_by_hand.T + b_by_hand, rtol=0, atol=1e-12)
    cols_only = sliced_linear(lin, cols=cols)  # an o_proj / down_proj with a bias keeps its whole bias
    assert torch.equal(cols_only.bias, lin.bias) and torch.equal(cols_only.weight, lin.weight[:, cols])
    rows_only = sliced_linear(lin, rows=rows)
    assert torch.equal(rows_only.weight, lin.weight[rows]) and torch.equal(rows_only.bias, b_by_hand)
    no_bias = sliced_linear(nn.Linear(5, 7, bias=False), rows=rows)
    assert no_bias.bias is None and no_bias.weight.shape == (3, 5)


class Allocations(TorchDispatchMode):
    """Device and dtype of every floating-point tensor an operation makes."""

    def __init__(self):
        super().__init__()
        self.made = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.made.add((t.device.type, t.dtype))
        return out


def test_slicing_makes_its_tensors_on_the_layers_device_in_its_dtype():
    """On a GPU a sliced layer must stay on the GPU in bf16; on the CPU that shows on the meta device (no data)."""
    model = tiny_model("llama", 4, 2).to(torch.bfloat16).to("meta")
    layer = model.model.layers[0]
    with Allocations() as seen:
        keep_kv_groups(layer, [1])
        keep_channels(layer, [0, 5, 9])
        keep_query_heads(layer, 1)
    assert seen.made == {("meta", torch.bfloat16)}
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {("meta", torch.bfloat16)}
    assert layer_shape(layer) == (1, 1, 3)


def test_kept_query_heads_equal_the_zeroed_full_size_model(tokens):
    """keep_query_heads (sheared shapes: fewer query heads per KV group) keeps the first heads of every group."""
    full = tiny_model("llama", 4, 2)
    sliced = copy.deepcopy(full)
    for zeroed, cut in zip(full.model.layers, sliced.model.layers):
        _zero_heads(zeroed, [1, 3])  # groups (0, 1) and (2, 3): the second head of each goes
        keep_query_heads(cut, 1)
        assert layer_shape(cut) == (2, 2, 48) and cut.self_attn.num_key_value_groups == 1
    torch.testing.assert_close(_logits(sliced, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)

    full = tiny_model("mistral", 6, 2, hidden=24)  # groups (0, 1, 2) and (3, 4, 5): keep two of each
    sliced = copy.deepcopy(full)
    for zeroed, cut in zip(full.model.layers, sliced.model.layers):
        _zero_heads(zeroed, [2, 5])
        keep_query_heads(cut, 2)
        assert layer_shape(cut) == (4, 2, 48) and cut.self_attn.num_key_value_groups == 2
    torch.testing.assert_close(_logits(sliced, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)


def _check_configs_follow(model, expected_class):
    assert type(model) is expected_class
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))  # no stale config left
    assert model.config.architectures in (None, [expected_class.__name__])
    assert "auto_map" not in model.config.to_dict()


def test_uniform_shapes_give_a_stock_config_that_loads_anywhere(tmp_path, tokens):
    full = tiny_model("llama", 4, 4, ffn=48)  # MHA, hidden 32, head_dim 8
    full.config.auto_map = {"AutoConfig": "modeling_slimgpt.SlimGPTLlamaConfig"}  # as loaded with remote code
    full.config.architectures = ["SlimGPTLlamaForCausalLM"]
    sliced = copy.deepcopy(full)
    for zeroed, cut in zip(full.model.layers, sliced.model.layers):
        _zero_heads(zeroed, [0, 3])
        _zero_channels(zeroed, range(24, 48))
        keep_kv_groups(cut, [1, 2])
        keep_channels(cut, range(24))
        assert cut.mlp.intermediate_size == 24  # the module's own description follows its weights
    update_config(sliced)
    _check_configs_follow(sliced, LlamaForCausalLM)
    c = sliced.config
    assert type(c) is LlamaConfig and not is_heterogeneous(c) and not any(k.startswith("layer_") for k in c.to_dict())
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (2, 2, 24, 8)
    loaded = _round_trip(sliced, tmp_path / "uniform")
    saved = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" not in saved and saved["num_attention_heads"] == 2
    assert type(loaded) is LlamaForCausalLM
    torch.testing.assert_close(_logits(loaded, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)


def test_mixed_shapes_and_a_second_pass(tmp_path, tokens):
    """Per-layer shapes make the SlimGPT class; pruning it again to uniform shapes gives the stock class back. Also
    uniform shapes whose head count does not divide hidden_size (stock configs refuse those)."""
    full = tiny_model("llama", 4, 2, ffn=48)  # GQA: 2 KV groups of 2 query heads
    sliced = copy.deepcopy(full)
    keeps = [([0, 1], range(48)), ([1], range(0, 48, 2)), ([0], [5])]
    for (groups, channels), zeroed, cut in zip(keeps, full.model.layers, sliced.model.layers):
        _zero_heads(zeroed, [h for g in {0, 1} - set(groups) for h in (2 * g, 2 * g + 1)])
        _zero_channels(zeroed, set(range(48)) - set(channels))
        keep_kv_groups(cut, groups)
        keep_channels(cut, channels)
    update_config(sliced)
    _check_configs_follow(sliced, SlimGPTLlamaForCausalLM)
    c = sliced.config
    assert base_model_type(c) == "llama" and is_heterogeneous(c) and head_dim(c) == 8
    assert (c.layer_num_attention_heads, c.layer_num_key_value_heads, c.layer_intermediate_size) == \
        ([4, 2, 2], [2, 1, 1], [48, 24, 1])
    loaded = _round_trip(sliced, tmp_path / "mixed")
    assert type(loaded) is SlimGPTLlamaForCausalLM and describe_layers(loaded) == describe_layers(sliced)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)

    # second pass: every layer down to one group and one channel (uniform again)
    _zero_heads(full.model.layers[0], [2, 3])
    _zero_channels(full.model.layers[0], range(1, 48))
    _zero_channels(full.model.layers[1], range(2, 48, 2))
    keep_kv_groups(loaded.model.layers[0], [0])
    keep_channels(loaded.model.layers[0], [0])
    keep_channels(loaded.model.layers[1], [0])
    update_config(loaded)
    _check_configs_follow(loaded, LlamaForCausalLM)
    assert type(loaded.config) is LlamaConfig and not is_heterogeneous(loaded.config)
    again = _round_trip(loaded, tmp_path / "second")
    torch.testing.assert_close(_logits(again, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)

    # three of four heads in every layer: uniform, but 32 is not a multiple of 3
    odd = tiny_model("llama", 4, 4)
    for layer in odd.model.layers:
        keep_kv_groups(layer, [0, 1, 3])
    update_config(odd)
    _check_configs_follow(odd, SlimGPTLlamaForCausalLM)
    assert odd.config.layer_num_attention_heads == [3, 3, 3] and odd.config.head_dim == 8
    torch.testing.assert_close(_logits(_round_trip(odd, tmp_path / "odd"), tokens), _logits(odd, tokens))


@pytest.mark.parametrize("uniform", [False, True])
def test_a_qwen2_model_keeps_its_biases_through_save_and_load(tmp_path, tokens, uniform):
    """Qwen2 configs have no head_dim attribute: a uniform pruned config must still say it (32 / 2 heads is not 8)."""
    full = tiny_model("qwen2", 4, 2)
    del full.config.head_dim  # as in Qwen2 checkpoints: 32 / 4 heads, implied
    assert "head_dim" not in full.config.to_dict()
    with torch.no_grad():
        for layer in full.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.1)
    sliced = copy.deepcopy(full)
    for i, (zeroed, cut) in enumerate(zip(full.model.layers, sliced.model.layers)):
        _zero_heads(zeroed, [0, 1] if i == 1 or uniform else [])
        keep_kv_groups(cut, [1] if i == 1 or uniform else [0, 1])
    update_config(sliced)
    assert base_model_type(sliced.config) == "qwen2"
    assert type(sliced.config).__name__ == ("Qwen2Config" if uniform else "SlimGPTQwen2Config")
    loaded = _round_trip(sliced, tmp_path / "qwen")
    torch.testing.assert_close(_logits(loaded, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_loading_builds_every_layers_shape(arch):
    """resize_layer through from_config: query heads, KV heads (and heads per group) and FFN width per layer."""
    config_cls, model_cls = CLASSES[arch]
    config = config_cls(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, num_hidden_layers=5, vocab_size=101,
                                layer_num_attention_heads=[4, 2, 2, 1, 4],
                                layer_num_key_value_heads=[2, 1, 2, 1, 2],
                                layer_intermediate_size=[48, 48, 7, 1, 47])
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is model_cls
    assert [layer_shape(layer) for layer in model.model.layers] == [(4, 2, 48), (2, 1, 48), (2, 2, 7), (1, 1, 1),
                                                                    (4, 2, 47)]
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [2, 2, 1, 1, 2]
    assert all(type(v) is int for shape in map(layer_shape, model.model.layers) for v in shape)


@pytest.mark.parametrize("shape", [(3, 2, 48), (4, 3, 48), (6, 3, 48), (6, 2, 48), (0, 1, 48), (4, 2, 49), (4, 2, -1),
                                   (4, 1, 48), (2, 0, 48)])
def test_resize_layer_refuses_shapes_that_do_not_fit(shape):
    layer = tiny_model("llama", 4, 2, layers=1).model.layers[0]
    with pytest.raises(ValueError) as err:
        resize_layer(layer, *shape)
    assert str(err.value) == (f"layer shape {shape[0]} heads / {shape[1]} KV heads / {shape[2]} channels does not "
                              "fit 4/2/48")
    assert layer_shape(layer) == (4, 2, 48)


def test_resize_layer_at_its_limits():
    # (0, 0, f): no attention; (q, kv, 0): no FFN
    for shape in [(1, 1, 1), (2, 2, 48), (4, 2, 1), (2, 1, 48), (4, 2, 47), (0, 0, 48), (4, 2, 0), (0, 0, 0)]:
        layer = tiny_model("llama", 4, 2, layers=1).model.layers[0]
        resize_layer(layer, *shape)
        assert layer_shape(layer) == shape
        assert layer.self_attn.num_key_value_groups == (shape[0] // shape[1] if shape[1] else 0)
    layer = tiny_model("llama", 4, 2, layers=1).model.layers[0]
    q = layer.self_attn.q_proj
    resize_layer(layer, 4, 2, 48)  # already that shape: untouched
    assert layer.self_attn.q_proj is q


def test_per_layer_config_validation():
    kwargs = dict(hidden_size=32, num_attention_heads=3, num_key_value_heads=1, head_dim=8, num_hidden_layers=2)
    ok = SlimGPTLlamaConfig(**kwargs, layer_num_attention_heads=[3, 2], layer_num_key_value_heads=[1, 2],
                            layer_intermediate_size=[16, 8])
    ok.validate()  # 32 is not a multiple of 3 heads: allowed with per-layer lists and an explicit head_dim
    SlimGPTLlamaConfig(**kwargs).validate()  # no lists at all
    bad = SlimGPTLlamaConfig(**kwargs, layer_num_attention_heads=[3, 3], layer_num_key_value_heads=[1, 2],
                             layer_intermediate_size=[16, 8])
    with pytest.raises(ValueError, match="^every layer's query heads must be a multiple of its KV heads$"):
        bad.validate()
    wrong_layer_type = SlimGPTLlamaConfig(**kwargs, layer_types=["sliding", "sliding"])
    with pytest.raises(ValueError, match="layer_types"):  # the stock checks other than the head count still run
        wrong_layer_type.validate()


def test_config_helpers():
    assert base_model_type(SlimGPTLlamaConfig()) == "llama" and base_model_type(Qwen2Config()) == "qwen2"
    assert base_model_type(LlamaConfig()) == "llama"
    assert head_dim(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=16)) == 16  # explicit, not 32 / 4
    qwen = head_dim(Qwen2Config(hidden_size=32, num_attention_heads=4))  # no head_dim attribute at all
    assert qwen == 8 and type(qwen) is int
    tied = tiny_model("llama")
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    by_storage = {p.data_ptr(): p.numel() for p in tied.state_dict().values()}
    assert count_parameters(tied) == sum(by_storage.values())  # the shared matrix once
    assert count_parameters(tied.model.layers[0]) == sum(p.numel() for p in tied.model.layers[0].state_dict().values())


def test_target_shape():
    model = tiny_model("llama", 4, 2)
    assert target_shape({"num_attention_heads": 2, "intermediate_size": 30, "head_dim": 8}, model) == \
        ([2, 2, 2], [30, 30, 30])
    assert target_shape({"layer_num_attention_heads": [4, 2, 1], "layer_intermediate_size": [1, 2, 3],
                         "hidden_size": 32, "num_hidden_layers": 3}, model) == ([4, 2, 1], [1, 2, 3])  # 32 // 4 = 8
    assert target_shape({"num_attention_heads": 3, "intermediate_size": 5}, model) == ([3] * 3, [5] * 3)  # no sizes
    assert target_shape({"num_attention_heads": 1, "intermediate_size": 5}, model) == ([1] * 3, [5] * 3)
    assert target_shape({"num_attention_heads": 2, "intermediate_size": 6, "head_dim": 8, "hidden_size": 64},
                        model) == ([2] * 3, [6] * 3)  # an explicit head_dim wins over hidden_size / heads
    cases = {
        "target architecture has 4 layers but the model has 3: only widths can be pruned":
            {"num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 8},
        "target config needs num_attention_heads and intermediate_size (or per-layer lists)":
            {"num_attention_heads": 2},
        "target head size 16 differs from the model's 8: heads cannot be resized":
            {"num_attention_heads": 2, "intermediate_size": 8, "hidden_size": 32},
        "target head size 32 differs from the model's 8: heads cannot be resized":
            {"num_attention_heads": 1, "intermediate_size": 8, "hidden_size": 32},
        "target head size 4 differs from the model's 8: heads cannot be resized":
            {"num_attention_heads": 2, "intermediate_size": 8, "head_dim": 4, "hidden_size": 16},
    }
    for sentence, target in cases.items():
        with pytest.raises(SlimGPTError) as err:
            target_shape(target, model)
        assert str(err.value) == sentence


def test_registration_in_a_fresh_process(tmp_path):
    """Our classes load in a new process without remote code once registered (twice is harmless)."""
    register_auto_classes()  # again, in this process too: harmless
    model = tiny_model("llama", 4, 2)
    keep_kv_groups(model.model.layers[1], [0])
    update_config(model)
    model.save_pretrained(tmp_path / "m")
    code = ("import sys; from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from slimgpt_core.base.modeling_slimgpt import register_auto_classes\n"
            "register_auto_classes(); register_auto_classes()\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "print(type(AutoConfig.for_model('slimgpt_qwen2')).__name__, type(m).__name__,"
            " m.model.layers[1].self_attn.k_proj.out_features)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SlimGPTQwen2Config", "SlimGPTLlamaForCausalLM", "8"]


def test_a_one_layer_model_pruned_uniformly(tmp_path, tokens):
    full = tiny_model("llama", 4, 2, layers=1)
    sliced = copy.deepcopy(full)
    _zero_heads(full.model.layers[0], [0, 1])
    _zero_channels(full.model.layers[0], range(10, 48))
    keep_kv_groups(sliced.model.layers[0], [1])
    keep_channels(sliced.model.layers[0], range(10))
    update_config(sliced)
    _check_configs_follow(sliced, LlamaForCausalLM)
    assert (sliced.config.num_attention_heads, sliced.config.num_key_value_heads, sliced.config.intermediate_size) == \
        (2, 1, 10)
    torch.testing.assert_close(_logits(_round_trip(sliced, tmp_path / "one"), tokens), _logits(full, tokens),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q, k and v
def test_the_parameter_counter_counts_what_transformers_builds(arch):
    """The one counter against the layers transformers itself builds at other widths (counted by numel)."""
    source = tiny_model(arch, heads=6, kv=3, ffn=20, hidden=24)
    layer = source.model.layers[0]
    layout = layer_layout(layer)
    assert layout.biases == ({"q_proj", "k_proj", "v_proj"} if arch == "qwen2" else set())
    units = unit_parameters(layer)
    for q, kv, f in [(6, 3, 20), (4, 2, 7), (2, 1, 1)]:
        extra = {"layer_types": ["full_attention"] * 2} if arch == "qwen2" else {}
        config = AutoConfig.for_model(arch, hidden_size=24, intermediate_size=f, num_hidden_layers=2,
                                      num_attention_heads=q, num_key_value_heads=kv, head_dim=4, vocab_size=101,
                                      **extra)
        built = AutoModelForCausalLM.from_config(config)
        want = count_parameters(built.model.layers[0])
        assert layer_parameters(layer, q, kv, f) == want
        assert units.fixed + kv * units.per_kv_group + f * units.per_channel == want
        assert model_parameters(2, q, kv, f, 24, 4, config.vocab_size, config.tie_word_embeddings,
                                layout.biases, layout.norms()) == count_parameters(built)


def test_the_parameter_counter_adds_floats_and_tensors_in_one_order():
    """Shear's masks count expected (fractional) shapes: the tensor count is the float count, bit for bit."""
    kv, heads, ffn, hidden = torch.tensor([1.25, 2.5]), torch.tensor([3.75, 5.0]), torch.tensor([7.3, 9.1]), 11.7
    n = decoder_layer_parameters(heads, kv, ffn, hidden, 4)
    n64 = decoder_layer_parameters(heads.double(), kv.double(), ffn.double(), hidden, 4)  # Python floats are fp64
    for i in range(2):
        assert float(n64[i]) == float(decoder_layer_parameters(float(heads[i]), float(kv[i]), float(ffn[i]), hidden, 4))
    # the formula written out: q/k/v/o, gate/up/down and two norms over the hidden size
    expected = hidden * 4 * (2 * heads + 2 * kv) + 3 * hidden * ffn + 2 * hidden
    assert torch.equal(n, expected)
