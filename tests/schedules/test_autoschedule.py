"""The auto schedule's search (schedules/autoschedule.py) on a tiny random llama (exact-math and mutation tests).

References are computed here: a variant's weight by least squares on the kept inputs, a candidate's KL by a plain
HF forward of the model with the variants' weights swapped in (never StitchedModel), and the whole (1+λ) search
re-written plainly with the same seeded generator, so every random move is reproduced and its score checked."""
import math

import numpy as np
import pytest
import torch
from tests.tiny_models import auto_search_case, tiny_model

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.statistics import dense_hessians
from slimgpt_core.schedules import autoschedule, curves
from slimgpt_core.schedules.curves import LayerCurves, ModelCurves
from slimgpt_core.schedules.schedule import layer_ratios

S = autoschedule.AutoSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield auto_search_case()


def _damped(H, damp):
    H = H.double()
    return H + damp * float(torch.diagonal(H).mean()) * torch.eye(len(H), dtype=torch.float64)


def _least_squares(W, Hd, removed):
    """Compensated weight of the kept columns (W Hd[:, L] Hd[L, L]⁻¹), removed columns zero."""
    live = torch.tensor([c for c in range(W.shape[1]) if c not in set(removed)])
    out = torch.zeros(W.shape, dtype=torch.float64)
    out[:, live] = W.double() @ Hd[:, live] @ torch.linalg.inv(Hd[live][:, live])
    return out


def test_variant_database_holds_the_obs_variants_of_the_curves_orders(setup):
    model, tokens, _, mc = setup
    db = autoschedule.VariantDatabase(model, mc, tokens, damp=0.05, batch_size=5, device="cpu", max_cached=3)
    assert db.group == [8, 8, 8]  # head_dim 4 × 2 query heads per KV group
    for i, layer, H_attn, H_mlp in dense_hessians(model, tokens, device="cpu"):
        lc = mc.layers[i]
        for k in (1, 3):
            cols = [u * 8 + j for u in lc.head_order[:k] for j in range(8)]
            ref = _least_squares(layer.self_attn.o_proj.weight.data, _damped(H_attn, 0.05), cols)
            assert torch.allclose(db.attention(i, k).double(), ref, atol=2e-4)
        for c in (1, 7, 30):
            ref = _least_squares(layer.mlp.down_proj.weight.data, _damped(H_mlp, 0.05), lc.ffn_order[:c])
            assert torch.allclose(db.ffn(i, c).double(), ref, atol=2e-4)
    assert torch.equal(db.attention(2, 0), model.model.layers[2].self_attn.o_proj.weight.data)  # nothing removed
    assert torch.equal(db.ffn(0, 0), model.model.layers[0].mlp.down_proj.weight.data)
    # a least-recently-used cache of 3: a hit returns the same tensor and refreshes it; the oldest goes first
    db.cached.clear()
    a, b = db.ffn(0, 2), db.attention(0, 1)
    assert db.ffn(0, 2) is a
    c = db.ffn(1, 2)
    d = db.ffn(2, 2)  # evicts b (a was used after it)
    assert list(db.cached) == [(0, "mlp", 2), (1, "mlp", 2), (2, "mlp", 2)]
    assert db.ffn(0, 2) is a and db.ffn(1, 2) is c and db.ffn(2, 2) is d
    again = db.attention(0, 1)
    assert again is not b and torch.equal(again, b) and len(db.cached) == 3
    default = autoschedule.VariantDatabase(model, mc, tokens)  # damping 0.01 by default
    H = [h for j, _, h, _ in dense_hessians(model, tokens, device="cpu") if j == 1][0]
    cols = [u * 8 + j for u in mc.layers[1].head_order[:2] for j in range(8)]
    ref = _least_squares(model.model.layers[1].self_attn.o_proj.weight.data, _damped(H, 0.01), cols)
    assert torch.allclose(default.attention(1, 2).double(), ref, atol=2e-4) and default.max_cached == 512


