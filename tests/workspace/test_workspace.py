"""The workspace: runs written at once, listed from small files, broken folders reported, bounded memory, jobs
that queue. Real stories260k runs (pruned in well under a second)."""
import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

from tests import ROOT


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def stories_run(assets_root):
    """A pruned stories260k model and its report, made once."""
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings

    m = load_model("stories260k", "cpu")
    tokens = calibration_tokens(m.tokenizer, "tinystories", 8, 64, 0)
    report = prune_model(m.model, tokens, PruneSettings(ratio=0.3, device="cpu"), model_name="stories260k",
                         use_cache=False)
    report.settings.update(calib="tinystories", nsamples=8, seqlen=64, seed=0)
    return m, report


def test_saved_run_is_listed_with_its_summary_and_managed(runs_dir, stories_run):
    from slimgpt_core.workspace import store as workspace

    m, report = stories_run
    info = workspace.save_run(m.model, m.tokenizer, report, label="first try")
    assert [r.name for r in workspace.list_runs()] == [info.name]
    assert info.broken is None and info.label == "first try"
    s = info.summary
    assert s["model"] == "stories260k" and s["schedule"] == "log" and s["calibration"]["nsamples"] == 8
    assert s["params_after"] == report.params_after < s["params_before"]
    assert s["achieved_layer_ratio"] == pytest.approx(report.achieved_layer_ratio)
    assert info.size_bytes > (info.path / "model.safetensors").stat().st_size
    time.sleep(0.01)
    second = workspace.save_run(m.model, m.tokenizer, report, label="second")
    assert [r.name for r in workspace.list_runs()] == [second.name, info.name]  # newest first
    workspace.update_meta(info.name, notes="heads look fine")
    renamed = workspace.rename_run(info.name, "keeper")
    assert renamed.name == "keeper" and renamed.notes == "heads look fine" and renamed.label == "first try"
    with pytest.raises(Exception, match="already exists"):
        workspace.rename_run(second.name, "keeper")
    workspace.delete_run("keeper")
    assert not (runs_dir / "keeper").exists() and [r.name for r in workspace.list_runs()] == [second.name]
    assert not [p for p in runs_dir.iterdir() if p.name.startswith(".deleting")]


def test_a_shape_run_lists_its_target_as_its_schedule(runs_dir, assets_root):
    # shear and minitron runs have no ratio schedule: the listing shows the shape they were cut to
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.methods.minitron import shape_run
    from slimgpt_core.methods.shear.target import resolve_target
    from slimgpt_core.models import load_model
    from slimgpt_core.workspace import store as workspace

    m = load_model("stories260k", "cpu")
    target = resolve_target({"layers": 4, "kv_groups": 2, "ffn": 128, "hidden": 48}, m.model)
    cfg = m.model.config
    heads_per_group = cfg.num_attention_heads // cfg.num_key_value_heads  # 8 heads in 4 groups: 2 each, kept
    result = shape_run(m.model, calibration_tokens(m.tokenizer, "tinystories", 4, 64, 0), target,
                       model_name="stories260k")
    info = workspace.save_run(m.model, m.tokenizer, result.report)
    assert info.summary["method"] == "minitron"
    assert info.summary["schedule"] == f"to 4 L · 2×{heads_per_group} heads · FFN 128 · d 48"


def test_a_failed_write_leaves_nothing_listed(runs_dir, stories_run, monkeypatch):
    from slimgpt_core.workspace import store as workspace
    from slimgpt_core.base.errors import SlimGPTError

    m, report = stories_run

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m.tokenizer, "save_pretrained", disk_full)
    with pytest.raises(SlimGPTError, match="disk full"):
        workspace.save_run(m.model, m.tokenizer, report, name="doomed")
    assert workspace.list_runs() == [] and list(runs_dir.iterdir()) == []


def test_broken_and_partial_folders_are_listed_with_a_reason(runs_dir, stories_run):
    from slimgpt_core.workspace import store as workspace

    m, report = stories_run
    good = workspace.save_run(m.model, m.tokenizer, report, name="good")
    (runs_dir / "notes").mkdir()
    (runs_dir / "notes" / "todo.txt").write_text("not a model")
    (runs_dir / "torn").mkdir()
    (runs_dir / "torn" / "config.json").write_text("{}")
    (runs_dir / "garbled").mkdir()
    for f in ("config.json", "model.safetensors"):
        (runs_dir / "garbled" / f).write_bytes((good.path / f).read_bytes())
    (runs_dir / "garbled" / "meta.json").write_text("{not json")
    (runs_dir / ".good.tmp-abc").mkdir()  # a run being written (or killed midway) is never listed
    listed = {r.name: r for r in workspace.list_runs()}
    assert set(listed) == {"good", "notes", "torn", "garbled"}
    assert listed["good"].broken is None
    assert "no config.json" in listed["notes"].broken
    assert "no .safetensors" in listed["torn"].broken
    assert "unreadable" in listed["garbled"].broken and "JSONDecodeError" in listed["garbled"].broken


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "slimgpt_core", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300)


