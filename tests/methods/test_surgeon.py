"""LLM Surgeon (SPEC §8, issue 17): KFAC math against explicit Kronecker computations, the curvature hooks
against torch.autograd.grad, and the driver on stories260k."""
import json

import pytest
import torch

from tests.tiny_models import tiny_model
from tests.kfac_reference import assert_factors_close, factors_by_autograd
from slimgpt_core.methods import kfac
from slimgpt_core.methods import obs
from slimgpt_core.cli import main
from slimgpt_core.methods.curvature import LINEARS, CurvatureCollector, factor_bytes
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.settings import SurgeonSettings
from slimgpt_core.base import devices
from slimgpt_core.methods.surgeon import check_memory, rows_threshold, select_heads, zero_fraction, _Unit


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return X.T @ X / (3 * n) + 0.05 * torch.eye(n, dtype=torch.float64)


def _problem(out=6, n_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g, dtype=torch.float64), _spd(out, seed + 1), _spd(n_in, seed + 2)


def _brute_force(W, G, A, fixed_mask):
    """The minimiser of ½ vec(ΔW)ᵀ(G⊗A)vec(ΔW) with ΔW = −W on `fixed_mask`, from the explicit Kronecker
    matrix (row-major vec) by eliminating the free entries; returns (ΔW, its cost)."""
    Fk = torch.kron(G, A)
    s = fixed_mask.flatten()
    v = torch.zeros(W.numel(), dtype=torch.float64)
    v[s] = -W.flatten()[s]
    free = ~s
    v[free] = -torch.linalg.solve(Fk[free][:, free], Fk[free][:, s] @ v[s])
    return v.view_as(W), float(0.5 * v @ Fk @ v)


def test_row_set_cost_and_update_are_the_constrained_kronecker_minimiser():
    W, G, A = _problem()
    rows = torch.tensor([1, 4])
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[rows] = True
    dW, cost = _brute_force(W, G, A, mask)
    G_inv = torch.linalg.inv(G)
    assert kfac.row_set_cost(W, A, G_inv, rows) == pytest.approx(cost, rel=1e-9)
    torch.testing.assert_close(kfac.row_update(W, G_inv, rows), dW, rtol=1e-9, atol=1e-10)
    assert kfac.kronecker_cost(dW, G, A) == pytest.approx(cost, rel=1e-9)


def test_column_set_cost_and_update_are_the_constrained_kronecker_minimiser():
    W, G, A = _problem(seed=3)
    cols = torch.tensor([0, 2, 3])
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, cols] = True
    dW, cost = _brute_force(W, G, A, mask)
    A_inv = torch.linalg.inv(A)
    assert kfac.column_set_cost(W, G, A_inv, cols) == pytest.approx(cost, rel=1e-9)
    torch.testing.assert_close(kfac.column_update(W, A_inv, cols), dW, rtol=1e-9, atol=1e-10)
    new = kfac.remove(W, torch.tensor([], dtype=torch.long), cols, None, A_inv)
    assert bool((new[:, cols] == 0).all())
    torch.testing.assert_close(new, W + dW, rtol=1e-9, atol=1e-10)
    # rows and columns together: both updates from the same W, summed; columns-only drops the row update
    rows = torch.tensor([2])
    G_inv = torch.linalg.inv(G)
    both = kfac.remove(W, rows, cols, G_inv, A_inv)
    expect = W + kfac.row_update(W, G_inv, rows) + dW
    expect[rows], expect[:, cols] = 0.0, 0.0
    torch.testing.assert_close(both, expect, rtol=1e-9, atol=1e-10)
    only_cols = kfac.remove(W, rows, cols, G_inv, A_inv, update_rows=False)
    expect = W + dW
    expect[rows], expect[:, cols] = 0.0, 0.0
    torch.testing.assert_close(only_cols, expect, rtol=1e-9, atol=1e-10)


