"""Sheared-LLaMA masks, the cut and the shear command (issue 18), then the masks, cut and mix update against
computations written out here (issue 15: mutation testing).

The hard-concrete numbers are SPEC §9's written with literal constants (l = −0.1, r = 1.1, β = 2/3, log α in
[ln 0.01, ln 100], the eval gate σ(0.8·log α/β)); parameter counts come from real models cut to binary gates;
the mix update is Algorithm 1 with numbers."""
import json
import math

import pytest
import torch

from slimgpt_core.cli import main
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.shear import hard_concrete as hc
from slimgpt_core.methods.shear.apply import MaskedModel
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.training.domain_mix import draw_domains, update_domain_weights
from slimgpt_core.methods.shear.masks import ShearMasks
from slimgpt_core.methods.shear.target import Shape, resolve_target, source_shape
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.train import shear_model
from slimgpt_core.base.shapes import count_parameters, head_dim, model_parameters
from tests.tiny_models import tiny_model


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
    assert count_parameters(model) == model_parameters(target.layers, target.heads, target.kv_groups, target.ffn,
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


# --- masks, cut and mix update against computations written out here ----------------------------------------------
SOURCE = Shape(layers=3, kv_groups=2, heads=6, ffn=8, hidden=12)  # 3 query heads per group, head size 2
ALL = Shape(layers=2, kv_groups=1, heads=2, ffn=5, hidden=9)  # shrinks every structure
SOME = Shape(layers=3, kv_groups=2, heads=4, ffn=5, hidden=12)  # only heads per group (3 -> 2) and FFN


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) = σ(log α − β·ln(−l/r)) with l = −0.1, r = 1.1, β = 2/3."""
    return torch.sigmoid(log_alpha.double() - 2 / 3 * math.log(0.1 / 1.1))


def masks_with_random_log_alpha(target: Shape, tied=False, seed=0, scale=2.0) -> ShearMasks:
    masks = ShearMasks(SOURCE, target, head_dim=2, vocab=101, tied=tied)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * scale)
    return masks


def test_a_mask_per_shrunk_structure_starting_nearly_dense():
    masks = ShearMasks(SOURCE, ALL, 2, 101, False)
    assert sorted(masks.names) == ["ffn", "heads", "hidden", "kv_groups", "layers"]
    shapes = {name: tuple(la.shape) for name, la in masks.log_alpha.items()}
    assert shapes == {"layers": (3,), "kv_groups": (3, 2), "heads": (3, 3), "ffn": (3, 8), "hidden": (12,)}
    assert all(torch.all(la == 5.0) and la.requires_grad for la in masks.log_alpha.values())
    assert [p is la for p, la in zip(masks.mask_parameters(), masks.log_alpha.values())] == [True] * 5
    assert all(torch.equal(lam, torch.zeros(2)) for lam in masks.lambda_parameters())
    assert list(masks.lambdas) == masks.names and len(masks.lambda_parameters()) == 5
    dense = float(keep_probability(torch.tensor(5.0)))  # 0.9991
    assert float(masks.expected_counts()["ffn"][0].detach()) == pytest.approx(8 * dense)
    some = ShearMasks(SOURCE, SOME, 2, 101, False)  # a structure kept whole gets no mask
    assert sorted(some.names) == ["ffn", "heads"] and list(some.lambdas) == some.names
    assert some.target_sparsity("heads") == pytest.approx(1 / 3) and some.target_sparsity("ffn") == 3 / 8
    assert ShearMasks(SOURCE, SOURCE, 2, 101, False).names == []


def test_expected_counts_and_shape_from_the_keep_probabilities():
    masks = masks_with_random_log_alpha(ALL)
    counts = masks.expected_counts()
    p = {name: keep_probability(la.detach()) for name, la in masks.log_alpha.items()}
    assert counts["layers"].shape == () and counts["ffn"].shape == (3,)
    for name in masks.names:
        assert torch.allclose(counts[name].double(), p[name].sum(-1), atol=1e-5), name
    shape = masks.expected_shape()
    by_hand = {"layers": float(p["layers"].sum()), "kv_groups": float(p["kv_groups"].sum(1).mean()),
               "heads_per_group": float(p["heads"].sum(1).mean()), "ffn": float(p["ffn"].sum(1).mean()),
               "hidden": float(p["hidden"].sum())}
    by_hand["heads"] = by_hand["kv_groups"] * by_hand["heads_per_group"]
    assert shape == pytest.approx(by_hand, rel=1e-5)
    some = masks_with_random_log_alpha(SOME).expected_shape()  # unmasked structures: the source's counts
    assert (some["layers"], some["kv_groups"], some["hidden"]) == (3, 2, 12)
    assert some["heads"] == pytest.approx(2 * some["heads_per_group"]) and some["heads_per_group"] < 3


@pytest.mark.parametrize("target", [ALL, SOME], ids=["all", "some"])
def test_lagrangian_by_hand(target):
    masks = masks_with_random_log_alpha(target, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lam in masks.lambdas.values():
            lam.copy_(torch.randn(2, generator=g) * 3)
    warmup = 0.6
    total, gaps = masks.lagrangian(warmup)
    expected, expected_gaps = 0.0, {}
    keep = {"layers": target.layers, "kv_groups": target.kv_groups, "heads": target.heads_per_group,
            "ffn": target.ffn, "hidden": target.hidden}
    for name, la in masks.log_alpha.items():
        rows = la.detach().reshape(-1, la.shape[-1])  # one row per layer (or the single row)
        size = rows.shape[1]
        lam1, lam2 = masks.lambdas[name].detach().double().tolist()
        terms, row_gaps = [], []
        for row in rows:
            sparsity = 1 - float(keep_probability(row).sum()) / size
            gap = sparsity - warmup * (1 - keep[name] / size)
            terms.append(lam1 * gap + lam2 * gap * gap)
            row_gaps.append(gap)
        expected += sum(terms) / len(terms)
        expected_gaps[name] = sum(row_gaps) / len(row_gaps)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert gaps == pytest.approx(expected_gaps, rel=1e-5, abs=1e-6)
    # both sides get gradients: the masks descend on it, the multipliers ascend
    total.backward()
    for name in masks.names:
        assert masks.log_alpha[name].grad.abs().sum() > 0 and masks.lambdas[name].grad.abs().sum() > 0
        assert masks.lambdas[name].grad[0] == pytest.approx(expected_gaps[name], rel=1e-5, abs=1e-6)


def _binary(masks: ShearMasks, seed: int) -> None:
    """Log α of ±30: every keep probability is 0 or 1 (to fp32), at least one entry open per row."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            open_ = torch.rand(la.shape, generator=g) < 0.6
            open_[..., 0] |= ~open_.any(-1)
            la.copy_(torch.where(open_, 30.0, -30.0))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("target", [ALL, SOME], ids=["all", "some"])
