"""LLM Surgeon's Kronecker math (kfac.py) and curvature collection (curvature.py), edge by edge: the cases
the mutation pass (tools/mutation.py, docs/testing.md) showed untested. Each against an independent computation:
explicit sums over tokens in fp64, torch.linalg.inv of the jittered matrix, autograd through the model."""
import pytest
import torch

from tests.device_moves import DeviceMoves
from tests.tiny_models import tiny_model
from tests.kfac_reference import assert_factors_close, assert_gram_close, factors_by_autograd
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods import kfac
from slimgpt_core.methods.curvature import CurvatureCollector, factor_bytes, next_token_loss

NONE = torch.zeros(0, dtype=torch.long)


def _with_eigenvalues(eigenvalues, seed=0):
    """Q diag(λ) Qᵀ for a random orthogonal Q, fp64."""
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


# --- factors -----------------------------------------------------------------------------------------------

def test_factor_is_the_fp32_mean_of_outer_products_wherever_it_is_kept():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g)]
    acc = kfac.FactorAccumulator(4)  # default: CPU
    for b in batches:
        acc.add(b)
    rows = torch.cat([b.reshape(-1, 4).double() for b in batches])  # 7 rows, [batch, tokens, dim] flattened
    assert acc.count == 7
    # fp32: each fp64 entry rounded (2u per product), 7 products summed (7u), divided by 7 (u): at most 10u of
    # the mean |x_i x_j| ≤ sqrt(F_ii F_jj), whatever the summation order (u = 2⁻²⁴)
    assert_gram_close(acc.mean.double(), rows.T @ rows / 7, rtol=0, scaled_atol=10 * 2**-24)
    one = kfac.FactorAccumulator(4)
    one.add(batches[1])
    torch.testing.assert_close(one.mean, batches[1].T @ batches[1])  # one row: divided by 1
    assert torch.equal(kfac.FactorAccumulator(3).mean, torch.zeros(3, 3))  # nothing seen: zeros, no nan
    torch.set_default_dtype(torch.float64)
    try:
        assert kfac.FactorAccumulator(4).sum.dtype == torch.float32  # fp32 whatever the default dtype
    finally:
        torch.set_default_dtype(torch.float32)
    on_meta = kfac.FactorAccumulator(4, "meta")
    on_meta.add(batches[0])  # a CPU batch goes to the factor's device
    assert on_meta.mean.device.type == "meta" and on_meta.count == 6