def test_batched_unit_costs_equal_set_costs_and_cholesky_inverse():
    W, G, A = _problem(out=8, n_in=6, seed=5)
    G_inv, A_inv = kfac.inverse(G), kfac.inverse(A)
    torch.testing.assert_close(G_inv, torch.linalg.inv(G), rtol=1e-9, atol=1e-9)
    rows = kfac.row_unit_costs(W, A, G_inv, group=2)
    cols = kfac.column_unit_costs(W, G, A_inv, group=3)
    for u in range(4):
        assert float(rows[u]) == pytest.approx(kfac.row_set_cost(W, A, G_inv, torch.arange(2 * u, 2 * u + 2)))
    for u in range(2):
        assert float(cols[u]) == pytest.approx(kfac.column_set_cost(W, G, A_inv, torch.arange(3 * u, 3 * u + 3)))
    # single units: the paper's ½ W_r A W_rᵀ / [G⁻¹]_rr and ½ W_cᵀ G W_c / [A⁻¹]_cc
    single = kfac.row_unit_costs(W, A, G_inv)
    torch.testing.assert_close(single, 0.5 * ((W @ A) * W).sum(1) / G_inv.diagonal())
    single = kfac.column_unit_costs(W, G, A_inv)
    torch.testing.assert_close(single, 0.5 * ((G @ W) * W).sum(0) / A_inv.diagonal())


def test_damping_is_a_fraction_of_the_mean_diagonal():
    F_ = _spd(5, 9)
    torch.testing.assert_close(kfac.damped(F_, 0.01), F_ + 0.01 * F_.diagonal().mean() * torch.eye(5, dtype=F_.dtype))


def test_identity_G_reduces_to_layerwise_column_obs():
    """With G = I the column costs are half the OBS group errors and the column update is OBS's (obs.py)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g) @ torch.randn(24, 24, generator=g)
    W = torch.randn(10, 24, generator=g)
    H = 2 * X.T @ X / 300
    I = torch.eye(10, dtype=torch.float64)
    A_inv = kfac.inverse(kfac.damped(H, 0.01))
    ref = obs.prune_head_groups(W, H, group=4, n_remove=1, damp=0.01)
    costs = kfac.column_unit_costs(W, I, A_inv, group=4)
    torch.testing.assert_close(2 * costs.float(), torch.tensor(ref.first_scores), rtol=1e-4, atol=1e-5)
    unit = int(costs.argmin())
    assert unit == ref.removed[0]
    cols = torch.arange(4 * unit, 4 * unit + 4)
    torch.testing.assert_close(kfac.remove(W, torch.tensor([], dtype=torch.long), cols, None, A_inv).float(),
                               ref.weight, rtol=1e-4, atol=1e-4)
    # several single columns in one solve = OBS removing them as one group
    ref = obs.prune_channels(W, H, 5, damp=0.01, floor=5, ceiling=5)
    cols = kfac.column_unit_costs(W, I, A_inv).topk(5, largest=False).indices.sort().values
    assert cols.tolist() == sorted(ref.removed)
    torch.testing.assert_close(kfac.remove(W, torch.tensor([], dtype=torch.long), cols, None, A_inv).float(),
                               ref.weight, rtol=1e-4, atol=1e-4)


def test_hooks_give_the_covariance_of_output_gradients_from_autograd(tokens):
    model = tiny_model()
    collector = CurvatureCollector(model, "cpu")
    A, G = collector.run(tokens, batch_size=5)
    assert all(p.grad is None for p in model.parameters())  # activation gradients only
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    A_ref, G_ref = factors_by_autograd(model, tokens)  # independently: kept inputs, autograd output gradients
    assert_factors_close(A, G, A_ref, G_ref)
    assert set(G[0]) == set(LINEARS) and set(A[0]) == {"q_proj", "o_proj", "gate_proj", "down_proj"}


def test_position_subsampling_and_true_fisher(tokens):
    model = tiny_model()
    collector = CurvatureCollector(model, "cpu", positions=5)
    A, G = collector.run(tokens, batch_size=4, fisher="true")
    assert collector.A[0]["q_proj"].count == tokens.shape[0] * 5 == collector.G[0]["down_proj"].count
    _, G_emp = CurvatureCollector(model, "cpu", positions=5).run(tokens, batch_size=4)
    assert not torch.allclose(G[1]["down_proj"], G_emp[1]["down_proj"])  # sampled labels, another Fisher
    assert float(torch.linalg.eigvalsh(G[1]["down_proj"].double()).min()) > -1e-9


def test_factor_bytes_of_smollm2_shapes():
    """SPEC §8: SmolLM2-135M's factors are about 1.1 GB in fp32."""
    model = tiny_model(heads=9, kv=3, layers=1, ffn=1536, hidden=576)
    assert 30 * factor_bytes(model) == pytest.approx(1.1e9, rel=0.03)


