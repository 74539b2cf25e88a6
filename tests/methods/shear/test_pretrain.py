"""Continued pre-training with dynamic batch loading (issue 18, item 3), on stories260k.

The pruned model is stories260k at 30% (log schedule), whose layers differ in shape (the SlimGPT mixed-shape
classes). Small steps and short windows: these check behaviour, not quality (docs/shear.md has the measurements).
"""
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimgpt_core.cli import main
from slimgpt_core.data import calibration_tokens, evaluation_tokens
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.models import load_model
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.workspace.store import save_run_at
from slimgpt_core.training.distill import distillation_kl, distillation_loss_fn
from slimgpt_core.training.domains import DomainSampler, load_domains, perplexity_tokens
from slimgpt_core.training.pretrain import pretrain
from slimgpt_core.training.settings import PretrainSettings

SMALL = dict(seqlen=64, batch_size=4, heldout=4, device="cpu", ppl=[])


pytestmark = pytest.mark.usefixtures("one_thread_and_own_cache")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, assets_root):
    """stories260k pruned 30% (log): a run folder whose layers differ in shape, its report naming the source."""
    loaded = load_model("stories260k", "cpu", "float32")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 16, 128)
    report = prune_model(loaded.model, tokens, PruneSettings(ratio=0.3), model_name="stories260k")
    return save_run_at(loaded.model, loaded.tokenizer, report, tmp_path_factory.mktemp("runs") / "s30")


def _pruned(run):
    loaded = load_model(str(run), "cpu", "float32")
    assert type(loaded.model).__name__ == "SlimGPTLlamaForCausalLM"  # mixed shapes
    return loaded


def _heldout_ce(model, windows):
    """Token-weighted next-token cross-entropy, computed here independently of training.py."""
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits.float()
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def test_a_lagging_domain_gains_weight_through_the_driver(assets_root):
    """Constructed lag: TinyStories' reference loss is 0 (it always lags), WikiText-2's is 100 (it never does).
    Every update must move weight to TinyStories by exactly Algorithm 1 on the losses the driver measured, and
    the sampler must then draw mostly TinyStories."""
    loaded = load_model("stories260k", "cpu", "float32")
    domains = load_domains(loaded.tokenizer, ["tinystories", "wikitext2"], 64, 4, 1)
    events = []
    settings = PretrainSettings(data=["tinystories", "wikitext2"], steps=6, update_every=2, lr=1e-5,
                                reference_losses=[0.0, 100.0], **SMALL)
    result = pretrain(loaded.model, loaded.tokenizer, settings, callback=events.append)
    updates = [e for e in events if e.kind == "domain-mix"]
    assert [u.step for u in updates] == [2, 4]
    # step 0: the driver's per-domain held-out loss is the plain cross-entropy on each domain's held-out windows
    before = load_model("stories260k", "cpu", "float32").model
    for d in domains:
        assert result.mix[0]["losses"][d.name] == pytest.approx(_heldout_ce(before, d.heldout), rel=1e-5)
    # each update: w_ts ← w_ts·e^{ℓ_ts − 0} / (w_ts·e^{ℓ_ts} + w_wt·e^{0}) (WikiText-2's gap is clamped to 0)
    w = 0.5
    for u in updates:
        assert u.weights_before["tinystories"] == pytest.approx(w)
        expected = w * math.exp(u.losses["tinystories"]) / (w * math.exp(u.losses["tinystories"]) + (1 - w))
        assert u.weights_after["tinystories"] == pytest.approx(expected, rel=1e-9)
        assert expected > w
        w = expected
    assert w > 0.9
    # the steps after an update drew from the new weights
    by_step = {e.step: e.weights["tinystories"] for e in events if e.kind == "pretrain-step"}
    assert by_step[1] == by_step[2] == pytest.approx(0.5)
    assert by_step[3] == pytest.approx(updates[0].weights_after["tinystories"])
    drawn = result.sequences_per_domain
    assert sum(drawn.values()) == 6 * 4
    assert drawn["tinystories"] > 2 * drawn["wikitext2"]  # expected 18 vs 6 from the weights above


def test_the_real_lag_after_pruning_is_tinystories(pruned_run):
    """Against the source model's own losses, a stories260k pruned 30% lags most on TinyStories (its training
    domain): the mix moves there."""
    loaded = _pruned(pruned_run)
    source = load_model("stories260k", "cpu", "float32").model
    result = pretrain(loaded.model, loaded.tokenizer, PretrainSettings(
        data=["c4", "tinystories", "wikitext2"], steps=4, update_every=2, lr=1e-5, **SMALL), reference=source)
    assert result.reference["tinystories"] == pytest.approx(_heldout_ce(source, load_domains(
        loaded.tokenizer, ["tinystories"], 64, 4, 1)[0].heldout), rel=1e-5)
    final = result.mix[-1]["weights"]
    assert max(final, key=final.get) == "tinystories" and final["tinystories"] > 1 / 3


