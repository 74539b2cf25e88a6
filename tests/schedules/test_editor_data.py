"""The schedule editor's payload: its parameter arithmetic against `preview_schedule`, its compacted curves against
`predict` on the full ones (tiny random models: exact math only)."""
import json
import random

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.schedules.curves import error_curves, predict, sensitivity_map
from slimgpt_core.schedules.editor_data import editor_payload, expand_counts, payload_curves
from slimgpt_core.schedules.schedule import units_to_remove
from slimgpt_core.services.prune import preview_schedule

MODELS = {  # GQA, plain multi-head, qwen2 (q/k/v biases) with GQA, uneven widths
    "llama-gqa": dict(arch="llama", heads=4, kv=2, layers=3, ffn=48),
    "llama-mha": dict(arch="llama", heads=4, kv=4, layers=4, ffn=40),
    "qwen2-gqa": dict(arch="qwen2", heads=6, kv=2, layers=3, ffn=52, hidden=48),
    "llama-1kv": dict(arch="llama", heads=4, kv=1, layers=2, ffn=37),
}


def params_from_payload(payload: dict, hr: list[float], fr: list[float]) -> tuple[int, int, int]:
    """(layer params before, after, whole model after) the way the editor adds them up."""
    before = after = 0
    for t, h, f in zip(payload["layers"], hr, fr):
        kv_left = t["n_kv"] - units_to_remove(t["n_kv"], h)
        ffn_left = t["n_ffn"] - units_to_remove(t["n_ffn"], f)
        before += t["fixed_params"] + t["n_kv"] * t["kv_params"] + t["n_ffn"] * t["ffn_params"]
        after += t["fixed_params"] + kv_left * t["kv_params"] + ffn_left * t["ffn_params"]
    return before, after, payload["total_params"] - before + after


@pytest.mark.parametrize("name", MODELS)
def test_layer_terms_add_up_to_the_layers_parameters(name):
    model = tiny_model(**MODELS[name])
    payload = editor_payload(model, None, [0.1] * len(model.model.layers), [0.1] * len(model.model.layers))
    for t, layer in zip(payload["layers"], model.model.layers):
        assert t["fixed_params"] + t["n_kv"] * t["kv_params"] + t["n_ffn"] * t["ffn_params"] == \
            sum(p.numel() for p in layer.parameters())
    assert payload["total_params"] == sum(p.numel() for p in model.parameters())
    if name.startswith("qwen2"):  # the q/k/v biases belong to the KV groups
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None
        rep, d, hidden = 3, attn.head_dim, attn.q_proj.in_features
        assert payload["layers"][0]["kv_params"] == hidden * d * (2 * rep + 2) + d * (rep + 2)


@pytest.mark.parametrize("name", MODELS)
def test_parameters_equal_preview_schedule_on_random_schedules(name):
    model = tiny_model(**MODELS[name])
    n = len(model.model.layers)
    payload = json.loads(json.dumps(editor_payload(model, None, [0.0] * n, [0.0] * n)))  # as the browser gets it
    rng = random.Random(7)
    for trial in range(60):
        # ratios at and around the rounding points k/n ± a hair, the half-way points, and uniform draws
        hr = [rng.choice([rng.uniform(0, 0.95), rng.randint(0, 4) / 4, (rng.randint(0, 4) + 0.5) / 4])
              for _ in range(n)]
        fr = [rng.choice([rng.uniform(0, 0.95), (rng.randint(0, 40) + 0.5) / 48, rng.randint(0, 40) / 37])
              for _ in range(n)]
        hr, fr = [min(0.95, r) for r in hr], [min(0.95, r) for r in fr]
        preview = preview_schedule(model, PruneSettings(head_ratios=hr, ffn_ratios=fr))
        before, after, total_after = params_from_payload(payload, hr, fr)
        assert (before, after, total_after) == (preview.layer_params_before, preview.layer_params_after,
                                                preview.params_after), (trial, hr, fr)


def test_compacted_curves_predict_what_the_full_curves_predict(tokens):
    model = tiny_model("qwen2", heads=6, kv=3, layers=3, ffn=300, hidden=48)
    curves = error_curves(model, tokens, device="cpu", use_cache=False)
    n = len(curves.layers)
    payload = json.loads(json.dumps(editor_payload(model, curves, [0.2] * n, [0.3] * n)))
    compact = payload_curves(payload)
    for lc, cc, raw in zip(curves.layers, compact.layers, payload["curves"]):
        assert cc.ffn_counts == lc.ffn_counts  # the counts travel as {step, last}, rebuilt exactly
        assert isinstance(raw["ffn_counts"], dict)
    rng = random.Random(3)
    for _ in range(40):
        hr = [rng.uniform(0, 0.95) for _ in range(n)]
        fr = [rng.uniform(0, 0.95) for _ in range(n)]
        full, small = predict(curves, hr, fr), predict(compact, hr, fr)
        assert small.kv_removed == full.kv_removed and small.ffn_removed == full.ffn_removed
        # five significant digits: each point within 5e-5 relative, and so is their interpolation
        assert small.attn == pytest.approx(full.attn, rel=1e-4, abs=1e-12)
        assert small.mlp == pytest.approx(full.mlp, rel=1e-4, abs=1e-12)
    full_map, small_map = sensitivity_map(curves), sensitivity_map(compact)
    assert payload["map_ratios"] == small_map.ratios
    assert torch.tensor(small_map.heads).allclose(torch.tensor(full_map.heads), rtol=1e-4, atol=1e-12)


def test_irregular_counts_travel_as_a_list():
    assert expand_counts([0, 3, 5, 9]) == [0, 3, 5, 9]
    assert expand_counts({"step": 4, "last": 10}) == [0, 4, 8, 10]


def test_bad_input_is_one_sentence(tokens):
    model = tiny_model()
    with pytest.raises(SlimGPTError, match="the preset has 2/3 ratios but the model has 3 layers"):
        editor_payload(model, None, [0.1, 0.2], [0.1, 0.2, 0.3])
    curves = error_curves(tiny_model(layers=2), tokens, device="cpu", use_cache=False)
    with pytest.raises(SlimGPTError, match="the error curves have 2 layers but the model has 3"):
        editor_payload(model, curves, [0.1] * 3, [0.1] * 3)
