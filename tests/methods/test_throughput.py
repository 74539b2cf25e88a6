"""Issue 13: each layer's attention and MLP computed once gives the previous implementation's results.

The previous implementation (dense reference, attention statistics, MLP statistics and outputs each a forward
of the layer) lives in tests/reference_layer.py; these tests run both on the same model and inputs."""
import pytest
import torch

from tests.reference_layer import reference_layer
from tests.tiny_models import tiny_model
from slimgpt_core.methods import pipeline
from slimgpt_core.methods.forwards import replay_outputs
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.base.shapes import SUPPORTED_ARCHITECTURES

# The two implementations sum the same fp32 Hessians in different orders and every OBS update solves with H⁻¹:
# results agree to about cond(H)·u, cond(H + damping) up to 1.5e3 in these tiny models (u = 2⁻²⁴: 9e-5).
# Measured up to 4e-6 apart (AVX2 and default kernels).
RTOL = 1e-4


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12)


def _assert_same_results(new, ref):
    """Same removed units in every layer; errors equal to RTOL relative."""
    assert [h.removed for h in new.heads] == [h.removed for h in ref.heads]
    assert [m.units_removed for m in new.modules] == [m.units_removed for m in ref.modules]
    assert [f.group_steps for f in new.ffn] == [f.group_steps for f in ref.ffn]
    for a, b in zip(new.modules, ref.modules, strict=True):
        assert _close(a.rel_error, b.rel_error), (a, b)
        assert _close(a.predicted_rel_error, b.predicted_rel_error), (a, b)
    for a, b in zip(new.layers, ref.layers, strict=True):
        if b.accumulated_error == b.accumulated_error:  # NaN when not measured, in both
            assert _close(a.accumulated_error, b.accumulated_error), (a, b)
        else:
            assert a.accumulated_error != a.accumulated_error


def _assert_same_units_kept(new_model, ref_model):
    """q/k/v and gate/up rows are dropped, never updated: equal weights mean the same heads and channels kept."""
    for a, b in zip(new_model.model.layers, ref_model.model.layers, strict=True):
        fused = ("self_attn.qkv_proj", "mlp.gate_up_proj")  # Phi-3
        for name in fused if hasattr(a.mlp, "gate_up_proj") else ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight), name


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def _assert_logits_close(model, ref_model, tokens):
    """Logits within RTOL of each other, entries near zero within RTOL of the largest logit (a logit near zero is
    a cancellation of terms of the logits' size, so its error follows their size)."""
    got, want = _logits(model, tokens), _logits(ref_model, tokens)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


MODES = {"sequential": {}, "no-accumulation": {"track_accumulation": False},
         "dense-inputs": {"sequential": False}, "dense-inputs-untracked": {"sequential": False,
                                                                          "track_accumulation": False},
         "no-compensation": {"compensate": False}, "wanda-sp": {"method": "wanda-sp"}}


ARCHITECTURES = [("llama", 4, 4), ("llama", 4, 2), ("mistral", 4, 2), ("qwen2", 4, 2), ("qwen3", 4, 2), ("gemma2", 4, 2),
                 ("gemma3_text", 4, 2), ("phi3", 4, 2)]


def test_every_supported_architecture_is_checked_here():
    """The replays pass the norm feeding a replayed module through (forwards._FEEDS), which holds for pre-norm
    layers only: an architecture added to the engine must be added to the comparisons below."""
    assert set(SUPPORTED_ARCHITECTURES) <= {arch for arch, _, _ in ARCHITECTURES}


@pytest.mark.parametrize("arch,heads,kv", ARCHITECTURES)
@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_models_match_the_previous_implementation(arch, heads, kv, mode, tokens):
    settings = PruneSettings(ratio=0.4, ffn_group_floor=2, batch_size=5, **MODES[mode])  # 5: a ragged last batch
    new_model, ref_model = tiny_model(arch, heads, kv), tiny_model(arch, heads, kv)
    new = pipeline._prune_pass(new_model, tokens, settings, use_cache=False)
    ref = pipeline._prune_pass(ref_model, tokens, settings, use_cache=False, layer_step=reference_layer)
    _assert_same_results(new, ref)
    _assert_same_units_kept(new_model, ref_model)
    _assert_logits_close(new_model, ref_model, tokens)


