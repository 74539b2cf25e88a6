"""The fast `auto` schedule's budget, allocation and measured sensitivity (schedules/global_allocation.py) on tiny
random llamas: exact properties only, each against a computation written here (parameter counts from the modules,
a brute force over every genome, the Fisher from retained gradients)."""
import itertools
import math

import numpy as np
import pytest
import torch
from tests.tiny_models import auto_search_case, tiny_model

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods import obs
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.schedules import global_allocation as ga
from slimgpt_core.schedules.stitched import unit_costs

B = ga.BudgetSpec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        model, tokens, _, mc = auto_search_case()
        yield model, tokens, mc


def _budget(model, spec, levels=8):
    head_cost, ffn_cost = unit_costs(model)
    return ga.GroupBudget([4] * 3, [40] * 3, head_cost, ffn_cost, spec, sum(p.numel() for p in model.parameters()),
                          sum(p.numel() for p in model.model.layers.parameters()), levels)


def _params_by_hand(model):
    """(whole model, decoder layers, one KV group, one FFN channel), counted from the modules' weight shapes."""
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    d = 32 // 8  # head_dim
    kv_group = 2 * d * 32 + d * 32 + d * 32 + 32 * 2 * d  # two query heads, K, V rows; o_proj columns
    channel = 32 + 32 + 32  # gate row, up row, down column
    assert a.q_proj.weight.shape == (32, 32) and m.gate_proj.weight.shape == (40, 32)
    return (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.model.layers.parameters()),
            kv_group, channel)


def test_budget_from_a_ratio_of_the_layers_or_the_model_a_target_or_apart(setup):
    model, _, _ = setup
    total, layers, kv_group, channel = _params_by_hand(model)
    assert _budget(model, B(ratio=0.3)).groups == [(list(range(6)), round(0.3 * layers))]
    assert _budget(model, B(ratio=0.3, scope="model")).groups == [(list(range(6)), round(0.3 * total))]
    assert _budget(model, B(ratio=0.9, target_params=total - 5000)).groups == [(list(range(6)), 5000)]
    apart = _budget(model, B(head_ratio=0.25, ffn_ratio=0.5)).groups
    assert apart == [([0, 1, 2], round(0.25 * 3 * 4 * kv_group)), ([3, 4, 5], round(0.5 * 3 * 40 * channel))]
    assert _budget(model, B(head_ratio=0.25)).groups[1] == ([3, 4, 5], 0)  # FFN untouched
    with pytest.raises(SlimGPTError, match=r"^the per-layer minimum kept must be in \[0, 1\), got 1.0$"):
        _budget(model, B(min_keep=1.0))
    with pytest.raises(SlimGPTError, match=r"^the budget's scope must be one of layers, model, got 'all'$"):
        _budget(model, B(scope="all"))
    with pytest.raises(SlimGPTError, match=r"^the FFN ratio must be in \[0, 1\), got 1.5$"):
        _budget(model, B(head_ratio=0.1, ffn_ratio=1.5))
    with pytest.raises(SlimGPTError, match=r"^target of 0 parameters must be between 1 and the model's "):
        _budget(model, B(target_params=0))
    with pytest.raises(SlimGPTError, match=r"^cannot remove [\d,]+ parameters while every layer keeps 60% of its "
                                           r"heads and channels \(at most [\d,]+\): lower the minimum or the target$"):
        _budget(model, B(ratio=0.5, min_keep=0.6))


@pytest.mark.parametrize("spec", [B(ratio=0.1), B(ratio=0.3, min_keep=0.5), B(ratio=0.6, min_keep=0.25),
                                  B(ratio=0.2, scope="model"), B(head_ratio=0.3, ffn_ratio=0.45, min_keep=0.3)])
