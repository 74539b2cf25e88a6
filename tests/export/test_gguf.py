"""GGUF export run in real llama.cpp (llama-cpp-python) against the PyTorch model it came from.

stories260k (real, 1 MB) carries most checks: a uniform export (llama layout) and a hand-built mixed schedule
(`deci` layout) with a layer whose attention is removed and one whose FFN is removed. Tiny random Qwen2 models check
the q/k/v biases (exact math only). SmolLM2 runs in test_gguf_smollm2.py."""
from __future__ import annotations

import copy
import errno
import math

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.evaluation import llamacpp
from slimgpt_core.workspace.gguf import export_gguf, layer_shapes
from slimgpt_core.base.shapes import keep_channels, keep_kv_groups
from slimgpt_core.models import LoadedModel, load_model

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
# f32 on both sides; what differs is the order of the sums (llama.cpp's SIMD blocks against MKL's) over at most 172
# products per dot product, through 5 layers, RMS norms and a softmax over at most 20 positions: a few units of f32
# rounding (u = 6e-8) times the size of the terms, far below 1e-4 of the largest logit. A wrong rope row order,
# a missing bias or a wrong head count moves logits by whole units.
LOGIT_TOLERANCE = 1e-4


def removed_attention(hidden_states, *args, **kwargs):
    """What a layer with every attention head removed adds to the residual stream: nothing."""
    return torch.zeros_like(hidden_states), None


def mixed_stories(loaded: LoadedModel) -> LoadedModel:
    """stories260k with a hand-built schedule: each layer its own heads and FFN width; layer 1 without attention,
    layer 2 without FFN (widths not multiples of 32, as SlimGPT leaves them)."""
    model = copy.deepcopy(loaded.model)
    plan = [([0, 2], 100), ([], 172), ([1], 0), ([0, 1, 2, 3], 64), ([0, 1, 3], 33)]
    for layer, (groups, width) in zip(model.model.layers, plan):
        keep_kv_groups(layer, groups)
        keep_channels(layer, range(width))
        if not groups:
            layer.self_attn.forward = removed_attention
    assert layer_shapes(model) == [(4, 2, 100), (0, 0, 172), (2, 1, 0), (8, 4, 64), (6, 3, 33)]
    return LoadedModel(model, loaded.tokenizer, "stories260k", loaded.path)


@pytest.fixture(scope="module")
def stories():
    loaded = load_model("stories260k", "cpu", "float32")
    return {"uniform": loaded, "mixed": mixed_stories(loaded)}


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].numpy()


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        token = int(np.argmax(torch_logits(model, ids)[-1]))
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("shape", ["uniform", "mixed"])
def test_f32_gguf_matches_pytorch(stories, tmp_path, shape):
    loaded = stories[shape]
    result = export_gguf(loaded, tmp_path / "m.gguf", "f32")
    assert result.architecture == {"uniform": "llama", "mixed": "deci"}[shape]
    meta = llamacpp.gguf_metadata(result.path)
    if shape == "mixed":  # per-layer arrays; the FFN-less layer with attention carries one zero channel
        assert meta["deci.attention.head_count"] == [4, 0, 2, 8, 6]
        assert meta["deci.attention.head_count_kv"] == [2, 0, 1, 4, 3]
        assert meta["deci.feed_forward_length"] == [100, 172, 1, 64, 33]
        assert not any(k.startswith("blk.1.attn") for k in llamacpp.tensor_types(result.path))
    llm = llamacpp.open_gguf(result.path, n_ctx=128, threads=1, logits_all=True, f32_cache=True)
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    # the tokenizer in the file splits text as the Hugging Face one does
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids
    expected, got = torch_logits(loaded.model, ids), llamacpp.logits(llm, ids)
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= LOGIT_TOLERANCE * scale
    assert list(llamacpp.greedy(llm, ids, 32)) == torch_greedy(loaded.model, ids, 32)


def test_removed_attention_and_ffn_change_the_output(stories, tmp_path):
    """The mixed model's reference is not the dense one in disguise: its logits differ by whole units."""
    ids = stories["uniform"].tokenizer(PROMPT)["input_ids"]
    dense, mixed = (torch_logits(stories[k].model, ids) for k in ("uniform", "mixed"))
    assert np.abs(dense - mixed).max() > 1.0


def _windows(tokenizer, n: int, seqlen: int) -> np.ndarray:
    from slimgpt_core.data import evaluation_tokens

    tokens = evaluation_tokens(tokenizer, "wikitext2")
    return tokens[: n * seqlen].view(n, seqlen).numpy()


def torch_nll(model, windows: np.ndarray) -> float:
    """Mean next-token NLL over the windows, written out with log_softmax + gather."""
    with torch.no_grad():
        ids = torch.from_numpy(windows)
        logp = torch.log_softmax(model(ids, use_cache=False).logits.double(), dim=-1)[:, :-1]
        return float(-logp.gather(2, ids[:, 1:, None]).mean())


@pytest.mark.parametrize("shape", ["uniform", "mixed"])
def test_q8_0_perplexity_within_two_percent(stories, tmp_path, shape):
    loaded = stories[shape]
    result = export_gguf(loaded, tmp_path / "m.gguf", "q8_0")
    types = llamacpp.tensor_types(result.path)
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    # ffn_down's rows are as long as the FFN width: 172 and 100 are not multiples of Q8_0's 32-wide blocks (f16
    # stays), 64 is
    assert types["blk.0.ffn_down.weight"] == "F16"
    if shape == "mixed":
        assert types["blk.3.ffn_down.weight"] == "Q8_0"
    windows = _windows(loaded.tokenizer, 8, 128)
    llm = llamacpp.open_gguf(result.path, n_ctx=128, threads=1, logits_all=True)
    ours = llamacpp.perplexity(llm, windows)
    reference = math.exp(torch_nll(loaded.model, windows))
    assert ours.windows == 8 and ours.tokens == 8 * 127
    assert abs(ours.ppl / reference - 1) < 0.02


