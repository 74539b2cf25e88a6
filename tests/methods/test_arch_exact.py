"""Qwen3, Gemma 2, Gemma 3 and Phi-3 on tiny random models (transformers' own config classes, GQA, sliding-window
and global layers, soft-capping, q/k norms, fused projections): the exact math llama has. 0% is the identity; the
OBS update of layer 0 equals an fp64 least-squares fit on the calibration inputs; a physically sliced model computes
what the full-size model computes with the removed units' o_proj / down_proj columns zeroed, and keeps computing it
through save and load (a stock checkpoint for uniform layers, the shipped modeling_slimgpt.py with remote code for
mixed ones); the CLI prunes each architecture from a folder."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimgpt_core.base.assets import asset_path
from slimgpt_core.base.modeling_slimgpt import CLASSES, register_auto_classes
from slimgpt_core.base.shapes import (base_model_type, describe_layers, is_heterogeneous, keep_channels,
                                      keep_kv_groups, layer_shape, update_config)
from slimgpt_core.cli import main
from slimgpt_core.export.checkpoint import export_checkpoint
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from tests import ROOT
from tests.tiny_models import tiny_model

register_auto_classes()
STORIES = asset_path("models", "stories260k")  # a real tokenizer for folders the CLI loads

ARCHS = ["qwen3", "gemma2", "gemma3_text", "phi3"]
STOCK = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
         "phi3": "Phi3ForCausalLM"}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _zero_units(layer, groups, channels):
    """Zero the o_proj columns of the query heads of the KV groups not in `groups` and the down_proj columns of the
    channels not in `channels`: the full-size layer then computes what the sliced one does."""
    attn = layer.self_attn
    width = attn.head_dim * attn.num_key_value_groups
    q, kv, f = layer_shape(layer)
    with torch.no_grad():
        for g in set(range(kv)) - set(groups):
            attn.o_proj.weight[:, g * width:(g + 1) * width] = 0.0
        for c in set(range(f)) - set(channels):
            layer.mlp.down_proj.weight[:, c] = 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_ratio_is_the_identity(arch, tokens):
    model = tiny_model(arch)
    before = _logits(model, tokens)
    report = prune_model(model, tokens, PruneSettings(ratio=0.0, batch_size=5))
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-5, atol=1e-6)
    assert report.params_after == report.params_before
    assert all(m.units_removed == 0 and m.rel_error < 1e-6 for m in report.modules)
    # the pruned stream, replayed from kept activations through the layer's own norms, is the dense one
    assert all(done.accumulated_error < 1e-6 for done in report.layers)


def gate_rows(mlp) -> torch.Tensor:
    """The gate projection's weight (Phi-3: the first half of the fused gate/up rows)."""
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj.weight.detach()[:mlp.down_proj.in_features]
    return mlp.gate_proj.weight.detach()


def _inputs_of(model, linear_of, tokens):
    """The inputs of one linear layer of layer 0 over the calibration tokens (rows), fp64."""
    rows = []
    handle = linear_of(model.model.layers[0]).register_forward_pre_hook(
        lambda module, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    _logits(model, tokens)
    handle.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", ["attn", "mlp"])
def test_layer0_obs_update_is_the_least_squares_fit(arch, module, tokens):
    """Without damping OBS gives the kept columns the weights that best reproduce W·X on the calibration inputs:
    torch.linalg.lstsq in fp64 on the inputs captured from the dense model (layer 0 sees the dense inputs)."""
    model = tiny_model(arch, ffn=24)  # 24 FFN channels: fewer than the 288 calibration tokens, well conditioned
    linear_of = (lambda layer: layer.self_attn.o_proj) if module == "attn" else (lambda layer: layer.mlp.down_proj)
    X = _inputs_of(model, linear_of, tokens)
    W = linear_of(model.model.layers[0]).weight.detach().double()
    gate_before = gate_rows(model.model.layers[0].mlp).clone()
    settings = PruneSettings(head_ratio=0.5 if module == "attn" else 0.0, ffn_ratio=0.5 if module == "mlp" else 0.0,
                             schedule="uniform", damp=0.0, ffn_group_floor=1, ffn_group_ceiling=1)
    events = []
    prune_model(model, tokens, settings, callback=events.append)
    layer = model.model.layers[0]
    kept_w = linear_of(layer).weight.detach().double()
    if module == "attn":
        removed = next(e.removed for e in events if type(e).__name__ == "HeadImportance" and e.layer == 0)
        width = layer.self_attn.head_dim * layer.self_attn.num_key_value_groups
        kept = [c for g in range(2) if g not in removed for c in range(g * width, (g + 1) * width)]
        assert layer_shape(layer)[:2] == (2, 1)
    else:  # the kept channels: their gate rows are copied unchanged
        gate = gate_rows(layer.mlp)
        kept = [int((gate_before == row).all(1).nonzero()) for row in gate]
        assert len(kept) == 12 and kept == sorted(kept)
    fit = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T
    assert torch.allclose(kept_w, fit, rtol=0, atol=1e-4 * float(fit.abs().max())), \
        float((kept_w - fit).abs().max())
    assert not torch.allclose(kept_w, W[:, kept], atol=1e-3)  # the update did something


CUTS = [([0, 1], range(48)), ([1], range(0, 48, 2)), ([0], [5, 7])]  # per layer: KV groups and channels kept


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_model_equals_zeroed_model_through_save_and_load(arch, tokens, tmp_path):
    full = tiny_model(arch)
    sliced = copy.deepcopy(full)
    for (groups, channels), zeroed, cut in zip(CUTS, full.model.layers, sliced.model.layers):
        _zero_units(zeroed, groups, channels)
        keep_kv_groups(cut, groups)
        keep_channels(cut, channels)
        assert layer_shape(cut) == (2 * len(groups), len(groups), len(channels))
    expected = _logits(full, tokens)
    torch.testing.assert_close(_logits(sliced, tokens), expected, rtol=1e-4, atol=1e-5)
    update_config(sliced)
    assert is_heterogeneous(sliced.config) and base_model_type(sliced.config) == arch
    assert type(sliced) is CLASSES[arch][1]
    torch.testing.assert_close(_logits(sliced, tokens), expected, rtol=1e-4, atol=1e-5)
    sliced.save_pretrained(tmp_path / "mixed")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed").eval()
    assert type(loaded) is CLASSES[arch][1] and describe_layers(loaded) == describe_layers(sliced)
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-4, atol=1e-5)

    # uniform shapes: a stock checkpoint
    for (groups, channels), layer, zeroed in zip(CUTS, loaded.model.layers, full.model.layers):
        _zero_units(zeroed, groups[:1], list(channels)[:2])  # the first kept group and two first kept channels
        if len(groups) == 2:
            keep_kv_groups(layer, [0])
        keep_channels(layer, range(2))
    update_config(loaded)
    assert not is_heterogeneous(loaded.config) and type(loaded).__name__ == STOCK[arch]
    loaded.save_pretrained(tmp_path / "uniform")
    saved = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert saved["model_type"] == arch and (saved["num_attention_heads"], saved["intermediate_size"]) == (2, 2)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    assert type(again).__name__ == STOCK[arch]
    torch.testing.assert_close(_logits(again, tokens), _logits(full, tokens), rtol=1e-4, atol=1e-5)


