"""Recovery: LoRA fine-tune of a pruned stories260k (issue 12).

The pruned model is stories260k at 50% (log schedule), whose layers differ in shape, so it runs as the SlimGPT
mixed-shape classes throughout. TinyStories is split by story into a training file (first 80%) and a test file
(last 20%), so the perplexity measured after training is on text the model never saw.
"""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from slimgpt_core.cli import main
from slimgpt_core.data import calibration_tokens
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.evaluation.evaluate import perplexity
from slimgpt_core.training.finetune_data import IGNORE, PROMPT_NO_INPUT, instruction_example, load_finetune_data
from slimgpt_core.models import load_model
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.training.recover import add_lora, check_recover_settings, load_source_report, merge_lora, recover
from slimgpt_core.training.settings import RecoverSettings
from slimgpt_core.workspace.store import save_run_at

FAST = dict(steps=30, lr=3e-3, seqlen=128, batch_size=8, eval_every=10, heldout_samples=16, ppl_seqlen=128,
            ppl_windows=16)


pytestmark = pytest.mark.usefixtures("one_thread_and_own_cache")


@pytest.fixture(scope="module")
def stories_split(tmp_path_factory, assets_root):
    text = (assets_root / "data" / "tinystories" / "tinystories_val_head.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    cut = int(0.8 * len(stories))
    folder = tmp_path_factory.mktemp("stories")
    (folder / "train.txt").write_text("\n\n".join(stories[:cut]), encoding="utf-8")
    (folder / "test.txt").write_text("\n\n".join(stories[cut:]), encoding="utf-8")
    return folder / "train.txt", folder / "test.txt"


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """stories260k pruned 50% (log): a run folder whose layers differ in shape."""
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 16, 128)
    report = prune_model(loaded.model, tokens, PruneSettings(ratio=0.5), model_name="stories260k")
    folder = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path_factory.mktemp("runs") / "s50")
    return folder


def _pruned(run):
    loaded = load_model(str(run), "cpu", "float32")
    assert type(loaded.model).__name__ == "SlimGPTLlamaForCausalLM"  # mixed shapes
    return loaded


