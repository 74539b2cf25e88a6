"""SmolLM2 (the offline default, from its GGUF) with a mixed schedule, exported and run in llama.cpp: the fewest,
slowest GGUF checks. The tokenizer is copied from the source GGUF."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimgpt_core.assets import smollm2_gguf
from slimgpt_core.evaluation import llamacpp
from slimgpt_core.export.gguf import export_gguf, layer_shapes
from slimgpt_core.methods.surgery import keep_channels, keep_kv_groups
from slimgpt_core.models import load_model
from tests.export.test_gguf import LOGIT_TOLERANCE, _windows, torch_logits, torch_nll

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_mixed():
    """SmolLM2 sliced to SlimGPT-like mixed shapes (9/6/3 query heads, widths that are not multiples of 32)."""
    loaded = load_model("default", "cpu", "float32")
    widths = [1296, 1000, 575]
    for i, layer in enumerate(loaded.model.model.layers):
        keep_kv_groups(layer, range(3 - i % 3))
        keep_channels(layer, range(widths[i % 3]))
    assert layer_shapes(loaded.model)[:3] == [(9, 3, 1296), (6, 2, 1000), (3, 1, 575)]
    return loaded


def test_f32_gguf_of_mixed_smollm2_matches_pytorch(smollm2_mixed, tmp_path):
    loaded = smollm2_mixed
    result = export_gguf(loaded, tmp_path / "smol.gguf", "f32")
    assert result.architecture == "deci" and result.tokenizer_source.startswith("source GGUF")
    meta = llamacpp.gguf_metadata(result.path)
    import gguf

    source = gguf.GGUFReader(smollm2_gguf()).fields["tokenizer.chat_template"].contents()
    assert meta["tokenizer.chat_template"] == source and meta["tokenizer.ggml.pre"] == "smollm"
    llm = llamacpp.open_gguf(result.path, n_ctx=128, threads=1, logits_all=True, f32_cache=True)
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    assert llm.tokenize(PROMPT.encode(), add_bos=False) == ids
    expected, got = torch_logits(loaded.model, ids), llamacpp.logits(llm, ids)
    # 30 layers and sums over up to 1296 products instead of 172: still far below 1e-4 of the largest logit
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE * np.abs(expected).max()
    with torch.no_grad():  # transformers' own greedy decoding with its KV cache
        expected_text = loaded.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                                              min_new_tokens=32)[0, len(ids):].tolist()
    assert list(llamacpp.greedy(llm, ids, 32)) == expected_text


def test_q8_0_gguf_of_mixed_smollm2_perplexity_within_two_percent(smollm2_mixed, tmp_path):
    loaded = smollm2_mixed
    result = export_gguf(loaded, tmp_path / "smol.gguf", "q8_0")
    assert len(result.fallback_tensors) == 30  # every ffn_down: 1296, 1000 and 575 are not multiples of 32
    windows = _windows(loaded.tokenizer, 4, 128)
    llm = llamacpp.open_gguf(result.path, n_ctx=128, threads=1, logits_all=True)
    ours = llamacpp.perplexity(llm, windows)
    reference = math.exp(torch_nll(loaded.model, windows))
    assert abs(ours.ppl / reference - 1) < 0.02, (ours.ppl, reference)