def test_expected_parameters_count_the_model_cut_to_binary_gates(tied, target):
    """With every keep probability 0 or 1 the expectation is a count: that of the real model cut to those gates."""
    for seed in range(3):
        model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12, seed=seed)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        assert source_shape(model) == SOURCE
        masks = ShearMasks(SOURCE, target, 2, 101, tied)
        _binary(masks, seed)
        gates = {name: (la.detach() > 0).float() for name, la in masks.log_alpha.items()}
        cut_model(model, gates)
        assert masks.expected_parameters() == pytest.approx(count_parameters(model), abs=1e-2)


def test_expected_parameters_with_fractional_probabilities():
    """Independent structures: each layer's count is multilinear in the kept entries, so its expectation is the
    count at the expected sizes, weighted by the layer's keep probability."""
    for target, tied in [(ALL, False), (ALL, True), (SOME, False)]:
        masks = masks_with_random_log_alpha(target, tied=tied, seed=3)
        p = {name: keep_probability(la.detach()) for name, la in masks.log_alpha.items()}
        hidden = float(p["hidden"].sum()) if "hidden" in p else 12.0
        total = hidden * (101 * (1 if tied else 2) + 1)  # embedding (+ untied head) and the final norm
        for layer in range(3):
            kv = float(p["kv_groups"][layer].sum()) if "kv_groups" in p else 2.0
            per_group = float(p["heads"][layer].sum()) if "heads" in p else 3.0
            ffn = float(p["ffn"][layer].sum()) if "ffn" in p else 8.0
            attention = hidden * 2 * (2 * kv * per_group + 2 * kv)  # q, o (kv·per_group heads); k, v (kv heads)
            mlp = 3 * hidden * ffn
            norms = 2 * hidden
            total += (float(p["layers"][layer]) if "layers" in p else 1.0) * (attention + mlp + norms)
        assert masks.expected_parameters() == pytest.approx(total, rel=1e-5)


