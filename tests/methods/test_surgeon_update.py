"""Why the specified row+column update wrecks heads mode, and the dead-rows update that replaced it
(docs/surgeon.md, "The row updates in heads mode").

The exact case: a linear FFN f(x) = D U x under the squared error to the dense output. With one matrix
fixed the loss is exactly quadratic in the other, with Kronecker curvature G_U ⊗ A_U = DᵀD ⊗ E[xxᵀ] for U and
I ⊗ E[hhᵀ] (h = Ux) for D, so every KFAC formula is exact block by block, and the loss after an update can
be computed directly, independently of kfac.py."""
import pytest
import torch

from slimgpt_core.methods import kfac
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.settings import SurgeonSettings

NONE = torch.zeros(0, dtype=torch.long)


def _linear_ffn(seed, n=8, m=6, p=9, samples=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g,
                                                                               dtype=torch.float64)
    U = torch.randn(m, n, generator=g, dtype=torch.float64)
    D = torch.randn(p, m, generator=g, dtype=torch.float64)
    H = X @ U.T
    factors = {"A_U": X.T @ X / samples, "G_U": D.T @ D, "A_D": H.T @ H / samples, "G_D": torch.eye(p).double()}

    def loss(U2, D2):  # ½ E‖D'U'x − DUx‖²: the true loss of the changed pair, no KFAC involved
        return float(0.5 * ((X @ U2.T @ D2.T - X @ U.T @ D.T) ** 2).sum(1).mean())
    return U, D, factors, loss


@pytest.mark.parametrize("seed", range(6))
def test_removing_a_channel_from_both_sides_overcompensates(seed):
    """Channel j leaves U (row j) and D (column j). The column update of D alone gives exactly the loss the
    column cost predicts, and row j of U is then dead (zeroing it changes nothing). Adding the row update of U
    (the specified update) compensates the same loss a second time, through the other channels, whose new
    activations the column update of D never saw: the true loss goes up."""
    U, D, f, loss = _linear_ffn(seed)
    j = torch.tensor([2])
    A_D_inv = kfac.inverse(kfac.damped(f["A_D"], 1e-9))
    G_U_inv = kfac.inverse(kfac.damped(f["G_U"], 1e-9))
    D_col = kfac.remove(D, NONE, j, None, A_D_inv)  # column update of D
    U_dead = U.clone()
    U_dead[j] = 0.0
    U_rows = kfac.remove(U, j, NONE, G_U_inv, None)  # row update of U

    column_cost = kfac.column_set_cost(D, f["G_D"], A_D_inv, j)
    assert loss(U_dead, D_col) == pytest.approx(column_cost, rel=1e-6)  # the column cost is the whole story
    assert loss(U_dead, D_col) == pytest.approx(loss(U, D_col), rel=1e-12)  # row j of U is dead
    both = loss(U_rows, D_col)
    assert both > 1.15 * loss(U_dead, D_col)
    # the summed block costs that ranked the unit overstate what removing it really costs
    summed = column_cost + kfac.row_set_cost(U, f["A_U"], G_U_inv, j)
    assert summed > 1.5 * loss(U_dead, D_col)


@pytest.mark.parametrize("seed", range(4))
def test_row_update_through_a_rank_deficient_G_is_cheap_on_paper_and_ruinous(seed):
    """Twice as many channels as outputs (as gate/up of SmolLM2, 1536 wide, against 896 calibration tokens):
    G_U = DᵀD is singular, held up only by the 0.01·mean(diag) damping. The row cost says removing row j is
    nearly free, because the other rows can reproduce its output in the directions G sees; the update that
    does it wrecks everything else, while the dead-rows update stays at the column cost."""
    U, D, f, loss = _linear_ffn(seed, n=8, m=12, p=6)
    j = torch.tensor([2])
    G_U_inv = kfac.inverse(kfac.damped(f["G_U"], 0.01))
    A_D_inv = kfac.inverse(kfac.damped(f["A_D"], 0.01))
    D_col = kfac.remove(D, NONE, j, None, A_D_inv)
    U_rows = kfac.remove(U, j, NONE, G_U_inv, None)
    U_dead = U.clone()
    U_dead[j] = 0.0
    assert kfac.row_set_cost(U, f["A_U"], G_U_inv, j) < 0.05 * loss(U_dead, D)  # "almost free" …
    assert loss(U_rows, D_col) > 50 * loss(U_dead, D_col)  # … and ruinous


