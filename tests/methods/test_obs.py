"""Exact OBS math on random data (SPEC §2.1-2.3)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slimgpt_core.methods import obs
from slimgpt_core.base.errors import SlimGPTError


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
    # both fp32 sums of 400 products with H_ii up to 87: ~sqrt(400)·2⁻²⁴·87 ≈ 1e-4 apart (1.6e-5 measured)
    torch.testing.assert_close(_hessian(X, 5), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("columns", [100, 192, 500, 1000])  # narrower than a strip, one strip, several (last narrower)
def test_triangular_gram_equals_the_fp64_product(columns):
    g = torch.Generator().manual_seed(columns)
    chunks = [torch.randn(n, columns, generator=g) for n in (300, 7, 129)]
    acc = obs.HessianAccumulator(columns)
    for chunk in chunks:
        acc.add_batch(chunk)
    X = torch.cat(chunks).double()
    assert torch.count_nonzero(torch.tril(acc.sum, -1)) == 0  # only the upper triangle is accumulated
    expected = 2 * X.T @ X / X.shape[0]
    # fp32 products over chunks of ≤ 300 rows: at most 300·2⁻²⁴·sqrt(H_ii H_jj) ≈ 300·6e-8·2 ≈ 4e-5 off
    torch.testing.assert_close(acc.H.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.H, acc.H.T)


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


def _least_squares_removal_error(W, X, cols):
    """2‖WXᵀ − Ŵ X_restᵀ‖²/N with Ŵ the best weights on the other columns (independent of OBS: lstsq in fp64)."""
    W, X = W.double(), X.double()
    rest = [c for c in range(X.shape[1]) if c not in set(cols)]
    target = X @ W.T  # [N, out]
    fit = torch.linalg.lstsq(X[:, rest], target).solution
    return float((target - X[:, rest] @ fit).pow(2).sum() * 2 / X.shape[0])


def test_first_step_scores_are_the_single_unit_errors():
    W, X = _problem(seed=3)
    H = _hessian(X)
    res = obs.prune_head_groups(W, H, group=4, n_remove=1, damp=0.0)
    assert len(res.first_scores) == 6
    for u, score in enumerate(res.first_scores):  # every unit, not only the cheapest
        measured = _least_squares_removal_error(W, X, range(u * 4, (u + 1) * 4))
        assert abs(score - measured) <= 1e-3 * measured
    assert res.removed[0] == min(range(6), key=lambda u: res.first_scores[u])
    assert abs(res.first_scores[res.removed[0]] - _measured(W, res.weight, X)) < 1e-3 * res.predicted_error


def test_first_step_channel_scores_are_the_single_channel_errors():
    W, X = _problem(seed=8, units=10, group=1)
    H = _hessian(X)
    res = obs.prune_channels(W, H, n_remove=1, damp=0.0, floor=1, ceiling=1)
    for c, score in enumerate(res.first_scores):
        measured = _least_squares_removal_error(W, X, [c])
        assert abs(score - measured) <= 1e-3 * measured
    assert res.removed == [min(range(10), key=lambda c: res.first_scores[c])]
    assert res.first_scores[res.removed[0]] == pytest.approx(_measured(W, res.weight, X), rel=1e-3)


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


# A fixed problem for the authors' approximate head error: two heads of two columns.
FIXED_H = torch.tensor([[4.0, 1.0, 0.5, 0.0], [1.0, 3.0, 0.0, 0.2], [0.5, 0.0, 2.0, 0.3], [0.0, 0.2, 0.3, 1.0]])
FIXED_W = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, -1.0, 2.0, 1.0]])


def _authors_formula(W, H):
    """Σ_rows W[:, j]²/U_jj² per head, U the upper Cholesky factor of the head's block B of H⁻¹, written out
    for 2×2 blocks [[a, b], [b, c]]: U_11² = a, U_22² = c − b²/a."""
    Hinv = torch.linalg.inv(H.double())
    out = []
    for u in range(2):
        a, b, c = Hinv[2 * u, 2 * u], Hinv[2 * u, 2 * u + 1], Hinv[2 * u + 1, 2 * u + 1]
        w1, w2 = W[:, 2 * u].double(), W[:, 2 * u + 1].double()
        out.append(float(w1.pow(2).sum() / a + w2.pow(2).sum() / (c - b * b / a)))
    return out


def _exact_formula(W, H):
    """tr(W_Q B⁻¹ W_Qᵀ) per head, B the head's block of H⁻¹."""
    Hinv = torch.linalg.inv(H.double())
    out = []
    for u in range(2):
        q = slice(2 * u, 2 * u + 2)
        Wq = W[:, q].double()
        out.append(float(torch.trace(Wq @ torch.linalg.inv(Hinv[q, q]) @ Wq.T)))
    return out


