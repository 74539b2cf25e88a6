"""The shared training loop against a loop written out in the test (issue 15, mutation testing).

A tiny random llama is trained by `train` and, from the same start, by a reference loop in the test: the loss as
a mean NLL from `log_softmax` + `gather` (fp64) over the tokens that carry loss, micro-batch losses averaged by
hand, gradients clipped, torch's AdamW stepped at the rate of the warm-up + cosine formula written out. Weights,
rates, losses, token counts and the order of events must agree."""
import copy
import math
import resource
import time

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.training import loop
from slimgpt_core.training.loop import IGNORE, OptimizerConfig, TrainStep, batch_loss, heldout_loss, train

CPU = torch.device("cpu")


@pytest.fixture
def model():
    m = tiny_model(heads=2, kv=1, layers=1, ffn=24, hidden=16)
    m.model.embed_tokens.weight.requires_grad_(False)  # frozen: must not move
    return m


def _batch(seed, padded):
    """3 sequences of 10; labels copy the inputs with some tokens ignored; `padded`: two left-padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (3, 10), generator=g)
    labels = ids.clone()
    labels[torch.rand(3, 10, generator=g) < 0.3] = IGNORE
    batch = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, :2] = 0
        mask[2, :1] = 0
        labels[mask == 0] = IGNORE
        batch["attention_mask"] = mask
    return batch


def _nll(model, batch):
    """(summed NLL of the predicted tokens that carry loss, their count), fp64, by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -picked[keep].sum(), int(keep.sum())


def _heldout_by_hand(model, batches):
    with torch.no_grad():
        sums = [_nll(model, b) for b in batches]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))


def _rate(step0, warmup, steps, schedule):
    """transformers' warm-up + cosine (or constant) factor at scheduler step `step0`, written out."""
    if step0 < warmup:
        return step0 / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step0 - warmup) / (steps - warmup)))


def test_batch_loss_is_the_mean_nll_of_the_predicted_tokens(model):
    for seed, padded in [(0, False), (1, True)]:
        b = _batch(seed, padded)
        total, n = _nll(model, b)
        with torch.no_grad():
            assert float(batch_loss(model, b, CPU)) == pytest.approx(float(total / n), rel=1e-6)
    b = _batch(1, True)  # the mask reaches the model: without it the padded rows' logits differ
    no_mask = {k: v for k, v in b.items() if k != "attention_mask"}
    with torch.no_grad():
        assert abs(float(batch_loss(model, b, CPU)) - float(batch_loss(model, no_mask, CPU))) > 1e-4


def test_batch_loss_sends_the_batch_to_the_device(model):
    from tests.device_moves import DeviceMoves
    b = _batch(1, True)
    with DeviceMoves(pretend="meta") as moves, torch.no_grad():
        loss = batch_loss(model, b, torch.device("meta"))
    with torch.no_grad():
        total, n = _nll(model, b)
    assert moves.moves[:3] == [torch.device("meta")] * 3  # input_ids, labels, attention_mask
    assert float(loss) == pytest.approx(float(total / n), rel=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_heldout_loss_is_token_weighted_without_gradients_in_eval_mode(model, training):
    batches = [_batch(2, False), _batch(3, True)]
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), m.training)))
    model.train(training)
    got = heldout_loss(model, batches, CPU)
    model._forward_pre_hooks.clear()
    assert got == pytest.approx(_heldout_by_hand(model, batches), rel=1e-6)
    assert seen == [(False, False)] * 2 and model.training is training
    one = {"input_ids": torch.tensor([[5, 7]]), "labels": torch.tensor([[IGNORE, 7]])}  # one token carries loss
    assert heldout_loss(model, [one], CPU) == pytest.approx(_heldout_by_hand(model, [one]), rel=1e-6)
    assert heldout_loss(model, [], CPU) == 0.0


def _reference(model, micro, steps, optim, accumulation, heldout, eval_every, loss_scale=1.0):
    """The loop written out: (trained copy, [(lr, mean loss, loss tokens)] per step, {step: held-out loss})."""
    ref = copy.deepcopy(model).train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    held = {0: _heldout_by_hand(ref, heldout)} if heldout else {}
    rows, it = [], iter(micro)
    for step in range(1, steps + 1):
        lr = optim.lr * _rate(step - 1, optim.warmup_steps, steps, optim.schedule)
        opt.param_groups[0]["lr"] = lr
        losses, tokens = [], 0
        for _ in range(accumulation):
            total, n = _nll(ref, next(it))
            loss = loss_scale * total / n
            (loss / accumulation).backward()
            losses.append(float(loss.detach()))
            tokens += n
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        opt.step()
        opt.zero_grad()
        rows.append((lr, sum(losses) / len(losses), tokens))
        if heldout and ((eval_every and step % eval_every == 0) or step == steps):
            held[step] = _heldout_by_hand(ref, heldout)
    return ref, rows, held


