"""Exact math of the error curves (schedules/curves.py) on tiny random tensors and models (mutation tests).

References are computed here in fp64 from the OBS closed form: removing the column set S of W with optimal
compensation under the damped statistics Hd costs tr(W_S (Hd⁻¹_SS)⁻¹ W_Sᵀ), and the compensated weight of the
columns L still there is W Hd[:, L] Hd[L, L]⁻¹ (least squares on the kept inputs)."""
import math
import time

import pytest
import torch
from tests.tiny_models import tiny_model

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods import obs
from slimgpt_core.schedules import curves
from slimgpt_core.schedules.curves import LayerCurves, ModelCurves


def _spd(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    return (X.T @ X * (scale / (3 * n))).float()


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double()
    return H + damp * float(torch.diagonal(H).mean()) * torch.eye(len(H), dtype=torch.float64)


def _removal_error(W, Hd, cols) -> float:
    """tr(W_S (Hd⁻¹_SS)⁻¹ W_Sᵀ), fp64."""
    if not len(cols):
        return 0.0
    S = torch.tensor(sorted(cols))
    Hinv = torch.linalg.inv(Hd)
    Ws = W.double()[:, S]
    return float((Ws @ torch.linalg.inv(Hinv[S][:, S]) * Ws).sum())


def _group_cols(units, group):
    return [u * group + j for u in units for j in range(group)]


@pytest.mark.parametrize("damp", [None, 0.2])
def test_head_curve_is_the_greedy_obs_error_of_removing_whole_groups(damp):
    W, H, group = _weight(5, 12, 0), _spd(12, 1, scale=50.0), 3
    errors, order = curves.head_curve(W, H, group) if damp is None else curves.head_curve(W, H, group, damp)
    Hd = _damped(H, 0.01 if damp is None else damp)
    assert len(errors) == 4 and errors[0] == 0.0 and len(order) == 3 and len(set(order)) == 3
    for k in range(1, 4):
        assert errors[k] == pytest.approx(_removal_error(W, Hd, _group_cols(order[:k], group)), rel=1e-4)
        # greedy: the k-th unit is the cheapest addition to the k−1 already removed
        best = min(set(range(4)) - set(order[:k - 1]),
                   key=lambda u: _removal_error(W, Hd, _group_cols(order[:k - 1] + [u], group)))
        assert order[k - 1] == best
    assert curves.head_curve(W[:, :3], H[:3, :3], 3) == ([0.0], [])  # one unit: nothing to remove


def _ffn_reference(W, Hd, order, counts):
    """The greedy step by step in fp64: at each point, the compensated weight and H⁻¹ of the live columns give
    each column's score ‖w_c‖²/[H⁻¹]_cc; the step must have removed the cheapest ones."""
    n = W.shape[1]
    for a, b in zip(counts, counts[1:]):
        live = sorted(set(range(n)) - set(order[:a]))
        L = torch.tensor(live)
        Hinv_live = torch.linalg.inv(Hd[L][:, L])
        W_live = W.double() @ Hd[:, L] @ Hinv_live
        scores = W_live.pow(2).sum(0) / torch.diagonal(Hinv_live)
        cheapest = {live[i] for i in torch.topk(scores, b - a, largest=False).indices.tolist()}
        assert set(order[a:b]) == cheapest
        assert order[a:b] == sorted(order[a:b])  # each step's columns in ascending index order


@pytest.mark.parametrize("damp", [None, 0.3])
def test_ffn_curve_is_the_greedy_obs_removal_step_columns_at_a_time(damp):
    n, step = 20, 3
    W, H = _weight(6, n, 2), _spd(n, 3, scale=100.0)  # large H: H⁻¹'s diagonal well below 1
    counts, errors, order = curves.ffn_curve(W, H, step) if damp is None else curves.ffn_curve(W, H, step, damp)
    Hd = _damped(H, 0.01 if damp is None else damp)
    assert counts == [0, 3, 6, 9, 12, 15, 18, 19]  # the last step removes what is left down to one column
    assert sorted(order) == sorted(set(order)) and len(order) == 19
    assert errors[0] == 0.0
    for c, e in zip(counts[1:], errors[1:]):
        assert e == pytest.approx(_removal_error(W, Hd, order[:c]), rel=1e-4)
    _ffn_reference(W, Hd, order, counts)


def test_ffn_curve_compacts_once_an_eighth_of_the_columns_is_dead(monkeypatch):
    """The matrices shrink to the live columns whenever at least 1/8 of the columns held are dead."""
    sizes, remove = [], obs.remove_and_measure

    def recording(W, Hinv, cols):
        sizes.append((W.shape[1], Hinv.shape[0], Hinv.shape[1], len(cols)))
        return remove(W, Hinv, cols)
    monkeypatch.setattr(obs, "remove_and_measure", recording)
    n, step = 40, 2
    W, H = _weight(4, n, 4), _spd(n, 5)
    counts, errors, order = curves.ffn_curve(W, H, step)
    expected, held, dead = [], n, 0
    while sum(e[3] for e in expected) < n - 1:
        cnt = min(step, n - 1 - sum(e[3] for e in expected))
        expected.append((held, held, held, cnt))
        dead += cnt
        if 8 * dead >= held:
            held, dead = held - dead, 0
    assert sizes == expected
    assert len(sizes) > 5 and len({s[0] for s in sizes}) > 5  # several compactions happened
    monkeypatch.undo()
    Hd = _damped(H, 0.01)
    assert errors[-1] == pytest.approx(_removal_error(W, Hd, order), rel=1e-4)
    _ffn_reference(W, Hd, order, counts)


def test_ffn_curve_makes_its_tensors_on_the_device_of_the_weight():
    W, H = _weight(4, 10, 6), _spd(10, 7)
    plain = curves.ffn_curve(W, H, 2)
    with torch.device("meta"):  # a tensor made without naming W's device would land on meta
        assert curves.ffn_curve(W, H, 2) == plain


def test_interpolate_is_piecewise_linear_and_flat_outside():
    counts, values = [0, 2, 5, 9], [0.0, 0.3, 0.45, 1.7]
    for c, expected in [(-1, 0.0), (0, 0.0), (1, 0.15), (2, 0.3), (3.5, 0.375), (5, 0.45), (6, 0.45 + 1.25 / 4),
                        (9, 1.7), (12, 1.7)]:
        assert curves.interpolate(counts, values, c) == pytest.approx(expected, abs=1e-12)


def test_ffn_step_is_a_128th_of_the_width_at_least_one():
    assert [curves.ffn_step(n) for n in (1, 127, 128, 255, 256, 1536, 8192)] == [1, 1, 1, 1, 2, 12, 64]


def _lc(**kw):
    base = dict(n_kv=4, heads_per_unit=2, n_ffn=10, head_errors=[0.0, 0.1, 0.25, 0.6], head_order=[2, 0, 3],
                ffn_counts=[0, 3, 6, 9], ffn_errors=[0.0, 0.2, 0.5, 0.9], ffn_order=[1, 4, 7, 0, 2, 9, 3, 5, 8],
                attn_energy=2.0, mlp_energy=3.0)
    return LayerCurves(**{**base, **kw})


def test_head_error_clamps_to_the_curve():
    lc = _lc()
    assert [lc.head_error(k) for k in (-2, 0, 1, 3, 4, 7)] == [0.0, 0.0, 0.1, 0.6, 0.6, 0.6]
    assert [lc.ffn_error(c) for c in (0, 1, 3, 7.5, 9, 10)] == pytest.approx([0.0, 0.2 / 3, 0.2, 0.7, 0.9, 0.9])


def test_curves_round_trip_through_tensors_exactly():
    layers = [_lc(), _lc(n_kv=1, heads_per_unit=3, n_ffn=7, head_errors=[0.0], head_order=[],
                         ffn_counts=[0, 1, 6], ffn_errors=[0.0, 1 / 3, math.pi], ffn_order=[6, 5, 4, 3, 2, 1],
                         attn_energy=1 / 3, mlp_energy=1e-9 / 7)]
    t = ModelCurves(layers, seconds=4.5).to_tensors()
    assert t["1.meta"].tolist() == [1, 3, 7] and t["0.energy"].dtype == torch.float64
    back = ModelCurves.from_tensors(t)
    assert back.layers == layers and back.seconds == 0.0 and back.from_cache is True
    assert all(type(v) is int for v in back.layers[0].ffn_order + back.layers[0].head_order)


def test_layer_curves_are_relative_to_each_modules_own_output():
    model = tiny_model(heads=4, kv=2, ffn=24, hidden=16, layers=1)
    layer = model.model.layers[0]
    H_attn, H_mlp = _spd(16, 8, 5.0), _spd(24, 9, 5.0)
    lc = curves.layer_curves(layer, H_attn, H_mlp, damp=0.05)
    Wo, Wd = layer.self_attn.o_proj.weight.data.double(), layer.mlp.down_proj.weight.data.double()
    e_attn = float((Wo @ H_attn.double() * Wo).sum())
    e_mlp = float((Wd @ H_mlp.double() * Wd).sum())
    assert (lc.n_kv, lc.heads_per_unit, lc.n_ffn) == (2, 2, 24) and type(lc.n_kv) is int
    assert lc.attn_energy == pytest.approx(e_attn, rel=1e-5) and lc.mlp_energy == pytest.approx(e_mlp, rel=1e-5)
    group = 8  # head_dim 4 × 2 query heads per KV group
    Ha, Hm = _damped(H_attn, 0.05), _damped(H_mlp, 0.05)
    assert lc.head_errors[0] == 0.0 and len(lc.head_errors) == 2 and len(lc.head_order) == 1
    assert lc.head_errors[1] == pytest.approx(_removal_error(Wo, Ha, _group_cols(lc.head_order, group)) / e_attn,
                                              rel=1e-4)
    assert lc.ffn_counts == list(range(24))  # a step of one channel below 256 channels
    for c, e in zip(lc.ffn_counts, lc.ffn_errors):
        assert e == pytest.approx(_removal_error(Wd, Hm, lc.ffn_order[:c]) / e_mlp, rel=1e-4, abs=1e-12)
    with torch.no_grad():  # a module with no output: every relative error is 0, not a division by zero
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    zero = curves.layer_curves(layer, H_attn, H_mlp)
    assert zero.head_errors == [0.0, 0.0] and zero.ffn_errors == [0.0] * 24
    assert zero.attn_energy == 0.0 and zero.mlp_energy == 0.0


def _hand_curves():
    return ModelCurves([_lc(), _lc(n_kv=2, n_ffn=4, head_errors=[0.0, 0.7], ffn_counts=[0, 1, 2, 3],
                                   ffn_errors=[0.0, 0.1, 0.3, 0.8])])


def test_predict_reads_the_curves_at_the_pipelines_unit_counts():
    mc = _hand_curves()
    pred = curves.predict(mc, [0.5, 0.5], [0.45, 0.99])
    # round(0.5·4) = 2 and round(0.5·2) = 1 KV groups; round(4.5) = 4 (banker's) and min(round(3.96), 4 − 1) = 3
    assert pred.kv_removed == [2, 1] and pred.ffn_removed == [4, 3]
    assert pred.attn == [0.25, 0.7] and pred.mlp == pytest.approx([0.2 + 0.3 / 3, 0.8])
    assert pred.total_attn == pytest.approx(0.95) and pred.total_mlp == pytest.approx(1.1)
    assert pred.total == pytest.approx(2.05)
    for heads, ffn in [([0.1], [0.1, 0.1]), ([0.1, 0.1], [0.1, 0.1, 0.1])]:
        with pytest.raises(SlimGPTError) as err:
            curves.predict(mc, heads, ffn)
        assert str(err.value) == f"the schedule has {len(heads)}/{len(ffn)} ratios but the model has 2 layers"


def test_sensitivity_map_reads_every_layer_at_every_ratio():
    mc = _hand_curves()
    smap = curves.sensitivity_map(mc)
    assert smap.ratios == [i / 20 for i in range(19)]
    assert smap.heads[0] == [mc.layers[0].head_errors[min(round(r * 4), 3)] for r in smap.ratios]
    assert smap.heads[1] == [0.7 * (round(r * 2) >= 1) for r in smap.ratios]
    assert smap.ffn[1] == [[0.0, 0.1, 0.3, 0.8][min(round(r * 4), 3)] for r in smap.ratios]
    small = curves.sensitivity_map(mc, [0.3])
    assert small.ratios == [0.3] and small.heads == [[0.1], [0.7]] and small.ffn == [[0.2], [0.1]]


@pytest.mark.parametrize("damp", [None, 0.2])
def test_ffn_curve_gap_against_prune_channels(damp):
    W, H = _weight(5, 16, 10), _spd(16, 11)
    kw = {} if damp is None else {"damp": damp}
    gaps = curves.ffn_curve_gap(W, H, [3, 8], **kw)
    d = 0.01 if damp is None else damp
    counts, errors, _ = curves.ffn_curve(W, H, 1, d)  # a step of one channel at 16 columns
    for k, gap in zip([3, 8], gaps):
        ref = obs.prune_channels(W, H, k, d).predicted_error
        assert gap == pytest.approx((errors[k] - ref) / ref, abs=1e-6)
    assert curves.ffn_curve_gap(torch.zeros(5, 16), H, [3]) == [0.0]  # nothing to lose: no division by zero


# --- error_curves on a tiny model -----------------------------------------------------------------------------

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_error_curves_cache_progress_and_batches(cache_dir, tokens):
    from slimgpt_core.methods.statistics import dense_hessians
    from slimgpt_core.base import cache
    model = tiny_model(layers=3, hidden=16, heads=4, kv=2, ffn=24)
    batches, seen = [], []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a, k: batches.append(
        (k.get("hidden_states", a[0] if a else None)).shape[0]), with_kwargs=True)
    t0 = time.perf_counter()
    mc = curves.error_curves(model, tokens, damp=0.02, progress=lambda d, n: seen.append((d, n)))
    wall = time.perf_counter() - t0
    hook.remove()
    assert seen == [(1, 3), (2, 3), (3, 3)] and not mc.from_cache and 0 < mc.seconds <= wall
    assert 8 in batches and 4 in batches and set(batches) <= {1, 8, 4}  # 12 sequences in batches of 8
    for i, _, H_attn, H_mlp in dense_hessians(model, tokens, device="cpu"):
        assert mc.layers[i] == curves.layer_curves(model.model.layers[i], H_attn, H_mlp, 0.02)
    key = (f"curves-v3|{cache.model_fingerprint(model)}|{cache.tokens_digest(tokens)}|0.02")
    assert ModelCurves.from_tensors(cache.lookup_tensors("stats", key)).layers == mc.layers
    again = curves.error_curves(model, tokens, damp=0.02)
    assert again.from_cache and again.layers == mc.layers
    other = curves.error_curves(model, tokens, damp=0.05, use_cache=False)
    assert not other.from_cache and other.layers[0].head_errors != mc.layers[0].head_errors
    assert cache.lookup_tensors("stats", key.replace("|0.02", "|0.05")) is None  # use_cache=False wrote nothing
    default = curves.error_curves(model, tokens)
    assert not default.from_cache and default.layers[0] == curves.layer_curves(
        model.model.layers[0], *[h for i, _, *h in dense_hessians(model, tokens, device="cpu") if i == 0][0])
    with pytest.raises(JobCancelled, match="error curves were cancelled"):
        curves.error_curves(model, tokens, damp=0.3, should_stop=lambda: True)


