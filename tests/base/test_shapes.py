"""Layer shapes and the parameter counter (base/shapes.py) against what transformers builds and what a really sliced
layer holds: parameter counts of models built at the counted widths (tied and untied heads, a head bias, biases on
every projection, q/k norms, another hidden size), the heads a layer keeps against layer_shape after the slicing
the pruner does, the refusals' sentences. The first tests of this module (layer surgery, configs, target shapes)
are in methods/test_surgery.py, written when the module was methods/surgery.py."""
import copy

import pytest
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import keep_query_heads_of
from slimgpt_core.base.shapes import (check_context_length, check_prunable_layers, count_parameters, head_units,
                                      keep_channels, keep_kv_groups, kept_heads, layer_layout, layer_parameters,
                                      layer_shape, model_parameters, outer_parameters, unit_parameters,
                                      update_config)
from tests.tiny_models import tiny_model

SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"
HEAD_DIM = 8


def _built(arch: str, hidden: int, q: int, kv: int, ffn: int, layers: int = 2, **extra):
    """A model transformers builds at these widths (head size HEAD_DIM), counted by numel."""
    if arch in ("qwen3", "gemma3_text"):
        extra.setdefault("layer_types", ["full_attention"] * layers)
    config = AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                  num_attention_heads=q, num_key_value_heads=kv, head_dim=HEAD_DIM, vocab_size=101,
                                  **extra)
    return AutoModelForCausalLM.from_config(config)


def test_biases_on_every_projection_are_counted_at_every_width():
    """Llama with attention_bias and mlp_bias: q/k/v/o and gate/up/down each carry a bias (o_proj's and down_proj's
    over the hidden size, gate/up's over the FFN width)."""
    biased = dict(attention_bias=True, mlp_bias=True)
    layer = _built("llama", 32, 4, 2, 20, **biased).model.layers[0]
    assert layer_layout(layer).biases == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    for q, kv, f in [(4, 2, 20), (2, 1, 7), (2, 2, 1)]:
        want = count_parameters(_built("llama", 32, q, kv, f, **biased).model.layers[0])
        assert layer_parameters(layer, q, kv, f) == want


def test_a_fused_projections_bias_counts_for_the_projections_it_holds():
    """Phi-3's qkv_proj and gate_up_proj given biases (no released Phi-3 has them): the count of the layer cut to
    fewer KV groups and channels is what the really sliced layer holds."""
    model = tiny_model("phi3", heads=4, kv=2, layers=1, ffn=20)
    layer = model.model.layers[0]
    for block, name in ((layer.self_attn, "qkv_proj"), (layer.mlp, "gate_up_proj")):
        old = getattr(block, name)
        setattr(block, name, nn.Linear(old.in_features, old.out_features, bias=True))
    assert layer_layout(layer).biases == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    for groups, channels in [([0, 1], range(20)), ([1], [2, 5, 11]), ([0], [7])]:
        cut = copy.deepcopy(layer)
        keep_kv_groups(cut, groups)
        keep_channels(cut, channels)
        assert layer_parameters(layer, *layer_shape(cut)) == count_parameters(cut)


@pytest.mark.parametrize("tied", [False, True])
def test_the_model_count_with_a_tied_or_untied_head(tied):
    source = tiny_model("llama", heads=4, kv=2, ffn=20)
    layout = layer_layout(source.model.layers[0])
    for layers, q, kv, f in [(3, 4, 2, 20), (2, 2, 1, 5)]:
        built = _built("llama", 32, q, kv, f, layers=layers, tie_word_embeddings=tied)
        assert (built.lm_head.weight is built.model.embed_tokens.weight) == tied
        want = count_parameters(built)
        assert model_parameters(layers, q, kv, f, 32, HEAD_DIM, 101, tied, layout.biases, layout.norms()) == want
        outside = want - sum(count_parameters(layer) for layer in built.model.layers)
        assert outer_parameters(32, 101, tied) == outside  # embedding, final norm and (untied) head


def test_a_head_bias_is_counted_once_the_head_is_untied():
    built = _built("llama", 32, 4, 2, 20)
    built.lm_head = nn.Linear(32, 101, bias=True)
    layout = layer_layout(built.model.layers[0])
    assert model_parameters(2, 4, 2, 20, 32, HEAD_DIM, 101, False, layout.biases, layout.norms(),
                            head_bias=True) == count_parameters(built)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])  # q/k norms over a head; Gemma's four hidden norms
