"""A real SlimGPT run of stories260k with aligned FFN widths, exported through the CLI as a GGUF and run in llama.cpp."""
from __future__ import annotations

import json

import numpy as np
import pytest

from slimgpt_core.cli import main
from slimgpt_core.evaluation import llamacpp
from slimgpt_core.methods.prune_settings import aligned_width
from slimgpt_core.models import load_model


@pytest.mark.parametrize("keep, full, align, expected", [
    (86, 172, 32, 96), (80, 172, 32, 96), (79, 172, 32, 64), (10, 172, 32, 32), (170, 172, 32, 160),
    (172, 172, 32, 172), (1000, 1536, 256, 1024), (1200, 1536, 256, 1280), (50, 172, 1, 50), (20, 24, 32, 20)])
def test_aligned_width_rounds_to_the_nearest_multiple(keep, full, align, expected):
    assert aligned_width(keep, full, align) == expected


def test_aligned_run_exports_to_gguf_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["prune", "--model", "stories260k", "--ratio", "0.5", "--align", "32", "--calib", "tinystories",
                 "--nsamples", "16", "--seqlen", "128", "--ppl", "tinystories", "--ppl-seqlen", "128",
                 "--ppl-windows", "4", "--out", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    widths = config.get("layer_intermediate_size") or [config["intermediate_size"]] * 5
    assert all(w % 32 == 0 and 0 < w < 172 for w in widths), widths
    report = json.loads((run / "report.json").read_text())
    assert report["settings"]["align"] == 32
    capsys.readouterr()
    out = tmp_path / "run.q8_0.gguf"
    assert main(["export", "--model", str(run), "--format", "gguf", "--weight-type", "q8_0", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out)
    # stories260k's heads are 8 wide: attn_output rows of 6 heads (48) stay f16; aligned FFN rows all quantize
    assert all(name.endswith("attn_output.weight") for name in printed["f16_fallback"]), printed["f16_fallback"]
    types = llamacpp.tensor_types(out)
    assert all(types[f"blk.{i}.ffn_down.weight"] == "Q8_0" for i in range(5))
    meta = llamacpp.gguf_metadata(out)
    assert meta["slimgpt.method"] == "slimgpt" and meta["slimgpt.schedule"] == "log"
    assert meta["slimgpt.achieved_layer_ratio"] == pytest.approx(report["summary"]["achieved_layer_ratio"], rel=1e-6)
    assert meta["slimgpt.pruned_ppl.ppl"] == pytest.approx(report["evaluation"]["pruned_ppl"]["ppl"], rel=1e-6)
    assert meta["slimgpt.layer_ffn_width"] == widths
    # the run as llama.cpp runs it continues a story as the PyTorch run does, greedy
    loaded = load_model(str(run), "cpu", "float32")
    ids = loaded.tokenizer("Once upon a time, there was a little dog")["input_ids"]
    import torch

    with torch.no_grad():
        expected = loaded.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                                         min_new_tokens=32)[0, len(ids):].tolist()
    f32 = tmp_path / "run.f32.gguf"
    assert main(["export", "--model", str(run), "--format", "gguf", "--weight-type", "f32", "--out", str(f32)]) == 0
    llm = llamacpp.open_gguf(f32, n_ctx=128, threads=1, f32_cache=True)
    assert list(llamacpp.greedy(llm, ids, 32)) == expected


def test_export_rejects_an_unknown_weight_type_in_one_line(tmp_path, capsys):
    assert main(["export", "--model", "stories260k", "--format", "gguf", "--weight-type", "q9_x",
                 "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown GGUF weight type 'q9_x'") and "\n" not in err
    assert list(tmp_path.iterdir()) == []
