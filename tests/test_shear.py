"""Sheared-LLaMA masks, the cut and the shear command (issue 18)."""
import json
import math

import pytest
import torch

from conftest import tiny_model
from slimgpt_core.cli import main
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.shear import hard_concrete as hc
from slimgpt_core.methods.shear.apply import MaskedModel
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.methods.shear.masks import ShearMasks, shape_parameters
from slimgpt_core.methods.shear.target import resolve_target, source_shape
from slimgpt_core.methods.shear.train import ShearSettings, shear_model
from slimgpt_core.base.shapes import count_parameters, head_dim


def test_keep_probability_formula_matches_monte_carlo():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    n = 200_000
    draws = hc.sample(log_alpha.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    assert draws.min() == 0 and draws.max() == 1  # hard zeros and ones occur
    empirical = (draws != 0).float().mean(0)
    formula = hc.keep_probability(log_alpha)
    stderr = (formula * (1 - formula) / n).sqrt()
    assert torch.all((empirical - formula).abs() < 4 * stderr + 1e-4), (empirical, formula)
    # independent closed form: P(z > 0) = P(s > −l/(r−l)) for the logistic s
    x = -hc.LOW / (hc.HIGH - hc.LOW)
    by_hand = 1 - torch.sigmoid(hc.BETA * math.log(x / (1 - x)) - log_alpha)
    assert torch.allclose(formula, by_hand, atol=1e-6)


def test_top_k_gates_keep_exactly_k_per_row():
    la = torch.randn(5, 11)
    gates = hc.top_k_gates(la, 4)
    assert torch.equal((gates != 0).sum(-1), torch.full((5,), 4))
    kept = gates != 0
    assert torch.all(la[kept].view(5, 4).min(-1).values >= la[~kept].view(5, 7).max(-1).values)


def _stories(assets_root):
    from slimgpt_core.models import load_model
    return load_model("stories260k", "cpu", "float32")


def _random_gates(model, target, seed):
    torch.manual_seed(seed)
    src = source_shape(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    masks = ShearMasks(src, target, head_dim(model.config), model.config.vocab_size, tied)
    for la in masks.log_alpha.values():
        la.data.normal_(0, 2)
    return masks, masks.deterministic()


def test_gates_of_one_leave_the_model_unchanged(assets_root):
    model = _stories(assets_root).model.eval()
    target = resolve_target({"layers": 4, "kv_groups": 2, "heads": 2, "ffn": 100, "hidden": 40}, model)
    masks, _ = _random_gates(model, target, 0)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with MaskedModel(model) as m:
            m.gates = {k: torch.ones_like(v) for k, v in masks.log_alpha.items()}
            ones = model(ids).logits
        after = model(ids).logits  # hooks removed
    assert torch.allclose(ones, ref, atol=1e-5) and torch.equal(after, ref)


@pytest.mark.parametrize("case", [
    ("stories260k", {"layers": 3, "kv_groups": 2, "heads": 2, "ffn": 100, "hidden": 40}),  # tied, 1 head per group
    ("stories260k", {"layers": 4, "kv_groups": 3, "ffn": 150, "hidden": 50}),  # hidden not a multiple of the heads
    ("tiny-untied", {"layers": 2, "kv_groups": 1, "heads": 2, "ffn": 30, "hidden": 24}),
])
def test_sliced_model_equals_masked_model(assets_root, case):
    name, raw = case
    model = (_stories(assets_root).model if name == "stories260k"
             else tiny_model(heads=4, kv=2, layers=3, ffn=48, hidden=32)).eval()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "stories260k")
    target = resolve_target(raw, model)
    masks, gates = _random_gates(model, target, 1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), MaskedModel(model) as m:
        m.gates = gates
        masked = model(ids).logits
    cut_model(model, gates)
    with torch.no_grad():
        sliced = model(ids).logits
    # fp32 forwards of different widths (gates folded into the weights vs multiplied in): errors of about
    # layers·sqrt(width)·u of the logits' size (5·sqrt(172)·2⁻²⁴ ≈ 4e-6); 8.6e-6 and 9.5e-6 were measured
    # (AVX2, default kernels) with logits up to 15, against an absolute 1e-5 before
    assert (sliced - masked).abs().max() < 1e-5 * masked.abs().max()
    assert source_shape(model) == target
    for layer in model.model.layers:  # every KV group keeps the same number of query heads
        attn = layer.self_attn
        assert attn.q_proj.out_features == attn.k_proj.out_features * target.heads_per_group
        assert attn.num_key_value_groups == target.heads_per_group
    assert count_parameters(model) == shape_parameters(target.layers, target.kv_groups, target.heads, target.ffn,
                                                       target.hidden, head_dim(model.config),
                                                       model.config.vocab_size, tied)


def test_expected_sizes_reach_the_target_within_200_steps(assets_root):
    from slimgpt_core.data import calibration_tokens

    loaded = _stories(assets_root)
    model = loaded.model
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 64, 64, 0)
    target = resolve_target({"layers": 4, "kv_groups": 2, "heads": 2, "ffn": 128, "hidden": 48}, model)
    result = shear_model(model, tokens, target, ShearSettings(steps=200, batch_size=2, device="cpu"))
    expected = result.history[-1].expected
    for key in ("layers", "kv_groups", "heads_per_group", "ffn", "hidden"):
        goal = getattr(target, key)
        assert abs(expected[key] - goal) <= 0.1 * goal, (key, expected[key], goal)
    assert result.history[0].expected["ffn"] > 165  # it started dense
    assert source_shape(model) == target
    assert result.report.params_after == count_parameters(model) < result.report.params_before