@pytest.mark.parametrize("schedule, clip, eval_every", [("cosine", 0.05, 2), ("constant", None, 0)])
def test_train_equals_the_loop_written_out(model, schedule, clip, eval_every):
    steps, accumulation = 5, 2
    micro = [_batch(10 + i, padded=i % 2 == 0) for i in range(steps * accumulation)]
    heldout = [_batch(50, False), _batch(51, True)]
    optim = OptimizerConfig(lr=3e-2, warmup_steps=2, schedule=schedule, weight_decay=0.1, betas=(0.8, 0.95),
                            max_grad_norm=clip)
    ref, rows, held = _reference(model, micro, steps, optim, accumulation, heldout, eval_every)
    frozen = model.model.embed_tokens.weight.clone()
    events, calls, modes = [], [], []

    def after_step(step):
        calls.append(step)
        events.append(("after", step))
        model.eval()  # a hook may evaluate: the next step must train again

    def loss_fn(m, batch, device, bf16):
        modes.append((m.training, device, bf16))
        return batch_loss(m, batch, device, bf16)
    model.eval()  # the loop puts it in training mode itself
    t0 = time.perf_counter()
    result = train(model, iter(micro), steps, optim, CPU, accumulation, heldout, eval_every, bf16=False,
                   callback=events.append, should_stop=lambda: False, loss_fn=loss_fn, after_step=after_step)
    wall = time.perf_counter() - t0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert torch.equal(model.model.embed_tokens.weight, frozen) and not model.training
    assert modes == [(True, CPU, False)] * (steps * accumulation) and calls == list(range(1, steps + 1))
    held_steps = [0, 2, 4, 5] if eval_every else [0, 5]
    assert [h.step for h in result.heldout] == held_steps == sorted(held)
    assert [h.loss for h in result.heldout] == pytest.approx([held[s] for s in held_steps], rel=1e-5)
    want = [("heldout", 0)]
    for s in range(1, steps + 1):
        want += [("heldout", s)] * (s in held_steps) + [("after", s), ("train-step", s)]
    assert [e if isinstance(e, tuple) else (e.kind, e.step) for e in events] == want
    steps_done = [e for e in events if isinstance(e, TrainStep)]
    assert steps_done == result.steps
    input_tokens = [sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                        for b in micro[2 * i:2 * i + 2]) for i in range(steps)]
    assert result.tokens_seen == sum(input_tokens) < steps * accumulation * 30
    for e, (lr, loss, tokens), n_in in zip(result.steps, rows, input_tokens):
        assert (e.steps, e.tokens) == (steps, tokens)
        assert e.lr == pytest.approx(lr, abs=1e-12) and e.train_loss == pytest.approx(loss, rel=1e-5)
        if e.step in held_steps:
            assert e.heldout_loss == pytest.approx(held[e.step], rel=1e-5)
        else:
            assert e.heldout_loss is None
        assert 0 < n_in / e.tokens_per_s <= e.elapsed_s  # the step's own seconds, inside the elapsed time
        assert e.eta_s == pytest.approx(e.elapsed_s / e.step * (steps - e.step))
    assert [e.lr for e in result.steps][:3] == pytest.approx([0, 0.5 * optim.lr, optim.lr])
    assert all(a.elapsed_s < b.elapsed_s for a, b in zip(result.steps, result.steps[1:]))
    assert wall >= result.seconds >= result.steps[-1].elapsed_s > 0
    assert all(p.grad is None for p in model.parameters())  # gradients freed after each step
    assert 0 < result.peak_memory_mb <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_without_heldout_or_hooks_only_the_training_runs(model):
    micro = [_batch(20 + i, padded=False) for i in range(3)]
    optim = OptimizerConfig(lr=1e-2)
    ref, rows, _ = _reference(model, micro, 3, optim, 1, None, 0)
    result = train(model, iter(micro), 3, optim, CPU)
    assert result.heldout == [] and [e.heldout_loss for e in result.steps] == [None] * 3
    assert [e.lr for e in result.steps] == pytest.approx([r[0] for r in rows])  # no warm-up: full rate first
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [3.0, 1e-9])
def test_a_custom_loss_trains_while_the_heldout_stays_cross_entropy(model, scale):
    """1e-9: gradients far below AdamW's eps, where the update is linear in them, so the 1/accumulation matters."""
    micro = [_batch(30 + i, padded=False) for i in range(4)]
    heldout = [_batch(52, False)]
    optim = OptimizerConfig(lr=1e-1, max_grad_norm=None)
    ref, rows, held = _reference(model, micro, 2, optim, 2, heldout, 0, loss_scale=scale)
    result = train(model, iter(micro), 2, optim, CPU, accumulation=2, heldout=heldout,
                   loss_fn=lambda m, b, d, bf16: scale * batch_loss(m, b, d, bf16))
    assert [e.train_loss for e in result.steps] == pytest.approx([r[1] for r in rows], rel=1e-5)
    assert [h.loss for h in result.heldout] == pytest.approx([held[0], held[2]], rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_stop_before_a_step_raises_and_leaves_the_steps_done(model):
    micro = iter([_batch(40 + i, padded=False) for i in range(5)])
    asked, events = [], []

    def stop():
        asked.append(1)
        return len(asked) == 3
    with pytest.raises(JobCancelled, match="^training was cancelled$"):
        train(model, micro, 5, OptimizerConfig(), CPU, callback=events.append, should_stop=stop)
    assert [e.step for e in events] == [1, 2] and len(asked) == 3


@pytest.mark.parametrize("bf16", [True, False])
def test_the_bf16_choice_reaches_every_autocast(model, monkeypatch, bf16):
    asked = []
    real = loop.autocast_context
    monkeypatch.setattr(loop, "autocast_context", lambda device, flag=True: asked.append(flag) or real(device, flag))
    train(model, iter([_batch(60, False)] * 2), 1, OptimizerConfig(), CPU, accumulation=2,
          heldout=[_batch(61, False)], bf16=bf16)
    assert asked == [bf16] * 4  # held-out before, two micro-batches, held-out after


def test_bf16_is_the_default_everywhere(model, monkeypatch):
    asked = []
    real = loop.autocast_context
    monkeypatch.setattr(loop, "autocast_context", lambda device, flag=None: asked.append(flag) or real(device, True))
    b = _batch(62, False)
    with torch.no_grad():
        batch_loss(model, b, CPU)
    heldout_loss(model, [b], CPU)
    train(model, iter([b]), 1, OptimizerConfig(), CPU)
    assert asked == [True] * 3


def test_training_builds_no_kv_cache(model):
    model.config.use_cache = True  # as in real checkpoints
    outputs = []
    model.register_forward_hook(lambda m, a, out: outputs.append(sorted(out.keys())))
    train(model, iter([_batch(63, False)]), 1, OptimizerConfig(), CPU, heldout=[_batch(64, False)])
    assert outputs == [["logits"]] * 3


def test_on_cuda_the_peak_is_reset_before_and_read_after(model, monkeypatch):
    """No GPU needed: moves to cuda are recorded and not made (conftest.DeviceMoves), torch.cuda's memory
    counters replaced by recorders."""
    from tests.device_moves import DeviceMoves
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("peak", device)) or 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    model.register_forward_pre_hook(lambda m, a: calls.append("forward"))
    cuda = torch.device("cuda")
    with DeviceMoves(pretend="cuda") as moves:
        result = train(model, iter([_batch(65, False)]), 1, OptimizerConfig(), cuda)
    assert calls == [("reset", cuda), "forward", ("peak", cuda)] and result.peak_memory_mb == 3.0
    assert cuda in moves.moves