def test_global_threshold_counts_overlapping_rows_and_columns():
    g = torch.Generator().manual_seed(0)
    costs = [(torch.rand(7, generator=g), torch.rand(5, generator=g)), (torch.rand(4, generator=g),
                                                                        torch.rand(9, generator=g))]
    for budget in (1, 10, 30, 50, 63):
        tau = rows_threshold(costs, budget)
        masks = []
        for r, c in costs:
            m = torch.zeros(len(r), len(c), dtype=torch.bool)
            m[r <= tau] = True
            m[:, c <= tau] = True
            masks.append(m)
        removed = sum(int(m.sum()) for m in masks)
        assert removed >= budget
        below = max(float(x.max()) for r, c in costs for x in (r[r < tau], c[c < tau]) if len(x)) \
            if tau > min(float(min(r.min(), c.min())) for r, c in costs) else None
        if below is not None:  # one step lower would not have been enough: the threshold is the smallest
            assert sum(int(((r <= below)[:, None] | (c <= below)[None, :]).sum()) for r, c in costs) < budget


def test_selection_keeps_one_unit_per_layer_and_fills_the_budget():
    units = [_Unit(0.1 * k, 0, "kv", k, 10) for k in range(3)] + [_Unit(0.05 * (k + 1), 1, "ffn", k, 3)
                                                                for k in range(4)]
    chosen = select_heads(units, budget=100, alive_kv=[3, 1], alive_ffn=[2, 4])
    assert sum(u.layer == 0 and u.kind == "kv" for u in chosen) == 2
    assert sum(u.layer == 1 and u.kind == "ffn" for u in chosen) == 3
    chosen = select_heads(units, budget=12, alive_kv=[3, 1], alive_ffn=[2, 4])
    assert [u.cost for u in chosen] == [0.0, 0.05]  # cheapest first, stops once the budget is met


# --- the driver on the real tiny model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    loaded = load_model("stories260k")
    return loaded, calibration_tokens(loaded.tokenizer, "tinystories", 9, 64)


def _fresh(stories):
    from slimgpt_core.models import load_model
    return load_model("stories260k")


def test_rows_mode_zeroes_the_requested_fraction_and_keeps_the_shape(stories):
    loaded = _fresh(stories)
    before = sum(p.numel() for p in loaded.model.parameters())
    report = prune_model(loaded.model, stories[1], PruneSettings(
        ratio=0.3, method="surgeon", device="cpu", surgeon=SurgeonSettings(shots=2, surgeon_units="rows")))
    assert sum(p.numel() for p in loaded.model.parameters()) == before  # not a smaller model
    zeros = zero_fraction(loaded.model.model.layers)
    assert 0.3 <= zeros < 0.31 and report.shots[-1].removed_fraction == pytest.approx(zeros)
    assert [round(s.target_fraction, 3) for s in report.shots] == [0.0, 0.15, 0.3]
    assert report.shots[1].removed_fraction == pytest.approx(0.15, abs=0.01)


def test_heads_mode_physically_smaller_reloads_with_the_same_logits(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimgpt_core.workspace.store import save_run_at
    loaded = _fresh(stories)
    events = []
    report = prune_model(loaded.model, stories[1], PruneSettings(ratio=0.4, method="surgeon", device="cpu",
                                                                 surgeon=SurgeonSettings(shots=2)),
                         callback=events.append, model_name="stories260k")
    assert report.achieved_layer_ratio == pytest.approx(0.4, abs=0.01)
    assert report.params_after < report.params_before
    last = report.shots[-1]
    assert last.keep_ffn == [layer.mlp.down_proj.in_features for layer in loaded.model.model.layers]
    assert last.heldout_loss > report.shots[0].heldout_loss
    assert any(e.kind == "progress" and "ETA" in e.phase for e in events)
    run = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path / "run")
    reloaded = AutoModelForCausalLM.from_pretrained(run).eval()
    ids = stories[1][:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits)
    saved = json.loads((run / "report.json").read_text())
    assert len(saved["shots"]) == 3 and saved["settings"]["surgeon_units"] == "heads"


