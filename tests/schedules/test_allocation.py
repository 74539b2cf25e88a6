"""Error curves, the what-if prediction and the auto schedule on stories260k (real tiny llama, real text)."""
import copy

import pytest
import torch

from slimgpt_core.schedules import global_allocation as ga
from slimgpt_core.schedules import refine, stitched

from slimgpt_core.schedules import curves

from slimgpt_core.methods import obs
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.schedules.schedule import layer_ratios


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny forwards: one thread avoids OpenMP spinning on a busy machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a fresh cache for this module, restored afterwards
        mp.setenv("SLIMGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield _stories()


def _stories():
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    loaded = load_model("stories260k", "cpu")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 16, 128, 0)
    fitness = calibration_tokens(loaded.tokenizer, "tinystories", 8, 128, 1)
    hessians = [(H_attn.clone(), H_mlp.clone()) for _, _, H_attn, H_mlp in
                curves.dense_hessians(loaded.model, tokens, device="cpu")]
    return loaded, tokens, fitness, hessians


@pytest.fixture(scope="module")
def model_curves(stories):
    loaded, tokens, _, _ = stories
    return curves.error_curves(loaded.model, tokens, device="cpu")


def test_head_curve_is_the_error_obs_reports_for_k_groups(stories, model_curves):
    loaded, _, _, hessians = stories
    for i, layer in enumerate(loaded.model.model.layers):
        attn = layer.self_attn
        group = attn.head_dim * attn.num_key_value_groups
        W = attn.o_proj.weight.data.float()
        H = hessians[i][0]
        lc = model_curves.layers[i]
        energy = float(((W @ H) * W).sum())  # tr(W H Wᵀ), computed here
        assert lc.attn_energy == pytest.approx(energy, rel=1e-5)
        for k in range(lc.n_kv):
            res = obs.prune_head_groups(W, H, group, k)
            assert lc.head_error(k) * lc.attn_energy == pytest.approx(res.predicted_error, rel=1e-5, abs=1e-9)
            assert lc.head_order[:k] == res.removed
        assert all(a <= b for a, b in zip(lc.head_errors, lc.head_errors[1:]))


def test_ffn_curve_matches_prune_channels_within_the_stated_tolerance(stories, model_curves):
    loaded, _, _, hessians = stories
    worst = 0.0
    for i, layer in enumerate(loaded.model.model.layers):
        W = layer.mlp.down_proj.weight.data.float()
        lc = model_curves.layers[i]
        for ratio in (0.1, 0.33, 0.5, 0.77, 0.9):
            c = round(ratio * lc.n_ffn)
            ref = obs.prune_channels(W, hessians[i][1], c).predicted_error / lc.mlp_energy
            gap = abs(lc.ffn_error(c) - ref) / ref
            worst = max(worst, gap)
    assert worst <= curves.FFN_CURVE_TOLERANCE
    assert worst > 0  # a different removal sequence, not the same function