def _kl(model, db, kv, ch, fitness, samples=None):
    """KL(dense ‖ stitched) per token through plain forwards, the variants swapped into the model itself."""
    layers = model.model.layers
    saved = [(l.self_attn.o_proj.weight.data, l.mlp.down_proj.weight.data) for l in layers]
    with torch.no_grad():
        p = torch.log_softmax(model(fitness).logits.double(), -1)
        for i, l in enumerate(layers):
            if kv[i]:
                l.self_attn.o_proj.weight.data = db.attention(i, int(kv[i]))
            if ch[i]:
                l.mlp.down_proj.weight.data = db.ffn(i, int(ch[i]))
        q = torch.log_softmax(model(fitness).logits.double(), -1)
    for l, (o, d) in zip(layers, saved):
        l.self_attn.o_proj.weight.data, l.mlp.down_proj.weight.data = o, d
    per_token = (p.exp() * (p - q)).sum(-1)
    return float(per_token[list(range(len(fitness))) if samples is None else list(samples)].mean())


def test_stitched_model_runs_the_variants_and_scores_kl_per_token(setup):
    model, tokens, fitness, mc = setup
    db = autoschedule.VariantDatabase(model, mc, tokens, device="cpu")
    net = autoschedule.StitchedModel(model, db, fitness, batch_size=2, device="cpu")
    with torch.no_grad():
        dense = torch.log_softmax(model(fitness).logits.float(), -1)
    assert torch.allclose(torch.cat(net.dense_logp), dense, atol=1e-5) and len(net.dense_logp) == 3  # 5 in 2s
    weights = [(l.self_attn.o_proj.weight.data_ptr(), l.mlp.down_proj.weight.data_ptr()) for l in model.model.layers]
    kv, ch = [1, 0, 3], [5, 12, 0]
    states = net.run(kv, ch)
    assert len(states) == 4 and torch.equal(states[0], net.x0)
    assert weights == [(l.self_attn.o_proj.weight.data_ptr(), l.mlp.down_proj.weight.data_ptr())  # dense ones back
                       for l in model.model.layers]
    for samples in ([0, 1, 2, 3, 4], [1, 3, 4], [4]):
        assert net.kl(states[-1][samples], samples) == pytest.approx(_kl(model, db, kv, ch, fitness, samples),
                                                                     rel=1e-4)
    tail = net.run(kv, ch, 1, states[1])  # from layer 1 on, given its input
    assert len(tail) == 3 and torch.allclose(tail[-1], states[-1], atol=1e-6)
    other = net.run([0, 2, 0], [0, 0, 7], 1, states[1])  # layer 0's removals are not re-applied from layer 1
    assert net.kl(other[-1], list(range(5))) == pytest.approx(_kl(model, db, [1, 2, 0], [5, 0, 7], fitness), rel=1e-4)
    assert net.kl(net.run([0] * 3, [0] * 3)[-1][[0, 2]], [0, 2]) == pytest.approx(0.0, abs=1e-7)
    one = autoschedule.StitchedModel(model, db, fitness)  # batches of 8 by default: one batch; device "auto"
    assert one.bs == 8 and len(one.dense_logp) == 1


def test_removal_budget_by_ratio_or_target():
    from slimgpt_core.base.shapes import count_parameters
    model = tiny_model(layers=2, hidden=16, heads=4, kv=2, ffn=24)
    before = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for p in model.model.layers.parameters())
    assert count_parameters(model) == before
    assert autoschedule.removal_budget(model, S(ratio=0.3)) == (before, before - round(0.3 * in_layers),
                                                                round(0.3 * in_layers))
    assert autoschedule.removal_budget(model, S()) == (before, before - round(0.2 * in_layers), round(0.2 * in_layers))
    assert autoschedule.removal_budget(model, S(target_params=before - 1, ratio=0.9)) == (before, before - 1, 1)
    assert autoschedule.removal_budget(model, S(target_params=1.0)) == (before, 1, before - 1)
    for target in (0, before, -5):
        with pytest.raises(SlimGPTError) as err:
            autoschedule.removal_budget(model, S(target_params=target))
        assert str(err.value) == f"target of {target:,} parameters must be between 1 and the model's {before:,}"