def test_approximate_head_error_is_the_authors_formula():
    approx = obs.prune_head_groups(FIXED_W, FIXED_H, group=2, n_remove=0, damp=0.0, mode="approx")
    exact = obs.prune_head_groups(FIXED_W, FIXED_H, group=2, n_remove=0, damp=0.0, mode="exact")
    assert approx.first_scores == pytest.approx(_authors_formula(FIXED_W, FIXED_H), rel=1e-5)
    assert exact.first_scores == pytest.approx(_exact_formula(FIXED_W, FIXED_H), rel=1e-5)
    # the approximation is not the exact error (nor the plain squared norm of the head's weights)
    assert approx.first_scores != pytest.approx(exact.first_scores, rel=1e-2)
    assert approx.first_scores != pytest.approx([float(FIXED_W[:, :2].pow(2).sum()),
                                                 float(FIXED_W[:, 2:].pow(2).sum())], rel=1e-2)
    assert approx.removed == [] and approx.predicted_error == 0.0 and approx.steps == []


def test_approximate_head_error_ranks_and_the_exact_error_is_incurred():
    W, X = _problem(seed=6)
    H = _hessian(X)
    exact = obs.prune_head_groups(W, H, group=4, n_remove=2, damp=0.0, mode="exact")
    approx = obs.prune_head_groups(W, H, group=4, n_remove=1, damp=0.0, mode="approx")
    assert approx.removed == [min(range(6), key=lambda u: approx.first_scores[u])]
    # whatever ranks them, the incurred error is the exact error of the chosen head
    chosen = approx.removed[0]
    measured = _least_squares_removal_error(W, X, range(chosen * 4, (chosen + 1) * 4))
    assert approx.predicted_error == pytest.approx(measured, rel=1e-3)
    assert approx.predicted_error == pytest.approx(_measured(W, approx.weight, X), rel=1e-3)
    assert exact.steps == [1, 1] and len(set(exact.removed)) == 2
    with pytest.raises(SlimGPTError, match="unknown head-error mode 'nope'"):
        obs.prune_head_groups(W, H, group=4, n_remove=1, mode="nope")


def test_dead_inputs():
    W, X = _problem(seed=7)
    X[:, 5] = 0.0  # an input that never fires
    H = _hessian(X)
    res = obs.prune_channels(W, H, n_remove=3, damp=0.01, floor=1, ceiling=1)
    assert torch.isfinite(res.weight).all()
    assert 5 in res.removed  # removing a dead input costs nothing
    assert torch.all(res.weight[:, 5] == 0)
    W0, Hinv, lam = obs.damped_inverse(W, H, 0.0)
    assert torch.all(W0[:, 5] == 0) and torch.equal(W0[:, :5], W[:, :5]) and lam == 0.0
    fixed = H.clone()
    fixed[5, 5] = 1.0  # a dead input's diagonal becomes 1 (the mean diagonal is taken after that)
    # two fp32 inverses of a matrix of condition number 660: each within ~cond·2⁻²⁴ ≈ 4e-5 (5e-6 measured)
    torch.testing.assert_close(Hinv, torch.linalg.inv(fixed), rtol=1e-3, atol=1e-6)