def _found(window: torch.Tensor, haystack: bytes) -> bool:
    return window.to(torch.int16).numpy().tobytes() in haystack


def test_wikitext2_test_and_tinystories_test_text_never_in_the_training_stream(assets_root):
    tok = load_model("stories260k", "cpu", "float32").tokenizer
    wiki_test = evaluation_tokens(tok, "wikitext2").to(torch.int16).numpy().tobytes()
    stories_test = perplexity_tokens(tok, "tinystories").to(torch.int16).numpy().tobytes()
    # the detector works: a window of the test text is found
    assert _found(evaluation_tokens(tok, "wikitext2")[5000:5064], wiki_test)
    assert _found(perplexity_tokens(tok, "tinystories")[3000:3064], stories_test)
    domains = load_domains(tok, ["wikitext2", "tinystories"], 64, 4, 400)
    sampler = DomainSampler(domains, torch.tensor([0.5, 0.5], dtype=torch.float64), 8, seed=0)
    seen = 0
    for _ in range(60):
        for window in next(sampler)["input_ids"]:
            assert not _found(window, wiki_test)
            assert not _found(window, stories_test)
            seen += 1
    for d in domains:
        for window in d.heldout:
            assert not _found(window, wiki_test) and not _found(window, stories_test)
    assert seen == 480 and sampler.drawn.min() > 150


def test_the_code_refuses_a_wikitext2_training_text_that_is_the_test_split(assets_root, monkeypatch):
    import slimgpt_core.training.domains as domains_module

    real = domains_module.documents
    monkeypatch.setattr(domains_module, "documents", lambda name, split="train": real(name, "test"))
    tok = load_model("stories260k", "cpu", "float32").tokenizer
    with pytest.raises(AssertionError):
        load_domains(tok, ["wikitext2"], 64, 4, 10)


def test_loss_goes_down_on_a_real_model(pruned_run):
    loaded = _pruned(pruned_run)
    result = pretrain(loaded.model, loaded.tokenizer, PretrainSettings(
        data=["tinystories"], steps=30, lr=3e-3, **SMALL))
    start, end = result.mix[0]["losses"]["tinystories"], result.mix[-1]["losses"]["tinystories"]
    assert end < start - 0.1
    losses = [e.loss for e in result.steps]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # the returned model is the trained one: its held-out loss is what the driver measured at the end
    domain = load_domains(loaded.tokenizer, ["tinystories"], 64, 4, 1)[0]
    assert _heldout_ce(result.model, domain.heldout) == pytest.approx(end, rel=1e-5)


def test_lora_trains_only_adapters_and_merges_into_a_run_that_reloads(pruned_run, tmp_path):
    from slimgpt_core.services.pretrain import save_pretrained_run
    from slimgpt_core.training.recover import load_source_report

    loaded = _pruned(pruned_run)
    original = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    settings = PretrainSettings(data=["tinystories"], steps=5, lr=1e-2, lora=True, rank=2, alpha=4,
                                target_modules=["q"], **SMALL)
    result = pretrain(loaded.model, loaded.tokenizer, settings)
    # adapters only on q_proj: r·(in + out) per layer, from the layers' own shapes
    q = [layer.self_attn.q_proj for layer in result.model.model.layers]
    assert result.trainable_parameters == sum(2 * (m.in_features + m.out_features) for m in q)
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, original[n])}
    assert changed and all(n.endswith("q_proj.weight") for n in changed)
    assert type(result.model).__name__ == "SlimGPTLlamaForCausalLM"
    assert result.merge_max_abs_diff < 1e-4
    out = save_pretrained_run(result, loaded.tokenizer, tmp_path / "cpt", load_source_report(pruned_run),
                              str(pruned_run))
    again = load_model(str(out), "cpu", "float32").model
    ids = torch.arange(40).view(1, 40)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, result.model(ids).logits, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["ratio"] == 0.3  # the pruning history stays
    assert report["pretrain"]["lora"]["target_modules"] == ["q_proj"]
    assert len(report["pretrain"]["loss_curve"]) == 5


def test_distillation_kl_by_hand():
    # teacher p = (1/4, 1/2, 1/4), student q uniform: KL = ½·ln(3/4) + ½·ln(3/2) = ½·ln(9/8)
    teacher = torch.tensor([[[0.0, math.log(2.0), 0.0], [5.0, 0.0, 0.0]]])
    student = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 7.0]]])
    mask = torch.tensor([[True, False]])  # the second position carries no loss
    # fp32 log-probabilities up to ln 4 each within ~3u (u = 2⁻²⁴) on any CPU's exp/log: the KL within ~5e-7
    assert float(distillation_kl(student, teacher, mask)) == pytest.approx(0.5 * math.log(9 / 8), abs=1e-6)
    # both positions: the second is Σ p ln(p/q) with p = softmax(5,0,0), q = softmax(0,0,7)
    p = torch.softmax(torch.tensor([5.0, 0, 0]), 0)
    q = torch.softmax(torch.tensor([0.0, 0, 7.0]), 0)
    second = float((p * (p / q).log()).sum())
    assert float(distillation_kl(student, teacher)) == pytest.approx((0.5 * math.log(9 / 8) + second) / 2, rel=1e-6)