def _budget(setup, remove, levels=8):
    model, _, _, mc = setup
    head_cost, ffn_cost = autoschedule.unit_costs(model)
    return autoschedule.Budget(mc, head_cost, ffn_cost, remove, 0.9, levels)


@pytest.mark.parametrize("kind", ["log", "linear", "uniform"])
def test_ffn_fill_just_meets_the_budget_left_after_the_heads(setup, kind):
    b = _budget(setup, 9000)
    heads = [0.25, 0.25, 0.5]
    b.remove = b.removed_params(b.from_ratios(heads, layer_ratios(3, 0.3, kind, 2.0)))  # met exactly at some mean
    ffn = autoschedule._ffn_fill(b, heads, kind, S(shape=2.0))
    mean = sum(ffn) / 3
    assert b.removed_params(b.from_ratios(heads, ffn)) >= b.remove
    # the smallest such mean, to the bisection's precision (0.95 / 2³⁰)
    assert b.removed_params(b.from_ratios(heads, layer_ratios(3, mean - 2e-9, kind, 2.0))) < b.remove
    lo, hi = 0.0, 0.95  # the 30 halvings of [0, 0.95], written out
    for _ in range(30):
        mid = (lo + hi) / 2
        if b.removed_params(b.from_ratios(heads, layer_ratios(3, mid, kind, 2.0))) >= b.remove:
            hi = mid
        else:
            lo = mid
    assert ffn == layer_ratios(3, hi, kind, 2.0)
    default = autoschedule._ffn_fill(b, heads, kind, S())  # shape 4
    assert default == pytest.approx(layer_ratios(3, sum(default) / 3, kind, 4.0), abs=1e-12)
    # no FFN ratio meets the budget: the highest mean the schedule can give, as a uniform list where the schedule
    # itself cannot give it (a log or linear one near there would ask ≥ 1 of the last layer)
    big = _budget(setup, 0)
    big.remove = 10 ** 9
    top = autoschedule._ffn_fill(big, [0.0] * 3, kind, S())
    if kind == "uniform":
        assert top == [0.95] * 3
    else:
        assert top == [top[0]] * 3 and 0.5 < top[0] < 0.95
        with pytest.raises(SlimGPTError):
            layer_ratios(3, top[0], kind, 4.0)
        assert layer_ratios(3, top[0] - 2e-9, kind, 4.0)[-1] < 1


def test_ffn_fill_stays_below_ratios_a_schedule_cannot_give(setup):
    """At shape 4 a log schedule cannot have a mean near 0.95 (its last layer would pass 1): such means count as
    too high and the fill stays where the schedule exists."""
    b = _budget(setup, 0)
    b.remove = b.removed_params(b.from_ratios([0.0] * 3, [0.6] * 3))
    ffn = autoschedule._ffn_fill(b, [0.0] * 3, "log", S(shape=4.0))
    assert max(ffn) < 1 and b.removed_params(b.from_ratios([0.0] * 3, ffn)) >= b.remove


