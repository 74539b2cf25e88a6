"""Exact OBS math on random data (SPEC §2.1-2.3)."""
import torch

from slimgpt_core import obs


def _problem(seed=0, out=12, units=6, group=4, n=400):
    g = torch.Generator().manual_seed(seed)
    cols = units * group
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    W = torch.randn(out, cols, generator=g)
    return W, X


def _hessian(X, batches=3):
    acc = obs.HessianAccumulator(X.shape[1])
    for chunk in X.chunk(batches):
        acc.add_batch(chunk)
    return acc.H


def _measured(W0, W1, X):
    """2‖ΔW X‖²/N: the units of the OBS errors with H = 2XXᵀ/N."""
    return float(((W1 - W0) @ X.T).pow(2).sum() * 2 / X.shape[0])


def test_running_mean_hessian_equals_batch_formula():
    _, X = _problem()
    torch.testing.assert_close(_hessian(X, 5), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


def test_exact_group_error_equals_measured_increase():
    W, X = _problem()
    H = _hessian(X)
    for k in (1, 2, 4):
        res = obs.prune_head_groups(W, H, group=4, n_remove=k, damp=0.0)
        assert len(res.removed) == k
        assert abs(res.predicted_error - _measured(W, res.weight, X)) <= 1e-3 * res.predicted_error
        # the removed columns are exactly zero, the others compensated
        for u in res.removed:
            assert torch.all(res.weight[:, u * 4:(u + 1) * 4] == 0)


def test_first_step_scores_are_the_single_unit_errors():
    W, X = _problem(seed=3)
    H = _hessian(X)
    res = obs.prune_head_groups(W, H, group=4, n_remove=1, damp=0.0)
    for u, score in enumerate(res.first_scores):
        single = obs.prune_head_groups(W.clone(), H, group=4, n_remove=0, damp=0.0)
        assert single.first_scores[u] == score
    assert res.removed[0] == min(range(6), key=lambda u: res.first_scores[u])
    assert abs(res.first_scores[res.removed[0]] - _measured(W, res.weight, X)) < 1e-3 * res.predicted_error


def test_obs_update_beats_plain_removal():
    W, X = _problem(seed=1)
    H = _hessian(X)
    res = obs.prune_head_groups(W, H, group=4, n_remove=3, damp=0.01)
    plain = W.clone()
    for u in res.removed:
        plain[:, u * 4:(u + 1) * 4] = 0
    assert obs.relative_error(W, res.weight, H) < 0.8 * obs.relative_error(W, plain, H)
    ch = obs.prune_channels(W, H, n_remove=8, damp=0.01, floor=2, ceiling=4)
    plain = W.clone()
    plain[:, ch.removed] = 0
    assert obs.relative_error(W, ch.weight, H) < 0.8 * obs.relative_error(W, plain, H)


def test_relative_error_matches_forward_measurement():
    W, X = _problem(seed=2)
    H = _hessian(X)
    res = obs.prune_channels(W, H, n_remove=5, damp=0.01, floor=1, ceiling=1)
    direct = float(((res.weight - W) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())
    assert abs(obs.relative_error(W, res.weight, H) - direct) < 1e-4 * max(direct, 1e-6) + 1e-7


def test_channel_group_error_equals_measured_increase():
    W, X = _problem(seed=4)
    H = _hessian(X)
    for floor, ceiling in ((1, 1), (3, 5), (64, 1024)):
        res = obs.prune_channels(W, H, n_remove=9, damp=0.0, floor=floor, ceiling=ceiling)
        assert sorted(res.removed) == sorted(set(res.removed)) and len(res.removed) == 9
        assert sum(res.steps) == 9
        assert abs(res.predicted_error - _measured(W, res.weight, X)) <= 1e-3 * res.predicted_error


def test_greedy_single_channels_never_worse_than_one_big_group():
    W, X = _problem(seed=5)
    H = _hessian(X)
    greedy = obs.prune_channels(W, H, n_remove=10, damp=0.0, floor=1, ceiling=1)
    one_shot = obs.prune_channels(W, H, n_remove=10, damp=0.0, floor=10, ceiling=10)
    assert greedy.steps == [1] * 10 and one_shot.steps == [10]
    assert greedy.predicted_error <= one_shot.predicted_error * 1.0001


def test_dynamic_group_sizes_match_the_authors_schedule():
    sizes = obs.dynamic_group_sizes(2202)  # LLaMA-7B FFN at 20%
    assert sizes[:4] == [845, 166, 64, 64] and sum(sizes) == 2202
    assert obs.dynamic_group_sizes(7, floor=1, ceiling=1) == [1] * 7
    assert max(obs.dynamic_group_sizes(5000, floor=64, ceiling=1024)) == 1024
    assert obs.dynamic_group_sizes(0) == []


def test_approximate_head_error_ranks_and_prunes():
    W, X = _problem(seed=6)
    H = _hessian(X)
    exact = obs.prune_head_groups(W, H, group=4, n_remove=2, damp=0.01, mode="exact")
    approx = obs.prune_head_groups(W, H, group=4, n_remove=2, damp=0.01, mode="approx")
    assert len(approx.removed) == 2
    assert approx.first_scores != exact.first_scores
    # whatever ranks them, the incurred error is the exact error of the chosen heads
    assert approx.predicted_error >= exact.predicted_error * 0.999 or approx.removed == exact.removed


def test_dead_inputs_and_damping():
    W, X = _problem(seed=7)
    X[:, 5] = 0.0  # an input that never fires
    H = _hessian(X)
    res = obs.prune_channels(W, H, n_remove=3, damp=0.01, floor=1, ceiling=1)
    assert torch.isfinite(res.weight).all()
    assert 5 in res.removed  # removing a dead input costs nothing
    assert torch.all(res.weight[:, 5] == 0)
