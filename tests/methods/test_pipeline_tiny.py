"""The pipeline on tiny random decoders: identities, shapes, round trips (no quality claims here)."""
import json

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.workspace.store import save_run_at
from slimgpt_core.base.shapes import describe_layers

ARCHS = [("llama", 4, 4), ("llama", 4, 2), ("qwen2", 4, 2), ("mistral", 6, 3)]


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("arch,heads,kv", ARCHS)
def test_zero_ratio_leaves_outputs_unchanged(arch, heads, kv, tokens):
    model = tiny_model(arch, heads, kv, hidden=24 if heads == 6 else 32)
    before = _logits(model, tokens)
    report = prune_model(model, tokens, PruneSettings(ratio=0.0, batch_size=5))
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-4, atol=1e-5)
    assert report.params_after == report.params_before
    assert all(m.units_removed == 0 and m.rel_error < 1e-6 for m in report.modules)


@pytest.mark.parametrize("arch,heads,kv", ARCHS)
def test_pruned_shapes_config_forward_generate(arch, heads, kv, tokens):
    model = tiny_model(arch, heads, kv, hidden=24 if heads == 6 else 32)
    report = prune_model(model, tokens, PruneSettings(ratio=0.5, schedule="linear", shape=3.0, ffn_group_floor=4))
    lists = describe_layers(model)
    rep = heads // kv
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, f = lists["layer_num_attention_heads"][i], lists["layer_num_key_value_heads"][i], \
            lists["layer_intermediate_size"][i]
        assert q == k * rep  # whole KV groups were removed
        assert attn.q_proj.weight.shape[0] == q * attn.head_dim == attn.o_proj.weight.shape[1]
        assert attn.k_proj.weight.shape[0] == k * attn.head_dim == attn.v_proj.weight.shape[0]
        assert layer.mlp.gate_proj.weight.shape[0] == f == layer.mlp.down_proj.weight.shape[1]
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.shape[0] == q * attn.head_dim
    n_ffn = [m.units_total - m.units_removed for m in report.modules if m.module == "mlp"]
    assert n_ffn == lists["layer_intermediate_size"]
    assert report.params_after < report.params_before
    assert 0.3 < report.achieved_layer_ratio < 0.7
    out = _logits(model, tokens)
    assert torch.isfinite(out).all()
    gen = model.generate(tokens[:2, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    assert gen.shape == (2, 11)


def test_events_report_and_cancel(tokens):
    model = tiny_model()
    events = []
    report = prune_model(model, tokens, PruneSettings(ratio=0.4, schedule="uniform", ffn_group_floor=2),
                         callback=events.append)
    kinds = {e.kind for e in events}
    assert kinds == {"progress", "module", "heads", "ffn", "layer"}
    phases = [e.phase for e in events if e.kind == "progress"]
    assert phases[0] == "capture" and phases[-1] == "done" and phases.count("attn-prune") == 3
    assert len(report.layers) == 3 and len(report.heads) == 3 and len(report.modules) == 6
    for h in report.heads:
        assert len(h.scores) == 2 and h.heads_per_unit == 2 and len(h.removed) == 1
        assert h.scores[h.removed[0]] == min(h.scores)
    assert report.layers[0].accumulated_error > 0
    json.dumps(report.to_dict())
    calls = []
    with pytest.raises(JobCancelled):
        prune_model(tiny_model(), tokens, PruneSettings(ratio=0.4), should_stop=lambda: len(calls.append(1) or calls) > 4)


def test_dense_inputs_mode_calibrates_on_dense_activations(tokens):
    seq = prune_model(tiny_model(), tokens, PruneSettings(ratio=0.5, schedule="uniform", ffn_group_floor=2))
    dense = prune_model(tiny_model(), tokens, PruneSettings(ratio=0.5, schedule="uniform", ffn_group_floor=2,
                                                            sequential=False))
    # layer 0 sees the same inputs in both modes; later layers differ
    assert seq.modules[0].rel_error == pytest.approx(dense.modules[0].rel_error, rel=1e-5)
    assert [m.rel_error for m in seq.modules[2:]] != pytest.approx([m.rel_error for m in dense.modules[2:]], rel=1e-5)


def test_custom_keep_counts_and_gqa_errors(tokens):
    model = tiny_model("llama", 4, 2)
    prune_model(model, tokens, PruneSettings(keep_heads=[4, 2, 2], keep_ffn=[48, 30, 7]))
    lists = describe_layers(model)
    assert lists["layer_num_attention_heads"] == [4, 2, 2] and lists["layer_intermediate_size"] == [48, 30, 7]
    with pytest.raises(SlimGPTError, match="multiple of 2"):
        prune_model(tiny_model("llama", 4, 2), tokens, PruneSettings(keep_heads=[3, 2, 2]))
    with pytest.raises(SlimGPTError, match="cannot keep 6"):
        prune_model(tiny_model("llama", 4, 2), tokens, PruneSettings(keep_heads=[6, 2, 2]))
    with pytest.raises(SlimGPTError, match=r"\[0, 1\)"):
        prune_model(tiny_model(), tokens, PruneSettings(ratio=1.2))


def test_run_round_trip_heterogeneous_and_uniform(tmp_path, tokens):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from slimgpt_core.models import load_model

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    for name, settings in (("mixed", PruneSettings(ratio=0.5, schedule="log", ffn_group_floor=2)),
                           ("uniform", PruneSettings(keep_heads=[2, 2, 2], keep_ffn=[20, 20, 20]))):
        model = tiny_model("llama", 4, 2)
        report = prune_model(model, tokens, settings)
        out = save_run_at(model, tok, report, tmp_path / name)
        config = json.loads((out / "config.json").read_text())
        reloaded = load_model(str(out)).model
        torch.testing.assert_close(_logits(reloaded, tokens), _logits(model, tokens))
        if name == "uniform":  # a stock checkpoint: transformers loads it without our help
            assert "layer_num_attention_heads" not in config and config["num_attention_heads"] == 2
            stock = AutoModelForCausalLM.from_pretrained(out)
            torch.testing.assert_close(_logits(stock, tokens), _logits(model, tokens))
        else:
            assert len(set(config["layer_intermediate_size"])) > 1
        assert (out / "report.json").exists() and not list(tmp_path.glob(".*tmp*"))