def test_mutate_raises_one_or_two_modules_and_repair_never_lowers_them(setup, monkeypatch):
    b = _budget(setup, 9000)
    parent = b.repair(np.zeros(6, dtype=np.int64), np.random.default_rng(0))
    parent[0] = b.maximum[0]  # one module at its ceiling: never raised
    seen, counts, raised_modules = [], {1: 0, 2: 0}, set()
    repair = b.repair

    def recording(g, rng, frozen=()):
        seen.append((g.copy(), list(frozen)))
        return repair(g, rng, frozen)
    monkeypatch.setattr(b, "repair", recording)
    for seed in range(300):
        child = b.mutate(parent, np.random.default_rng(seed))
        g, frozen = seen[-1]
        counts[len(frozen)] += 1
        raised_modules.update(frozen)
        expected = parent.copy()
        for m in frozen:
            expected[m] = b.moved(expected, m, 1)
        assert g.tolist() == expected.tolist() and 0 not in frozen
        assert all(child[m] >= g[m] for m in frozen)  # frozen modules are never lowered by the repair
        assert b.removed_params(child) >= 9000
    assert 120 < counts[1] < 180 and 120 < counts[2] < 180  # one or two, evenly
    assert raised_modules == {m for m in range(6) if parent[m] < b.maximum[m]} and len(raised_modules) >= 4
    assert (parent == b.repair(np.zeros(6, dtype=np.int64), np.random.default_rng(0)).clip(None, b.maximum)).any()
    monkeypatch.undo()
    # repair lowers a frozen module never, an unfrozen one sometimes
    high = b.maximum.copy()
    lowered = {m: False for m in range(6)}
    for seed in range(40):
        r = b.repair(high, np.random.default_rng(seed), frozen=[2])
        assert r[2] == high[2]
        free = b.repair(high, np.random.default_rng(seed))
        lowered.update({m: True for m in range(6) if free[m] < high[m]})
    assert all(lowered.values())


def test_repair_meets_the_budget_exactly_at_the_boundary(setup):
    """A genome exactly on the budget is kept; one parameter short of it is raised."""
    b = _budget(setup, 0)
    g = np.array([1, 0, 2, 5, 10, 0])
    b.remove = b.removed_params(g)
    for seed in range(10):
        assert b.repair(g, np.random.default_rng(seed), frozen=range(6)).tolist() == g.tolist()
        r = b.repair(g, np.random.default_rng(seed))
        assert b.removed_params(r) >= b.remove
    b.remove += 1
    r = b.repair(g, np.random.default_rng(0), frozen=range(6))
    assert b.removed_params(r) >= b.remove and (r >= g).all() and (r != g).sum() == 1


# --- the search, re-written plainly ----------------------------------------------------------------------------

def _reference_search(model, tokens, fitness, settings, mc, starts=None):
    db = autoschedule.VariantDatabase(model, mc, tokens, settings.damp, device="cpu")
    head_cost, ffn_cost = autoschedule.unit_costs(model)
    before = sum(p.numel() for p in model.parameters())
    if settings.target_params is None:
        remove = round(settings.ratio * sum(p.numel() for p in model.model.layers.parameters()))
    else:
        remove = before - settings.target_params
    b = autoschedule.Budget(mc, head_cost, ffn_cost, remove, settings.ceiling, settings.ffn_levels)
    n = b.n
    prunable = sum(p.numel() for l in model.model.layers for p in l.parameters() if p.dim() == 2)
    cands = dict(starts or {})
    for kind in ("log", "linear", "uniform"):
        for balance in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
            try:
                heads = layer_ratios(n, min(0.95, balance * remove / prunable), kind, settings.shape)
            except SlimGPTError:
                continue
            cands[f"{kind} heads×{balance:g}"] = (heads, autoschedule._ffn_fill(b, heads, kind, settings))
    baselines, best = {}, None
    for name, (heads, ffn) in cands.items():
        g = b.repair(b.from_ratios(heads, ffn), np.random.default_rng(settings.seed))
        baselines[name] = _kl(model, db, g[:n], g[n:], fitness)
        if best is None or baselines[name] < best[0]:
            best = (baselines[name], g, name)
    kl, parent, start = best
    history, evaluations = [kl], len(cands)
    rng = np.random.default_rng(settings.seed)
    everyone = list(range(len(fitness)))
    for _ in range(settings.generations):
        screen = sorted(rng.choice(everyone, min(settings.screen_samples, len(fitness)), replace=False).tolist())
        scored = []
        for _ in range(settings.offspring):
            child = b.mutate(parent, rng)
            if (child != parent).any():
                scored.append((_kl(model, db, child[:n], child[n:], fitness, screen), child))
        scored.sort(key=lambda s: s[0])
        evaluations += len(scored) + min(settings.survivors, len(scored))
        for _, child in scored[:settings.survivors]:
            child_kl = _kl(model, db, child[:n], child[n:], fitness)
            if child_kl < kl:
                kl, parent = child_kl, child
        history.append(kl)
    return dict(parent=parent, kl=kl, start=start, baselines=baselines, history=history, evaluations=evaluations,
                budget=b, before=before, remove=remove, head_cost=head_cost, ffn_cost=ffn_cost)


