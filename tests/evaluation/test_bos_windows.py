"""<bos> at the start of every calibration and evaluation window for the Gemma family (data.window_bos), and
plain windows, byte for byte as before, for every other tokenizer (stories260k's llama tokenizer here)."""
import json
import math
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from slimgpt_core import data
from slimgpt_core.base.assets import asset_path
from slimgpt_core.evaluation import evaluate
from tests.tiny_models import tiny_model

STORIES = asset_path("models", "stories260k")


@pytest.fixture(scope="module")
def llama_tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def gemma_tokenizer(tmp_path_factory):
    """stories260k's vocabulary under the GemmaTokenizer class (the class Gemma 1/2/3 checkpoints name)."""
    folder = tmp_path_factory.mktemp("gemma-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GemmaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    return tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))


def _seeded_draw(tokenizer, nsamples, seqlen, seed):
    """The calibration draw written out: the same tokenised text, the same generator, windows of seqlen."""
    budget = max(4 * nsamples * seqlen, 262_144)
    docs, _ = data.documents("tinystories", "train")
    stream = data._tokenize_docs(tokenizer, docs, budget, "\n\n")
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def test_llama_windows_are_unchanged(llama_tokenizer):
    assert data.window_bos(llama_tokenizer) is None
    got = data.calibration_tokens(llama_tokenizer, "tinystories", 6, 32, seed=3)
    assert torch.equal(got, _seeded_draw(llama_tokenizer, 6, 32, 3))
    stream = data.evaluation_tokens(llama_tokenizer, "tinystories")
    assert torch.equal(evaluate.text_windows(stream, 32, 5), stream[:160].view(5, 32))


def test_gemma_calibration_windows_start_with_bos(gemma_tokenizer):
    bos = gemma_tokenizer.bos_token_id
    assert data.window_bos(gemma_tokenizer) == bos == 1
    got = data.calibration_tokens(gemma_tokenizer, "tinystories", 6, 32, seed=3)
    plain = _seeded_draw(gemma_tokenizer, 6, 32, 3)
    assert got.shape == (6, 32) and bool((got[:, 0] == bos).all())
    assert torch.equal(got[:, 1:], plain[:, :-1])  # the same draws, the last token making room for <bos>


def _hand_nll(model, windows):
    """Mean −log p over every predicted position, window by window, with log_softmax and gather."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            picked = logp[:-1].gather(1, ids[1:, None])
            total -= float(picked.sum())
            count += picked.numel()
    return total / count, count


def test_gemma_perplexity_windows_are_bos_and_text(gemma_tokenizer, llama_tokenizer):
    model = tiny_model("gemma3_text", vocab=512)
    stream = data.evaluation_tokens(gemma_tokenizer, "tinystories")
    hand = torch.stack([torch.cat([torch.tensor([1]), stream[w * 15:(w + 1) * 15]]) for w in range(4)])
    nll, count = _hand_nll(model, hand)
    res = evaluate.cached_perplexity(model, gemma_tokenizer, "tinystories", seqlen=16, batch_size=3, max_windows=4)
    assert (res.windows, res.tokens) == (4, count) and count == 4 * 15
    assert res.nll == pytest.approx(nll, rel=1e-5) and res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    # the llama tokenizer's result on the same model is the plain-window one, not served from the <bos> entry
    plain = data.evaluation_tokens(llama_tokenizer, "tinystories")
    nll_plain, _ = _hand_nll(model, plain[:64].view(4, 16))
    res_plain = evaluate.cached_perplexity(model, llama_tokenizer, "tinystories", seqlen=16, batch_size=3,
                                           max_windows=4)
    assert res_plain.nll == pytest.approx(nll_plain, rel=1e-5) and res_plain.tokens == 4 * 15


def test_held_out_windows_of_the_accumulation_demo_follow_the_same_rule(gemma_tokenizer, llama_tokenizer):
    from slimgpt_core.services.accumulation import heldout_windows
    stream = data.evaluation_tokens(llama_tokenizer, "tinystories")
    assert torch.equal(heldout_windows(llama_tokenizer, "tinystories", 32, 5), stream[:160].view(5, 32))
    gemma = heldout_windows(gemma_tokenizer, "tinystories", 32, 5)
    text = data.evaluation_tokens(gemma_tokenizer, "tinystories")
    assert bool((gemma[:, 0] == 1).all()) and torch.equal(gemma[:, 1:], text[:155].view(5, 31))