def test_target_parameters_count_the_model_cut_to_the_target():
    for tied in (False, True):
        model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        masks = masks_with_random_log_alpha(ALL, tied=tied, seed=4)
        cut_model(model, masks.deterministic())
        assert source_shape(model) == ALL
        assert masks.target_parameters() == count_parameters(model)
        assert isinstance(masks.target_parameters(), int)


def test_deterministic_gates_keep_the_target_count_at_their_eval_values():
    masks = masks_with_random_log_alpha(ALL, seed=5)
    gates = masks.deterministic()
    keep = {"layers": 2, "kv_groups": 1, "heads": 2, "ffn": 5, "hidden": 9}
    assert list(gates) == masks.names
    for name, la in masks.log_alpha.items():
        la = la.detach()
        rows, values = la.reshape(-1, la.shape[-1]), gates[name].reshape(-1, la.shape[-1])
        assert not gates[name].requires_grad
        for row, value in zip(rows, values):
            top = set(sorted(range(len(row)), key=lambda j: -float(row[j]))[:keep[name]])
            for j in range(len(row)):
                expected = 1 / (1 + math.exp(-0.8 * float(row[j]) / (2 / 3))) if j in top else 0.0
                # fp32 sigmoid of 1.2·la: the argument's rounding moves it by (1 − σ)·|x|·2⁻²⁴ (|x| ≲ 6) plus a
                # few ulp of its own, under 17·2⁻²⁴ ≈ 1e-6
                assert float(value[j]) == pytest.approx(expected, rel=1e-6, abs=1e-7), (name, j)


def test_training_gates_follow_each_masks_own_log_alpha():
    masks = ShearMasks(SOURCE, ALL, 2, 101, False)
    _binary(masks, 6)
    sample = masks.sample()
    assert list(sample) == masks.names
    for name, la in masks.log_alpha.items():  # log α ±30: the stretched, clipped sample is exactly 1 or 0
        assert torch.equal(sample[name], (la.detach() > 0).float()), name
    with torch.no_grad():
        masks.log_alpha["ffn"].fill_(0.0)
    draws = torch.stack([masks.sample()["ffn"] for _ in range(400)])  # 400 × 24 draws
    assert ((draws > 0) & (draws < 1)).any() and draws.min() == 0 and draws.max() == 1
    assert float((draws != 0).float().mean()) == pytest.approx(float(keep_probability(torch.tensor(0.0))), abs=0.02)


