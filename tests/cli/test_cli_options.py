"""Command-line options beyond their errors: separate and custom ratios, --force, eval --baseline,
export --dtype, and Ctrl-C (exit 130, nothing written). stories260k, tiny calibration."""
import json

import pytest
import torch

from slimgpt_core.cli import main

FAST = ["--model", "stories260k", "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--quiet"]


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_head_and_ffn_ratios_custom_lists_and_force(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # uniform 50% of heads (2 of 4 KV groups of 2 query heads), 10% of FFN channels (round(17.2) = 17 of 172)
    assert main(["prune", *FAST, "--schedule", "uniform", "--head-ratio", "0.5", "--ffn-ratio", "0.1",
                 "--out", str(out)]) == 0
    config = _config(out)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 155)
    report = json.loads((out / "report.json").read_text())
    assert report["head_ratios"] == [0.5] * 5 and report["ffn_ratios"] == [0.1] * 5
    (out / "stale.txt").write_text("from before")
    capsys.readouterr()
    assert main(["prune", *FAST, "--head-ratios", "0,0.25,0.5,0.75,0", "--ffn-ratios", "0.5,0.4,0.3,0.2,0.1",
                 "--out", str(out)]) == 1  # exists: refused without --force
    assert "already exists" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(["prune", *FAST, "--head-ratios", "0,0.25,0.5,0.75,0", "--ffn-ratios", "0.5,0.4,0.3,0.2,0.1",
                 "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists()  # replaced, not merged
    config = _config(out)
    assert config["layer_num_attention_heads"] == [8, 6, 4, 2, 8]  # KV groups removed: 0, 1, 2, 3, 0
    assert config["layer_num_key_value_heads"] == [4, 3, 2, 1, 4]
    assert config["layer_intermediate_size"] == [86, 103, 120, 138, 155]  # 172 − round(r·172)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no temporary folders left


def test_eval_baseline_export_dtype_and_force(tmp_path, capsys, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from slimgpt_core.models import load_model

    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["prune", *FAST, "--ratio", "0.5", "--out", str(run)]) == 0
    # eval --baseline: the dense model evaluated the same way, side by side
    ppl = ["--ppl", "tinystories", "--seqlen", "256", "--max-windows", "3", "--quiet", "--no-cache"]
    capsys.readouterr()
    assert main(["eval", "--model", "stories260k", *ppl]) == 0
    dense = json.loads(capsys.readouterr().out)["ppl"]
    assert main(["eval", "--model", str(run), *ppl]) == 0
    pruned = json.loads(capsys.readouterr().out)["ppl"]
    assert main(["eval", "--model", str(run), "--baseline", "stories260k", *ppl, "--json", str(tmp_path / "e.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ppl"] == pruned and summary["baseline"]["ppl"] == dense and summary["baseline"]["model"] == "stories260k"
    assert dense < pruned
    payload = json.loads((tmp_path / "e.json").read_text())
    assert payload["model"] == str(run) and payload["baseline"]["perplexity"]["windows"] == 3
    # export --dtype float16, then --force back to the stored float32
    exp = tmp_path / "exp"
    assert main(["export", "--model", str(run), "--out", str(exp), "--dtype", "float16"]) == 0
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert _config(exp).get("dtype", _config(exp).get("torch_dtype")) == "float16"
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    half = AutoModelForCausalLM.from_pretrained(exp, trust_remote_code=True, dtype=torch.float32)
    full = load_model(str(run)).model
    with torch.no_grad():
        a, b = half(ids).logits, full(ids).logits
    assert not torch.equal(a, b)  # the weights were rounded to half precision ...
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)  # ... and still compute the same model
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--out", str(exp)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(run), "--out", str(exp), "--force"]) == 0
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from slimgpt_core.methods import obs

    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = obs.prune_channels

    def interrupted(*args, **kwargs):  # Ctrl-C in the middle of the third layer
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(obs, "prune_channels", interrupted)
    out = tmp_path / "run"
    assert main(["prune", *FAST, "--out", str(out)]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert len(calls) == 3 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