def _main(capsys, *args) -> tuple[int, str, str]:
    """The command line in this process (the same `main` the console script runs): (exit code, stdout, stderr)."""
    from slimgpt_core.cli import main
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_runs_land_in_the_workspace_with_their_evaluations(runs_dir, assets_root, tmp_path, capsys):
    from slimgpt_core.workspace import store as workspace

    # from a shell: its own process
    out = _cli("prune", "--model", "stories260k", "--ratio", "0.2", "--calib", "tinystories", "--nsamples", "4",
               "--seqlen", "64", "--device", "cpu", "--runs", str(runs_dir), "--label", "from the shell")
    assert out.returncode == 0, out.stderr
    [info] = workspace.list_runs()
    assert info.broken is None and info.label == "from the shell" and info.summary["model"] == "stories260k"
    assert info.summary["params_after"] == json.loads(out.stdout)["params_after"]
    assert str(info.path) == json.loads(out.stdout)["out"]
    # eval of a workspace run keeps the measurement with it (the same window option name as prune's)
    code, ev, err = _main(capsys, "eval", "--model", str(info.path), "--ppl", "tinystories", "--seqlen", "64",
                          "--ppl-windows", "2", "--device", "cpu")
    assert code == 0, err
    [record] = workspace.read_run(info.path).evaluations
    assert record["kind"] == "perplexity" and record["windows"] == 2 and record["seqlen"] == 64
    assert record["ppl"] == pytest.approx(json.loads(ev)["ppl"], rel=1e-3)
    code, listing, _ = _main(capsys, "runs", "--runs", str(runs_dir))
    assert code == 0 and info.name in listing and "from the shell" in listing
    assert _main(capsys, "runs", "--runs", str(runs_dir), "--delete", info.name)[0] == 0
    assert workspace.list_runs() == []
    # a file that is not a model says what it is and what a model path must be
    (tmp_path / "notes.txt").write_text("remember the milk")
    code, _, err = _main(capsys, "eval", "--model", str(tmp_path / "notes.txt"))
    assert code == 1 and "is a file, not a model" in err and "config.json" in err


def test_evaluations_from_many_threads_are_all_kept(runs_dir, stories_run):
    from slimgpt_core.workspace import store as workspace

    m, report = stories_run
    info = workspace.save_run(m.model, m.tokenizer, report, name="r")
    threads = [threading.Thread(target=workspace.add_evaluation, args=(info.path, {"kind": "task", "i": i}))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e["i"] for e in workspace.read_run(info.path).evaluations) == list(range(20))


def test_memory_stays_bounded_as_runs_are_opened_one_after_another(runs_dir, stories_run):
    from slimgpt_core.workspace import store as workspace
    from slimgpt_core.workspace.model_pool import ModelPool

    m, report = stories_run
    paths = [workspace.save_run(m.model, m.tokenizer, report, name=f"r{i}").path for i in range(5)]
    pool = ModelPool(capacity=2)
    alive = []
    for p in paths:
        alive.append(weakref.ref(pool.get(str(p), "cpu").model))
        gc.collect()
        assert len(pool.keys()) <= 2
        assert sum(r() is not None for r in alive) <= 2  # evicted models are freed, not merely forgotten
    assert pool.get(str(paths[-1]), "cpu") is pool.get(str(paths[-1]), "cpu") and pool.loads == 5
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(pool.get(str(paths[0]), "cpu").model(x).logits, m.model(x).logits)


def test_heavy_jobs_queue_and_a_queued_job_can_be_cancelled():
    from slimgpt_core.base.errors import JobCancelled
    from slimgpt_core.workspace.jobs import JobBoard

    board = JobBoard(heavy_slots=1)
    release = threading.Event()
    order = []

    def work(tag, callback=None, should_stop=None):
        order.append(("start", tag))
        while not release.is_set():
            if should_stop():
                raise JobCancelled()
            time.sleep(0.01)
        order.append(("end", tag))
        return tag

    first = board.submit("prune", work, "a", job_label="tab 1")
    second = board.submit("prune", work, "b", job_label="tab 2")
    third = board.submit("prune", work, "c")
    light = board.submit("export", lambda callback=None, should_stop=None: "done", heavy=False)
    assert light.wait(5).state == "done"  # light jobs do not wait for their turn
    time.sleep(0.2)
    assert first.state == "running" and second.queued and third.queued
    assert board.latest("prune") is third and {j.id for j in board.running()} == {first.id, second.id, third.id}
    third.cancel()
    assert third.wait(5).state == "cancelled"
    release.set()
    assert first.wait(5).result == "a" and second.wait(5).result == "b"
    assert order == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]  # one at a time, never both