def _indefinite(min_eigenvalue: float, n: int = 6) -> torch.Tensor:
    """A symmetric matrix with mean diagonal 1 and one eigenvalue `min_eigenvalue` (others positive)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.tensor([min_eigenvalue] + [1.0] * (n - 1), dtype=torch.float64)
    eig[1:] += (n - eig.sum())  / (n - 1)  # trace n: mean diagonal 1
    return (Q @ torch.diag(eig) @ Q.T).float()


def test_damping_used_as_asked_then_raised_tenfold():
    H = _indefinite(0.5)
    W = torch.ones(3, 6)
    _, Hinv, lam = obs.damped_inverse(W, H, 0.01)
    assert lam == 0.01  # positive definite: the damping asked for
    torch.testing.assert_close(Hinv, torch.linalg.inv(H + 0.01 * torch.eye(6)), rtol=1e-4, atol=1e-5)
    H = _indefinite(-0.05)  # needs a damping above 0.05 x mean diagonal: 0.01 fails, 0.1 works
    _, Hinv, lam = obs.damped_inverse(W, H, 0.01)
    assert lam == pytest.approx(0.1)
    torch.testing.assert_close(Hinv, torch.linalg.inv(H + 0.1 * torch.eye(6)), rtol=1e-4, atol=1e-5)
    H = _indefinite(-0.005)  # from no damping: 0 → 1e-4 → 1e-3 → 1e-2 (the fourth and last try)
    assert obs.damped_inverse(W, H, 0.0)[2] == pytest.approx(1e-2)
    res = obs.prune_channels(torch.randn(3, 6), H, n_remove=1, damp=0.0, floor=1, ceiling=1)
    assert res.damping == pytest.approx(1e-2)


def test_not_positive_definite_even_with_damping_is_a_clear_error():
    H = _indefinite(-0.05)  # 0 → 1e-4 → 1e-3 → 1e-2: all fail
    with pytest.raises(SlimGPTError, match="^the calibration Hessian is not positive definite even with damping: use more calibration samples$"):
        obs.damped_inverse(torch.ones(3, 6), H, 0.0)
    with pytest.raises(SlimGPTError, match="not positive definite"):
        obs.prune_head_groups(torch.ones(3, 6), H, group=2, n_remove=1, damp=0.0)


def test_safe_cholesky_jitters_a_block_that_rounding_made_indefinite():
    B = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]])  # the first block is singular
    L = obs._safe_cholesky(B)
    assert torch.isfinite(L).all() and torch.all(torch.triu(L, 1) == 0)
    # jitter 1e-6 x the block's mean diagonal: L_11 = sqrt((1 + 1e-6) − 1/(1 + 1e-6)) ≈ sqrt(2e-6); in fp32 the
    # two terms round by up to ~3·2⁻²⁴ ≈ 2e-7 of 1, about 9% of their 2e-6 difference (5% of L_11)
    assert float(L[0, 1, 1]) == pytest.approx(2e-6 ** 0.5, rel=0.1)
    good = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]])
    assert torch.equal(obs._safe_cholesky(good), torch.linalg.cholesky(good))


# A constructed case for the data-free and activation-aware baselines: 4 units of 2 columns.
BASE_W = torch.tensor([[3.0, 0.0, 1.0, 1.0, 0.5, 0.5, 2.0, 2.0],
                       [-3.0, 0.0, -1.0, 1.0, 0.5, -0.5, 2.0, -2.0]])
BASE_H = torch.diag(torch.tensor([1.0, 1.0, 100.0, 100.0, 100.0, 100.0, 0.01, 0.01]))
BASE_H[0, 7] = BASE_H[7, 0] = 0.05  # off-diagonal terms do not enter Wanda's score


def test_magnitude_removes_the_smallest_norm_units():
    # unit norms: sqrt(18)=4.24, sqrt(4)=2, sqrt(1)=1, sqrt(16)=4
    res = obs.prune_by_score(BASE_W, BASE_H, 2, 2, "magnitude")
    assert sorted(res.removed) == [1, 2]
    assert res.first_scores == pytest.approx([18 ** 0.5, 2.0, 1.0, 4.0])
    expected = BASE_W.clone()
    expected[:, 2:6] = 0.0
    assert torch.equal(res.weight, expected)  # removed columns zero, the others untouched
    delta = expected - BASE_W
    assert res.predicted_error == pytest.approx(float(torch.trace(delta @ BASE_H @ delta.T)))
    assert res.steps == [2] and res.damping == 0.0
    assert obs.prune_by_score(BASE_W, None, 2, 1, "magnitude").predicted_error == 0.0


def test_wanda_sp_weighs_weights_by_input_norms():
    # Σ|W|·sqrt(H_jj) per unit: 6·1 = 6, 4·10 = 40, 2·10 = 20, 8·0.1 = 0.8 (without ‖X‖: 6, 4, 2, 8)
    res = obs.prune_by_score(BASE_W, BASE_H, 2, 2, "wanda-sp")
    assert res.first_scores == pytest.approx([6.0, 40.0, 20.0, 0.8])
    assert sorted(res.removed) == [0, 3]
    expected = BASE_W.clone()
    expected[:, [0, 1, 6, 7]] = 0.0
    assert torch.equal(res.weight, expected)
    negative = BASE_H.clone()
    negative[0, 0] = -1.0  # a rounding-negative diagonal counts as a dead input, not a NaN
    assert obs.unit_scores(BASE_W, negative, 2, "wanda-sp")[0] == 0.0
    assert obs.prune_by_score(BASE_W, BASE_H, 2, 0, "wanda-sp").removed == []
    with pytest.raises(SlimGPTError, match="unknown scoring method 'nope'"):
        obs.unit_scores(BASE_W, BASE_H, 2, "nope")


def test_without_compensation_keeps_the_choice_and_drops_the_update():
    W, X = _problem(seed=9)
    H = _hessian(X)
    res = obs.prune_head_groups(W, H, group=4, n_remove=2, damp=0.01)
    plain = obs.without_compensation(W, H, res, 4)
    expected = W.clone()
    for u in res.removed:
        expected[:, u * 4:(u + 1) * 4] = 0.0
    assert torch.equal(plain.weight, expected)
    assert plain.removed == res.removed and plain.first_scores == res.first_scores and plain.steps == res.steps
    assert plain.predicted_error == pytest.approx(_measured(W, expected, X), rel=1e-3)
    assert plain.predicted_error > res.predicted_error and plain.damping == res.damping


def test_relative_error_of_a_silent_layer_is_zero():
    H = torch.eye(3)
    assert obs.relative_error(torch.zeros(2, 3), torch.ones(2, 3), H) == 0.0  # nothing to reconstruct
    small = torch.full((1, 3), 0.1)  # ‖WX‖² = 0.03 < 1
    assert obs.relative_error(small, torch.zeros(1, 3), H) == pytest.approx(1.0)


def test_relative_error_uses_a_given_denominator():
    W, X = _problem(seed=11)
    H = _hessian(X)
    W2 = W * 0.9
    by_hand = float(((W2 - W) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())  # ‖ΔW X‖² / ‖W X‖², H ∝ X Xᵀ
    assert obs.relative_error(W, W2, H) == pytest.approx(by_hand, rel=1e-4)
    denom = obs.quadratic_error(W, H)
    assert obs.relative_error(W, W2, H, denom) == obs.relative_error(W, W2, H)
    assert obs.relative_error(W, W2, H, 2 * denom) == pytest.approx(by_hand / 2, rel=1e-4)


def test_defaults_and_error_sentences():
    W, X = _problem(seed=10)
    H = _hessian(X)
    a = obs.prune_head_groups(W, H, group=4, n_remove=2)
    b = obs.prune_head_groups(W, H, group=4, n_remove=2, damp=0.01, mode="exact")
    assert a.removed == b.removed and torch.equal(a.weight, b.weight) and a.damping == 0.01
    a = obs.prune_channels(W, H, n_remove=3)
    b = obs.prune_channels(W, H, n_remove=3, damp=0.01, floor=64, ceiling=1024)
    assert a.removed == b.removed and a.steps == b.steps == [3] and a.damping == 0.01
    with pytest.raises(SlimGPTError, match="^24 input columns do not split into groups of 5$"):
        obs.prune_head_groups(W, H, group=5, n_remove=1)
    with pytest.raises(SlimGPTError, match=r"^FFN group sizes need 1 <= floor <= ceiling, got floor=0, ceiling=1024$"):
        obs.dynamic_group_sizes(10, floor=0)
    with pytest.raises(SlimGPTError, match="got floor=8, ceiling=4"):
        obs.dynamic_group_sizes(10, floor=8, ceiling=4)
    sizes = obs.dynamic_group_sizes(5000)
    assert sizes[0] == 1024 and all(type(s) is int for s in sizes + obs.dynamic_group_sizes(2202))


def test_channel_groups_follow_floor_and_ceiling():
    g = torch.Generator().manual_seed(11)
    W = torch.randn(2, 600, generator=g)
    H = torch.eye(600) + 0.01 * torch.ones(600, 600)
    res = obs.prune_channels(W, H, n_remove=560, damp=0.0, floor=4, ceiling=10)
    # bs₀ = (560 − 512)//2 = 24, capped at 10; then bs < 0, so the floor of 4 until 560 are gone
    assert res.steps == [10] + [4] * 137 + [2] and len(set(res.removed)) == 560
    assert obs.prune_channels(W[:, :30], H[:30, :30], n_remove=9, floor=3, ceiling=5).steps == [3, 3, 3]
    none = obs.prune_channels(W, H, n_remove=0)
    assert none.removed == [] and none.steps == [] and none.predicted_error == 0.0 and len(none.first_scores) == 600
    assert torch.equal(none.weight, W)
    assert obs.prune_by_score(W, H, 1, 0, "magnitude").steps == []


def _all_reduce_worker(rank, world, init, chunks, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    acc = obs.HessianAccumulator(chunks[0].shape[-1])
    for chunk in chunks[rank::world]:
        acc.add_batch(chunk)
    with torch.device("meta"):  # the count is reduced beside the statistics, not on the default device
        acc.all_reduce()
    if rank == 0:
        torch.save({"H": acc.H, "n": acc.nsamples}, out)
    dist.destroy_process_group()


def test_all_reduce_sums_statistics_of_two_processes(tmp_path):
    import torch.multiprocessing as mp
    _, X = _problem(seed=12, n=120)
    chunks = list(X.chunk(6))
    single = obs.HessianAccumulator(X.shape[1])
    for chunk in chunks:
        single.add_batch(chunk)
    single.all_reduce()  # not distributed: nothing changes
    assert single.nsamples == 120
    out = tmp_path / "h.pt"
    mp.spawn(_all_reduce_worker, args=(2, f"file://{tmp_path / 'store'}", chunks, str(out)), nprocs=2)
    merged = torch.load(out, weights_only=True)
    assert merged["n"] == 120 and type(merged["n"]) is int
    torch.testing.assert_close(merged["H"], single.H, rtol=1e-6, atol=1e-6)


def test_statistics_sum_in_fp64_from_fp32_products_of_any_batch_shape():
    acc = obs.HessianAccumulator(1)
    acc.add_batch(torch.tensor([[1e4]]))  # XᵀX = 1e8: in fp32 every later +1 would round away
    for _ in range(100):
        acc.add_batch(torch.tensor([[1.0]]))  # one-row batches count too
    assert acc.nsamples == 101
    assert float(acc.H) == pytest.approx(2 * (1e8 + 100) / 101, abs=0.2)  # fp32 spacing there is 0.125
    half = obs.HessianAccumulator(1)
    half.add_batch(torch.tensor([[1.0], [0.0625]], dtype=torch.bfloat16))  # exact in bf16, XᵀX = 1 + 2⁻⁸ is not
    assert float(half.H) == 1.00390625 and half.H.dtype == torch.float32
    _, X = _problem(seed=14, n=24)
    flat, batched = obs.HessianAccumulator(X.shape[1]), obs.HessianAccumulator(X.shape[1])
    flat.add_batch(X)
    batched.add_batch(X.reshape(4, 6, X.shape[1]))  # [batch, tokens, columns] as a hook sees it
    assert batched.nsamples == flat.nsamples == 24 and torch.equal(batched.H, flat.H)
    acc.add_batch(torch.zeros(0, 1))  # an empty batch changes nothing
    assert acc.nsamples == 101


def test_tensors_are_made_where_and_as_the_inputs_are():
    """The tensors the OBS code creates take their device from its inputs, never torch's default: with the default
    device set to meta (a device without data) the CPU results are unchanged. On a GPU a tensor made on the default
    device would land on the CPU. The damped inverse and the statistics also keep their dtype under an fp64 default."""
    W, X = _problem(seed=13)
    H = _hessian(X)
    runs = [lambda: obs.prune_head_groups(W, H, 4, 2), lambda: obs.prune_head_groups(W, H, 4, 2, mode="approx"),
            lambda: obs.prune_channels(W, H, 5, floor=2, ceiling=2)]
    expected = [run() for run in runs]
    with torch.device("meta"):
        got = [run() for run in runs]
    for a, b in zip(expected, got):
        assert b.removed == a.removed and b.first_scores == a.first_scores and b.steps == a.steps
        assert torch.equal(b.weight, a.weight) and b.weight.dtype == torch.float32
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            H_again = _hessian(X)
            _, Hinv, _ = obs.damped_inverse(W, H, 0.01)
    finally:
        torch.set_default_dtype(default)
    assert H_again.device.type == "cpu" and torch.equal(H_again, H)
    assert Hinv.device.type == "cpu" and Hinv.dtype == torch.float32
    # statistics kept on another device: every batch is sent there
    from tests.device_moves import DeviceMoves
    elsewhere = obs.HessianAccumulator(X.shape[1], device="meta")
    with DeviceMoves() as moves:
        elsewhere.add_batch(X[:10])
    assert moves.moves == [torch.device("meta")] and elsewhere.H.device.type == "meta" and elsewhere.nsamples == 10


def test_damping_is_relative_to_the_mean_diagonal():
    H = 3 * _indefinite(0.5)  # mean diagonal 3
    _, Hinv, lam = obs.damped_inverse(torch.ones(3, 6), H, 0.01)
    assert lam == 0.01
    torch.testing.assert_close(Hinv, torch.linalg.inv(H + 0.03 * torch.eye(6)), rtol=1e-4, atol=1e-6)


def test_safe_cholesky_jitter_follows_each_blocks_own_scale():
    # singular blocks [[a, a], [a, a]] of mean diagonal 4 and 0.25 beside a block of mean diagonal 150; with jitter
    # ε = 1e-6·a on the block's own diagonal, L₁₁² = (a + ε) − a²/(a + ε) ≈ 2ε, to ~9% in fp32 (see above)
    B = torch.tensor([[[4.0, 4.0], [4.0, 4.0]], [[0.25, 0.25], [0.25, 0.25]], [[200.0, 50.0], [50.0, 100.0]]])
    L = obs._safe_cholesky(B)
    assert float(L[0, 1, 1]) ** 2 == pytest.approx(2 * 4e-6, rel=0.25)
    assert float(L[1, 1, 1]) ** 2 == pytest.approx(2 * 0.25e-6, rel=0.25)
    torch.testing.assert_close(L[2] @ L[2].T, B[2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(obs._safe_cholesky(B[1]), L[1])  # one block, as prune_channels passes it


def test_approximate_error_from_the_factor_alone():
    Hinv = torch.linalg.inv(FIXED_H)
    blocks = torch.stack([Hinv[:2, :2], Hinv[2:, 2:]])
    scores = obs.group_errors(FIXED_W, torch.linalg.cholesky(blocks), 2, "approx")  # the lower factor's diagonal
    assert scores.tolist() == pytest.approx(_authors_formula(FIXED_W, FIXED_H), rel=1e-5)


def test_channel_group_defaults_are_the_authors(monkeypatch):
    g = torch.Generator().manual_seed(15)
    W = torch.randn(2, 600, generator=g)
    H = torch.eye(600) + 0.01 * torch.ones(600, 600)
    # 580 channels: bs₀ = (580 − 512)//2 = 34, below the floor of 64, so groups of 64 and a rest of 4
    res = obs.prune_channels(W, H, n_remove=580)
    assert res.steps == [64] * 9 + [4] and res.damping == 0.01
    # the ceiling shows only from k ≥ 2·1024 + 512 channels (seconds of work): the sizes are asked with it
    import inspect
    asked, real = [], obs.dynamic_group_sizes
    bind = inspect.signature(real).bind
    monkeypatch.setattr(obs, "dynamic_group_sizes", lambda *a, **k: asked.append(dict(bind(*a, **k).arguments))
                        or real(*a, **k))
    obs.prune_channels(W, H, n_remove=3)
    assert asked == [{"n_remove": 3, "floor": 64, "ceiling": 1024}]


@pytest.mark.parametrize("B", [[[1.0, 2.0], [2.0, 1.0]],  # indefinite (eigenvalues 3, −1): fails at the 2nd pivot
                               [[-1.0, 0.0], [0.0, 1.0]]])  # fails at the first pivot (cholesky_ex's info = 1)
def test_a_block_singular_beyond_the_jitter_is_one_sentence(B):
    with pytest.raises(SlimGPTError) as caught:
        obs._safe_cholesky(torch.tensor([B]))
    assert str(caught.value) == ("the calibration statistics are too close to singular to prune these units: raise "
                                 "--damp or use more calibration samples")


def test_approx_mode_scores_the_jittered_factor():
    """A block that needs the jitter: the approximate error uses the factor that was computed (and succeeds)."""
    W = torch.tensor([[1.0, 2.0, 0.5, 0.25]])
    blocks = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]])  # the first block is singular
    L = obs._safe_cholesky(blocks)
    scores = obs.group_errors(W, L, 2, "approx")
    d = L.diagonal(dim1=-2, dim2=-1)
    assert scores.tolist() == pytest.approx([(1.0 / d[0, 0] ** 2 + 4.0 / d[0, 1] ** 2).item(),
                                             (0.25 / d[1, 0] ** 2 + 0.0625 / d[1, 1] ** 2).item()])


def test_head_scores_under_an_fp64_default_dtype_stay_fp32():
    W, X = _problem()
    H = _hessian(X)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        res = obs.prune_head_groups(W, H, group=4, n_remove=1)
    finally:
        torch.set_default_dtype(before)
    assert res.weight.dtype == torch.float32 and len(res.first_scores) == 6


def test_one_group_obs_removal_is_the_least_squares_fit_for_every_caller():
    """The core and its two wrappers: the weights left are the least-squares fit on the kept inputs (fp64
    lstsq, independent of OBS), the error is what that fit loses; the pruner's and the variants' weights are the
    same bits, the curves' fused form differs from them by rounding only and leaves H⁻¹ downdated."""
    W, X = _problem(seed=3, out=10, units=8, group=3)
    H = _hessian(X)
    Wd, Hinv, _ = obs.damped_inverse(W, H, 0.0)
    cols = torch.tensor([2, 5, 6, 11])
    L = torch.linalg.cholesky(Hinv[cols][:, cols])
    error = float(obs.exact_error(L, Wd[:, cols]))
    assert error == pytest.approx(_least_squares_removal_error(W, X, cols.tolist()), rel=1e-3)
    pruned, pruned_inv = Wd.clone(), Hinv.clone()
    obs.remove_columns(pruned, pruned_inv, cols, L)
    assert (pruned[:, cols] == 0).all() and (pruned_inv[:, cols] == 0).all()
    assert _measured(W, pruned, X) == pytest.approx(error, rel=1e-3)
    variant = obs.removed_weights(Wd, Hinv, cols)
    assert torch.equal(variant, pruned) and torch.equal(Hinv, obs.damped_inverse(W, H, 0.0)[1])  # H⁻¹ untouched
    fused, fused_inv = Wd.clone(), Hinv.clone()
    assert obs.remove_and_measure(fused, fused_inv, cols) == error
    live = [c for c in range(W.shape[1]) if c not in set(cols.tolist())]
    # fp32 products of 24 terms of size ~|W|·|X|: a few ulps of the largest weight
    torch.testing.assert_close(fused[:, live], pruned[:, live], rtol=1e-5, atol=1e-5 * float(Wd.abs().max()))
    torch.testing.assert_close(fused_inv[live][:, live], pruned_inv[live][:, live], rtol=1e-5,
                               atol=1e-5 * float(Hinv.abs().max()))
    assert fused[:, cols].abs().max() < 1e-4 * float(Wd.abs().max())  # rounding noise, not zeroed
    assert (fused[:, cols] != 0).any()