def test_a_sample_is_the_stretched_clipped_concrete_of_its_uniforms():
    """z = clamp(σ((ln u − ln(1−u) + log α)/β)·1.2 − 0.1, 0, 1) with u drawn by the given generator, in log α's
    dtype and on its device (meta as the default device must not matter)."""
    log_alpha = torch.linspace(-6, 6, 500, dtype=torch.float64)
    with torch.device("meta"):
        z = hc.sample(log_alpha, torch.Generator().manual_seed(3))
    u = torch.rand(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / (2 / 3))
    assert z.dtype == torch.float64 and z.device.type == "cpu"
    assert torch.allclose(z, (s * 1.2 - 0.1).clamp(0, 1), rtol=0, atol=1e-12)
    torch.manual_seed(0)  # the global generator is not used
    assert torch.equal(z, hc.sample(log_alpha, torch.Generator().manual_seed(3)))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert hc.sample(log_alpha.float()).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    assert hc.sample(torch.full((4,), -5.0), torch.Generator().manual_seed(0)).tolist() == [0.0] * 4


def test_clamp_keeps_log_alpha_within_a_hundredfold_odds():
    masks = masks_with_random_log_alpha(ALL, seed=7, scale=8.0)
    before = {name: la.detach().clone() for name, la in masks.log_alpha.items()}
    assert all((b.abs() > math.log(100)).any() for b in before.values())
    masks.clamp_()
    for name, la in masks.log_alpha.items():
        expected = before[name].clamp(math.log(0.01), math.log(100))
        assert torch.allclose(la.detach(), expected, rtol=0, atol=1e-6), name
        assert la.requires_grad


# the mix update (Sheared-LLaMA, Algorithm 1)


def test_mix_update_with_numbers():
    w = torch.tensor([0.25, 0.25, 0.5])
    losses, reference = torch.tensor([3.0, 2.0, 2.2]), torch.tensor([2.5, 2.0, 2.7])
    # paper: Δ = max(ℓ − ℓ_ref, 0) = (0.5, 0, 0); w·e^Δ = (0.25·1.6487, 0.25, 0.5), normalised
    e = math.exp(0.5)
    paper = update_domain_weights(w, losses, reference)
    assert paper.tolist() == pytest.approx([0.25 * e / (0.75 + 0.25 * e), 0.25 / (0.75 + 0.25 * e),
                                            0.5 / (0.75 + 0.25 * e)], rel=1e-6)
    # code: Δ = (0.5, 0, −0.5), then (1 − c)·w + c/3
    raw = [0.25 * e, 0.25, 0.5 / e]
    for c in (1e-4, 0.3):
        kw = {} if c == 1e-4 else {"smoothing": c}
        code = update_domain_weights(w, losses, reference, "code", **kw)
        assert code.tolist() == pytest.approx([(1 - c) * r / sum(raw) + c / 3 for r in raw], rel=1e-6)
    # a domain at weight 0 stays at 0 in the paper variant, and the others are normalised without it
    zero = update_domain_weights(torch.tensor([0.0, 0.5, 0.5]), losses, reference)
    assert zero.tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-12)


@pytest.mark.parametrize("args, sentence", [
    ((torch.ones(3) / 3, torch.ones(3), torch.ones(2)), "weights, losses and reference losses need one entry per "
                                                        "domain"),
    ((torch.ones(2, 2) / 4, torch.ones(2, 2), torch.ones(2, 2)), "weights, losses and reference losses need one "
                                                                  "entry per domain"),
    ((torch.ones(3) / 3, torch.ones(3), torch.ones(3), "mean"), "variant must be 'paper' or 'code', got 'mean'"),
])
def test_mix_update_refuses_bad_input(args, sentence):
    with pytest.raises(ValueError) as info:
        update_domain_weights(*args)
    assert str(info.value) == sentence