def test_curves_job_reports_progress_per_layer(cache_dir, tokens, monkeypatch):
    """The studio's job: calibration tokens as asked (the real sampler is tested in test_data), then the curves."""
    import slimgpt_core.data
    from types import SimpleNamespace
    asked = []

    def sampler(tokenizer, calib, nsamples, seqlen, seed):
        asked.append((tokenizer, calib, nsamples, seqlen, seed))
        return tokens[:nsamples, :seqlen]
    monkeypatch.setattr(slimgpt_core.data, "calibration_tokens", sampler)
    loaded = SimpleNamespace(model=tiny_model(layers=2, hidden=16, heads=4, kv=2, ffn=24), tokenizer="tok")
    events = []
    t0 = time.perf_counter()
    mc = curves.curves_job(loaded, "tinystories", 10, 20, callback=events.append)
    wall = time.perf_counter() - t0
    assert asked == [("tok", "tinystories", 10, 20, 0)]
    assert [(e.layer, e.n_layers, e.phase) for e in events] == [(1, 2, "curves"), (2, 2, "curves")]
    assert 0 < events[0].elapsed_s <= events[-1].elapsed_s <= wall
    assert mc.layers == curves.error_curves(loaded.model, tokens[:10, :20], use_cache=False).layers
    again = curves.curves_job(loaded, "wikitext2", 6, 16, seed=3, damp=0.05)  # no callback
    assert asked[-1] == ("tok", "wikitext2", 6, 16, 3)
    assert again.layers == curves.error_curves(loaded.model, tokens[:6, :16], 0.05, use_cache=False).layers
    with pytest.raises(JobCancelled, match="error curves were cancelled"):
        curves.curves_job(loaded, "tinystories", 4, 16, damp=0.5, should_stop=lambda: True)
    with pytest.raises(SlimGPTError, match="unknown device 'abacus'"):  # the device is the one asked for
        curves.curves_job(loaded, "tinystories", 4, 16, damp=0.5, device="abacus")