def test_damping_default_and_factors_with_no_signal():
    F_ = _with_eigenvalues([0.2, 0.5, 0.8])  # mean diagonal 0.5: below 1
    torch.testing.assert_close(kfac.damped(F_), F_ + 0.005 * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(kfac.damped(torch.zeros(3, 3)), torch.eye(3, dtype=torch.float64))  # dead: identity
    assert kfac.damped(torch.zeros(0, 0)).shape == (0, 0)
    before = F_.clone()
    kfac.damped(F_, 0.3)
    assert torch.equal(F_, before)  # the caller's fp64 factor is not changed in place


@pytest.mark.parametrize("jitter", [1e-10, 1e-8, 1e-6, 1e-4])
def test_inverse_adds_the_first_jitter_that_makes_the_factor_definite(jitter):
    """A factor whose smallest eigenvalue is −½·jitter·mean|diag| (rounding, or no damping) is inverted with
    exactly that jitter: the smaller ones leave it indefinite, and a larger one would give another inverse."""
    base = _with_eigenvalues([1.0, 2.0, 3.0, 4.0, 5.0, 0.0], seed=1) * 3.7
    scale = float(base.diagonal().abs().mean())
    F_ = base - 0.5 * jitter * scale * torch.eye(6, dtype=torch.float64)
    expect = torch.linalg.inv(F_ + jitter * scale * torch.eye(6, dtype=torch.float64))
    # condition number up to 4e10 (jitter 1e-10): fp64 inverses agree to a few cond·2⁻⁵³ (1e-4 measured)
    torch.testing.assert_close(kfac.inverse(F_), expect, rtol=1e-3, atol=0)


def test_inverse_refuses_a_factor_no_jitter_makes_definite():
    F_ = _with_eigenvalues([1.0, 2.0, -1e-3], seed=2)
    with pytest.raises(SlimGPTError, match="^a curvature factor is not positive definite even with damping: use "
                                           "more calibration samples or more damping$"):
        kfac.inverse(F_)


def test_singular_blocks_get_a_relative_jitter_in_costs_and_updates():
    """[G⁻¹]_RR blocks singular to rounding: every block of the batch gets 1e-12·its mean |diagonal|."""
    g = torch.Generator().manual_seed(3)
    good = _with_eigenvalues([1.0, 2.0, 3.0], seed=4) * 2.5
    bad = _with_eigenvalues([1.0, 0.0, 4.0], seed=5) * 0.3 - 1e-14 * torch.eye(3, dtype=torch.float64)
    G_inv = torch.block_diag(good, bad, good)  # three units of three rows, the middle one singular
    W = torch.randn(9, 5, generator=g, dtype=torch.float64)
    A = _with_eigenvalues([1.0, 2.0, 0.5, 1.5, 3.0], seed=6)
    costs = kfac.row_unit_costs(W, A, G_inv, group=3)
    for u in range(3):
        B = G_inv[3 * u:3 * u + 3, 3 * u:3 * u + 3]
        B = B + 1e-12 * float(B.diagonal().abs().mean()) * torch.eye(3, dtype=torch.float64)
        WR = W[3 * u:3 * u + 3]
        assert float(costs[u]) == pytest.approx(float(0.5 * torch.trace(torch.linalg.inv(B) @ WR @ A @ WR.T)),
                                                rel=1e-2)  # 1/λ with λ ≈ 5e-13: 1e-4 of rounding
    # one set: the row update through a singular block (dense G⁻¹ so the other rows see it)
    G_inv = torch.ones(3, 3, dtype=torch.float64) + torch.diag(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    G_inv[2, 0] = G_inv[0, 2] = 0.5  # rows {0, 1}: block [[1, 1], [1, 1]], singular
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 1])
    B = G_inv[:2, :2] + 1e-12 * torch.eye(2, dtype=torch.float64)
    expect = -G_inv[:, :2] @ torch.linalg.inv(B) @ W[:2]
    torch.testing.assert_close(kfac.row_update(W, G_inv, rows), expect, rtol=1e-2, atol=0)
    with pytest.raises(SlimGPTError, match="not positive definite"):
        kfac.row_set_cost(W, torch.eye(4), -torch.eye(3), rows)


def test_units_must_split_evenly_and_default_to_single_rows_and_columns():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    A = _with_eigenvalues([1.0, 2.0, 3.0, 4.0], seed=8)
    G = _with_eigenvalues([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], seed=9)
    torch.testing.assert_close(kfac.row_drop_costs(W, A, G), 0.5 * ((W @ A) * W).sum(1) * G.diagonal())
    torch.testing.assert_close(kfac.column_drop_costs(W, G, A), 0.5 * ((G @ W) * W).sum(0) * A.diagonal())
    for rows_fn, args in [(kfac.row_unit_costs, (A, G)), (kfac.row_drop_costs, (A, G))]:
        with pytest.raises(SlimGPTError, match="^6 rows do not split into groups of 4$"):
            rows_fn(W, *args, group=4)
    for cols_fn, args in [(kfac.column_unit_costs, (G, A)), (kfac.column_drop_costs, (G, A))]:
        with pytest.raises(SlimGPTError, match="^4 columns do not split into groups of 3$"):
            cols_fn(W, *args, group=3)
    # no rows or columns: no update
    assert torch.equal(kfac.row_update(W, G, NONE), torch.zeros_like(W))
    assert torch.equal(kfac.column_update(W, A, NONE), torch.zeros_like(W))


# --- curvature collection ------------------------------------------------------------------------------------

def _true_labels(model, tokens, generator=None):
    with torch.no_grad():
        probs = model(tokens).logits[:, :-1].float().softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(tokens.shape[0], -1)


