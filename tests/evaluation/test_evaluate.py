"""Perplexity against a hand-computed mean negative log-likelihood on a tiny model (evaluate.py)."""
import math
import statistics
import time
import types

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.evaluation import evaluate
from slimgpt_core.base.errors import JobCancelled, SlimGPTError


def _hand_nll(model, tokens, seqlen, windows):
    """Mean −log p(next token) over every predicted position of the first `windows` windows, one window at
    a time, written out with log_softmax and gather (no cross_entropy, no batching)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            ids = tokens[w * seqlen:(w + 1) * seqlen]
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            picked = logp[:-1].gather(1, ids[1:, None])  # position t predicts token t + 1
            total -= float(picked.sum())
            count += picked.numel()
    return total / count, count


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(5))


def test_perplexity_is_the_mean_nll_of_the_predicted_tokens(model, stream):
    nll, count = _hand_nll(model, stream, 16, 25)  # 400 // 16 = 25 windows
    t0 = time.perf_counter()
    res = evaluate.perplexity(model, stream, seqlen=16, batch_size=5, dataset="tiny")
    elapsed = time.perf_counter() - t0
    assert (res.windows, res.tokens, res.seqlen, res.dataset) == (25, count, 16, "tiny")
    assert count == 25 * 15  # seqlen − 1 predictions per window
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert 0.0 < res.seconds <= elapsed


def test_window_limit_and_batching_do_not_change_the_mean(model, stream):
    nll, count = _hand_nll(model, stream[5:], 24, 7)  # 395 tokens: 16 windows of 24, the 11-token tail unused
    for batch in (1, 3, 8):
        res = evaluate.perplexity(model, stream[5:], seqlen=24, batch_size=batch, max_windows=7)
        assert res.windows == 7 and res.tokens == count == 7 * 23
        assert res.nll == pytest.approx(nll, rel=1e-5)
    assert evaluate.perplexity(model, stream[5:], seqlen=24, max_windows=1000).windows == 16  # capped by the text


def test_standard_error_is_that_of_the_per_window_nlls(model, stream):
    # every window hand-scored alone; the standard error from Python's statistics module, not torch
    per_window = [_hand_nll(model, stream[w * 16:(w + 1) * 16], 16, 1)[0] for w in range(25)]
    expected = statistics.stdev(per_window) / math.sqrt(25)
    for batch in (1, 4, 25):  # windows split across batches in any way give the same list
        res = evaluate.perplexity(model, stream, seqlen=16, batch_size=batch)
        assert res.nll == pytest.approx(statistics.fmean(per_window), rel=1e-5)
        assert res.nll_se == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3  # the windows differ: a zero or constant se would fail above
    assert evaluate.perplexity(model, stream, seqlen=16, max_windows=1).nll_se is None  # no spread from one window
    two = evaluate.perplexity(model, stream, seqlen=16, max_windows=2)  # the smallest sample with a spread
    assert two.nll_se == pytest.approx(abs(per_window[0] - per_window[1]) / 2, rel=1e-4)


def test_progress_and_cancel(model, stream):
    seen = []
    evaluate.perplexity(model, stream, seqlen=16, batch_size=10, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(10, 25), (20, 25), (25, 25)]
    asked = []
    with pytest.raises(JobCancelled, match="^evaluation was cancelled$"):
        evaluate.perplexity(model, stream, seqlen=16, batch_size=10, should_stop=lambda: len(asked.append(1) or asked) > 2,
                            progress=lambda d, n: seen.append((d, n)))
    assert len(asked) == 3 and seen[3:] == [(10, 25), (20, 25)]  # stopped before the third batch
    assert evaluate.perplexity(model, stream, seqlen=16, max_windows=2, should_stop=lambda: False).windows == 2


def test_bad_lengths_are_clear_errors(model, stream):
    with pytest.raises(SlimGPTError, match="evaluation length must be >= 2, got 1"):
        evaluate.perplexity(model, stream, seqlen=1)
    assert evaluate.perplexity(model, stream, seqlen=2, max_windows=3).tokens == 3  # 2 is the shortest window
    with pytest.raises(SlimGPTError, match="evaluation length 129 exceeds the model's context of 128 tokens"):
        evaluate.perplexity(model, stream, seqlen=129)
    assert evaluate.perplexity(model, stream, seqlen=128, max_windows=1).windows == 1  # the whole context is fine
    with pytest.raises(SlimGPTError, match="evaluation text has 100 tokens, fewer than one window of 101"):
        evaluate.perplexity(model, stream[:100], seqlen=101)


def test_out_of_memory_is_a_clear_error(stream):
    class Exhausted(torch.nn.Module):
        config = type("Config", (), {"max_position_embeddings": 64})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(SlimGPTError, match="out of memory on cuda:0 while evaluating perplexity: lower"):
        evaluate.perplexity(Exhausted(), stream, seqlen=16, device="cuda:0")
    with pytest.raises(SlimGPTError, match="out of memory on cpu while evaluating perplexity"):
        evaluate.perplexity(Exhausted(), stream, seqlen=16)


def test_defaults_are_windows_of_128_in_batches_of_8(model):
    long = torch.randint(0, 101, (9 * 128 + 5,), generator=torch.Generator().manual_seed(2))
    seen = []
    res = evaluate.perplexity(model, long, progress=lambda d, n: seen.append((d, n)))
    assert (res.seqlen, res.windows, res.tokens, res.dataset) == (128, 9, 9 * 127, "")
    assert seen == [(8, 9), (9, 9)]


def test_a_model_without_a_context_length_is_not_limited(model, stream):
    class NoContext(torch.nn.Module):  # a model whose config does not say how long its context is
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.asked = inner, types.SimpleNamespace(), []

        def forward(self, ids, use_cache=None):
            self.asked.append(use_cache)
            return self.inner(ids, use_cache=use_cache)

    wrapped = NoContext(model)
    res = evaluate.perplexity(wrapped, stream, seqlen=24, max_windows=2)
    assert wrapped.asked == [False]  # no KV cache is built for a scoring forward
    assert res.windows == 2 and res.nll == pytest.approx(_hand_nll(model, stream, 24, 2)[0], rel=1e-5)


def test_cached_perplexity_hits_and_bypasses(model, monkeypatch, tmp_path):
    from slimgpt_core import data
    from slimgpt_core.base import cache

    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path))
    text = torch.randint(0, 101, (300,), generator=torch.Generator().manual_seed(9))
    asked = []
    monkeypatch.setattr(data, "evaluation_tokens", lambda tokenizer, source: asked.append((tokenizer, source)) or text)
    computed = []
    real = evaluate.perplexity
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: computed.append(a[2:]) or real(*a, **k))
    first = evaluate.cached_perplexity(model, "the tokenizer", "made-up", 16, 4, max_windows=5)
    assert asked == [("the tokenizer", "made-up")]
    assert computed == [(16, 4, 5, "cpu", "made-up", None, None, None)]
    assert first.dataset == "made-up" and first.windows == 5
    assert first.nll == pytest.approx(_hand_nll(model, text, 16, 5)[0], rel=1e-5)
    assert evaluate.cached_perplexity(model, None, "made-up", 16, 4, max_windows=5) == first
    assert len(computed) == 1
    progress, stop = (lambda d, n: None), (lambda: False)
    evaluate.cached_perplexity(model, None, "made-up", 16, 4, max_windows=5, device="cpu", progress=progress,
                               should_stop=stop, use_cache=False)
    assert computed[-1] == (16, 4, 5, "cpu", "made-up", progress, stop, None)
    evaluate.cached_perplexity(model, None, "made-up", 16, 4, max_windows=6)  # another key
    evaluate.cached_perplexity(model, None, "made-up", 32, 4, max_windows=5)
    assert len(computed) == 4 and len(list((tmp_path / "results").glob("*.json"))) == 3
    assert cache.STATS["results.hit"] >= 1
    evaluate.cached_perplexity(model, None, "made-up")  # defaults: windows of 128, batches of 8, all windows
    assert computed[-1] == (128, 8, None, "cpu", "made-up", None, None, None)


def test_windows_are_sent_to_the_device_of_the_model(model, stream):
    """The token windows go to wherever the model's weights are (a GPU), however the text was loaded. Here the
    model's first weight is on the meta device: each batch's move there is recorded (and not made, so the real
    weights still compute on the CPU)."""
    from tests.device_moves import DeviceMoves

    class Elsewhere(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.empty(1, device="meta"))  # the first of its parameters
            self.inner, self.config = inner, inner.config

        def forward(self, ids, use_cache=None):
            return self.inner(ids, use_cache=use_cache)

    with DeviceMoves(pretend="meta") as moves:
        res = evaluate.perplexity(Elsewhere(model), stream, seqlen=16, batch_size=10)
    assert [m for m in moves.moves if m is not None and m.type == "meta"] == [torch.device("meta")] * 3  # 3 batches
    assert res.nll == pytest.approx(_hand_nll(model, stream, 16, 25)[0], rel=1e-5)