# --- the auto schedule's parameter arithmetic (stitched.unit_costs; the budget: schedules/test_global_allocation.py)

@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases go with their heads
def test_unit_costs_are_what_the_real_surgery_removes(arch, tokens, cache_dir):
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.schedules import stitched
    model = tiny_model(arch, heads=4, kv=2, layers=2, ffn=24, hidden=16)
    head_cost, ffn_cost = stitched.unit_costs(model)
    d = 4  # head_dim; 2 query heads per KV group
    bias = 1 if arch == "qwen2" else 0
    # q rows of 2 heads, k and v rows of one, o_proj columns of 2 heads (biases with their rows)
    assert head_cost == [(2 * d * 16 + bias * 2 * d) + 2 * (d * 16 + bias * d) + 16 * 2 * d] * 2
    assert ffn_cost == [3 * 16] * 2
    report = prune_model(model, tokens, PruneSettings(keep_heads=[2, 4], keep_ffn=[20, 9], device="cpu",
                                                      track_accumulation=False), use_cache=False)
    assert report.params_before - report.params_after == head_cost[0] * 1 + ffn_cost[0] * (4 + 15)


def test_removed_weights_is_the_group_obs_update():
    W, H = _weight(5, 9, 12), _spd(9, 13)
    Hd = _damped(H, 0.01)
    cols = [1, 4, 5]
    out = obs.removed_weights(W, torch.linalg.inv(Hd).float(), torch.tensor(cols))
    live = [c for c in range(9) if c not in cols]
    L = torch.tensor(live)
    expected = W.double() @ Hd[:, L] @ torch.linalg.inv(Hd[L][:, L])  # least squares on the kept inputs
    assert torch.allclose(out[:, L].double(), expected, atol=1e-4) and (out[:, cols] == 0).all()
    same = obs.removed_weights(W, H, torch.tensor([], dtype=torch.long))
    assert torch.equal(same, W) and same is not W
