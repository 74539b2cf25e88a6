"""Minitron's activation importance against sums written out in the test (issue 15, mutation testing).

Activations are hooked by the test itself on one forward of the whole batch, while `collect_scores` runs in batches
of 5 (12 sequences: 5 + 5 + 2), so the batching, the mean over the sequence, the L2 over the batch and the token
count all show in the numbers."""
import copy
import time

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.base.events import Progress
from slimgpt_core.methods import minitron
from slimgpt_core.methods.minitron import MinitronScores, collect_scores, shape_gates
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.methods.shear.target import resolve_target, source_shape
from slimgpt_core.base.shapes import count_parameters

L, HEADS, KV, FFN, HIDDEN = 3, 4, 2, 24, 16  # head size 4, 2 heads per KV group


@pytest.fixture
def model():
    return tiny_model(heads=HEADS, kv=KV, layers=L, ffn=FFN, hidden=HIDDEN)


def _hooked(model, tokens):
    """Inputs of o_proj and down_proj, outputs of both norms and the residual stream around every layer, fp64."""
    seen = {}

    def keep(name, where):
        def hook(module, *a):
            seen[name] = (a[0][0] if where == "in" else a[-1]).detach().double()
        return hook
    hs = []
    for i, layer in enumerate(model.model.layers):
        hs += [layer.self_attn.o_proj.register_forward_pre_hook(keep(("o", i), "in")),
               layer.mlp.down_proj.register_forward_pre_hook(keep(("down", i), "in")),
               layer.input_layernorm.register_forward_hook(keep(("n1", i), "out")),
               layer.post_attention_layernorm.register_forward_hook(keep(("n2", i), "out")),
               layer.register_forward_pre_hook(keep(("x", i), "in")),
               layer.register_forward_hook(keep(("y", i), "out"))]
    with torch.no_grad():
        model(input_ids=tokens)
    for h in hs:
        h.remove()
    return seen


def _l2_over_batch_of_seq_mean_abs(x):  # x [batch, seq, channels] -> [channels]
    a = x.abs().sum(1) / x.shape[1]
    return (a * a).sum(0).sqrt()


def test_scores_equal_the_sums_written_out(model, tokens):
    seen = _hooked(model, tokens)
    hd = HIDDEN // HEADS
    heads = torch.stack([_l2_over_batch_of_seq_mean_abs(seen["o", i]).view(HEADS, hd).pow(2).sum(1).sqrt()
                         for i in range(L)])
    ffn = torch.stack([_l2_over_batch_of_seq_mean_abs(seen["down", i]) for i in range(L)])
    hidden = sum(_l2_over_batch_of_seq_mean_abs(seen[n, i]) for i in range(L) for n in ("n1", "n2"))
    layers = []
    for i in range(L):
        x, y = seen["x", i], seen["y", i]
        cos = (x * y).sum(-1) / (x.pow(2).sum(-1).sqrt() * y.pow(2).sum(-1).sqrt())
        layers.append(1 - cos.sum() / tokens.numel())
    s = collect_scores(model, tokens, batch_size=5)
    assert s.heads.dtype == s.ffn.dtype == s.hidden.dtype == s.layers.dtype == torch.float32
    assert s.heads.shape == (L, HEADS) and s.ffn.shape == (L, FFN) and s.hidden.shape == (HIDDEN,)
    assert torch.allclose(s.heads.double(), heads, rtol=1e-5, atol=1e-7)
    assert torch.allclose(s.ffn.double(), ffn, rtol=1e-5, atol=1e-7)
    assert torch.allclose(s.hidden.double(), hidden, rtol=1e-5, atol=1e-7)
    assert torch.allclose(s.layers.double(), torch.stack(layers), rtol=1e-4, atol=1e-6)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_scores_go_through_the_device_given(model, tokens):
    from tests.device_moves import DeviceMoves
    plain = collect_scores(model, tokens, batch_size=5)
    with DeviceMoves(pretend="meta") as moves:
        on_meta = collect_scores(model, tokens, batch_size=5, device="meta")
    assert moves.moves.count(torch.device("meta")) >= 3  # each of the 3 batches (and the weights) sent there
    assert torch.equal(on_meta.heads, plain.heads) and torch.equal(on_meta.layers, plain.layers)