def test_true_fisher_samples_labels_from_the_model_with_the_seeded_generator(tokens):
    model = tiny_model(layers=2)
    labels = _true_labels(model, tokens, torch.Generator().manual_seed(0))  # the default seed
    A, G = CurvatureCollector(model, "cpu").run(tokens, batch_size=len(tokens), fisher="true")
    assert_factors_close(A, G, *factors_by_autograd(model, tokens, labels))
    # sub-sampling every position is no sub-sampling: the same labels, nothing else drawn
    A2, G2 = CurvatureCollector(model, "cpu", positions=tokens.shape[1]).run(tokens, len(tokens), "true")
    assert all(torch.equal(G[1][n], G2[1][n]) for n in G[1])
    with pytest.raises(SlimGPTError, match="^the Fisher must be 'empirical' or 'true', got 'fisher'$"):
        next_token_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), "fisher")
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    by_hand = sum(-logits[s, t].log_softmax(-1)[ids[s, t + 1]] for s in range(2) for t in range(3)) / 3
    assert float(next_token_loss(logits, ids)) == pytest.approx(float(by_hand), rel=1e-6)  # empirical default


def test_the_curvature_forward_builds_no_key_value_cache(tokens):
    """Every layer's K/V of the batch would stay alive beside the autograd graph: the forward asks for no cache."""
    model = tiny_model(layers=2)
    model.config.use_cache = True  # as in real checkpoints (SmolLM2, LLaMA)
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append(out.past_key_values), with_kwargs=True)
    CurvatureCollector(model, "cpu").run(tokens[:2], batch_size=2)
    assert seen == [None]


def test_sampled_positions_are_the_same_for_A_and_G_in_every_sequence(tokens):
    """5 of 24 positions per sequence, drawn by the collector's seeded generator (randperm per sequence)."""
    model = tiny_model(layers=2)
    g = torch.Generator().manual_seed(4)
    S = tokens.shape[1]
    rows = torch.cat([torch.randperm(S, generator=g)[:5] + r * S for r in range(len(tokens))]).sort().values
    A, G = CurvatureCollector(model, "cpu", positions=5, seed=4).run(tokens, batch_size=len(tokens))
    assert_factors_close(A, G, *factors_by_autograd(model, tokens, rows=rows))


def test_progress_factor_bytes_and_factors_on_the_asked_device(tokens):
    model = tiny_model(layers=2)
    calls = []
    collector = CurvatureCollector(model, "meta")
    A, G = collector.run(tokens[:11], batch_size=5, progress=lambda b, n: calls.append((b, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and all(type(n) is int for _, n in calls)
    assert {t.device.type for layer in A + G for t in layer.values()} == {"meta"}
    assert collector.G[1]["down_proj"].count == 11 * 24
    h, f, kv = 32, 48, 2 * 8  # hidden, FFN width, k/v outputs (2 KV heads of 8)
    per_layer = 3 * h * h + f * f + (h * h + 2 * kv * kv + h * h + 2 * f * f + h * h)  # A: q, o, gate, down; G
    assert factor_bytes(model) == 4 * 2 * per_layer


def test_ids_go_to_the_model_device_and_the_global_generator_samples_there(tokens):
    """The embedding's weight is on meta (standing for a GPU): each batch's ids are sent there (recorded, not
    made) and the true-Fisher labels come from the global generator, since a CPU one cannot sample there."""
    model = tiny_model(layers=2)

    class MetaEmbedding(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.weight = inner, torch.nn.Parameter(torch.empty(1, device="meta"))

        def forward(self, ids):
            return self.inner(ids)

    class Elsewhere(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.model, self.embed = inner, inner.model, MetaEmbedding(inner.get_input_embeddings())

        def get_input_embeddings(self):
            return self.embed

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    torch.manual_seed(11)
    labels = _true_labels(model, tokens)
    torch.manual_seed(11)
    with DeviceMoves(pretend="meta") as moves:
        A, G = CurvatureCollector(Elsewhere(model), "cpu").run(tokens, batch_size=len(tokens), fisher="true")
    assert [m for m in moves.moves if m is not None and m.type == "meta"] == [torch.device("meta")]
    assert_factors_close(A, G, *factors_by_autograd(model, tokens, labels))