def test_allocation_meets_the_budget_exactly_and_keeps_the_minimum(setup, spec):
    """Every group removes at least its budget and, once channels are given back, less than one FFN channel more
    (a heads-only group: less than one KV group more); the really pruned model has exactly the parameters counted."""
    model, tokens, mc = setup
    total, _, kv_group, channel = _params_by_hand(model)
    budget = _budget(model, spec)
    for balance in (0.25, 1.0, 4.0):
        g = ga.allocate(mc, budget, [1.0, 2.0, 0.5, 1.5, 1.0, 3.0], balance)
        exact = budget.exact(g)
        most_heads = math.floor((1 - spec.min_keep) * 4 + 1e-9)
        most_channels = math.floor((1 - spec.min_keep) * 40 + 1e-9)
        assert all(0 <= k <= min(3, most_heads) for k in exact[:3]), exact
        assert all(0 <= c <= min(39, most_channels) for c in exact[3:]), exact
        removed_heads = int(exact[:3].sum()) * kv_group
        removed_ffn = int(exact[3:].sum()) * channel
        if spec.apart:
            (_, head_budget), (_, ffn_budget) = budget.groups
            assert head_budget <= removed_heads < head_budget + kv_group
            assert ffn_budget <= removed_ffn < ffn_budget + channel
        else:
            assert budget.remove <= removed_heads + removed_ffn < budget.remove + channel
        if balance != 1.0:
            continue
        pruned = tiny_model(layers=3, hidden=32, heads=8, kv=4, ffn=40)
        report = prune_model(pruned, tokens, PruneSettings(keep_heads=[2 * (4 - int(k)) for k in exact[:3]],
                                                           keep_ffn=[40 - int(c) for c in exact[3:]], device="cpu"))
        assert report.params_after == total - removed_heads - removed_ffn


def _hull_gap(xs, ys, i):
    """How far point i lies above the lowest chord between points on either side of it (0: a lower-hull vertex)."""
    gap = 0.0
    for a in range(i):
        for b in range(i + 1, len(xs)):
            chord = ys[a] + (ys[b] - ys[a]) * (xs[i] - xs[a]) / (xs[b] - xs[a])
            gap = max(gap, ys[i] - chord)
    return gap


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.55])
@pytest.mark.parametrize("balance", [0.5, 2.0])
def test_allocation_is_the_cheapest_genome_removing_as_much(setup, ratio, balance):
    """Brute force over every genome of the 3-layer model at the search's moves: none that removes at least as
    many parameters as the allocation costs less (sensitivity × predicted error, summed), up to how far the
    allocation's modules sit above their lower convex hulls (zero when each stops at a hull vertex: the greedy on
    hull segments is then a Lagrangian optimum; an FFN segment cut short to the budget may stop between vertices)."""
    model, _, mc = setup
    budget = _budget(model, B(ratio=ratio, min_keep=0.1))
    sensitivity = [0.7, 1.9, 1.2, 2.5, 0.4, 1.1]
    table = ga.module_costs(mc, budget, sensitivity, balance)
    g = ga.allocate(mc, budget, sensitivity, balance)
    level = [{c: i for i, c in enumerate(counts)} for counts, _ in table]
    unit = [int(c) for c in budget.cost]

    def cost_of(genome):
        return sum(table[m][1][level[m][int(genome[m])]] for m in range(6))
    mine, removed = cost_of(g), budget.removed(g)
    slack = sum(_hull_gap([c * unit[m] for c in table[m][0]], table[m][1], level[m][int(g[m])]) for m in range(6))
    best = math.inf
    for genome in itertools.product(*(counts for counts, _ in table)):
        if sum(c * u for c, u in zip(genome, unit)) >= removed:
            best = min(best, cost_of(genome))
    assert removed >= budget.remove
    assert mine <= best * (1 + 1e-12) + slack
    assert slack <= 0.25 * mine  # stopping between vertices costs little here


def test_apart_budgets_are_each_met_by_their_own_modules(setup):
    model, _, mc = setup
    budget = _budget(model, B(head_ratio=0.0, ffn_ratio=0.5))
    g = ga.allocate(mc, budget, [1.0] * 6)
    assert list(g[:3]) == [0, 0, 0] and budget.removed(g, [3, 4, 5]) >= budget.groups[1][1]


@pytest.mark.parametrize("kind", ["log", "linear", "uniform"])
def test_fitted_schedules_meet_the_budget(setup, kind):
    model, _, mc = setup
    for spec in (B(ratio=0.3), B(ratio=0.5, min_keep=0.3), B(head_ratio=0.25, ffn_ratio=0.4)):
        budget = _budget(model, spec)
        for share in (None, 0.0, 0.5):
            g = ga.fitted_schedule(budget, [4] * 3, [40] * 3, kind, 2.0, share)
            assert budget.meets(g), (spec, share, g)
            ffn_alone = 3 * math.floor((1 - spec.min_keep) * 40 + 1e-9) * 96 >= budget.remove  # 96 per channel
            if share == 0.0 and not spec.apart and ffn_alone:
                assert list(g[:3]) == [0, 0, 0]  # heads at 0 × the share: the FFN takes the whole budget