def test_domains_drawn_from_the_given_generator():
    w = torch.tensor([0.2, 0.5, 0.3])
    a = draw_domains(w, 50, torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global generator is neither used nor needed
    b = draw_domains(w, 50, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (50,)
    assert not torch.equal(a, draw_domains(w, 50, torch.Generator().manual_seed(1)))
    assert torch.equal(a, torch.multinomial(w, 50, replacement=True, generator=torch.Generator().manual_seed(0)))


# the cut, against a forward pass written out with plain torch ops


def _rms(x, weight, eps, open_dims):
    """RMSNorm over the open hidden dimensions only (the closed ones hold zeros)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / open_dims + eps) * weight


def _rope(x, theta):
    """Rotary embedding of [batch, heads, tokens, d] (rotate-half convention)."""
    d, n = x.shape[-1], x.shape[-2]
    freqs = torch.arange(n, dtype=torch.float32)[:, None] / theta ** (torch.arange(0, d, 2).float() / d)[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rotated * sin


def gated_forward(model, ids, gates):
    """Logits of the full-size `model` with every gate applied where SPEC §9 puts it: hidden gate on the
    embedding, on each block's output and on every norm's output; head gates (KV group × head within group) on
    the heads' outputs; channel gates on the FFN; a layer's gate on its two block outputs."""
    c = model.config
    n_heads, n_kv, hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    d, rep, eps = hidden // n_heads, n_heads // n_kv, c.rms_norm_eps
    theta = c.rope_parameters["rope_theta"]
    z_hidden = gates.get("hidden", torch.ones(hidden))
    open_dims = float((z_hidden != 0).sum())
    x = model.model.embed_tokens.weight[ids] * z_hidden
    b, n = ids.shape
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        z_layer = gates["layers"][i] if "layers" in gates else 1.0
        h = _rms(x, layer.input_layernorm.weight, eps, open_dims) * z_hidden
        q = (h @ attn.q_proj.weight.T).view(b, n, n_heads, d).transpose(1, 2)
        k = (h @ attn.k_proj.weight.T).view(b, n, n_kv, d).transpose(1, 2)
        v = (h @ attn.v_proj.weight.T).view(b, n, n_kv, d).transpose(1, 2)
        q, k = _rope(q, theta), _rope(k, theta)
        heads = []
        for head in range(n_heads):
            g = head // rep  # query head `head` reads KV group head // rep
            weights = torch.softmax(q[:, head] @ k[:, g].transpose(-1, -2) / math.sqrt(d) + causal, -1)
            z = gates["kv_groups"][i, g] if "kv_groups" in gates else 1.0
            if "heads" in gates:
                row = gates["heads"][i] if gates["heads"].dim() == 2 else gates["heads"][i, g]
                z = z * row[head % rep]
            heads.append(weights @ v[:, g] * z)
        out = torch.cat(heads, -1) @ attn.o_proj.weight.T
        x = x + out * z_layer * z_hidden
        h = _rms(x, layer.post_attention_layernorm.weight, eps, open_dims) * z_hidden
        a = torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)
        a = a * (gates["ffn"][i] if "ffn" in gates else 1.0)
        x = x + (a @ mlp.down_proj.weight.T) * z_layer * z_hidden
    return _rms(x, model.model.norm.weight, eps, open_dims) * z_hidden @ model.lm_head.weight.T


def _gates(target, seed, minitron=False):
    """Deterministic gates of random log α (values between 0 and 1, not binary); Minitron's head gate is one row
    per KV group, binary."""
    masks = masks_with_random_log_alpha(target, seed=seed)
    gates = masks.deterministic()
    if minitron and "heads" in gates:
        g = torch.Generator().manual_seed(seed)
        per_group = torch.zeros(3, 2, 3)
        for i in range(3):
            for group in range(2):
                per_group[i, group, torch.randperm(3, generator=g)[:target.heads_per_group]] = 1.0
        gates["heads"] = per_group
    return gates


@pytest.mark.parametrize("target, tied, minitron", [
    (ALL, False, False), (ALL, True, False), (ALL, False, True), (SOME, True, False), (SOME, False, True),
    (Shape(layers=2, kv_groups=2, heads=6, ffn=8, hidden=12), False, False),  # layers only
    (Shape(layers=3, kv_groups=1, heads=3, ffn=8, hidden=7), True, False),  # KV groups and hidden only
], ids=["all", "all-tied", "all-minitron", "some-tied", "some-minitron", "layers", "kv-hidden-tied"])
def test_cut_equals_the_gated_forward_written_out(target, tied, minitron):
    model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12, seed=1)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # norms other than all-ones, so that slicing and scaling them matters
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
    gates = _gates(target, seed=8, minitron=minitron)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gated_forward(model, ids, gates)
        cut_model(model, gates)
        logits = model(ids).logits
    assert (logits - expected).abs().max() < 2e-5
    model.set_attn_implementation("eager")  # eager attention repeats each KV head num_key_value_groups times
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() < 2e-5
    assert source_shape(model) == target and count_parameters(model) == ShearMasks(
        SOURCE, target, 2, 101, tied).target_parameters()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers) == (target.hidden, target.layers)
    assert model.model.embed_tokens.embedding_dim == target.hidden
    for pos, layer in enumerate(model.model.layers):
        assert layer.self_attn.num_key_value_groups == target.heads_per_group
        assert layer.mlp.intermediate_size == target.ffn and layer.self_attn.layer_idx == pos
    # decoding with a KV cache (indexed by layer_idx) gives the full forward's last logits
    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=first.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, logits[:, -1], atol=1e-5)


def test_cut_of_a_qwen2_model_keeps_the_kept_layers_types():
    model = tiny_model("qwen2", heads=6, kv=2, layers=3, ffn=8, hidden=12)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    gates = {"layers": torch.tensor([0.0, 0.7, 0.9])}
    cut_model(model, gates)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.num_hidden_layers == 2


def test_cut_makes_its_tensors_on_the_models_device():
    """With meta (a device without data) as the default device, the CPU cut is unchanged: every tensor it makes
    names the model's device (on a GPU, a tensor made on the default device would be on the CPU)."""
    for target in (ALL, SOME, Shape(layers=2, kv_groups=1, heads=3, ffn=8, hidden=9)):  # last: heads, FFN whole
        a, b = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12), tiny_model(heads=6, kv=2, layers=3, ffn=8,
                                                                                 hidden=12)
        gates = _gates(target, seed=9)
        cut_model(a, gates)
        with torch.device("meta"):
            cut_model(b, gates)
        assert all(p.device.type == "cpu" for p in b.parameters())
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cut_of_a_bf16_model_stays_bf16():
    model = tiny_model(heads=6, kv=2, layers=3, ffn=8, hidden=12).to(torch.bfloat16)
    full = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    gates = _gates(ALL, seed=10)
    cut_model(model, gates)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    dims = torch.nonzero(gates["hidden"]).flatten()
    z_hidden = gates["hidden"][dims]
    kept = torch.nonzero(gates["layers"]).flatten().tolist()
    emb = full["model.embed_tokens.weight"][:, dims] * z_hidden
    close = dict(rtol=2 ** -7, atol=0)  # bf16 rounding (twice at most; elementwise, the same on every CPU)
    assert torch.allclose(model.model.embed_tokens.weight.float(), emb, **close)
    untied_norm = full["model.norm.weight"][dims] * z_hidden  # untied head: the hidden gate folds into the norm
    assert torch.allclose(model.model.norm.weight.float(), untied_norm, **close)
    for pos, i in enumerate(kept):
        layer = model.model.layers[pos]
        norm = full[f"model.layers.{i}.input_layernorm.weight"][dims] * z_hidden
        assert torch.allclose(layer.input_layernorm.weight.float(), norm, **close)
        channels = torch.nonzero(gates["ffn"][i]).flatten()
        down = full[f"model.layers.{i}.mlp.down_proj.weight"][dims][:, channels]
        down = down * (gates["layers"][i] * z_hidden)[:, None] * gates["ffn"][i][channels][None, :]
        assert torch.allclose(layer.mlp.down_proj.weight.float(), down, **close)