@pytest.mark.parametrize("settings,starts", [
    (S(ratio=0.2, generations=6, offspring=4, survivors=2, screen_samples=2, ffn_levels=8, device="cpu"), None),
    (S(target_params=None, ratio=0.45, generations=5, offspring=3, survivors=1, screen_samples=9, ffn_levels=5,
       shape=2.0, seed=3, ceiling=0.8, damp=0.05, device="cpu"), {"mine": ([0.1, 0.2, 0.3], [0.3, 0.3, 0.3])}),
    (S(ratio=0.7, generations=2, offspring=2, ffn_levels=8, device="cpu"), None),  # heads×1.5 capped at 0.95
])
def test_search_is_the_plain_one_plus_lambda_search(setup, settings, starts):
    model, tokens, fitness, mc = setup
    ref = _reference_search(model, tokens, fitness, settings, mc, starts)
    events = []
    result = autoschedule.search(model, tokens, fitness, settings, events.append, curves=mc, starts=starts)
    n, b = 3, ref["budget"]
    assert result.start == ref["start"] and list(result.baselines) == list(ref["baselines"])
    assert result.baselines == pytest.approx(ref["baselines"], rel=1e-4)
    assert result.start_kl == result.baselines[result.start] == min(result.baselines.values())
    assert [h for h, _ in result.history] == list(range(settings.generations + 1))
    assert [k for _, k in result.history] == pytest.approx(ref["history"], rel=1e-4)
    assert result.kl == result.history[-1][1] and result.kl == pytest.approx(ref["kl"], rel=1e-4)
    if settings.ratio < 0.5:
        assert len(set(k for _, k in result.history)) > 1  # the search improved on its start
    else:  # balance 1.5 asks more than 0.95 of the heads: capped there (uniform), not refused
        assert "uniform heads×1.5" in result.baselines
    assert result.evaluations == ref["evaluations"] and result.generations == settings.generations
    kv, ch = ref["parent"][:n].tolist(), b.exact_channels(ref["parent"])
    assert result.keep_heads == [(4 - k) * 2 for k in kv] and result.keep_ffn == [40 - c for c in ch]
    assert result.head_ratios == [k / 4 for k in kv] and result.ffn_ratios == [c / 40 for c in ch]
    removed = sum(k * c for k, c in zip(kv, ref["head_cost"])) + sum(k * c for k, c in zip(ch, ref["ffn_cost"]))
    assert result.params_before == ref["before"] and result.params_after == ref["before"] - removed
    assert result.target_params == ref["before"] - ref["remove"]
    assert 0 <= removed - ref["remove"] < min(ref["ffn_cost"]) and not result.stopped
    # progress: database, baselines, generation 0 … G, done; the KL and ratios of the parent at each
    assert [e.phase for e in events] == ["database", "baselines"] + ["search"] * (settings.generations + 1) + ["done"]
    assert all(math.isnan(e.best_kl) and math.isnan(e.start_kl) and e.head_ratios == [] == e.ffn_ratios
               and e.evaluations == 0 and e.generation == 0 for e in events[:2])
    search_events = events[2:-1]
    assert [(e.generation, e.best_kl) for e in search_events] == result.history
    assert all(e.start_kl == result.start_kl and e.kind == "search" for e in events[2:])
    assert search_events[0].evaluations == len(ref["baselines"]) and events[-1].evaluations == result.evaluations
    assert all(a.evaluations <= c.evaluations and a.elapsed_s <= c.elapsed_s for a, c in zip(events, events[1:]))
    assert 0 <= events[0].elapsed_s and events[-1].elapsed_s == result.seconds
    last = events[-2]
    assert last.head_ratios == [k / 4 for k in ref["parent"][:n]]
    assert last.ffn_ratios == [c / 40 for c in ref["parent"][n:]]
    done = events[-1]
    assert (done.generation, done.best_kl, done.head_ratios, done.ffn_ratios) == (
        settings.generations, result.kl, result.head_ratios, result.ffn_ratios)