def test_norms_over_a_head_keep_their_size_at_another_hidden_size(arch):
    """What shear's size editor counts (`layout.norms(hidden)`): norms over the hidden size follow it, q_norm and
    k_norm (over head_dim) do not; against models transformers builds at the other hidden sizes."""
    source = _built(arch, 32, 4, 2, 20)
    layout = layer_layout(source.model.layers[0])
    assert len(layout.norm_sizes) == (6 if arch == "gemma3_text" else 4)
    tied = source.config.tie_word_embeddings
    for hidden, q, kv, f in [(32, 4, 2, 20), (48, 6, 3, 9), (16, 2, 1, 3)]:
        built = _built(arch, hidden, q, kv, f)
        assert model_parameters(2, q, kv, f, hidden, HEAD_DIM, 101, tied, layout.biases,
                                layout.norms(hidden)) == count_parameters(built)
    assert layout.norms() == layout.norms(32)


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 1)])  # MHA: a unit is one head with its K/V; MQA: one query head
def test_unit_counts_of_mha_and_single_kv_head_layers(heads, kv):
    layer = _built("llama", 32, heads, kv, 20).model.layers[0]
    units = unit_parameters(layer)
    for n_units, f in [(heads, 20), (2, 7), (1, 1)]:
        q_kept, kv_kept = (n_units, n_units) if kv == heads else (n_units, 1)
        want = count_parameters(_built("llama", 32, q_kept, kv_kept, f).model.layers[0])
        assert units.fixed + n_units * units.per_kv_group + f * units.per_channel == want


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_head_units_are_the_layers_kv_groups_or_its_query_heads(heads, kv):
    attn = tiny_model("llama", heads=heads, kv=kv, layers=1).model.layers[0].self_attn
    # by group: transformers' own count of query heads per KV head
    assert head_units(heads, kv, by_query_head=False) == (kv, attn.num_key_value_groups)
    assert head_units(heads, kv) == ((heads, 1) if kv == 1 else (kv, attn.num_key_value_groups))


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("by_query_head", [True, False])
def test_kept_heads_are_what_the_sliced_layer_keeps(heads, kv, by_query_head):
    """The preview's heads: removing the first k units the way the pruner removes them (query heads inside a single
    KV group, whole groups otherwise), then reading the layer's shape from its weights."""
    units = head_units(heads, kv, by_query_head)[0]
    for removed in range(units + 1):
        layer = tiny_model("llama", heads=heads, kv=kv, layers=1).model.layers[0]
        keep = list(range(removed, units))
        if kv == 1 and by_query_head:
            keep_query_heads_of(layer, keep)
        else:
            keep_kv_groups(layer, keep)
        kept = kept_heads(heads, kv, removed) if by_query_head else kept_heads(heads, kv, removed, False)
        assert kept == layer_shape(layer)[:2], removed


def test_a_fused_layers_own_head_count_follows_the_new_config():
    """A sliced Phi-3 attention reads its query-head count from its own LayerConfig and everything else through to
    the model's config: after update_config that must be the new config, not the one it replaced."""
    model = tiny_model("phi3", heads=4, kv=2)
    keep_kv_groups(model.model.layers[1], [1])
    old = model.config
    update_config(model)
    assert model.config is not old
    attn = model.model.layers[1].self_attn
    assert attn.config.num_attention_heads == 2 and attn.config.base is model.config
    assert all(getattr(m.config, "base", m.config) is model.config for m in model.modules() if hasattr(m, "config"))


def test_a_sequence_longer_than_the_context_is_refused_in_one_sentence():
    config = tiny_model(layers=1).config  # a context of 128 tokens
    check_context_length(config, 128)
    with pytest.raises(SlimGPTError) as err:
        check_context_length(config, 129)
    assert str(err.value) == "sequence length 129 exceeds the model's context of 128 tokens"
    with pytest.raises(SlimGPTError) as err:
        check_context_length(config, 200, "--seqlen")
    assert str(err.value) == "--seqlen 200 exceeds the model's context of 128 tokens"


@pytest.mark.parametrize("missing", ["self_attn", "mlp"])
def test_a_layer_without_attention_or_ffn_is_refused_in_one_sentence(missing):
    """A layer whose blocks go by other names (Mixtral's block_sparse_moe, say) is refused, not an AttributeError."""
    model = tiny_model("llama")
    delattr(model.model.layers[2], missing)
    with pytest.raises(SlimGPTError) as err:
        check_prunable_layers(model, "tiny")
    assert str(err.value) == ("layer 2 of tiny is not an attention block and a dense FFN (experts?), which the "
                              f"engine cannot prune (supported: {SUPPORTED})")
