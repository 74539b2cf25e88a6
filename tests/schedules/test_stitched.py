"""The variant database (o_proj / down_proj OBS-pruned on dense inputs) against least squares, and the stitched
forward's KL against plain forwards of the model with the variants swapped in."""
import pytest
import torch
from tests.device_moves import DeviceMoves
from tests.tiny_models import auto_search_case

from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.methods.forwards import capture_layer_inputs
from slimgpt_core.methods.statistics import dense_hessians
from slimgpt_core.schedules import stitched


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
    db = stitched.VariantDatabase(model, mc, tokens, damp=0.05, batch_size=5, device="cpu", max_cached=3)
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
    default = stitched.VariantDatabase(model, mc, tokens)  # damping 0.01 by default
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
    db = stitched.VariantDatabase(model, mc, tokens, device="cpu")
    net = stitched.StitchedModel(model, db, fitness, batch_size=2, device="cpu")
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
    rows = net.window_kl(states[-1][[4, 1, 3]], [4, 1, 3])  # one KL per window, each the KL of that window alone
    assert rows.dtype == torch.float64 and rows.shape == (3,)
    for row, sample in zip(rows.tolist(), [4, 1, 3]):
        assert row == pytest.approx(_kl(model, db, kv, ch, fitness, [sample]), rel=1e-4)
    assert net.kl(states[-1][[4, 1, 3]], [4, 1, 3]) == float(rows.mean())
    tail = net.run(kv, ch, 1, states[1])  # from layer 1 on, given its input
    assert len(tail) == 3 and torch.allclose(tail[-1], states[-1], atol=1e-6)
    other = net.run([0, 2, 0], [0, 0, 7], 1, states[1])  # layer 0's removals are not re-applied from layer 1
    assert net.kl(other[-1], list(range(5))) == pytest.approx(_kl(model, db, [1, 2, 0], [5, 0, 7], fitness), rel=1e-4)
    assert net.kl(net.run([0] * 3, [0] * 3)[-1][[0, 2]], [0, 2]) == pytest.approx(0.0, abs=1e-7)
    one = stitched.StitchedModel(model, db, fitness)  # batches of 8 by default: one batch; device "auto"
    assert one.bs == 8 and len(one.dense_logp) == 1
    # the dense side handed over by a forward that already made it (the Fisher's): used as given
    given = [torch.log_softmax(torch.randn(b, fitness.shape[1], 101), -1) for b in (2, 2, 1)]
    handed = stitched.StitchedModel(model, db, fitness, batch_size=2, device="cpu", dense_logp=given)
    assert handed.dense_logp is given
    assert handed.kl(states[-1], list(range(5))) != pytest.approx(net.kl(states[-1], list(range(5))), rel=1e-2)
    with pytest.raises(ValueError, match="^dense_logp is not in batches of batch_size over these tokens$"):
        stitched.StitchedModel(model, db, fitness, batch_size=4, device="cpu", dense_logp=given)
    # the first batch handed over (the fast phase's windows of a larger pool): the others made when a KL needs them
    prefix = stitched.StitchedModel(model, db, fitness, batch_size=2, device="cpu", dense_logp=net.dense_logp[:1])
    assert len(prefix.dense_logp) == 1
    assert prefix.kl(states[-1][[0, 1]], [0, 1]) == net.kl(states[-1][[0, 1]], [0, 1]) and len(prefix.dense_logp) == 1
    assert prefix.kl(states[-1][[2]], [2]) == pytest.approx(_kl(model, db, kv, ch, fitness, [2]), rel=1e-4)
    assert len(prefix.dense_logp) == 2
    assert prefix.kl(states[-1], list(range(5))) == pytest.approx(_kl(model, db, kv, ch, fitness), rel=1e-4)
    assert torch.allclose(torch.cat(prefix.dense_logp), dense, atol=1e-5)
    with pytest.raises(ValueError, match="^dense_logp is not in batches of batch_size over these tokens$"):
        stitched.StitchedModel(model, db, fitness, batch_size=2, device="cpu", dense_logp=given + given[:1])


def test_stitched_model_runs_a_half_precision_model(setup):
    import copy
    model, tokens, fitness, mc = setup
    db = stitched.VariantDatabase(model, mc, tokens, device="cpu")
    half = copy.deepcopy(model).to(torch.bfloat16)
    net = stitched.StitchedModel(half, db, fitness, device="cpu")
    final = net.run([1, 2, 0], [3, 0, 9])[-1]
    assert final.dtype == torch.bfloat16
    assert net.kl(final, list(range(5))) == pytest.approx(_kl(model, db, [1, 2, 0], [3, 0, 9], fitness), rel=0.2)


def test_the_stitched_model_sends_the_model_its_inputs_and_every_variant_to_its_device(setup):
    """Moves recorded, not made (a pretend device): the model and the captured inputs go to the device asked for;
    in a run every swapped-in variant goes to its weight's device, one move each."""
    model, tokens, fitness, mc = setup
    db = stitched.VariantDatabase(model, mc, tokens, device="cpu")
    meta = torch.device("meta")
    with DeviceMoves(pretend="meta") as whole:
        model.to("meta")
    with DeviceMoves(pretend="meta") as inputs:
        capture_layer_inputs(model, fitness, 2, meta)
    with DeviceMoves(pretend="meta") as init:
        net = stitched.StitchedModel(model, db, fitness, batch_size=2, device="meta")
    assert init.moves.count(meta) == whole.moves.count(meta) + inputs.moves.count(meta) > 0
    net.dev = torch.device("cpu")
    cpu = torch.device("cpu")
    with DeviceMoves() as dense:
        net.run([0, 0, 0], [0, 0, 0])
    with DeviceMoves() as swapped:
        net.run([1, 0, 2], [3, 0, 5])
    assert swapped.moves.count(cpu) == dense.moves.count(cpu) + 4


def test_the_variant_database_reports_its_layers_and_stops_under_its_name(setup, tmp_path, monkeypatch):
    model, tokens, fitness, mc = setup
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "fresh"))  # statistics computed here, in batches of 5
    seen = []
    db = stitched.VariantDatabase(model, mc, tokens, batch_size=5, device="cpu",
                                  progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and len(db.inverse) == 3
    calls = []
    with pytest.raises(JobCancelled, match="^statistics were cancelled$"):
        stitched.VariantDatabase(model, mc, tokens, device="cpu", should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert len(calls) == 2  # asked before every layer: stopped before the second
    with pytest.raises(JobCancelled, match="^variants were cancelled$"):
        stitched.VariantDatabase(model, mc, tokens, device="cpu", should_stop=lambda: True, what="variants")
