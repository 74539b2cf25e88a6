"""SmolLM2 (the offline default, from its GGUF) pruned by SlimGPT through the command line (its perplexity summary
checked), exported and run in llama.cpp: the fewest, slowest GGUF checks. The tokenizer is copied from the source
GGUF."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from slimgpt_core.base.assets import smollm2_gguf
from slimgpt_core.cli import main
from slimgpt_core.evaluation import llamacpp
from slimgpt_core.workspace.gguf import export_gguf, layer_shapes
from slimgpt_core.models import load_model
from tests.export.test_gguf import LOGIT_TOLERANCE, _windows, torch_logits, torch_nll

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_mixed(tmp_path_factory):
    """SmolLM2 pruned by SlimGPT to 20% (log schedule, 4 × 128 C4 samples, `--align 1`): whole KV groups and FFN
    widths that differ by layer and are not multiples of 32, OBS-compensated, so its perplexity is a model's (sliced
    without compensation it is in the thousands, where q8_0's rounding moves it by more than 2%)."""
    run = tmp_path_factory.mktemp("smollm2") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["prune", "--model", "default", "--ratio", "0.2", "--calib", "c4", "--nsamples", "4", "--seqlen",
                     "128", "--align", "1", "--ppl", "wikitext2", "--ppl-seqlen", "128", "--ppl-windows", "4",
                     "--out", str(run), "--quiet"]) == 0
    # the offline default model (GQA, 30 layers, from its GGUF) through the command line, short calibration
    summary = json.loads(printed.getvalue().strip().splitlines()[-1])
    assert 20 < summary["dense_ppl"] < 200 and summary["dense_ppl"] < summary["pruned_ppl"] < 5000
    assert 0.15 < summary["achieved_ratio"] < 0.25
    config = json.loads((run / "config.json").read_text())
    assert len(config["layer_num_attention_heads"]) == 30
    loaded = load_model(str(run), "cpu", "float32")
    shapes = layer_shapes(loaded.model)
    assert len(set(shapes)) > 1 and all(heads % 3 == 0 and heads == 3 * kv for heads, kv, _ in shapes)
    return run, loaded


def test_f32_gguf_of_mixed_smollm2_matches_pytorch(smollm2_mixed, tmp_path):
    run, loaded = smollm2_mixed
    result = export_gguf(run, tmp_path / "smol.gguf", "f32")
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
    run, loaded = smollm2_mixed
    result = export_gguf(run, tmp_path / "smol.gguf", "q8_0")
    # Q8_0 blocks are 32 wide: exactly the ffn_down tensors whose width is not a multiple of 32 stay f16
    unaligned = {f"blk.{i}.ffn_down.weight" for i, (_, _, width) in enumerate(layer_shapes(loaded.model)) if width % 32}
    assert unaligned and set(result.fallback_tensors) == unaligned
    windows = _windows(loaded.tokenizer, 4, 128)
    llm = llamacpp.open_gguf(result.path, n_ctx=128, threads=1, logits_all=True)
    ours = llamacpp.perplexity(llm, windows)
    reference = math.exp(torch_nll(loaded.model, windows))
    assert abs(ours.ppl / reference - 1) < 0.02, (ours.ppl, reference)
