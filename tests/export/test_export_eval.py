"""Checkpoints that load anywhere, zero-shot tasks through lm-eval, speed, and the cache (issue 3)."""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from slimgpt_core.base import cache
from slimgpt_core.cli import main
from slimgpt_core.data import calibration_tokens
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.workspace.exports import export_model
from slimgpt_core.models import load_model
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.workspace.store import save_run_at

LOAD_AND_COMPARE = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ref, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote) if remote else \\
    AutoModelForCausalLM.from_pretrained(folder)
data = torch.load(ref, weights_only=True)
with torch.no_grad():
    logits = model(data["ids"]).logits
print(type(model).__name__, float((logits - data["logits"]).abs().max()))
"""


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    old = os.environ.get("SLIMGPT_CACHE")
    os.environ["SLIMGPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["SLIMGPT_CACHE"]
    else:
        os.environ["SLIMGPT_CACHE"] = old


def _pruned_stories(settings):
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 16, 128)
    report = prune_model(loaded.model, tokens, settings, model_name="stories260k")
    return loaded, report


def _fresh_process_logits(folder, model, tmp_path, remote):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    out = subprocess.run([sys.executable, "-c", LOAD_AND_COMPARE, str(folder), str(tmp_path / "ref.pt"),
                          "1" if remote else "0"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    name, diff = out.stdout.split()
    return name, float(diff)


def test_mixed_shape_export_round_trip_in_fresh_process(tmp_path, isolated_cache):
    loaded, report = _pruned_stories(PruneSettings(ratio=0.5, schedule="log"))
    run = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path / "run")
    result = export_model(str(run), tmp_path / "export", make_zip=True)
    assert result.heterogeneous and "modeling_slimgpt.py" in result.files
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slimgpt.SlimGPTLlamaForCausalLM"
    assert len(set(config["layer_intermediate_size"])) > 1
    name, diff = _fresh_process_logits(tmp_path / "export", loaded.model, tmp_path, remote=True)
    assert name == "SlimGPTLlamaForCausalLM" and diff == 0.0
    import zipfile
    with zipfile.ZipFile(result.zip_path) as z:
        assert {"config.json", "model.safetensors", "modeling_slimgpt.py", "tokenizer.json"} <= set(z.namelist())
    card = (tmp_path / "export" / "README.md").read_text()
    assert "stories260k" in card and "trust_remote_code=True" in card
    assert f"{report.params_before:,}" in card and f"{report.params_after:,}" in card
    for i, layer in enumerate(loaded.model.model.layers):  # the per-layer table
        q = layer.self_attn.q_proj.out_features // 8
        assert f"| {i} | {q} | {q // 2} | {layer.mlp.down_proj.in_features} |" in card
    assert "| schedule | log |" in card


def test_uniform_export_is_a_stock_checkpoint(tmp_path, isolated_cache):
    loaded, report = _pruned_stories(PruneSettings(keep_heads=[4] * 5, keep_ffn=[128] * 5))
    run = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path / "run")
    result = export_model(str(run), tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert not result.heterogeneous and "auto_map" not in config and "modeling_slimgpt.py" not in result.files
    assert config["model_type"] == "llama" and config["num_attention_heads"] == 4 and config["intermediate_size"] == 128
    name, diff = _fresh_process_logits(tmp_path / "export", loaded.model, tmp_path, remote=False)
    assert name == "LlamaForCausalLM" and diff == 0.0


def test_failed_export_leaves_nothing(tmp_path, monkeypatch, isolated_cache):
    loaded, report = _pruned_stories(PruneSettings(ratio=0.3))
    run = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path / "run")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)  # after the weights, before the remote code file
    with pytest.raises(SlimGPTError, match="disk full"):
        export_model(str(run), tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_lm_eval_command_line_on_exported_model(tmp_path, isolated_cache, monkeypatch, assets_root):
    """lm-eval's own command line on an exported pruned model scores hand-made documents as we do by hand."""
    from tests.multiple_choice import DOCS, hand_scores, offline_assets
    from slimgpt_core.evaluation.zeroshot import write_task_yamls

    monkeypatch.setenv("SLIMGPT_ASSETS", str(offline_assets(tmp_path, assets_root)))
    loaded, report = _pruned_stories(PruneSettings(ratio=0.4))
    acc, acc_norm, margin = hand_scores(loaded.model, loaded.tokenizer)
    assert margin > 1.0
    run = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path / "run")
    export_model(str(run), tmp_path / "export")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    names = write_task_yamls(tasks, ["piqa"], prefix="offline_")
    lm_eval = shutil.which("lm_eval") or shutil.which("lm-eval")
    assert lm_eval, "lm-eval's command line is installed with the package"
    out = subprocess.run([lm_eval, "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'export'},trust_remote_code=True,max_length=512,truncation=True",
                          "--tasks", ",".join(names), "--include_path", str(tasks), "--device", "cpu",
                          "--batch_size", "4", "--output_path", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    files = list((tmp_path / "results").rglob("results*.json"))
    payload = json.loads(files[0].read_text())
    assert payload["n-samples"]["offline_piqa"]["effective"] == len(DOCS)
    assert payload["results"]["offline_piqa"]["acc,none"] == pytest.approx(acc)
    assert payload["results"]["offline_piqa"]["acc_norm,none"] == pytest.approx(acc_norm)


def test_zero_shot_offline_in_memory_and_result_cache(isolated_cache, monkeypatch):
    from slimgpt_core.evaluation import zeroshot

    loaded = load_model("stories260k")
    calls = []
    real = zeroshot._zero_shot
    monkeypatch.setattr(zeroshot, "_zero_shot", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    progress = []
    res = zeroshot.zero_shot(loaded.model, loaded.tokenizer, list(zeroshot.TASKS), limit=4,
                             progress=lambda i, n, t: progress.append((i, n, t)))
    assert list(res) == list(zeroshot.TASKS)
    for r in res.values():
        assert r.n == 4 and r.limit == 4 and 0.0 <= r.acc <= 1.0 and 0.0 <= r.acc_norm <= 1.0
        assert r.source.startswith("offline:")
    assert [p[2] for p in progress] == list(zeroshot.TASKS) + ["done"]
    again = zeroshot.zero_shot(loaded.model, loaded.tokenizer, ["piqa", "boolq"], limit=4)
    assert len(calls) == 1  # the second call was served from cache/results
    assert again["piqa"] == res["piqa"]
    zeroshot.zero_shot(loaded.model, loaded.tokenizer, ["piqa"], limit=3)  # another limit is another entry
    assert calls[-1] == ["piqa"] and len(calls) == 2


def test_perplexity_cache_hit_and_corrupt_entries_recomputed(isolated_cache, monkeypatch):
    from slimgpt_core.evaluation import evaluate

    loaded = load_model("stories260k")
    computed = []
    real = evaluate.perplexity
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: computed.append(1) or real(*a, **k))
    first = evaluate.cached_perplexity(loaded.model, loaded.tokenizer, "tinystories", 256, max_windows=5)
    second = evaluate.cached_perplexity(loaded.model, loaded.tokenizer, "tinystories", 256, max_windows=5)
    assert len(computed) == 1 and first == second
    for entry in (cache.cache_root() / "results").glob("*.json"):  # corrupt every result entry
        entry.write_text('{"key": "trunc')
    for entry in (cache.cache_root() / "tokens").glob("*.safetensors"):  # and truncate the token cache
        entry.write_bytes(entry.read_bytes()[:50])
    before = cache.STATS["results.corrupt"], cache.STATS["tokens.corrupt"]
    third = evaluate.cached_perplexity(loaded.model, loaded.tokenizer, "tinystories", 256, max_windows=5)
    assert len(computed) == 2 and third.ppl == pytest.approx(first.ppl)
    assert cache.STATS["results.corrupt"] == before[0] + 1 and cache.STATS["tokens.corrupt"] == before[1] + 1


def test_dense_statistics_are_reused(isolated_cache):
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 8, 64)
    settings = PruneSettings(ratio=0.3, sequential=False)
    first = prune_model(load_model("stories260k").model, tokens, settings)
    second = prune_model(load_model("stories260k").model, tokens, settings)
    eligible = 5 + sum(1 for m in first.modules if m.module == "attn" and m.units_removed == 0)
    assert first.reused_statistics == 0 and second.reused_statistics == eligible
    assert [m.rel_error for m in first.modules] == [m.rel_error for m in second.modules]
    seq = prune_model(load_model("stories260k").model, tokens, PruneSettings(ratio=0.3))
    assert seq.reused_statistics >= 1  # layer 0 sees dense inputs in sequential mode too


def test_speed_dense_vs_pruned(isolated_cache):
    from slimgpt_core.evaluation.speed import measure_speed

    dense = load_model("stories260k")
    pruned, _ = _pruned_stories(PruneSettings(ratio=0.5))
    a = measure_speed(dense.model, (1, 2), (32,), new_tokens=4, repeats=1)
    b = measure_speed(pruned.model, (1, 2), (32,), new_tokens=4, repeats=1)
    assert len(a.points) == 2 and all(p.prefill_ms > 0 and p.decode_tokens_per_s > 0 for p in a.points + b.points)
    assert b.parameters < a.parameters and b.kv_cache_kb_per_token < a.kv_cache_kb_per_token


def test_cli_eval_export_and_cache(tmp_path, capsys, isolated_cache):
    assert main(["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "8", "--seqlen", "64",
                 "--ratio", "0.3", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--tasks", "piqa,winogrande", "--limit", "3",
                 "--ppl", "tinystories", "--seqlen", "256", "--max-windows", "3", "--speed", "--speed-batches", "1",
                 "--speed-lengths", "16", "--new-tokens", "4", "--json", str(tmp_path / "run" / "eval.json"),
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["acc"]) == {"piqa", "winogrande"} and summary["windows"] == 3
    assert summary["decode_tokens_per_s"]["b1x16"] > 0
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "exp"), "--zip"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["zip"].endswith("exp.zip") and "README.md" in exported["files"]
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "piqa acc / acc_norm (limit 3)" in card and "perplexity (tinystories" in card
    assert main(["cache", "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["results"]["entries"] >= 3 and info["tokens"]["entries"] >= 1
    assert main(["cache", "clear", "--kind", "results"]) == 0
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["entries"] == 0
    assert main(["eval", "--model", "stories260k", "--tasks", "mmlu", "--quiet"]) == 1
    assert "unknown task(s) mmlu" in capsys.readouterr().err