@pytest.mark.parametrize("room", ["both", "down_proj's inputs", "nothing"])
def test_what_memory_holds_changes_only_what_the_outputs_recompute(monkeypatch, tokens, room):
    """The MLP-statistics pass keeps down_proj's inputs and the attention's outputs when both fit, down_proj's inputs
    alone when only they fit, nothing otherwise; the outputs then run o_proj and the pruned MLP again as needed."""
    ffn, rows = 48, tokens.numel() * 4  # tiny_model's FFN; fp32 activations, one row per calibration token
    limit = {"both": float("inf"), "down_proj's inputs": rows * ffn, "nothing": 0}[room]
    monkeypatch.setattr(pipeline, "fits", lambda nbytes, where: nbytes <= limit)
    settings = PruneSettings(ratio=0.4, ffn_group_floor=2, batch_size=5, track_accumulation=False)
    model, ref_model = tiny_model(ffn=ffn), tiny_model(ffn=ffn)
    replays = []

    def replay(layer, x, kwargs, batch_size, attn_inputs, columns, out, attn_outputs=None, mlp_inputs=None, *args):
        replays.append((attn_inputs is not None, attn_outputs is not None, mlp_inputs is not None))
        return replay_outputs(layer, x, kwargs, batch_size, attn_inputs, columns, out, attn_outputs, mlp_inputs, *args)
    monkeypatch.setattr(pipeline, "replay_outputs", replay)
    new = pipeline._prune_pass(model, tokens, settings, use_cache=False)
    ref = pipeline._prune_pass(ref_model, tokens, settings, use_cache=False, layer_step=reference_layer)
    _assert_same_results(new, ref)
    _assert_logits_close(model, ref_model, tokens)
    # (o_proj's inputs still held, the attention's outputs kept, down_proj's inputs kept), in every layer
    expected = {"both": (False, True, True), "down_proj's inputs": (True, False, True), "nothing": (True, False, False)}
    assert replays == [expected[room]] * len(model.model.layers)


def test_qwen2_biases_reach_the_replayed_outputs(tokens):
    """Large q/v biases (qwen2): the kept o_proj inputs carry them, the replay matches a real forward."""
    model = tiny_model("qwen2", 4, 2)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.v_proj.bias.normal_(0, 0.5)
    ref_model = tiny_model("qwen2", 4, 2)
    ref_model.load_state_dict(model.state_dict())
    settings = PruneSettings(ratio=0.5, ffn_group_floor=2)
    new = pipeline._prune_pass(model, tokens, settings, use_cache=False)
    ref = pipeline._prune_pass(ref_model, tokens, settings, use_cache=False, layer_step=reference_layer)
    _assert_same_results(new, ref)
    _assert_same_units_kept(model, ref_model)


def test_statistics_cache_gives_the_same_results(tmp_path, monkeypatch, tokens):
    """Layers whose statistics come from cache/stats (dense inputs) still get their outputs right."""
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    settings = PruneSettings(ratio=0.4, ffn_group_floor=2, sequential=False)
    ref = pipeline._prune_pass(tiny_model(), tokens, settings, use_cache=False, layer_step=reference_layer)
    first = pipeline._prune_pass(tiny_model(), tokens, settings)
    again = pipeline._prune_pass(tiny_model(), tokens, settings)
    assert first.reused_statistics == 0 and again.reused_statistics > 0
    _assert_same_results(first, ref)
    _assert_same_results(again, ref)


@pytest.mark.parametrize("track", [True, False])
def test_stories260k_matches_the_previous_implementation(assets_root, track):
    from slimgpt_core.data import calibration_tokens, evaluation_tokens
    from slimgpt_core.evaluation.evaluate import perplexity
    from slimgpt_core.models import load_model

    loaded = load_model("stories260k", "cpu")
    calib = calibration_tokens(loaded.tokenizer, "tinystories", 16, 128)
    test = evaluation_tokens(loaded.tokenizer, "tinystories")
    settings = PruneSettings(ratio=0.3, batch_size=6, ffn_group_floor=8, track_accumulation=track)
    ref_model = load_model("stories260k", "cpu").model
    new = pipeline._prune_pass(loaded.model, calib, settings, use_cache=False)
    ref = pipeline._prune_pass(ref_model, calib, settings, use_cache=False, layer_step=reference_layer)
    _assert_same_results(new, ref)
    _assert_same_units_kept(loaded.model, ref_model)
    assert sum(m.units_removed for m in new.modules) > 0
    ppl_new = perplexity(loaded.model, test, 256, 8, 8).ppl
    ppl_ref = perplexity(ref_model, test, 256, 8, 8).ppl
    assert ppl_new == pytest.approx(ppl_ref, rel=1e-5)