def test_kobd_removes_units_without_updating_the_rest(stories):
    kept = {}
    for method in ("surgeon", "kobd"):
        loaded = _fresh(stories)
        prune_model(loaded.model, stories[1], PruneSettings(ratio=0.4, method=method, device="cpu",
                                                            surgeon=SurgeonSettings(shots=1)))
        kept[method] = loaded.model.model.layers[0].mlp.down_proj.weight
    dense = _fresh(stories).model.model.layers[0].mlp.down_proj.weight

    def original_columns(w):
        return (dense.T[:, None, :] == w.T[None, :, :]).all(-1).any(0)
    assert bool(original_columns(kept["kobd"]).all())  # K-OBD: every kept column is an original one
    assert not bool(original_columns(kept["surgeon"]).any())  # LLM Surgeon: all compensated


def test_cancel_between_shots_and_bad_settings(stories):
    loaded = _fresh(stories)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3
    with pytest.raises(JobCancelled):
        prune_model(loaded.model, stories[1], PruneSettings(ratio=0.3, method="surgeon", device="cpu",
                                                            surgeon=SurgeonSettings(shots=3)),
                    should_stop=stop)
    with pytest.raises(SlimGPTError, match="fisher must be empirical or true"):
        prune_model(loaded.model, stories[1], PruneSettings(method="surgeon", surgeon=SurgeonSettings(fisher="exact")))
    with pytest.raises(SlimGPTError, match="surgeon units must be heads or rows"):
        prune_model(loaded.model, stories[1],
                    PruneSettings(method="kobd", surgeon=SurgeonSettings(surgeon_units="cols")))


def test_cli_end_to_end_prints_the_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "9", "--seqlen", "64",
                 "--ratio", "0.3", "--method", "surgeon", "--shots", "2", "--fisher", "true",
                 "--kfac-positions", "32", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["achieved_layer_ratio"] == pytest.approx(0.3, abs=0.01)
    config = json.loads((out / "config.json").read_text())
    assert summary["keep_ffn"] == config.get("layer_intermediate_size", [config["intermediate_size"]] * 5)
    assert len(summary["shots"]) == 3
    # the allocation goes straight back in as a schedule
    assert main(["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "9", "--seqlen", "64",
                 "--keep-heads", ",".join(map(str, summary["keep_heads"])),
                 "--keep-ffn", ",".join(map(str, summary["keep_ffn"])), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params_after"] == summary["params_after"]


def test_budget_for_comparison_equals_what_the_schedule_removes(stories):
    from slimgpt_core.methods.surgeon import schedule_fraction
    loaded = _fresh(stories)
    settings = PruneSettings(ratio=0.5, schedule="log", device="cpu")
    fraction = schedule_fraction(loaded.model, settings)
    report = prune_model(loaded.model, stories[1], settings, use_cache=False)
    assert fraction == pytest.approx(report.achieved_layer_ratio, abs=1e-12)


def test_factors_go_where_they_fit_and_otherwise_one_sentence(monkeypatch):
    """On the device when factors and a forward+backward fit nine tenths of its free memory; on a GPU that cannot
    hold them, on the CPU when the factors alone fit there; else the refusal names both sizes."""
    model = tiny_model()  # hidden 32, 3 layers, FFN 48, vocab 101
    factors = factor_bytes(model)
    acts = 4 * 2 * 16 * (3 * 101 + 24 * 32 * 3 + 4 * 48 * 3)  # batch 2 × 16 tokens, as the docstring's estimate
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    free = {}
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: free[device.type])
    need = factors + acts
    assert 0.9 * (need / 0.9) == need and 0.9 * (factors / 0.9) == factors  # the boundaries below are exact
    free.update(cuda=need / 0.9, cpu=None)
    assert check_memory(model, 2, 16, gpu) == gpu  # exactly nine tenths: fits
    free.update(cuda=need / 0.9 - 2, cpu=factors / 0.9 + 2)
    assert check_memory(model, 2, 16, gpu) == cpu
    free.update(cpu=factors / 0.9)  # the CPU fallback wants room to spare
    with pytest.raises(SlimGPTError) as refused:
        check_memory(model, 2, 16, gpu)
    assert str(refused.value).startswith(f"LLM Surgeon needs {factors / 2**30:.2f} GiB for the KFAC factors")
    free.update(cpu=need / 0.9 - 2)
    with pytest.raises(SlimGPTError):
        check_memory(model, 2, 16, cpu)  # no fallback from the CPU
    free.update(cpu=None)
    assert check_memory(model, 2, 16, cpu) == cpu  # free memory unknown: go on