def test_search_stops_when_asked_or_out_of_time(setup, monkeypatch, tmp_path):
    model, tokens, fitness, mc = setup
    settings = S(ratio=0.3, generations=50, offspring=2, ffn_levels=8, device="cpu")
    calls = []

    def stop_after(k):
        return lambda: calls.append(1) or len(calls) > k
    full = autoschedule.search(model, tokens, fitness, S(ratio=0.3, generations=3, offspring=2, ffn_levels=8,
                                                           device="cpu"), curves=mc)
    n_base = len(full.baselines)
    result = autoschedule.search(model, tokens, fitness, settings, should_stop=stop_after(3 + n_base + 3), curves=mc)
    # checks: one per layer of the database, one per baseline, one per generation: 3 run, the 4th is stopped
    assert result.stopped and result.generations == 3 and len(result.history) == 4
    assert result.history == full.history and result.keep_ffn == full.keep_ffn
    calls.clear()
    early = autoschedule.search(model, tokens, fitness, settings, should_stop=stop_after(3 + 2), curves=mc)
    # stopping during the baselines keeps those scored so far (at least one)
    assert list(early.baselines) == list(full.baselines)[:2] and early.generations == 0 and early.stopped
    assert early.kl == min(early.baselines.values())
    out_of_time = autoschedule.search(model, tokens, fitness, S(ratio=0.3, max_seconds=0.0, ffn_levels=8,
                                                                 device="cpu"), curves=mc)
    assert out_of_time.generations == 0 and not out_of_time.stopped and out_of_time.history == [full.history[0]]
    plenty = autoschedule.search(model, tokens, fitness, S(ratio=0.3, generations=3, offspring=2, ffn_levels=8,
                                                           max_seconds=1e9, device="cpu"), curves=mc)
    assert plenty.history == full.history
    # without curves the search computes (and caches) them from the calibration tokens
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    own = autoschedule.search(model, tokens, fitness, S(ratio=0.3, generations=3, offspring=2, ffn_levels=8,
                                                          device="cpu"))
    assert own.history == full.history and own.keep_heads == full.keep_heads
    with pytest.raises(SlimGPTError, match="within a ceiling of 10%"):
        autoschedule.search(model, tokens, fitness, S(ratio=0.5, ceiling=0.1, device="cpu"), curves=mc)


def test_auto_job_samples_database_and_fitness_windows(setup, monkeypatch):
    import slimgpt_core.data
    from types import SimpleNamespace
    model, tokens, fitness, mc = setup
    asked = []

    def sampler(tokenizer, calib, nsamples, seqlen, seed):
        asked.append((tokenizer, calib, nsamples, seqlen, seed))
        return tokens[:nsamples, :seqlen] if seed == 4 else fitness[:nsamples, :seqlen]
    monkeypatch.setattr(slimgpt_core.data, "calibration_tokens", sampler)
    monkeypatch.setattr(curves, "error_curves", lambda *a, **k: mc)
    monkeypatch.setattr(autoschedule, "error_curves", lambda *a, **k: mc)
    settings = S(ratio=0.3, generations=2, offspring=2, ffn_levels=8, device="cpu")
    loaded = SimpleNamespace(model=model, tokenizer="tok")
    events = []
    result = autoschedule.auto_job(loaded, "tinystories", 12, 200, 4, settings, callback=events.append)
    assert asked == [("tok", "tinystories", 12, 200, 4), ("tok", "tinystories", 8, 128, 5)]
    direct = autoschedule.search(model, tokens[:12], fitness[:8, :128], settings, curves=mc)
    assert result.history == direct.history and result.keep_ffn == direct.keep_ffn and events[-1].phase == "done"
    other = autoschedule.auto_job(loaded, "wikitext2", 6, 16, 0, settings, starts={"x": ([0.1] * 3, [0.2] * 3)})
    assert list(other.baselines)[0] == "x"
    assert asked[-2:] == [("tok", "wikitext2", 6, 16, 0), ("tok", "wikitext2", 8, 16, 1)]
    with pytest.raises(JobCancelled, match="statistics were cancelled"):  # should_stop reaches the search
        autoschedule.auto_job(loaded, "tinystories", 6, 16, 4, settings, should_stop=lambda: True)
    assert next(model.parameters()).device.type == "cpu"