def test_distillation_loss_is_the_kl_beside_the_labels(pruned_run):
    student = _pruned(pruned_run).model
    teacher = load_model("stories260k", "cpu", "float32").model
    ids = evaluation_tokens(load_model("stories260k").tokenizer, "tinystories")[:128].view(2, 64)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        s, t = student(ids).logits[:, :-1], teacher(ids).logits[:, :-1]
        kl = F.kl_div(F.log_softmax(s, -1).reshape(-1, s.shape[-1]), F.log_softmax(t, -1).reshape(-1, s.shape[-1]),
                      log_target=True, reduction="batchmean")
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
        device = torch.device("cpu")
        assert float(distillation_loss_fn(teacher, 1.0)(student, batch, device)) == pytest.approx(float(kl), rel=1e-5)
        assert float(distillation_loss_fn(teacher, 0.25)(student, batch, device)) == pytest.approx(
            float(0.75 * ce + 0.25 * kl), rel=1e-5)
        assert float(distillation_loss_fn(teacher, 1.0)(teacher, batch, device)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_pulls_the_student_toward_the_teacher(pruned_run):
    loaded = _pruned(pruned_run)
    teacher = load_model("stories260k", "cpu", "float32").model
    ids = perplexity_tokens(loaded.tokenizer, "tinystories")[:256].view(4, 64)

    def kl_to_teacher(model):
        with torch.no_grad():
            return float(distillation_kl(model(ids).logits[:, :-1], teacher(ids).logits[:, :-1]))

    before = kl_to_teacher(loaded.model)
    result = pretrain(loaded.model, loaded.tokenizer, PretrainSettings(data=["tinystories"], steps=30, lr=1e-3,
                                                                       **SMALL), teacher=teacher)
    assert result.distill_weight == 1.0
    assert kl_to_teacher(result.model) < 0.85 * before  # 0.97 -> 0.70 when written


@pytest.mark.parametrize("args, words", [
    (["--data", "c4,books"], "unknown domain 'books'"),
    (["--steps", "0"], "steps must be at least 1, got 0"),
    (["--steps", "-3"], "steps must be at least 1, got -3"),
    (["--data", "tinystories,tinystories"], "given twice"),
    (["--update-every", "0"], "update-every must be at least 1"),
    (["--distill-weight", "1.5"], "distill weight must be in [0, 1]"),
])
def test_bad_input_one_sentence_and_nothing_written(pruned_run, tmp_path, capsys, args, words):
    out = tmp_path / "never"
    rc = main(["pretrain", "--model", str(pruned_run), "--steps", "2", "--out", str(out), "--runs",
               str(tmp_path / "ws"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: ") and words in err[-1]
    assert not out.exists() and not any(tmp_path.glob(".never*"))
    assert not any((tmp_path / "ws").glob("*")) if (tmp_path / "ws").exists() else True


def test_a_teacher_with_another_vocabulary_is_refused_before_training(pruned_run, tmp_path, capsys):
    from tests.tiny_models import tiny_model

    teacher = tmp_path / "tiny-teacher"
    tiny_model().save_pretrained(teacher)  # vocabulary 101, stories260k's is 512
    out = tmp_path / "never"
    rc = main(["pretrain", "--model", str(pruned_run), "--teacher", str(teacher), "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == (f"error: the teacher's vocabulary (101 tokens, {teacher}) differs from the "
                                   "model's (512): it needs the same tokenizer")
    assert not out.exists()
    loaded = _pruned(pruned_run)  # the engine refuses it too
    with pytest.raises(SlimGPTError, match="vocabulary"):
        pretrain(loaded.model, loaded.tokenizer, PretrainSettings(data=["c4"], steps=2, **SMALL),
                 teacher=tiny_model())


def test_memory_check_refuses_before_any_work(pruned_run, tmp_path, capsys, monkeypatch):
    from slimgpt_core.base import devices

    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 1000)
    out = tmp_path / "never"
    rc = main(["pretrain", "--model", str(pruned_run), "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "continued pre-training needs about" in err and "--batch-size" in err and "--lora" in err
    assert not out.exists()


def test_cancel_leaves_nothing(pruned_run, tmp_path, capsys, monkeypatch):
    # the engine: should_stop between steps; LoRA's adapters are dropped, the weights are as they came
    loaded = _pruned(pruned_run)
    original = copy.deepcopy(loaded.model.state_dict())
    calls = []
    with pytest.raises(JobCancelled):
        pretrain(loaded.model, loaded.tokenizer, PretrainSettings(data=["tinystories"], steps=10, lora=True,
                                                                  lr=1e-2, **SMALL),
                 should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4
    state = loaded.model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    # the command line: interrupted mid-training, exit 130, no folder and no temporary one
    import slimgpt_core.training.pretrain as engine

    real_training = engine.run_training

    def interrupted(model, batches, plan):
        def bomb(event):
            plan.callback(event)
            if event.step == 2:
                raise KeyboardInterrupt
        return real_training(model, batches, dataclasses.replace(plan, callback=bomb))

    monkeypatch.setattr(engine, "run_training", interrupted)
    out = tmp_path / "cpt"
    rc = main(["pretrain", "--model", str(pruned_run), "--steps", "5", "--seqlen", "64", "--heldout", "2",
               "--ppl", "none", "--out", str(out)])
    assert rc == 130 and "nothing was written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".cpt*"))


def test_cli_pretrain_into_the_workspace_with_a_teacher(pruned_run, tmp_path, capsys):
    from slimgpt_core.workspace import store as workspace

    runs = tmp_path / "ws"
    rc = main(["pretrain", "--model", str(pruned_run), "--data", "c4,tinystories,wikitext2", "--steps", "6",
               "--dynamic-mix", "--update-every", "2", "--teacher", "source", "--distill-weight", "0.5",
               "--seqlen", "64", "--heldout", "2", "--lr", "3e-3", "--ppl", "tinystories", "--ppl-windows", "4",
               "--runs", str(runs)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "step 6/6 loss" in captured.err and "mix update at step 2" in captured.err and "tok/s ETA" in captured.err
    listed = workspace.list_runs(runs)
    assert len(listed) == 1 and listed[0].name.startswith("s30-pretrain-6")
    folder = Path(summary["out"])
    assert folder.parent == runs
    report = json.loads((folder / "report.json").read_text())
    record = report["pretrain"]
    assert record["teacher"] == "stories260k" and record["distill_weight"] == 0.5
    assert record["reference_source"] == "stories260k" and record["update_every"] == 2
    assert [m["step"] for m in record["mix"]] == [0, 2, 4, 6] and len(record["updates"]) == 2
    assert record["ppl_before"]["tinystories"]["windows"] == 4
    assert round(report["evaluation"]["pretrain_ppl_after_tinystories"]["ppl"], 3) == summary["ppl_after_tinystories"]
    loaded = load_model(str(folder), "cpu", "float32")
    assert type(loaded.model).__name__ == "SlimGPTLlamaForCausalLM"
    measured = listed[0].perplexity  # the Runs page's perplexity, with its provenance
    assert measured["ppl"] == report["pretrain"]["ppl_after"]["tinystories"]["ppl"]
    assert measured["windows"] == 4 and "last 1/5" in measured["text"]


def test_a_sheared_run_with_fewer_layers_and_hidden_dims_pretrains_and_reloads(assets_root, tmp_path):
    """A shear run (depth and hidden size cut), pretrained without --dynamic-mix: the mix stays equal, the
    shape stays the target's, the run reloads with the same logits."""
    from slimgpt_core.training.recover import load_source_report
    from slimgpt_core.services.shear import save_shear_run
    from slimgpt_core.methods.shear.target import resolve_target, source_shape
    from slimgpt_core.methods.shear.settings import ShearSettings
    from slimgpt_core.methods.shear.train import shear_model
    from slimgpt_core.services.pretrain import save_pretrained_run

    loaded = load_model("stories260k", "cpu", "float32")
    target = resolve_target({"layers": 4, "kv_groups": 2, "ffn": 128, "hidden": 48}, loaded.model)
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 8, 64)
    sheared = shear_model(loaded.model, tokens, target, ShearSettings(steps=4, batch_size=2, device="cpu"),
                          model_name="stories260k")
    run = save_shear_run(loaded.model, loaded.tokenizer, sheared, tmp_path / "shear")
    model = load_model(str(run), "cpu", "float32")
    result = pretrain(model.model, model.tokenizer, PretrainSettings(
        data=["c4", "tinystories"], steps=4, dynamic_mix=False, update_every=1, lr=1e-3, **SMALL))
    assert all(m["weights"] == {"c4": 0.5, "tinystories": 0.5} for m in result.mix) and not result.updates
    assert source_shape(result.model) == target
    out = save_pretrained_run(result, model.tokenizer, tmp_path / "cpt", load_source_report(run), str(run))
    again = load_model(str(out), "cpu", "float32").model
    ids = torch.arange(30).view(1, 30)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, result.model(ids).logits, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == "shear" and report["pretrain"]["dynamic_mix"] is False