def test_llamacpp_quantization_q4_k_m(stories, tmp_path):
    loaded = stories["mixed"]
    f16 = export_gguf(loaded, tmp_path / "m-f16.gguf", "f16")
    q4 = export_gguf(loaded, tmp_path / "m-q4.gguf", "Q4_K_M")
    assert q4.bytes < f16.bytes
    meta = llamacpp.gguf_metadata(q4.path)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert meta["deci.attention.head_count"] == [4, 0, 2, 8, 6]  # llama.cpp's quantize keeps the metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-q4.gguf"]  # no staging file left
    windows = _windows(loaded.tokenizer, 4, 128)
    llm = llamacpp.open_gguf(q4.path, n_ctx=128, threads=1, logits_all=True)
    reference = math.exp(torch_nll(loaded.model, windows))
    assert abs(llamacpp.perplexity(llm, windows).ppl / reference - 1) < 0.10


def tiny_qwen2_mixed(mixed: bool) -> LoadedModel:
    """A tiny random Qwen2 (q/k/v biases) with stories260k's tokenizer (512 tokens)."""
    model = tiny_model("qwen2", heads=4, kv=2, layers=3, ffn=64, hidden=32)
    model.resize_token_embeddings(512, mean_resizing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # biases that matter (they start at zero)
            if "embed" in name:
                p.normal_(0, 0.5)
    if mixed:
        keep_kv_groups(model.model.layers[0], [1])
        keep_channels(model.model.layers[1], range(40))
    tokenizer = load_model("stories260k", "cpu", "float32").tokenizer
    return LoadedModel(model, tokenizer, "tiny-qwen2", "")


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform-qwen2", "mixed-deci"])
def test_qwen2_biases_follow_their_rows(tmp_path, mixed):
    loaded = tiny_qwen2_mixed(mixed)
    result = export_gguf(loaded, tmp_path / "q.gguf", "f32")
    assert result.architecture == ("deci" if mixed else "qwen2")
    assert "blk.0.attn_q.bias" in llamacpp.tensor_types(result.path)
    llm = llamacpp.open_gguf(result.path, n_ctx=64, threads=1, logits_all=True, f32_cache=True)
    ids = [1, 57, 300, 12, 99, 4, 250, 8]
    expected, got = torch_logits(loaded.model, ids), llamacpp.logits(llm, ids)
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE * np.abs(expected).max()


def test_a_gguf_loads_back_with_the_same_weights_and_one_parse(stories, tmp_path, monkeypatch):
    """An f32 GGUF of stories260k (llama layout) loads back through the cached conversion with every weight as it
    was written, and the file's metadata is parsed once for the architecture check, the config, the weights and the
    tokenizer (transformers opens a reader for each); the library's reader is in place again afterwards."""
    path = export_gguf(stories["uniform"], tmp_path / "m.gguf", "f32").path
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, file, mode="r"):
            opened.append(str(file))
            super().__init__(file, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    loaded = load_model(str(path), "cpu", "float32")
    assert opened == [str(path)]
    assert gguf.GGUFReader is CountingReader
    expected = stories["uniform"].model.state_dict()
    got = loaded.model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    ids = stories["uniform"].tokenizer(PROMPT)["input_ids"]
    assert loaded.tokenizer(PROMPT)["input_ids"] == ids
    assert np.array_equal(torch_logits(loaded.model, ids), torch_logits(stories["uniform"].model, ids))


# ---------------------------------------------------------------- bad input: one sentence, nothing written

def test_unsupported_architecture_is_one_sentence(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(SlimGPTError, match="does not support the gpt2 architecture"):
        export_gguf(LoadedModel(model, None, "gpt2", ""), tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_unknown_weight_type_is_one_sentence(stories, tmp_path):
    with pytest.raises(SlimGPTError, match=r"unknown GGUF weight type 'q3_z'.*q8_0.*q4_k_m"):
        export_gguf(stories["uniform"], tmp_path / "x.gguf", "q3_z")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["cancel", "disk full", "interrupt"])
def test_failed_export_keeps_the_earlier_file_and_leaves_nothing(stories, tmp_path, monkeypatch, failure):
    out = tmp_path / "m.gguf"
    export_gguf(stories["uniform"], out, "f16")
    before = out.read_bytes()
    seen = []
    cancel = None
    if failure == "cancel":
        cancel = lambda: len(seen) >= 10  # noqa: E731
    elif failure == "interrupt":
        def on_progress(event):
            seen.append(event)
            if len(seen) == 10:
                raise KeyboardInterrupt
    if failure == "disk full":
        def full_disk(self, *, progress=False):
            self.fout[0].write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    expected = {"cancel": (JobCancelled, "cancelled"), "disk full": (SlimGPTError, r"disk full\); nothing"),
                "interrupt": (KeyboardInterrupt, "")}[failure]
    with pytest.raises(expected[0], match=expected[1]):
        export_gguf(stories["mixed"], out, "q8_0", overwrite=True, cancel=cancel,
                    progress=on_progress if failure == "interrupt" else seen.append)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert out.read_bytes() == before


def test_existing_file_needs_overwrite(stories, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(SlimGPTError, match="already exists"):
        export_gguf(stories["uniform"], out, "f16")
    assert out.read_bytes() == b"keep"