def test_autocast_only_on_a_cuda_device_with_bf16(monkeypatch):
    import contextlib
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with pytest.warns(UserWarning):  # no CUDA here: torch builds the context, then disables it
        ctx = loop.autocast_context(torch.device("cuda"))  # bf16 by default
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert isinstance(loop.autocast_context(torch.device("cuda"), False), contextlib.nullcontext)
    assert isinstance(loop.autocast_context(CPU, True), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert isinstance(loop.autocast_context(torch.device("cuda"), True), contextlib.nullcontext)


def test_trained_report_copies_the_source_or_starts_fresh(model):
    from slimgpt_core.base.events import RunReport
    from slimgpt_core.base.shapes import count_parameters
    assert loop.trained_report(model).model == ""
    fresh = loop.trained_report(model, source="dense-tiny")
    n = sum(p.numel() for p in model.parameters())
    n_layers = sum(p.numel() for p in model.model.layers.parameters())
    assert fresh == RunReport(model="dense-tiny", settings={}, head_ratios=[], ffn_ratios=[], params_before=n,
                                params_after=n, layer_params_before=n_layers, layer_params_after=n_layers)
    assert n == count_parameters(model)
    source = copy.deepcopy(fresh)
    source.settings = {"method": "slimgpt", "nested": [1]}
    copied = loop.trained_report(model, source, "ignored")
    assert copied == source and copied is not source and copied.settings is not source.settings


def test_a_second_training_keeps_the_first_record_as_previous(model):
    first = loop.trained_report(model, None, "dense-tiny", "recovery", {"steps": 3})
    assert first.recovery == {"steps": 3} and first.pretrain is None
    second = loop.trained_report(model, first, "run-a", "recovery", {"steps": 5})
    assert second.recovery == {"steps": 5, "previous_recovery": {"steps": 3}}
    assert first.recovery == {"steps": 3}  # the source run's report is not touched
    other = loop.trained_report(model, second, "run-b", "pretrain", {"tokens": 7})
    assert other.pretrain == {"tokens": 7} and other.recovery == second.recovery  # kinds chain separately