def test_cancel_between_batches_removes_the_hooks(model, tokens):
    calls = []

    def stop_at_second():
        calls.append(1)
        return len(calls) == 2
    with pytest.raises(JobCancelled):
        collect_scores(model, tokens, batch_size=5, should_stop=stop_at_second)
    assert len(calls) == 2
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    collect_scores(model, tokens, batch_size=5, should_stop=lambda: False)  # asked and answered no: runs


def _scores():
    """Hand-made scores with distinct values, so each gate's open entries are known."""
    heads = torch.tensor([[1.0, 5.0, 2.0, 3.0], [4.0, 0.5, 0.1, 0.2], [0.3, 0.9, 7.0, 0.4]])
    ffn = torch.arange(L * FFN, dtype=torch.float32).view(L, FFN).flip(1) % 7 + torch.arange(FFN) / 100
    hidden = (torch.arange(HIDDEN, dtype=torch.float32) * 5) % HIDDEN
    return MinitronScores(heads, ffn, hidden, torch.tensor([0.2, 0.05, 0.3]))


def _gate(n, open_):
    g = torch.zeros(n)
    g[list(open_)] = 1
    return g


@pytest.mark.parametrize("structure", ["layers", "kv_groups", "heads", "ffn", "hidden", "none"])
def test_a_gate_only_for_what_shrinks_and_open_on_the_top_scores(model, structure):
    s = _scores()
    smaller = {"layers": 2, "kv_groups": 1, "heads": 1, "ffn": 20, "hidden": 13}
    spec = {"layers": L, "kv_groups": KV, "heads": HEADS, "ffn": FFN, "hidden": HIDDEN}
    if structure == "heads":
        spec["heads"] = KV  # one head per group
    elif structure == "kv_groups":
        spec.update(kv_groups=1, heads=HEADS // KV)
    elif structure != "none":
        spec[structure] = smaller[structure]
    target = resolve_target(spec, model)
    gates = shape_gates(model, s, target)
    assert sorted(gates) == ([] if structure == "none" else [structure])
    if structure == "layers":
        assert torch.equal(gates["layers"], _gate(L, [0, 2]))
    if structure == "kv_groups":  # group L2: layer 0 (1,5 | 2,3), layer 1 (4,.5 | .1,.2), layer 2 (.3,.9 | 7,.4)
        assert torch.equal(gates["kv_groups"], torch.stack([_gate(2, [0]), _gate(2, [0]), _gate(2, [1])]))
    if structure == "heads":  # the best head of each group, per layer
        want = torch.tensor([[[0, 1], [0, 1]], [[1, 0], [0, 1]], [[0, 1], [1, 0]]], dtype=torch.float32)
        assert torch.equal(gates["heads"], want)
    if structure == "ffn":
        want = torch.stack([_gate(FFN, s.ffn[i].argsort(descending=True)[:20].tolist()) for i in range(L)])
        assert torch.equal(gates["ffn"], want) and gates["ffn"].sum() == 60
    if structure == "hidden":
        assert torch.equal(gates["hidden"], (s.hidden >= 3).float())  # values 0..15: the 13 largest are >= 3


def test_prune_to_shape_cuts_by_the_scores_and_marks_the_model(model, tokens):
    target = resolve_target({"layers": 2, "kv_groups": 1, "heads": 1, "ffn": 20, "hidden": 12}, model)
    s = collect_scores(model, tokens, batch_size=5)
    by_hand = copy.deepcopy(model)
    order = lambda v, k: sorted(v.argsort(descending=True)[:k].tolist())  # noqa: E731
    groups = s.heads.view(L, KV, 2).pow(2).sum(-1)
    gates = {"layers": _gate(L, order(s.layers, 2)),
             "kv_groups": torch.stack([_gate(KV, order(groups[i], 1)) for i in range(L)]),
             "heads": torch.stack([torch.stack([_gate(2, order(s.heads[i, 2 * g:2 * g + 2], 1)) for g in range(KV)])
                                   for i in range(L)]),
             "ffn": torch.stack([_gate(FFN, order(s.ffn[i], 20)) for i in range(L)]),
             "hidden": _gate(HIDDEN, order(s.hidden, 12))}
    cut_model(by_hand, gates)
    model._slimgpt_fingerprint = "stale"
    returned = minitron.prune_to_shape(model, tokens, target, batch_size=5)
    assert torch.equal(returned.layers, s.layers) and torch.equal(returned.heads, s.heads)
    assert source_shape(model) == target and model._slimgpt_fingerprint is None
    assert model.config.slimgpt == {"method": "minitron", "target": target.to_dict()}
    with torch.no_grad():
        assert torch.equal(model(tokens[:2]).logits, by_hand(tokens[:2]).logits)


def test_prune_minitron_keeps_the_best_groups_and_channels(model, tokens):
    settings = PruneSettings(ratio=0.5, schedule="uniform", device="cpu", batch_size=5, method="minitron")
    s = collect_scores(model, tokens, batch_size=5)
    before = copy.deepcopy(model)
    events = []
    model._slimgpt_fingerprint = "stale"
    t0 = time.perf_counter()
    report = minitron.prune_minitron(model, tokens, settings, callback=events.append, model_name="tiny")
    wall = time.perf_counter() - t0
    for i, (old, new) in enumerate(zip(before.model.layers, model.model.layers)):
        group = s.heads[i].view(KV, 2).pow(2).sum(-1).argmax().item()  # half the groups: the best one stays
        channels = sorted(s.ffn[i].argsort(descending=True)[:FFN // 2].tolist())
        assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[:, group * 8:(group + 1) * 8])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, channels])
    assert model.config.num_key_value_heads == 1 and model._slimgpt_fingerprint is None
    assert (report.model, report.device, report.params_before, report.layer_params_before) == (
        "tiny", "cpu", count_parameters(before), count_parameters(before.model.layers))
    assert (report.params_after, report.layer_params_after) == (count_parameters(model),
                                                                count_parameters(model.model.layers))
    assert report.head_ratios == report.ffn_ratios == [0.5] * L and report.settings["method"] == "minitron"
    assert sorted(report.phase_seconds) == ["cut", "scores"] and report.total_seconds > 0
    assert report.phase_seconds["cut"] == pytest.approx(report.total_seconds - report.phase_seconds["scores"])
    assert 0 < report.phase_seconds["scores"] <= report.total_seconds
    assert model.config.slimgpt["source_model"] == "tiny" and model.config.slimgpt["ratio"] == 0.5
    assert [(e.layer, e.n_layers, e.phase) for e in events] == [
        (0, L, "capture"), (0, L, "outputs"), (1, L, "outputs"), (2, L, "outputs"), (L - 1, L, "done")]
    assert events[0].elapsed_s == 0 and events[-1].elapsed_s == report.total_seconds <= wall
    assert all(isinstance(e, Progress) for e in events)
    assert all(0 <= a.elapsed_s <= b.elapsed_s for a, b in zip(events, events[1:]))
    unnamed = copy.deepcopy(before)
    assert minitron.prune_minitron(unnamed, tokens, settings).model == ""  # no callback, no name: runs
    assert unnamed.config.slimgpt["source_model"] == ""


