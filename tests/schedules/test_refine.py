"""`auto` as an anytime job (schedules/refine.py) on a tiny random llama: Stop keeps the best so far and says which,
the on-disk variant database is reused and keyed by what makes a variant, the progress events, the exact budget;
and one end-to-end run of the CLI on stories260k. KLs are recomputed here with a plain HF forward of the model
with the variants' weights swapped in."""
import itertools
import json
import math

import pytest
import torch
from tests.tiny_models import auto_search_case, tiny_model

from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.methods import obs
from slimgpt_core.schedules import curves, global_allocation as ga, refine
from slimgpt_core.base import cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield *auto_search_case(use_cache=True), mp


def config(**kw):
    base = dict(budget=ga.BudgetSpec(ratio=0.35), max_seconds=None, generations=4, offspring=3, ffn_levels=8,
                device="cpu", batch_size=4)
    return refine.AutoConfig(**{**base, **kw})


def _kl_by_hand(model, db, keep_heads, keep_ffn, fitness):
    """KL(dense ‖ schedule) per token with the schedule's variants swapped into a copy of the HF model (fp64 sums)."""
    import copy
    n = len(model.model.layers)
    kv = [4 - k // 2 for k in keep_heads]
    ch = [40 - c for c in keep_ffn]
    cand = copy.deepcopy(model)
    for i, layer in enumerate(cand.model.layers):
        lc = db.curves.layers[i]
        Wo, Hi_o, Wd, Hi_d = db.inverse[i]
        cols = torch.tensor([u * 8 + j for u in lc.head_order[:kv[i]] for j in range(8)], dtype=torch.long)
        if kv[i]:
            layer.self_attn.o_proj.weight.data = obs.removed_weights(Wo, Hi_o, cols)
        if ch[i]:
            layer.mlp.down_proj.weight.data = obs.removed_weights(Wd, Hi_d, torch.tensor(sorted(lc.ffn_order[:ch[i]])))
    with torch.no_grad():
        p = torch.log_softmax(model(fitness).logits.double(), -1)
        q = torch.log_softmax(cand(fitness).logits.double(), -1)
    assert n == 3
    return float((p.exp() * (p - q)).sum() / (fitness.shape[0] * fitness.shape[1]))


def test_auto_meets_the_budget_and_its_kl_is_the_models(setup):
    model, tokens, fitness, mc, _ = setup
    events = []
    result = refine.auto_schedule(model, tokens, fitness, config(), events.append, curves=mc)
    head_unit, channel = 768, 96  # parameters of one KV group and one FFN channel of this model
    removed = sum((8 - k) // 2 * head_unit for k in result.keep_heads) + sum((40 - c) * channel
                                                                              for c in result.keep_ffn)
    assert result.remove <= removed < result.remove + channel
    assert result.params_after == result.params_before - removed
    assert result.kl == min(kl for _, _, kl in result.history) <= result.fast_kl == min(result.candidates.values())
    # the reported KL is at the search's FFN moves; the final give-back of channels is within one move of it
    db = refine.DiskVariantDatabase(model, mc, tokens, device="cpu")
    fast_kl = _kl_by_hand(model, db, result.fast_keep_heads, result.fast_keep_ffn, fitness)
    assert fast_kl == pytest.approx(result.fast_kl, rel=0.2)
    phases = [e.phase for e in events]
    assert phases[0] == "curves" and phases[-1] == "done"
    order = ["curves", "database", "sensitivity", "fast", "search", "done"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases)
    assert all(0.0 <= e.fraction <= 1.0 and (e.eta_s is None or e.eta_s >= 0.0) for e in events)
    first_fast = next(e for e in events if e.phase == "fast")
    assert first_fast.best == "fast" and math.isnan(first_fast.best_kl) and first_fast.head_ratios  # before any KL
    search = [e for e in events if e.phase == "search"]
    assert [e.fraction for e in search] == [g / 4 for g in range(1, 5)] and search[-1].eta_s == 0.0
    assert events[-1].best == result.which and events[-1].best_kl == result.kl


def test_stop_keeps_the_best_so_far_and_says_which(setup):
    model, tokens, fitness, mc, _ = setup
    # two fast candidates only: from the best of all eight the tiny search finds nothing better, and this test needs
    # stops that land after a refinement too
    full = refine.auto_schedule(model, tokens, fitness, config(generations=6, fast_seconds=0.0), curves=mc)

    def stopping_at(k):
        calls = []
        return lambda: calls.append(1) or len(calls) > k
    # stopped before the first schedule (while the database is made): nothing to keep
    with pytest.raises(JobCancelled, match="were cancelled|before its first schedule"):
        refine.auto_schedule(model, tokens, fitness, config(), should_stop=stopping_at(1), curves=mc)
    results = []
    for k in range(4, 40, 3):
        events = []
        r = refine.auto_schedule(model, tokens, fitness, config(generations=6, fast_seconds=0.0), events.append,
                                 should_stop=stopping_at(k), curves=mc)
        results.append(r)
        assert r.stopped
        assert r.kl == min(kl for _, _, kl in r.history) or math.isnan(r.kl)
        assert set(r.candidates.items()) <= set(full.candidates.items())  # same tokens, same scores
        if r.which == "fast":
            assert r.generation == 0 and r.keep_heads == r.fast_keep_heads and r.keep_ffn == r.fast_keep_ffn
            assert r.describe().startswith(f"the fast schedule (KL {r.kl:.4f}; fast {r.fast}")
        else:
            assert r.kl < r.fast_kl and 1 <= r.generation <= r.generations
            assert r.describe().startswith(f"refined at generation {r.generation} (KL {r.kl:.4f}")
        assert events[-1].head_ratios == r.head_ratios or r.which == "fast"
    assert {r.which for r in results} == {"fast", "refined"}  # both cases were met
    assert [r.generations for r in results] == sorted(r.generations for r in results)


def _record_kl_calls(monkeypatch) -> list:
    """Every KL the search computes, in order, as (windows, KL per window), with "generation" where each generation
    begins."""
    calls = []
    window_kl, next_generation = refine.StitchedModel.window_kl, refine._AutoRun.next_generation

    def recording(self, final, samples):
        rows = window_kl(self, final, samples)
        calls.append((list(samples), rows))
        return rows
    monkeypatch.setattr(refine.StitchedModel, "window_kl", recording)
    monkeypatch.setattr(refine._AutoRun, "next_generation",
                        lambda self, g, rng: calls.append("generation") or next_generation(self, g, rng))
    return calls


def _by_generation(calls: list) -> tuple[list, list[list]]:
    """The KL calls before the first generation, and those of each generation."""
    start = calls.index("generation")
    generations = []
    for c in calls[start:]:
        if c == "generation":
            generations.append([])
        else:
            generations[-1].append(c)
    return calls[:start], generations


def _whole(size: int, *parts) -> torch.Tensor:
    """A child's KL per window on the whole pool from its KLs on disjoint sets of windows."""
    rows = torch.full((size,), math.nan, dtype=torch.float64)
    for windows, part in parts:
        rows[windows] = part
    assert not rows.isnan().any()
    return rows


def _mean(rows: torch.Tensor) -> float:
    return float(rows.mean())


def _record_runs(monkeypatch) -> list:
    """Every search's _AutoRun, to read its final parent."""
    runs = []
    search = refine._AutoRun.refine
    monkeypatch.setattr(refine._AutoRun, "refine", lambda self, rng: runs.append(self) or search(self, rng))
    return runs


def _assert_kept_states_are_one_runs(runs: list, result) -> None:
    """The final parent's states, put together from runs on parts of the pool, against one run of it on the whole
    pool (fp32, other batchings: 1e-5)."""
    run, = runs
    fresh = run.net.run(*refine._decode(run.parent, run.n))
    assert len(fresh) == len(run.parent_states)
    for kept, made in zip(run.parent_states, fresh):
        assert torch.allclose(kept, made, atol=1e-5, rtol=1e-5)
    assert run.net.kl(fresh[-1], run.all_samples) == pytest.approx(result.kl, rel=1e-5)


def test_only_offspring_better_than_the_parent_on_the_screen_are_scored_on_all(setup, monkeypatch):
    """Every KL the search computes, in order, per generation: the offspring on the screening sequences, then the
    full scorings, at most `survivors` and only of offspring whose screen KL beat the parent's there (its KL per
    window kept, never recomputed), each run on the windows it has not run on yet; every full scoring is the child's
    KL of one run on the whole pool."""
    model, tokens, fitness, mc, _ = setup
    calls = _record_kl_calls(monkeypatch)
    mutate = ga.GroupBudget.mutate
    monkeypatch.setattr(ga.GroupBudget, "mutate",
                        lambda self, g, rng: calls.append({"child": mutate(self, g, rng), "parent": g.copy()}) or
                        calls[-1]["child"])
    runs = _record_runs(monkeypatch)
    result = refine.auto_schedule(model, tokens, fitness, config(generations=12, offspring=4, survivors=2,
                                                                 fast_seconds=0.0), curves=mc)
    run, = runs
    before, generations = _by_generation(calls)
    every = list(range(5))
    assert before[-1][0] == every  # the fast schedule on the pool
    parent_rows = before[-1][1]
    assert len(generations) == 12
    full_scorings = 0
    for entries in generations:
        children = [e["child"] for e in entries if isinstance(e, dict) and (e["child"] != e["parent"]).any()]
        scores = [e for e in entries if not isinstance(e, dict)]
        screen = scores[0][0]
        offspring = [rows for windows, rows in scores if windows == screen]
        rest = scores[len(offspring):]
        assert len(screen) == 2 and all(windows != screen for windows, _ in rest)  # screens first, then full ones
        assert len(children) == len(offspring)
        better = sorted(((r, c) for r, c in zip(offspring, children) if _mean(r) < _mean(parent_rows[screen])),
                        key=lambda p: _mean(p[0]))[:2]
        assert len(rest) == len(better)
        for (screened, child), (windows, rows) in zip(better, rest):
            assert sorted(windows + screen) == every
            whole = _whole(5, (screen, screened), (windows, rows))
            fresh = run.net.kl(run.net.run(*refine._decode(child, run.n))[-1], every)  # one run on the whole pool
            assert _mean(whole) == pytest.approx(fresh, rel=1e-5)
            if _mean(whole) < _mean(parent_rows):
                parent_rows = whole
        full_scorings += len(rest)
    assert 0 < full_scorings < 2 * 12  # some generations skipped their full scorings
    assert result.generations == 12 and result.kl == _mean(parent_rows)
    _assert_kept_states_are_one_runs(runs, result)


def test_the_search_selects_on_fresh_windows_in_three_steps_and_accepts_on_the_whole_pool(setup, monkeypatch):
    """A pool of 12 windows, the fast phase on the first 3: its KLs on those; then per generation, in order, the
    offspring on 2 screening windows drawn afresh, at most `survivors` of those that beat the parent there on 4
    other windows, and at most one of those that beat the parent there on the 6 windows left, accepted only if it
    beats the parent's KL on all 12. The parent's KL per window is kept (never recomputed); the accepted child's
    hidden states, put together from its three runs, are those of one run on the whole pool."""
    model, tokens, _, mc, _ = setup
    pool = torch.randint(0, 101, (12, 16), generator=torch.Generator().manual_seed(7))
    calls = _record_kl_calls(monkeypatch)
    runs = _record_runs(monkeypatch)
    result = refine.auto_schedule(model, tokens, pool, config(generations=16, offspring=4, survivors=2,
                                                              fast_samples=3, check_samples=4, fast_seconds=0.0),
                                  curves=mc)
    every = list(range(12))
    before, generations = _by_generation(calls)
    *fast, widened = before
    assert [w for w, _ in fast] == [[0, 1, 2]] * len(fast) and len(fast) == 2  # candidates on the fast windows
    parent_rows = widened[1]
    assert widened[0] == every and _mean(parent_rows) == result.history[0][2] == result.fast_kl  # parent on the pool
    assert result.kl_samples == 12 and result.candidates[result.fast] == min(_mean(r) for _, r in fast)
    db = refine.DiskVariantDatabase(model, mc, tokens, device="cpu")
    assert _kl_by_hand(model, db, result.fast_keep_heads, result.fast_keep_ffn, pool) == pytest.approx(
        result.fast_kl, rel=0.2)
    screens, checked, accepted = set(), 0, 0
    for scores in generations:
        screen = scores[0][0]
        offspring = [rows for _, rows in itertools.takewhile(lambda c: c[0] == screen, scores)]
        screens.add(tuple(screen))
        rest = scores[len(offspring):]
        better = sorted((r for r in offspring if _mean(r) < _mean(parent_rows[screen])), key=_mean)[:2]
        if not better:
            assert rest == []
            continue
        check = rest[0][0]
        assert len(check) == 4 and not set(check) & set(screen)
        survivors = [rows for _, rows in itertools.takewhile(lambda c: c[0] == check, rest)]
        assert len(survivors) == len(better)
        checked += len(survivors)
        passed = sorted(((s, c) for s, c in zip(better, survivors) if _mean(c) < _mean(parent_rows[check])),
                        key=lambda p: _mean(p[1]))[:1]
        left = rest[len(survivors):]
        assert len(left) == len(passed)
        for (screened, checked_rows), (windows, rows) in zip(passed, left):
            assert sorted(screen + check + windows) == every  # no window run twice for this child
            whole = _whole(12, (screen, screened), (check, checked_rows), (windows, rows))
            if _mean(whole) < _mean(parent_rows):
                parent_rows, accepted = whole, accepted + 1
    assert len(screens) > 1 and checked > 0 and accepted > 0  # the windows move; every step was met
    assert result.kl == _mean(parent_rows) and result.which == "refined"
    assert [kl for _, _, kl in result.history] == sorted((kl for _, _, kl in result.history), reverse=True)
    assert _kl_by_hand(model, db, result.keep_heads, result.keep_ffn, pool) == pytest.approx(result.kl, rel=0.2)
    _assert_kept_states_are_one_runs(runs, result)


def test_the_search_ends_at_its_seconds_and_a_snapshot_is_the_best_as_it_was_then(setup, monkeypatch):
    """A clock that moves one second per KL: no scoring starts after the job's seconds, and the schedule kept at S
    seconds is the one found last before S, even when the generation running at S finds a better one."""
    model, tokens, _, mc, _ = setup
    pool = torch.randint(0, 101, (12, 16), generator=torch.Generator().manual_seed(7))
    clock, starts = [0.0], []
    window_kl = refine.StitchedModel.window_kl

    def ticking_kl(self, final, samples):
        starts.append(clock[0])
        clock[0] += 1.0
        return window_kl(self, final, samples)
    monkeypatch.setattr(refine.StitchedModel, "window_kl", ticking_kl)
    monkeypatch.setattr(refine.time, "perf_counter", lambda: clock[0])
    snapshots = tuple(float(t) for t in range(9, 196, 10))
    result = refine.auto_schedule(model, tokens, pool, config(generations=None, max_seconds=196.5, offspring=4,
                                                              fast_samples=3, check_samples=4, fast_seconds=0.0,
                                                              snapshots=snapshots), curves=mc)
    assert max(starts) < 196.5 and result.seconds == clock[0] <= 197.5
    found = [(t, kl) for t, _, kl in result.history]  # a generation's better parent is found at its last scoring
    for S in snapshots:
        assert result.snapshots[S]["kl"] == [kl for t, kl in found if t <= S][-1], S
    assert len({snap["kl"] for snap in result.snapshots.values()}) > 2  # the search moved between snapshots


def test_variants_are_kept_on_disk_and_keyed_by_model_tokens_and_damping(setup, tmp_path):
    model, tokens, fitness, mc, mp = setup
    mp.setenv("SLIMGPT_CACHE", str(tmp_path / "fresh"))
    first = refine.auto_schedule(model, tokens, fitness, config(), curves=mc)
    assert first.variants_built > 0 and first.variants_from_disk == 0
    again = refine.auto_schedule(model, tokens, fitness, config(), curves=mc)
    assert again.variants_built == 0 and again.variants_from_disk == first.variants_built
    assert (again.keep_heads, again.keep_ffn, again.kl) == (first.keep_heads, first.keep_ffn, first.kl)
    assert [h[1:] for h in again.history] == [h[1:] for h in first.history]  # (generation, KL); not the seconds
    db = refine.DiskVariantDatabase(model, mc, tokens, device="cpu")
    stored = cache.lookup_tensors("stats", db.disk_key(1, "mlp", 10))
    fresh = refine.VariantDatabase(model, mc, tokens, device="cpu").ffn(1, 10)
    assert stored is None or torch.equal(stored["W"], fresh)
    assert torch.equal(db.ffn(1, 10), fresh)  # made now if it was not on disk, then read back
    assert torch.equal(cache.lookup_tensors("stats", db.disk_key(1, "mlp", 10))["W"], fresh)
    # another damping, other calibration tokens or another model: other keys, nothing reused
    other_damp = refine.auto_schedule(model, tokens, fitness, config(damp=0.05),
                                      curves=curves.error_curves(model, tokens, 0.05, device="cpu"))
    assert other_damp.variants_from_disk == 0
    other_tokens = tokens.roll(1, 0)
    assert refine.DiskVariantDatabase(model, mc, other_tokens, device="cpu").prefix != db.prefix
    other_model = tiny_model(layers=3, hidden=32, heads=8, kv=4, ffn=40, seed=1)
    assert refine.DiskVariantDatabase(other_model, mc, tokens, device="cpu").prefix != db.prefix


def test_fast_only_and_budgets_apart(setup):
    model, tokens, fitness, mc, _ = setup
    fast = refine.auto_schedule(model, tokens, fitness, config(refine=False), curves=mc)
    assert fast.which == "fast" and fast.generations == 0 and not fast.stopped
    apart = refine.auto_schedule(model, tokens, fitness, config(budget=ga.BudgetSpec(head_ratio=0.25, ffn_ratio=0.5,
                                                                                    min_keep=0.2)), curves=mc)
    kv_removed = sum((8 - k) // 2 for k in apart.keep_heads)
    assert kv_removed == 3  # 25% of 12 KV groups' parameters, whole groups
    assert 0.5 * 120 <= sum(40 - c for c in apart.keep_ffn) < 0.5 * 120 + 1
    assert set(apart.candidates) == {"global", "log"}
    assert all(k >= 4 for k in apart.keep_heads) and all(c >= 8 for c in apart.keep_ffn)  # 20% kept


def test_cli_prune_auto_on_stories260k(tmp_path, capsys, monkeypatch):
    """One real end-to-end run: the fast schedule refined for two generations, pruned by the pipeline, at the
    whole-model budget, every layer keeping a third."""
    from slimgpt_core.cli import main
    from slimgpt_core.models import load_model
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    before = sum(p.numel() for p in load_model("stories260k", "cpu").model.parameters())
    out = tmp_path / "auto"
    assert main(["prune", "--model", "stories260k", "--schedule", "auto", "--ratio", "0.25", "--budget-scope", "model",
                 "--min-keep", "0.34", "--auto-seconds", "600", "--search-generations", "2", "--calib", "tinystories", "--nsamples", "8",
                 "--seqlen", "64", "--fitness-samples", "4", "--fitness-seqlen", "64", "--device", "cpu",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    channel = 3 * 64  # stories260k: hidden 64, one FFN channel is a gate row, an up row and a down column
    remove = round(0.25 * before)
    assert before - remove - channel < summary["params_after"] <= before - remove
    auto = report["settings"]["auto"]
    assert report["settings"]["keep_ffn"] == auto["keep_ffn"] and auto["which"] in ("fast", "refined")
    assert all(k >= 0.34 * 172 - 1e-9 for k in auto["keep_ffn"])  # stories260k's FFN width is 172
    assert auto["generations"] == 2 and auto["kl"] <= auto["fast_kl"]