def test_mutate_and_repair_keep_every_group_within_one_move(setup):
    model, _, _ = setup
    rng = np.random.default_rng(3)
    for spec in (B(ratio=0.4, min_keep=0.2), B(head_ratio=0.3, ffn_ratio=0.3)):
        budget = _budget(model, spec)
        g = budget.repair(np.zeros(6, dtype=np.int64), rng)
        changed = 0
        for _ in range(200):
            child = budget.mutate(g, rng)
            assert budget.meets(child)
            changed += not np.array_equal(child, g)  # a raise the repair had to undo leaves the parent
            for modules, remove in budget.groups:
                biggest = max(int(budget.step[m]) * int(budget.cost[m]) for m in modules)
                assert remove <= budget.removed(child, modules) < remove + biggest
            g = child
        assert changed >= 100


def test_output_fisher_equals_the_retained_gradients_of_sampled_labels(setup):
    """G of every o_proj / down_proj output against gradients read from `retain_grad` on the outputs, with the
    labels drawn by the same seeded sampler, in fp64 sums."""
    model, tokens, _ = setup
    G_attn, G_mlp, dense_logp = ga.output_fisher(model, tokens[:6, :12], batch_size=4, seed=5)
    with torch.no_grad():  # the forward's log-probabilities of every position come back in the same batches
        plain = torch.log_softmax(model(tokens[:6, :12]).logits.float(), -1)
    assert [p.shape for p in dense_logp] == [torch.Size([4, 12, 101]), torch.Size([2, 12, 101])]
    torch.testing.assert_close(torch.cat(dense_logp), plain, rtol=0, atol=1e-5)  # fp32, one forward with grad
    ref_attn = [torch.zeros(32, 32, dtype=torch.float64) for _ in range(3)]
    ref_mlp = [torch.zeros(32, 32, dtype=torch.float64) for _ in range(3)]
    generator = torch.Generator().manual_seed(5)
    count = 0
    for s in (0, 4):
        ids = tokens[:6, :12][s:s + 4]  # batches of 4 and 2, as output_fisher takes them
        outputs = {}

        def keep(key):
            def hook(module, args, out):
                out.retain_grad()
                outputs[key] = out
            return hook
        hooks = [mod.register_forward_hook(keep(key)) for i, layer in enumerate(model.model.layers)
                 for key, mod in (((i, "attn"), layer.self_attn.o_proj), ((i, "mlp"), layer.mlp.down_proj))]
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, use_cache=False).logits[:, :-1].float()
        probs = torch.softmax(logits.detach(), -1).reshape(-1, 101)
        labels = torch.multinomial(probs, 1, generator=generator).flatten()
        torch.nn.functional.cross_entropy(logits.reshape(-1, 101), labels, reduction="sum").backward()
        for h in hooks:
            h.remove()
        for (i, kind), out in outputs.items():
            grad = out.grad.reshape(-1, 32).double()
            (ref_attn if kind == "attn" else ref_mlp)[i] += grad.T @ grad
        count += labels.numel()
        model.zero_grad(set_to_none=True)
    for mine, ref in zip(G_attn + G_mlp, ref_attn + ref_mlp):
        scale = float(torch.diagonal(ref).max())
        torch.testing.assert_close(mine, ref / count, rtol=0, atol=1e-10 * scale / count)
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are given back


def test_directional_sensitivity_is_the_fisher_met_by_the_error():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    X = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    G = A @ A.T
    W, Hinv, lam = obs.damped_inverse(W, X @ X.T, 0.01)
    H = torch.linalg.inv(Hinv)  # the damped Hessian
    cols = torch.tensor([1, 4, 6])
    # the variant built the long way, then tr(G ΔW H ΔWᵀ) / tr(ΔW H ΔWᵀ) written out entry by entry
    D = obs.removed_weights(W, Hinv, cols) - W
    M = [[sum(D[a, i] * H[i, j] * D[b, j] for i in range(8) for j in range(8)) for b in range(5)] for a in range(5)]
    expected = sum(G[a, b] * M[b][a] for a in range(5) for b in range(5)) / sum(M[a][a] for a in range(5))
    # fp64 on an H with condition number ~1e2 (40 samples of 8 inputs, 1% damping)
    assert ga.directional_sensitivity(G, W, Hinv, cols) == pytest.approx(float(expected), rel=1e-9)
    G_diag = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0, 2.5], dtype=torch.float64))
    no_cols = torch.tensor([], dtype=torch.long)
    assert ga.directional_sensitivity(G_diag, W, Hinv, no_cols) == 1.5  # no error: the mean of G's diagonal


def test_lower_hull_drops_points_above_the_chords():
    xs = [0, 1, 2, 3, 4, 6]
    ys = [0.0, 3.0, 1.0, 2.5, 3.0, 10.0]
    assert ga.lower_hull(xs, ys) == [0, 2, 4, 5]