def test_search_times_itself_on_its_own_clock(setup, monkeypatch):
    """A fake clock that ticks 1 s per reading: the elapsed times and the time limit are then exact."""
    from types import SimpleNamespace
    model, tokens, fitness, mc = setup
    ticks = iter(range(10_000, 20_000))
    monkeypatch.setattr(autoschedule, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    events = []
    # readings: start, database, baselines, generation 0, then per generation the limit check and its event
    result = autoschedule.search(model, tokens, fitness, S(ratio=0.2, generations=9, offspring=2, max_seconds=8,
                                                           ffn_levels=8, device="cpu"), events.append, curves=mc)
    # generation 3's check reads 8 s: not over 8; generation 4's reads 10 s
    assert result.generations == 3 and not result.stopped
    assert [e.elapsed_s for e in events] == [1, 2, 3, 5, 7, 9, 11] and result.seconds == 11


def test_search_puts_the_model_on_its_device_and_auto_job_back(setup, monkeypatch):
    from types import SimpleNamespace
    model, tokens, fitness, mc = setup
    moves, to = [], model.to

    def recording(*args, **kwargs):
        moves.append((args, kwargs))
        return to(*args, **kwargs)
    monkeypatch.setattr(model, "to", recording)
    monkeypatch.setattr(autoschedule, "error_curves", lambda *a, **k: mc)
    import slimgpt_core.data
    monkeypatch.setattr(slimgpt_core.data, "calibration_tokens",
                        lambda tok, calib, n, seqlen, seed: tokens[:n, :seqlen])
    autoschedule.auto_job(SimpleNamespace(model=model, tokenizer="tok"), "tinystories", 6, 16, 0,
                          S(ratio=0.2, generations=1, offspring=1, ffn_levels=8, device="cpu"))
    assert moves == [((torch.device("cpu"),), {}), ((torch.device("cpu"),), {})]  # the search's, then home


def test_ceilings_count_whole_units_despite_rounding():
    """0.29 × 100 is 28.999… in floating point: the ceiling still allows 29 channels."""
    mc = ModelCurves([LayerCurves(n_kv=100, heads_per_unit=1, n_ffn=100, head_errors=[0.0] * 100,
                                  head_order=list(range(99)), ffn_counts=[0, 99], ffn_errors=[0.0, 1.0],
                                  ffn_order=list(range(99)), attn_energy=1.0, mlp_energy=1.0)])
    b = autoschedule.Budget(mc, [10], [3], 100, 0.29, 100)
    assert b.max_head == [29] and b.max_ffn_ch == [29] and b.step == [1]
    assert autoschedule.Budget(mc, [10], [3], 29 * 13, 0.29, 100).remove == 377  # exactly the most it can remove


def test_budget_boundaries_and_orders(setup):
    from slimgpt_core.schedules.curves import ModelCurves as MC
    from tests.schedules.test_curves import _lc
    mc = MC([_lc(n_kv=4, n_ffn=10), _lc(n_kv=2, n_ffn=7, head_errors=[0.0, 0.5])])
    b = autoschedule.Budget(mc, [100, 60], [7, 5], 370, 0.9, 4)  # steps of 3 and 2 channels
    # the excess goes back from the layer with the most channels first: 404 − 370 = 34 → 6 × 5, then 0 × 7
    assert b.exact_channels(np.array([3, 1, 2, 6])) == [2, 0]
    g = np.array([1, 0, 3, 2])
    b.remove = b.removed_params(g)
    for m in range(4):  # one move up from the budget, lowered back exactly onto it when only m may move
        up = g.copy()
        up[m] = b.moved(g, m, 1)
        assert b.repair(up, np.random.default_rng(m), frozen=[j for j in range(4) if j != m]).tolist() == g.tolist()
    b.remove += 1  # one parameter short: one module raised by one move
    r = b.repair(g, np.random.default_rng(0), frozen=range(4))
    assert any(r.tolist() == [*g[:m], b.moved(g, m, 1), *g[m + 1:]] for m in range(4))
    # the raise picks uniformly among the modules below their ceiling (module 0 at its ceiling is never picked)
    start = np.array([3, 0, 0, 0])
    b.remove = 400
    for seed in range(20):
        rng, mine = np.random.default_rng(seed), np.random.default_rng(seed)
        out = b.repair(start, rng, frozen=range(4))
        ref, r = start.copy(), b.removed_params(start)
        while r < 400:
            m = int(mine.choice([m for m in range(4) if ref[m] < b.maximum[m]]))
            ref[m] = b.moved(ref, m, 1)
            r = b.removed_params(ref)
        assert out.tolist() == ref.tolist()


def test_search_asks_its_parts_for_its_own_settings(setup, monkeypatch, tmp_path):
    model, tokens, fitness, mc = setup
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    asked = []
    stitched = autoschedule.StitchedModel

    def curves_of(*args, **kwargs):
        asked.append(("curves", args, kwargs))
        return mc

    def stitched_of(*args, **kwargs):
        asked.append(("stitched", args, kwargs))
        return stitched(*args, **kwargs)
    monkeypatch.setattr(autoschedule, "error_curves", curves_of)
    monkeypatch.setattr(autoschedule, "StitchedModel", stitched_of)
    stop = lambda: False  # noqa: E731
    result = autoschedule.search(model, tokens, fitness, S(ratio=0.2, generations=0, damp=0.03, batch_size=3,
                                                           device="cpu"), should_stop=stop)
    assert asked[0] == ("curves", (model, tokens, 0.03, 3, "cpu"), {"should_stop": stop})
    assert asked[1][0] == "stitched" and asked[1][1][2:] == (fitness, 3, "cpu") and asked[1][2] == {}
    assert result.generations == 0 and len(result.history) == 1 and not result.stopped


def test_ties_keep_the_first_start_and_the_parent(setup, monkeypatch):
    """With every candidate scoring the same KL, the first start wins and no child replaces the parent."""
    model, tokens, fitness, mc = setup
    monkeypatch.setattr(autoschedule.StitchedModel, "kl", lambda self, final, samples: 0.5)
    settings = S(ratio=0.2, generations=3, offspring=3, ffn_levels=8, device="cpu")
    result = autoschedule.search(model, tokens, fitness, settings, curves=mc, starts={"first": ([0.1] * 3, [0.2] * 3)})
    b = _budget(setup, autoschedule.removal_budget(model, S(ratio=0.2))[2])
    g = b.repair(b.from_ratios([0.1] * 3, [0.2] * 3), np.random.default_rng(0))
    assert result.start == "first" and result.history == [(k, 0.5) for k in range(4)]
    assert result.head_ratios == [k / 4 for k in g[:3]] and result.keep_ffn == [40 - c for c in b.exact_channels(g)]


def test_stitched_model_runs_a_half_precision_model(setup):
    import copy
    model, tokens, fitness, mc = setup
    db = autoschedule.VariantDatabase(model, mc, tokens, device="cpu")
    half = copy.deepcopy(model).to(torch.bfloat16)
    net = autoschedule.StitchedModel(half, db, fitness, device="cpu")
    final = net.run([1, 2, 0], [3, 0, 9])[-1]
    assert final.dtype == torch.bfloat16
    assert net.kl(final, list(range(5))) == pytest.approx(_kl(model, db, [1, 2, 0], [3, 0, 9], fitness), rel=0.2)