class _Allocations(TorchDispatchMode):
    """The element counts of the tensors each out-of-place ATen op makes (in-place ops, `…_`, make none)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not name.endswith("_"):
            self.made += [(name, t.numel()) for t in (out if isinstance(out, (tuple, list)) else (out,))
                          if isinstance(t, torch.Tensor)]
        return out


def test_the_curves_removal_makes_no_temporary_of_the_weights_or_inverse_size():
    """The error curves' greedy passes remove one group at a time from large matrices: the fused form subtracts the
    product in place (on this CPU it gives the unfused form's bits, so only the memory it takes tells them apart)."""
    W, X = _problem(seed=3, out=10, units=8, group=3)
    Wd, Hinv, _ = obs.damped_inverse(W, _hessian(X), 0.0)
    cols = torch.tensor([2, 5, 6, 11])
    fused, fused_inv, L = Wd.clone(), Hinv.clone(), torch.linalg.cholesky(Hinv[cols][:, cols])
    with _Allocations() as ops:
        obs.remove_and_measure(fused, fused_inv, cols)
    assert ops.made and max(n for _, n in ops.made) < min(Wd.numel(), Hinv.numel()), ops.made
    with _Allocations() as ops:  # the pruner's form, for contrast: W_Q X is a temporary of W's size
        obs.remove_columns(Wd, Hinv, cols, L)
    assert max(n for _, n in ops.made) >= Wd.numel()