def test_prune_minitron_cancels_between_layers(model, tokens):
    settings = PruneSettings(ratio=0.5, schedule="uniform", device="cpu", batch_size=5)
    answers = iter([False] * 3 + [False, True])  # 3 batches, layer 0, then stop before layer 1
    before = copy.deepcopy(model)
    with pytest.raises(JobCancelled):
        minitron.prune_minitron(model, tokens, settings, should_stop=lambda: next(answers))
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == FFN // 2  # layer 0 was cut, layer 1 not
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before.model.layers[1].mlp.down_proj.weight)


def test_shape_run_reports_the_cut(model, tokens):
    target = resolve_target({"layers": 2, "kv_groups": 1, "heads": 2, "ffn": 18, "hidden": 12}, model)
    s = collect_scores(model, tokens, batch_size=3)
    before = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = minitron.shape_run(model, tokens, target, batch_size=3, device="cpu", model_name="tiny")
    wall = time.perf_counter() - t0
    kept = sorted(s.layers.argsort(descending=True)[:2].tolist())
    r = result.report
    assert result.kept_layers == kept and result.source == source_shape(before) and result.target == target
    assert result.history == [] and source_shape(model) == target
    assert r.settings == {"method": "minitron", "source_model": "tiny", "target": target.to_dict(),
                          "source_shape": source_shape(before).to_dict(), "kept_layers": kept,
                          "calibration_tokens": tokens.numel()}
    assert r.model == "tiny" and r.device == "cpu" and 0 < r.total_seconds <= wall
    assert r.head_ratios == [0.5, 0.5] and r.ffn_ratios == [0.25, 0.25]
    assert (r.params_before, r.layer_params_before) == (count_parameters(before), count_parameters(before.model.layers))
    assert (r.params_after, r.layer_params_after) == (count_parameters(model), count_parameters(model.model.layers))
    assert model.config.slimgpt == {"source_model": "tiny", "method": "minitron", "target": target.to_dict()}