# --- the driver on stories260k ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_tokens():
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    return calibration_tokens(load_model("stories260k").tokenizer, "tinystories", 16, 64)


def _pruned(tokens, update, method="surgeon", ratio=0.3):
    from slimgpt_core.models import load_model
    loaded = load_model("stories260k")
    report = prune_model(loaded.model, tokens, PruneSettings(ratio=ratio, method=method, device="cpu",
                                                             surgeon=SurgeonSettings(shots=1, surgeon_update=update)))
    return loaded.model, report


def _rows_kept_verbatim(dense_w, w):
    """Whether every row of `w` is a row of `dense_w`, unchanged."""
    return bool((w[:, None, :] == dense_w[None, :, :]).all(-1).any(1).all())


def test_default_update_leaves_the_rows_and_compensates_the_columns(stories_tokens):
    from slimgpt_core.models import load_model
    dense = load_model("stories260k").model.model.layers
    model, _ = _pruned(stories_tokens, "dead-rows")
    assert PruneSettings().surgeon.surgeon_update == "dead-rows"
    changed_columns = 0
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert _rows_kept_verbatim(getattr(dense[i].self_attn, name).weight, getattr(layer.self_attn, name).weight)
        for name in ("gate_proj", "up_proj"):
            assert _rows_kept_verbatim(getattr(dense[i].mlp, name).weight, getattr(layer.mlp, name).weight)
        if layer.mlp.down_proj.in_features < dense[i].mlp.down_proj.in_features:
            changed_columns += int(not torch.equal(layer.mlp.down_proj.weight,
                                                   dense[i].mlp.down_proj.weight[:, :layer.mlp.down_proj.in_features]))
    assert changed_columns > 0
    both, _ = _pruned(stories_tokens, "both")
    assert not all(_rows_kept_verbatim(d.mlp.gate_proj.weight, b.mlp.gate_proj.weight)
                   for d, b in zip(dense, both.model.layers))


def test_dead_rows_beats_the_specified_update_and_kobd_on_held_out_loss(stories_tokens):
    """Real model, one shot to 30% of the decoder-layer parameters: the held-out loss the report records."""
    loss = {u: _pruned(stories_tokens, u)[1].shots[-1].heldout_loss for u in ("dead-rows", "both")}
    loss["kobd"] = _pruned(stories_tokens, "dead-rows", method="kobd")[1].shots[-1].heldout_loss
    assert loss["dead-rows"] < loss["both"] and loss["dead-rows"] < loss["kobd"]


def test_kobd_drop_costs_are_the_kronecker_loss_of_zeroing_without_update():
    """K-OBD (the authors' OBD costs): the cost of a unit is ½ vec(ΔW)ᵀ(G⊗A)vec(ΔW) for ΔW = −W on the unit and
    0 elsewhere, from the explicit Kronecker matrix."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    X = torch.randn(30, 8, generator=g, dtype=torch.float64)
    Y = torch.randn(30, 6, generator=g, dtype=torch.float64)
    A, G = X.T @ X / 30, Y.T @ Y / 30
    F = torch.kron(G, A)
    rows, cols = kfac.row_drop_costs(W, A, G, group=2), kfac.column_drop_costs(W, G, A, group=4)
    for u in range(3):
        d = torch.zeros_like(W)
        d[2 * u:2 * u + 2] = -W[2 * u:2 * u + 2]
        assert float(rows[u]) == pytest.approx(float(0.5 * d.flatten() @ F @ d.flatten()), rel=1e-10)
    for u in range(2):
        d = torch.zeros_like(W)
        d[:, 4 * u:4 * u + 4] = -W[:, 4 * u:4 * u + 4]
        assert float(cols[u]) == pytest.approx(float(0.5 * d.flatten() @ F @ d.flatten()), rel=1e-10)