def test_pruned_checkpoints_load_with_the_shipped_remote_code(tmp_path, tokens):
    """Each architecture pruned with SlimGPT to mixed shapes, exported; a fresh process without our package loads it
    with trust_remote_code and computes the same logits."""
    expected = {}
    for arch in ARCHS:
        model = tiny_model(arch, vocab=512)
        prune_model(model, tokens, PruneSettings(ratio=0.5, schedule="linear", shape=3.0, ffn_group_floor=4))
        assert is_heterogeneous(model.config), describe_layers(model)
        tokenizer = AutoTokenizer.from_pretrained(STORIES)
        export_checkpoint(model, tokenizer, tmp_path / arch)
        expected[arch] = _logits(model, tokens)
        assert (tmp_path / arch / "modeling_slimgpt.py").exists()
    torch.save(tokens, tmp_path / "tokens.pt")
    code = ("import sys, torch; sys.path.remove(sys.argv[2]) if sys.argv[2] in sys.path else None\n"
            "from transformers import AutoModelForCausalLM\n"
            "ids = torch.load(sys.argv[1] + '/tokens.pt')\n"
            f"for arch in {ARCHS!r}:\n"
            "    m = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '/' + arch, trust_remote_code=True).eval()\n"
            "    assert 'slimgpt_core' not in sys.modules\n"
            "    with torch.no_grad(): torch.save(m(ids, use_cache=False).logits, sys.argv[1] + '/' + arch + '.pt')\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "HOME": str(tmp_path)})
    for arch in ARCHS:
        torch.testing.assert_close(torch.load(tmp_path / f"{arch}.pt"), expected[arch], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cli_prunes_a_model_folder(arch, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    folder, out = tmp_path / "dense", tmp_path / "run"
    model = tiny_model(arch, vocab=512)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    assert main(["prune", "--model", str(folder), "--calib", "tinystories", "--nsamples", "4", "--seqlen", "32",
                 "--ratio", "0.5", "--schedule", "linear", "--ffn-group-floor", "4", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["layer_num_key_value_heads"][0] == 2 and min(config["layer_num_key_value_heads"]) == 1
    assert max(config["layer_intermediate_size"]) < 48
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(pruned) is CLASSES[arch][1]
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_logits(pruned, ids)).all()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_layers_run_with_their_own_masks_and_rotary_embeddings(arch, tokens):
    """Run layer by layer on the captured inputs, every layer with its own kwargs, the decoder reproduces the model's
    hidden states; with layer 0's kwargs everywhere (a sliding window and, in Gemma 3, the local rotary embedding
    on the global layer) it does not."""
    from slimgpt_core.methods.forwards import capture_layer_inputs, run_layer

    model = tiny_model(arch)
    x, kwargs = capture_layer_inputs(model, tokens, 5, torch.device("cpu"))
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(x, hidden[0])
    own = shared = x
    for i, layer in enumerate(model.model.layers):
        own = run_layer(layer, own, kwargs.layer(i), 5)
        shared = run_layer(layer, shared, kwargs, 5)
        # the last hidden state is after the final norm
        after = own if i + 1 < len(model.model.layers) else model.model.norm(own)
        torch.testing.assert_close(after, hidden[i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared, own, atol=1e-3)