@pytest.mark.parametrize("run", ["prune_minitron", "prune_to_shape", "shape_run"])
def test_each_driver_scores_on_its_device_then_cuts_on_the_cpu(model, tokens, run):
    """meta stands for a GPU: moves there are recorded, not made (conftest.DeviceMoves)."""
    from tests.device_moves import DeviceMoves
    plain = copy.deepcopy(model)
    target = resolve_target({"layers": 2, "ffn": 18}, model)
    if run == "prune_minitron":
        args = lambda m, device: (m, tokens, PruneSettings(ratio=0.5, device=device, batch_size=5))  # noqa: E731
        kwargs = {}
    else:
        args = lambda m, device: (m, tokens, target, 5, device)  # noqa: E731
        kwargs = {}
    getattr(minitron, run)(*args(plain, "cpu"), **kwargs)
    n = len(list(model.parameters())) + len(list(model.buffers()))  # tensors moved by model.to
    with DeviceMoves(pretend="meta") as moves:
        out = getattr(minitron, run)(*args(model, "meta"), **kwargs)
    metas = [i for i, d in enumerate(moves.moves) if d == torch.device("meta")]
    run_of_cpu, longest = 0, 0  # after the last batch, the forward's own casts, then the model moved back whole
    for d in moves.moves[metas[-1] + 1:]:
        run_of_cpu = run_of_cpu + 1 if d == torch.device("cpu") else 0
        longest = max(longest, run_of_cpu)
    assert len(metas) == n + 3 and longest >= n  # the model and 3 batches sent there, every tensor back after
    if run != "prune_to_shape":
        assert (out.report if run == "shape_run" else out).device == "meta"
    with torch.no_grad():
        assert torch.equal(model(tokens[:2]).logits, plain(tokens[:2]).logits)


@pytest.mark.parametrize("run", ["prune_to_shape", "shape_run"])
def test_shape_drivers_defaults_and_cancel(model, run):
    """Defaults: batches of 8 on the CPU, no name; `should_stop` is asked before each batch (17 rows: 3 batches)."""
    tokens = torch.randint(0, 101, (17, 6), generator=torch.Generator().manual_seed(4))
    target = resolve_target({"layers": 2}, model)
    asked = []
    out = getattr(minitron, run)(copy.deepcopy(model), tokens, target, should_stop=lambda: asked.append(1) or False)
    assert len(asked) == 3
    if run == "shape_run":
        assert out.report.device == "cpu" and out.report.model == "" and out.report.settings["source_model"] == ""
    with pytest.raises(JobCancelled):
        getattr(minitron, run)(model, tokens, target, should_stop=lambda: True)
    assert source_shape(model).layers == L  # nothing cut