def _shapes(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_recovery_lowers_heldout_loss_and_test_perplexity(pruned_run, stories_split):
    train_file, test_file = stories_split
    loaded = _pruned(pruned_run)
    shapes = _shapes(loaded.model)
    events = []
    result = recover(loaded.model, loaded.tokenizer,
                     RecoverSettings(data=[str(train_file)], ppl_source=str(test_file), **FAST), callback=events.append)
    # measured (1 thread, seed 0): held-out 3.379 -> 2.757 nats, test PPL (16 windows of 128) 29.21 -> 16.05
    held = [h["loss"] for h in result.heldout]
    assert [h["step"] for h in result.heldout] == [0, 10, 20, 30]
    assert held[-1] < held[0] - 0.4
    assert result.ppl_after["ppl"] < 0.7 * result.ppl_before["ppl"]
    # the reported perplexity, recomputed independently on the story-split test file
    test_ids = torch.tensor(loaded.tokenizer("\n\n".join(s for s in test_file.read_text().split("\n\n")),
                                             add_special_tokens=False)["input_ids"])
    again = perplexity(result.model, test_ids, 128, max_windows=16)
    assert again.ppl == pytest.approx(result.ppl_after["ppl"], rel=1e-5)
    # same class, same shapes, plain weights (no adapters left)
    assert result.model is loaded.model and type(result.model).__name__ == "SlimGPTLlamaForCausalLM"
    assert _shapes(result.model) == shapes
    assert not any("lora" in n for n, _ in result.model.named_parameters())
    steps = [e for e in events if e.kind == "train-step"]
    assert [e.step for e in steps] == list(range(1, 31)) and steps[-1].eta_s == 0.0
    assert all(e.tokens_per_s > 0 and e.tokens == 8 * 127 for e in steps)
    assert steps[0].lr < steps[2].lr  # warm-up (2 steps) then cosine decay
    assert steps[-1].lr < 0.05 * FAST["lr"]
    phases = [e.phase for e in events if e.kind == "recover-phase"]
    assert phases == ["data", "ppl-before", "train", "merge", "ppl-after", "done"]


def test_merged_model_gives_the_adapted_logits(pruned_run):
    loaded = _pruned(pruned_run)
    model = loaded.model
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    q_weight = model.model.layers[3].self_attn.q_proj.weight.detach().clone()
    wrapped = add_lora(model, rank=4, alpha=8, dropout=0.05, targets=["q_proj", "down_proj"], seed=1)
    with torch.no_grad():  # B starts at zero: give the adapters some weight, as training would
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    wrapped.eval()
    lora_q = wrapped.base_model.model.model.layers[3].self_attn.q_proj
    a, b = lora_q.lora_A["default"].weight.detach().clone(), lora_q.lora_B["default"].weight.detach().clone()
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
    merged = merge_lora(wrapped)
    with torch.no_grad():
        after = merged(ids).logits
    assert type(merged).__name__ == "SlimGPTLlamaForCausalLM"
    assert (adapted - before).abs().max() > 0.1  # the adapters matter
    assert (after - adapted).abs().max() < 1e-4  # fp32, logits of magnitude ~10
    # the merge is W + (alpha / r) B A, computed here by hand
    merged_q = merged.model.layers[3].self_attn.q_proj.weight
    assert torch.allclose(merged_q, q_weight + 2.0 * b @ a, atol=1e-6)


def test_cli_recover_saves_a_run_that_reloads_everywhere(pruned_run, stories_split, tmp_path, capsys):
    train_file, test_file = stories_split
    out = tmp_path / "s50-lora"
    rc = main(["recover", "--model", str(pruned_run), "--data", str(train_file), "--steps", "6", "--lr", "3e-3",
               "--seqlen", "128", "--batch-size", "4", "--eval-every", "3", "--target-modules", "q,k,v,o,down",
               "--ppl", str(test_file), "--ppl-windows", "8", "--seed", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["steps"] == 6
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["source_run"] == str(pruned_run) and rec["steps"] == 6 and rec["rank"] == 8 and rec["alpha"] == 16
    assert rec["lr"] == 3e-3 and rec["seed"] == 3 and rec["loss_on"] == "all tokens"
    assert rec["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    assert [p["step"] for p in rec["loss_curve"]] == list(range(1, 7))
    assert [p["step"] for p in rec["heldout_curve"]] == [0, 3, 6]
    assert rec["ppl_before"]["windows"] == 8 and rec["ppl_after"]["seqlen"] == 128
    assert summary["ppl_after"] == round(rec["ppl_after"]["ppl"], 3)
    source = json.loads((pruned_run / "report.json").read_text())
    assert report["heads"] == source["heads"] and report["settings"] == source["settings"]  # pruning history kept
    assert load_source_report(out).recovery["steps"] == 6

    # the same loader as every run, and from_pretrained in a fresh process (remote code: mixed shapes)
    reloaded = load_model(str(out), "cpu", "float32").model
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": reloaded(ids).logits}, tmp_path / "ref.pt")
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
              "d = torch.load(sys.argv[2], weights_only=True)\n"
              "print(type(m).__name__, float((m(d['ids']).logits - d['logits']).abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "ref.pt")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    name, diff = res.stdout.split()
    assert name == "SlimGPTLlamaForCausalLM" and float(diff) == 0.0

    # lm-eval's own command line on the recovered run folder
    from slimgpt_core.evaluation.zeroshot import write_task_yamls
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    names = write_task_yamls(tasks, ["piqa"], prefix="offline_")
    lm_eval = shutil.which("lm_eval") or shutil.which("lm-eval")
    res = subprocess.run([lm_eval, "--model", "hf", "--model_args",
                          f"pretrained={out},trust_remote_code=True,max_length=512,truncation=True",
                          "--tasks", ",".join(names), "--include_path", str(tasks), "--limit", "4", "--device", "cpu",
                          "--batch_size", "4", "--output_path", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results*.json")).read_text())["results"]
    assert 0.0 <= results[names[0]]["acc,none"] <= 1.0


def test_alpaca_instructions_train_on_the_response_only(pruned_run, tmp_path):
    loaded = _pruned(pruned_run)
    tok = loaded.tokenizer
    # one response for every instruction: each step's loss tokens must be 4 x (response + EOS), whatever the prompts
    output = "Tom had a red ball and he was happy."
    rows = [{"instruction": f"Finish story {n}.", "input": "", "output": output} for n in range(12)]
    rows[0]["input"] = "Once upon a time"
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    ex = instruction_example(tok, rows[1], 256)
    prompt = [tok.bos_token_id] + tok(PROMPT_NO_INPUT.format(instruction="Finish story 1."),
                                      add_special_tokens=False)["input_ids"]
    response = tok(rows[1]["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE] * len(prompt) + response
    data = load_finetune_data(tok, [str(path)], 256, train_needed=40, heldout_fraction=0.25, heldout_samples=8,
                              seed=0)
    assert len(data.heldout) == 3 and len(data.train) == 9 and data.loss_on == "response only"
    held = {tuple(e.input_ids) for e in data.heldout}
    assert not held & {tuple(e.input_ids) for e in data.train}
    result = recover(loaded.model, tok, RecoverSettings(data=[str(path)], steps=3, seqlen=256, batch_size=4,
                                                        heldout_fraction=0.25, ppl_source=None, eval_every=0))
    assert result.loss_on == "response only" and len(result.steps) == 3 and result.ppl_before is None
    assert [e.tokens for e in result.steps] == [4 * len(response)] * 3


def test_text_heldout_comes_first_and_is_disjoint(stories_split):
    train_file, _ = stories_split
    tok = load_model("stories260k").tokenizer
    data = load_finetune_data(tok, [str(train_file)], 64, train_needed=20, heldout_fraction=0.05, heldout_samples=5)
    stream = torch.tensor(tok(train_file.read_text() + "\n\n", add_special_tokens=False)["input_ids"])
    windows = [e.input_ids for e in data.heldout + data.train]
    assert len(data.heldout) == 5 and len(data.train) == 20
    # held-out windows, then training windows: consecutive non-overlapping slices of the same stream
    assert torch.equal(torch.tensor(windows).flatten(), stream[:25 * 64])


def test_cancel_leaves_the_model_as_it_came(pruned_run):
    loaded = _pruned(pruned_run)
    state = copy.deepcopy(loaded.model.state_dict())
    steps = []
    with pytest.raises(JobCancelled):
        recover(loaded.model, loaded.tokenizer, RecoverSettings(data=["tinystories"], ppl_source=None, **{
            **FAST, "ppl_windows": None}), callback=lambda e: e.kind == "train-step" and steps.append(e.step),
            should_stop=lambda: len(steps) >= 3)
    assert steps == [1, 2, 3]
    after = loaded.model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for p in loaded.model.parameters())  # as loaded, not frozen by peft


def test_memory_check_says_what_to_lower(pruned_run, monkeypatch):
    from slimgpt_core.base import devices
    loaded = _pruned(pruned_run)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 2**20)
    with pytest.raises(SlimGPTError, match=r"lower --batch-size \(4.*--seqlen \(256\) or --rank \(8\)"):
        recover(loaded.model, loaded.tokenizer, RecoverSettings(data=["tinystories"]))


def test_wikitext2_test_split_is_never_trained_on(assets_root):
    with pytest.raises(SlimGPTError, match="never trained on"):
        check_recover_settings(RecoverSettings(data=[str(assets_root / "data" / "wikitext-2-raw" / "wiki.test.raw")]))


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "LoRA rank must be at least 1, got 0"),
    (["--steps", "0"], "steps must be at least 1, got 0"),
    (["--data", "no/such/file.txt"], "training data 'no/such/file.txt' not found"),
    (["--target-modules", "q,wq"], "unknown target module 'wq'"),
    (["--resume"], "checkpoints and --resume need a checkpoint folder"),
    (["--checkpoint-every", "-1"], "checkpoint-every must be 0 (none) or positive, got -1"),
])
def test_bad_input_one_sentence_nothing_written(pruned_run, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(["recover", "--model", str(pruned_run), "--data", "tinystories", "--steps", "2", "--seqlen", "64",
               "--ppl", "none", "--out", str(out), "--quiet", *args])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and message in errors[0]  # (transformers' own loading bar aside)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_and_writes_nothing(pruned_run, tmp_path, capsys, monkeypatch):
    from slimgpt_core.training import recover as recover_module
    real_training = recover_module.run_training

    def interrupted(model, batches, plan):
        def callback(event):
            if event.kind == "train-step" and event.step == 2:
                raise KeyboardInterrupt
        return real_training(model, batches, dataclasses.replace(plan, callback=callback))

    monkeypatch.setattr(recover_module, "run_training", interrupted)
    rc = main(["recover", "--model", str(pruned_run), "--data", "tinystories", "--steps", "5", "--seqlen", "64",
               "--ppl", "none", "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 130 and "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lora_targets_name_the_fused_layers_of_phi3():
    """Phi-3 holds q/k/v in qkv_proj and gate/up in gate_up_proj: the default targets land on those, once each."""
    from tests.tiny_models import tiny_model
    from slimgpt_core.training.recover import resolve_targets
    from slimgpt_core.training.settings import DEFAULT_TARGETS
    phi3 = tiny_model("phi3", heads=4, kv=2, layers=2, ffn=24, hidden=16)
    assert resolve_targets(phi3, list(DEFAULT_TARGETS)) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve_targets(phi3, ["v", "up", "qkv"]) == ["qkv_proj", "gate_up_proj"]
    llama = tiny_model("llama", heads=4, kv=2, layers=2, ffn=24, hidden=16)
    assert resolve_targets(llama, list(DEFAULT_TARGETS)) == list(DEFAULT_TARGETS)
    with pytest.raises(SlimGPTError, match="unknown target module 'qkv'"):
        resolve_targets(llama, ["qkv"])
    # adapters on the fused layers train and fold back: B starts at zero, so the merged model is the model
    from slimgpt_core.training.recover import add_lora, merge_lora
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        before = phi3(ids).logits
    wrapped = add_lora(copy.deepcopy(phi3), 2, 4.0, 0.0, resolve_targets(phi3, list(DEFAULT_TARGETS)))
    wrapped(ids, labels=ids).loss.backward()
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None} == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    with torch.no_grad():
        assert torch.allclose(merge_lora(wrapped)(ids).logits, before, atol=1e-6)