def test_shear_command_writes_a_run_that_reloads(assets_root, tmp_path, capsys):
    out = tmp_path / "shear"
    code = main(["shear", "--model", "stories260k", "--target", '{"layers": 4, "kv_groups": 3, "ffn": 128, "hidden": 40}',
                 "--data", "tinystories,c4", "--steps", "12", "--seqlen", "64", "--batch-size", "2",
                 "--ppl", "tinystories", "--ppl-seqlen", "256", "--ppl-windows", "4", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "step 12/12" in captured.err and "tok/s" in captured.err
    assert summary["shape"]["hidden"] == "64->40" and len(summary["kept_layers"]) == 4
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["target"] == {"layers": 4, "kv_groups": 3, "heads": 6, "ffn": 128, "hidden": 40}
    assert len(json.loads((out / "shear.json").read_text())["history"]) == 12
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 40 and config["num_hidden_layers"] == 4  # 40 % 6 != 0: per-layer lists
    assert main(["eval", "--model", str(out), "--ppl", "tinystories", "--seqlen", "256", "--max-windows", "4",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(summary["sheared_ppl"], rel=1e-4)


def test_uniform_target_exports_a_stock_checkpoint(assets_root, tmp_path, capsys):
    out = tmp_path / "stock"
    assert main(["shear", "--model", "stories260k", "--target", '{"layers": 3, "kv_groups": 2, "heads": 2, '
                 '"hidden": 32}', "--data", "tinystories", "--steps", "3", "--seqlen", "32", "--batch-size", "1",
                 "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 2
    assert not (out / "modeling_slimgpt.py").exists()
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert source_shape(reloaded).hidden == 32 and len(reloaded.model.layers) == 3


@pytest.mark.parametrize("target, words", [
    ('{"ffn": 999}', "only shrink"),
    ('{"layers": 0}', "at least one"),
    ('{"kv_groups": 3, "heads": 4}', "do not divide"),
    ('{"heads": 8, "kv_groups": 2}', "only shrink"),  # 4 heads per group, the source has 2
    ('{"depth": 3}', "unknown target key"),
    ('{"ffn": 1.5}', "whole number"),
])
def test_bad_targets_say_so_and_write_nothing(assets_root, tmp_path, capsys, target, words):
    out = tmp_path / "bad"
    assert main(["shear", "--model", "stories260k", "--target", target, "--steps", "2", "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and words in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cancel_stops_before_any_change(assets_root):
    model = _stories(assets_root).model
    before = count_parameters(model)
    target = resolve_target({"layers": 3}, model)
    with pytest.raises(JobCancelled):
        shear_model(model, torch.zeros(4, 16, dtype=torch.long), target, ShearSettings(steps=5, device="cpu"),
                    should_stop=lambda: True)
    assert count_parameters(model) == before and len(model.model.layers) == 5


def test_target_from_another_models_config(assets_root, tmp_path):
    model = _stories(assets_root).model
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "intermediate_size": 64, "head_dim": 8}))
    from slimgpt_core.methods.shear.target import read_target
    t = resolve_target(read_target(str(path)), model)
    assert (t.layers, t.kv_groups, t.heads, t.ffn, t.hidden) == (3, 2, 4, 64, 32)
    path.write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2,
                                "intermediate_size": 64}))  # head size 16
    with pytest.raises(SlimGPTError, match="head size"):
        resolve_target(read_target(str(path)), model)


# Minitron: activation importance, one shot


def _silence(model, layer, kv_group=None, channel=None, dim=None):
    """Make one unit provably useless, so its activation score must be zero."""
    with torch.no_grad():
        block = model.model.layers[layer]
        d = block.self_attn.head_dim
        if kv_group is not None:  # zero values: every head of the group outputs zeros
            block.self_attn.v_proj.weight[kv_group * d:(kv_group + 1) * d] = 0
        if channel is not None:
            block.mlp.up_proj.weight[channel] = 0
        if dim is not None:  # nothing ever writes this residual dimension
            model.model.embed_tokens.weight[:, dim] = 0
            for b in model.model.layers:
                b.self_attn.o_proj.weight[dim] = 0
                b.mlp.down_proj.weight[dim] = 0


def test_minitron_scores_rank_silenced_units_last(tokens):
    from slimgpt_core.methods.minitron import collect_scores

    model = tiny_model(heads=4, kv=2, layers=3, ffn=48, hidden=32)
    _silence(model, 1, kv_group=1, channel=7, dim=5)
    with torch.no_grad():  # layer 2 does nothing: its output equals its input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    s = collect_scores(model, tokens, batch_size=4)
    assert s.heads.shape == (3, 4) and s.ffn.shape == (3, 48) and s.hidden.shape == (32,)
    assert torch.all(s.heads[1, 2:] == 0) and torch.all(s.heads[1, :2] > 0)
    assert s.ffn[1, 7] == 0 and s.ffn[1].argmin() == 7 and (s.ffn[0] > 0).all()
    assert s.hidden[5] == 0 and (s.hidden.sum() > 0)
    assert s.layers[2].abs() < 1e-5 and s.layers[:2].min() > 1e-3


def test_minitron_to_a_shape_drops_the_useless_units(assets_root, tokens):
    from slimgpt_core.methods.minitron import prune_to_shape

    model = tiny_model(heads=4, kv=2, layers=3, ffn=48, hidden=32)
    _silence(model, 0, kv_group=0, dim=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    target = resolve_target({"layers": 2, "kv_groups": 1, "heads": 1, "ffn": 40, "hidden": 31}, model)
    ids = tokens[:2]
    from slimgpt_core.methods.minitron import collect_scores, shape_gates
    gates = shape_gates(model, collect_scores(model, tokens, 4), target)
    assert gates["layers"].tolist() == [1, 0, 1] and gates["kv_groups"][0].tolist() == [0, 1]
    assert gates["hidden"][3] == 0 and gates["hidden"].sum() == 31
    assert gates["heads"].shape == (3, 2, 2) and torch.all(gates["heads"].sum(-1) == 1)
    prune_to_shape(model, tokens, target, batch_size=4)
    assert source_shape(model) == target
    assert all(layer.self_attn.num_key_value_groups == 1 for layer in model.model.layers)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_minitron_method_in_the_pipeline_matches_slimgpt_parameters(assets_root, tmp_path, capsys):
    out = tmp_path / "minitron"
    assert main(["prune", "--model", "stories260k", "--method", "minitron", "--calib", "tinystories", "--nsamples",
                 "8", "--seqlen", "128", "--ratio", "0.3", "--out", str(out), "--quiet"]) == 0
    minitron = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["prune", "--model", "stories260k", "--method", "magnitude", "--calib", "tinystories",
                 "--nsamples", "8", "--seqlen", "128", "--ratio", "0.3", "--out", str(tmp_path / "mag"),
                 "--quiet"]) == 0
    magnitude = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert minitron["params_after"] == magnitude["params_after"] < minitron["params_before"]
    assert json.loads((out / "report.json").read_text())["settings"]["method"] == "minitron"


def test_hidden_size_not_a_multiple_of_any_head_count_saves_and_reloads(tmp_path):
    """SmolLM2 to hidden 512 with 6 heads: transformers' config rule (hidden % heads) fails for the source's and
    the target's head counts alike; the per-layer class must still save and load the same function."""
    from transformers import AutoModelForCausalLM
    from slimgpt_core.base.modeling_slimgpt import register_auto_classes

    model = tiny_model(heads=6, kv=3, layers=2, ffn=40, hidden=48).eval()
    target = resolve_target({"kv_groups": 3, "heads": 3, "hidden": 40}, model)
    _, gates = _random_gates(model, target, 3)
    cut_model(model, gates)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    register_auto_classes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert source_shape(reloaded) == target
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)


# dynamic batch loading (the update rule; continued pre-training is not built yet)


def test_a_lagging_domain_gains_weight():
    from slimgpt_core.training.domain_mix import draw_domains, update_domain_weights

    w = torch.tensor([0.5, 0.3, 0.2])
    losses, reference = torch.tensor([2.0, 3.0, 2.5]), torch.tensor([2.0, 2.0, 2.6])  # domain 1 lags by 1 nat
    paper = update_domain_weights(w, losses, reference)
    by_hand = torch.tensor([0.5, 0.3 * math.e, 0.2]) / (0.7 + 0.3 * math.e)
    assert torch.allclose(paper, by_hand, atol=1e-6) and paper.argmax() == 1 and paper.sum() == pytest.approx(1)
    code = update_domain_weights(w, losses, reference, "code")
    raw = torch.tensor([0.5, 0.3 * math.e, 0.2 * math.exp(-0.1)])
    assert torch.allclose(code, (1 - 1e-4) * raw / raw.sum() + 1e-4 / 3, atol=1e-6)
    assert code[2] / code[0] < w[2] / w[0]  # below its reference: the code variant lowers it, the paper does not
    assert paper[2] / paper[0] == pytest.approx(float(w[2] / w[0]))
    counts = torch.bincount(draw_domains(paper, 100_000, torch.Generator().manual_seed(0)), minlength=3) / 100_000
    assert torch.allclose(counts, paper, atol=0.01)
    for _ in range(5):  # repeated updates while the gap persists: the mix keeps moving toward the laggard
        paper2 = update_domain_weights(paper, losses, reference)
        assert paper2[1] > paper[1]
        paper = paper2


def test_memory_check_refuses_before_any_work(assets_root, tmp_path, capsys):
    out = tmp_path / "big"
    assert main(["shear", "--model", "stories260k", "--target", '{"layers": 4}', "--batch-size", "200000",
                 "--seqlen", "512", "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "GiB" in err[0] and "--batch-size" in err[0]
    assert not list(tmp_path.iterdir())


def test_shear_method_minitron_writes_a_run_of_the_target_shape(assets_root, tmp_path, capsys):
    out = tmp_path / "minitron-shape"
    assert main(["shear", "--method", "minitron", "--model", "stories260k", "--target",
                 '{"layers": 4, "kv_groups": 2, "heads": 2, "ffn": 128, "hidden": 48}', "--data", "tinystories",
                 "--nsamples", "16", "--seqlen", "128", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "minitron" and len(summary["kept_layers"]) == 4
    from slimgpt_core.models import load_model
    reloaded = load_model(str(out), "cpu", "float32").model
    t = source_shape(reloaded)
    assert (t.layers, t.kv_groups, t.heads, t.ffn, t.hidden) == (4, 2, 2, 128, 48)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == "minitron" and report["params_after"] == count_parameters(reloaded)
    assert json.loads((out / "shear.json").read_text())["history"] == []