def test_ffn_curve_is_prune_channels_with_fixed_groups(stories):
    """With every group of the curve's step, obs.prune_channels (no compaction, its own update code) removes
    the same channels in the same order at the same error: deep into the pass, past every compaction."""
    loaded, _, _, hessians = stories
    for i in (0, 4):
        W = loaded.model.model.layers[i].mlp.down_proj.weight.data.float()
        step = 5  # several channels per group, so the group update is exercised, not only single columns
        counts, errors, order = curves.ffn_curve(W, hessians[i][1], step)
        assert counts[-1] == W.shape[1] - 1 and sorted(order) == sorted(set(order))
        for k in (step, 10 * step, counts[len(counts) // 2], counts[-2]):  # up to 97% of the width removed
            ref = obs.prune_channels(W, hessians[i][1], k, floor=step, ceiling=step)
            assert order[:k] == ref.removed
            assert errors[counts.index(k)] == pytest.approx(ref.predicted_error, rel=1e-4)


def test_prediction_equals_what_a_dense_input_run_reports(stories, model_curves):
    """predict() from the curves alone against the pipeline's own predicted errors on dense inputs."""
    loaded, tokens, _, _ = stories
    model = copy.deepcopy(loaded.model)
    n = len(model.model.layers)
    heads, ffn = layer_ratios(n, 0.4, "log"), layer_ratios(n, 0.3, "linear")
    report = prune_model(model, tokens, PruneSettings(head_ratios=heads, ffn_ratios=ffn, sequential=False,
                                                      device="cpu", track_accumulation=False), use_cache=False)
    pred = curves.predict(model_curves, heads, ffn)
    measured = {(m.layer, m.module): m.predicted_rel_error for m in report.modules}
    for i in range(n):
        assert pred.attn[i] == pytest.approx(measured[(i, "attn")], rel=1e-4, abs=1e-7)
        assert pred.mlp[i] == pytest.approx(measured[(i, "mlp")], rel=curves.FFN_CURVE_TOLERANCE)
    assert pred.total == pytest.approx(sum(pred.attn) + sum(pred.mlp))
    smap = curves.sensitivity_map(model_curves)
    assert len(smap.heads) == n and len(smap.heads[0]) == len(smap.ratios) == 19
    assert smap.heads[0][0] == 0 and smap.ffn[0][0] == 0 and smap.ffn[0][-1] > smap.ffn[0][5]


def test_curves_come_back_from_the_cache(stories, model_curves):
    from slimgpt_core.base import cache
    loaded, tokens, _, _ = stories
    hits = cache.STATS["stats.hit"]
    again = curves.error_curves(loaded.model, tokens, device="cpu")
    assert cache.STATS["stats.hit"] == hits + 1 and again.from_cache
    assert again.layers[2].ffn_errors == pytest.approx(model_curves.layers[2].ffn_errors)


def test_database_variant_equals_the_greedy_obs_sequence(stories, model_curves):
    """One group-OBS update of the first k greedy units == the greedy's k sequential updates."""
    loaded, tokens, _, hessians = stories
    db = stitched.VariantDatabase(loaded.model, model_curves, tokens, device="cpu")
    layer = loaded.model.model.layers[1]
    attn = layer.self_attn
    group = attn.head_dim * attn.num_key_value_groups
    res = obs.prune_head_groups(attn.o_proj.weight.data.float(), hessians[1][0], group, 2)
    assert torch.allclose(db.attention(1, 2), res.weight, atol=1e-4, rtol=1e-3)
    step = curves.ffn_step(layer.mlp.down_proj.in_features)
    res = obs.prune_channels(layer.mlp.down_proj.weight.data.float(), hessians[1][1], 6 * step, floor=step,
                             ceiling=step)
    assert torch.allclose(db.ffn(1, 6 * step), res.weight, atol=1e-4, rtol=1e-3)


def _kl_of_counts(model, db, kv, ch, fitness):
    """KL(dense ‖ stitched) through a plain HF forward of a copy with the variants' weights (not StitchedModel)."""
    pruned = copy.deepcopy(model)
    for i, layer in enumerate(pruned.model.layers):
        if kv[i]:
            layer.self_attn.o_proj.weight.data = db.attention(i, kv[i]).clone()
        if ch[i]:
            layer.mlp.down_proj.weight.data = db.ffn(i, ch[i]).clone()
    with torch.no_grad():
        p = torch.log_softmax(model(fitness).logits, -1)
        q = torch.log_softmax(pruned(fitness).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("ratio,kinds", [(0.2, ("log",)), (0.5, ("log", "linear", "uniform"))])
def test_auto_meets_the_budget_and_beats_the_fixed_schedules(stories, model_curves, ratio, kinds):
    """At each fixed schedule's achieved count, auto lands within one channel of it and its KL, computed here
    through a plain forward of a stitched copy, is no higher than that schedule's."""
    loaded, tokens, fitness, _ = stories
    model = loaded.model
    head_cost, ffn_cost = stitched.unit_costs(model)
    db = stitched.VariantDatabase(model, model_curves, tokens, device="cpu")
    for kind in kinds:
        pruned = copy.deepcopy(model)
        report = prune_model(pruned, tokens, PruneSettings(ratio=ratio, schedule=kind, device="cpu",
                                                           track_accumulation=False), use_cache=False)
        kv_b = [m.units_removed for m in report.modules if m.module == "attn"]
        ch_b = [m.units_removed for m in report.modules if m.module == "mlp"]
        removed = sum(k * c for k, c in zip(kv_b, head_cost)) + sum(c * f for c, f in zip(ch_b, ffn_cost))
        assert removed == report.params_before - report.params_after  # unit costs agree with the real surgery
        target = report.params_after
        events = []
        result = refine.auto_schedule(model, tokens, fitness, refine.AutoConfig(
            budget=ga.BudgetSpec(target_params=target), max_seconds=None, generations=12, device="cpu"),
            events.append, curves=model_curves)
        # budget: the real pruned model lands within one unit (an FFN channel) of the target
        pruned = copy.deepcopy(model)
        auto_report = prune_model(pruned, tokens, PruneSettings(keep_heads=result.keep_heads, keep_ffn=result.keep_ffn,
                                                                device="cpu", track_accumulation=False),
                                  use_cache=False)
        assert auto_report.params_after == result.params_after
        assert target - min(ffn_cost) < auto_report.params_after <= target
        assert all(k >= lc.heads_per_unit for k, lc in zip(result.keep_heads, model_curves.layers))
        assert all(f >= 1 for f in result.keep_ffn)
        # objective: KL(dense ‖ stitched) on the fitness tokens, computed here through a plain forward
        kv = [lc.n_kv - k // lc.heads_per_unit for lc, k in zip(model_curves.layers, result.keep_heads)]
        ch = [lc.n_ffn - f for lc, f in zip(model_curves.layers, result.keep_ffn)]
        auto_kl = _kl_of_counts(model, db, kv, ch, fitness)
        base_kl = _kl_of_counts(model, db, kv_b, ch_b, fitness)
        assert auto_kl <= base_kl, (ratio, kind, auto_kl, base_kl)
        search = [e for e in events if e.phase == "search"]
        assert search and search[-1].best_kl <= search[0].best_kl
        assert len(search[-1].head_ratios) == len(model.model.layers)


def test_auto_refuses_an_impossible_budget(stories, model_curves):
    loaded, tokens, fitness, _ = stories
    with pytest.raises(SlimGPTError, match="while every layer keeps 50% of its heads and channels"):
        refine.auto_schedule(loaded.model, tokens, fitness, refine.AutoConfig(
            budget=ga.BudgetSpec(ratio=0.8, min_keep=0.5), device="cpu"), curves=model_curves)


def test_cli_prune_schedule_auto_meets_target_params(stories, tmp_path, capsys):
    import json

    from slimgpt_core.cli import main
    loaded = stories[0]
    _, ffn_cost = stitched.unit_costs(loaded.model)
    before = sum(p.numel() for p in loaded.model.parameters())
    target = before - 60_000
    out = tmp_path / "auto"
    assert main(["prune", "--model", "stories260k", "--schedule", "auto", "--target-params", str(target),
                 "--calib", "tinystories", "--nsamples", "8", "--seqlen", "64", "--search-generations", "3",
                 "--fitness-samples", "4", "--fitness-seqlen", "64", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert target - min(ffn_cost) < summary["params_after"] <= target
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["schedule"] == "auto" and report["settings"]["auto"]["generations"] == 3
    assert report["settings"]["keep_heads"] == report["settings"]["auto"]["keep_heads"]
