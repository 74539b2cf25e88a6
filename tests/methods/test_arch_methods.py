"""Qwen3, Gemma 2/3 and Phi-3 beyond the pruning path, on tiny random models (exact math only): the schedule
editor's terms and the preview against the really pruned model; the error curves (0 at 0 units; for a layer with
one KV head, one point per query head, equal to the pruner's measured error); the fast `auto` schedule meeting its
budget on the model it prunes; LLM Surgeon and K-OBD at 0% (and their refusal of Phi-3's fused projections before
any forward pass); Minitron and Sheared-LLaMA's cut, exported and reloaded."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimgpt_core.base.assets import asset_path
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import register_auto_classes
from slimgpt_core.base.shapes import count_parameters, describe_layers, head_units, layer_shape, unit_parameters
from slimgpt_core.evaluation.speed import kv_cache_bytes_per_token
from slimgpt_core.export.checkpoint import export_checkpoint
from slimgpt_core.methods import minitron
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.settings import SurgeonSettings
from slimgpt_core.methods.shear.apply import MaskedModel
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.methods.shear.masks import ShearMasks
from slimgpt_core.methods.shear.target import resolve_target, source_shape
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.train import shear_model
from slimgpt_core.schedules import global_allocation as ga, refine
from slimgpt_core.schedules.curves import error_curves, predict
from slimgpt_core.schedules.editor_data import editor_payload
from slimgpt_core.schedules.schedule import units_to_remove
from slimgpt_core.services.prune import preview_schedule
from tests.tiny_models import tiny_model

register_auto_classes()
STORIES = asset_path("models", "stories260k")  # a real tokenizer for the exported folders

MODELS = {
    "qwen3": dict(arch="qwen3", heads=4, kv=2),  # q/k norms
    "gemma2": dict(arch="gemma2", heads=4, kv=2),  # sandwich norms, soft-capping
    "gemma3": dict(arch="gemma3_text", heads=4, kv=2),
    "gemma3-1kv": dict(arch="gemma3_text", heads=4, kv=1),  # Gemma 3 270M's layout: query heads are the units
    "phi3": dict(arch="phi3", heads=4, kv=2),  # fused qkv_proj and gate_up_proj
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _reloads_the_same(model, tmp_path, ids, report=None):
    """Export, reload with the shipped remote code, and compute the same logits."""
    expected = _logits(model, ids)
    export_checkpoint(model, AutoTokenizer.from_pretrained(STORIES), tmp_path / "out", report=report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert [layer_shape(layer) for layer in loaded.model.layers] == [layer_shape(layer) for layer in model.model.layers]
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", MODELS)
def test_editor_terms_and_preview_count_the_pruned_model(name, tokens):
    model = tiny_model(**MODELS[name])
    layers = model.model.layers
    payload = editor_payload(model, None, [0.0] * 3, [0.0] * 3)
    for t, layer in zip(payload["layers"], layers):
        assert t["fixed_params"] + t["n_kv"] * t["kv_params"] + t["n_ffn"] * t["ffn_params"] == count_parameters(layer)
    hr, fr = [0.5, 0.25, 0.75], [0.3, 0.1, 0.5]
    settings = PruneSettings(head_ratios=hr, ffn_ratios=fr, ffn_group_floor=4)
    preview = preview_schedule(model, settings)
    editor_after = sum(t["fixed_params"] + (t["n_kv"] - units_to_remove(t["n_kv"], h)) * t["kv_params"]
                       + (t["n_ffn"] - units_to_remove(t["n_ffn"], f)) * t["ffn_params"]
                       for t, h, f in zip(payload["layers"], hr, fr))
    prune_model(model, tokens, settings, use_cache=False)
    assert editor_after == preview.layer_params_after == count_parameters(model.model.layers)
    assert preview.params_after == count_parameters(model)
    assert preview.heads_kept == [layer_shape(layer)[0] for layer in model.model.layers]
    assert min(preview.heads_kept) < 4  # heads went: in the one-KV-head model, query heads inside the group


@pytest.mark.parametrize("name", MODELS)
def test_curves_start_at_zero_and_equal_the_pruners_errors(name, tokens):
    model = tiny_model(**MODELS[name])
    q, kv, f = layer_shape(model.model.layers[0])
    units, per_unit = head_units(q, kv)
    curves = error_curves(model, tokens, damp=0.0, device="cpu", use_cache=False)
    for lc in curves.layers:
        assert (lc.n_kv, lc.heads_per_unit, lc.n_ffn) == (units, per_unit, f)
        assert lc.head_errors[0] == 0.0 and lc.ffn_errors[0] == 0.0 and len(lc.head_errors) == units
    editor_payload(model, curves, [0.0] * 3, [0.0] * 3)  # the curves' units are the editor's
    first = curves.layers[0]
    for k in range(1, units):
        # layer 0 reads the dense inputs in the pipeline too: its measured error is the curve's (no damping: the
        # OBS prediction is the error on the calibration inputs)
        pruned = copy.deepcopy(model)
        report = prune_model(pruned, tokens, PruneSettings(keep_heads=[q - k * per_unit, q, q], keep_ffn=[f] * 3,
                                                           damp=0.0), use_cache=False)
        attn = next(m for m in report.modules if m.layer == 0 and m.module == "attn")
        assert (attn.units_total, attn.units_removed) == (units, k)
        assert first.head_errors[k] == pytest.approx(attn.rel_error, rel=1e-3)
        assert first.head_errors[k] > first.head_errors[k - 1]
        prediction = predict(curves, [k / units, 0.0, 0.0], [0.0] * 3)
        assert prediction.kv_removed == [k, 0, 0] and prediction.attn[0] == first.head_errors[k]


@pytest.mark.parametrize("name", ["qwen3", "gemma3-1kv", "phi3"])
def test_fast_auto_schedule_meets_its_budget_on_the_pruned_model(name, tokens):
    model = tiny_model(**MODELS[name])
    fitness = torch.randint(0, 101, (5, 16), generator=torch.Generator().manual_seed(3))
    config = refine.AutoConfig(budget=ga.BudgetSpec(ratio=0.35), max_seconds=None, refine=False, ffn_levels=8,
                               device="cpu", batch_size=4)
    result = refine.auto_schedule(model, tokens, fitness, config)
    assert result.which == "fast"
    pruned = copy.deepcopy(model)
    prune_model(pruned, tokens, PruneSettings(keep_heads=result.keep_heads, keep_ffn=result.keep_ffn), use_cache=False)
    removed = count_parameters(model) - count_parameters(pruned)
    assert result.params_after == count_parameters(pruned)
    largest_unit = max(max(u.per_kv_group, u.per_channel) for u in map(unit_parameters, model.model.layers))
    assert result.remove <= removed < result.remove + largest_unit


@pytest.mark.parametrize("method", ["surgeon", "kobd"])
@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3-1kv"])
def test_surgeon_and_kobd_at_zero_are_the_identity(name, method, tokens):
    model = tiny_model(**MODELS[name])
    before = _logits(model, tokens)
    report = prune_model(model, tokens, PruneSettings(ratio=0.0, method=method, surgeon=SurgeonSettings(shots=1),
                                                      device="cpu"))
    assert report.params_after == report.params_before
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["surgeon", "kobd"])
def test_surgeon_and_kobd_refuse_fused_projections_before_any_forward(method, tokens):
    model = tiny_model(**MODELS["phi3"])
    forwards = []
    model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(SlimGPTError, match=r"fuses \(qkv_proj, gate_up_proj\)"):
        prune_model(model, tokens, PruneSettings(ratio=0.3, method=method, surgeon=SurgeonSettings(shots=1),
                                                 device="cpu"))
    assert forwards == []


@pytest.mark.parametrize("name", MODELS)
def test_minitron_prunes_exports_and_reloads(name, tokens, tmp_path):
    model = tiny_model(**MODELS[name])
    report = prune_model(model, tokens, PruneSettings(ratio=0.4, method="minitron", device="cpu"))
    assert report.params_after < report.params_before
    assert max(layer_shape(layer)[2] for layer in model.model.layers) < 48
    _reloads_the_same(model, tmp_path, tokens, report)


TARGETS = {  # every structure shrinks; Gemma keeps its hidden size (refused below)
    "qwen3": {"layers": 2, "kv_groups": 1, "heads": 1, "ffn": 30, "hidden": 24},
    "gemma3": {"layers": 2, "kv_groups": 1, "heads": 1, "ffn": 30},
    "phi3": {"layers": 2, "kv_groups": 1, "heads": 1, "ffn": 30, "hidden": 24},
}


@pytest.mark.parametrize("name", TARGETS)
def test_shear_cut_equals_the_masked_model_and_reloads(name, tokens, tmp_path):
    model = tiny_model(**MODELS[name])
    target = resolve_target(TARGETS[name], model)
    torch.manual_seed(1)
    masks = ShearMasks(source_shape(model), target, model.config.head_dim, model.config.vocab_size,
                       model.lm_head.weight is model.model.embed_tokens.weight)
    for log_alpha in masks.log_alpha.values():
        log_alpha.data.normal_(0, 2)
    gates = masks.deterministic()
    with torch.no_grad(), MaskedModel(model) as masked:
        masked.gates = gates
        expected = model(tokens, use_cache=False).logits
    cut_model(model, gates)
    assert source_shape(model) == target
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    _reloads_the_same(model, tmp_path, tokens)


@pytest.mark.parametrize("name", ["phi3", "gemma3-1kv"])
def test_shear_and_minitron_to_a_shape_run_and_export(name, tokens, tmp_path):
    raw = {"layers": 2, "ffn": 30} if name.startswith("gemma") else {"layers": 2, "kv_groups": 1, "ffn": 30,
                                                                     "hidden": 24}
    sheared = tiny_model(**MODELS[name])
    target = resolve_target(raw, sheared)
    result = shear_model(sheared, tokens, target, ShearSettings(steps=2, batch_size=4, device="cpu"))
    assert source_shape(sheared) == target
    _reloads_the_same(sheared, tmp_path / "shear", tokens, result.report)
    cut = tiny_model(**MODELS[name])
    minitron.prune_to_shape(cut, tokens, target, batch_size=4)
    assert source_shape(cut) == target
    _reloads_the_same(cut, tmp_path / "minitron", tokens)


def test_gemma_hidden_size_is_refused_before_any_work():
    model = tiny_model(**MODELS["gemma3"])
    with pytest.raises(SlimGPTError, match="cannot lose hidden dimensions"):
        resolve_target({"hidden": 24}, model)
    assert resolve_target({"hidden": 32}, model).hidden == 32


@pytest.mark.parametrize("name", ["phi3", "gemma3-1kv", "qwen3"])
def test_kv_cache_size_counts_every_kv_head(name, tokens):
    model = tiny_model(**MODELS[name])
    config = model.config
    fp32 = 4
    assert kv_cache_bytes_per_token(model) == 3 * 2 * config.num_key_value_heads * config.head_dim * fp32
    prune_model(model, tokens, PruneSettings(head_ratios=[0.5, 0.0, 0.5], ffn_ratios=[0.0] * 3), use_cache=False)
    kept = describe_layers(model)["layer_num_key_value_heads"]
    assert kv_cache_bytes_per_token(model) == sum(kept) * 2 * config.head_dim * fp32
