"""The workspace's run store, one behaviour at a time (mutation tests of slimgpt_core/workspace/store.py).

Expected values are written out in the tests (file contents, sentences, names, sizes from os.walk); the only
model is stories260k loaded once (no pruning), for the runs save_run writes."""
import decimal
import importlib.metadata
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.workspace import store


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("SLIMGPT_RUNS", str(root))
    return root


@pytest.fixture(scope="module")
def stories(assets_root):
    from slimgpt_core.models import load_model
    return load_model("stories260k", "cpu")


def _report(**changes):
    report = RunReport("stories260k", {"method": "slimgpt", "schedule": "log", "ratio": 0.25, "calib": "wiki",
                                         "nsamples": 8, "seqlen": 64, "seed": 3},
                         [0.1, 0.2], [0.3, 0.6], 1000, 700, 800, 500)
    for k, v in changes.items():
        setattr(report, k, v)
    return report


def _fake_run(root: Path, name: str, meta: dict | None = None) -> Path:
    """A folder that looks like a model (config.json and weights) with an optional meta.json."""
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"12345678")
    if meta is not None:
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def _walk_size(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# --- the runs folder --------------------------------------------------------------------------------------

def test_runs_root_comes_from_the_environment_or_the_project(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLIMGPT_RUNS", "~/deep/er/runs")
    assert store.runs_root() == tmp_path / "home" / "deep" / "er" / "runs" and store.runs_root().is_dir()
    monkeypatch.setattr(store, "PROJECT_ROOT", tmp_path / "project")
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("SLIMGPT_RUNS")
        else:
            monkeypatch.setenv("SLIMGPT_RUNS", unset)
        assert store.runs_root() == tmp_path / "project" / "runs" and (tmp_path / "project" / "runs").is_dir()


def test_runs_root_that_cannot_be_made_is_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SLIMGPT_RUNS", str(tmp_path / "file" / "runs"))
    with pytest.raises(SlimGPTError) as err:
        store.runs_root()
    assert str(err.value) == f"cannot create the runs folder {tmp_path / 'file' / 'runs'}: Not a directory"
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --- small JSON files ------------------------------------------------------------------------------------

def test_json_is_written_whole_indented_and_with_floats(tmp_path):
    target = tmp_path / "x.json"
    store._write_json_atomic(target, {"a": [1, decimal.Decimal("0.5")]})
    assert target.read_text() == '{\n "a": [\n  1,\n  0.5\n ]\n}'
    assert store._read_json(target) == {"a": [1, 0.5]} and os.listdir(tmp_path) == ["x.json"]


def test_json_is_written_beside_the_target_under_a_hidden_name_per_thread(tmp_path, monkeypatch):
    sources = []
    real_replace = os.replace

    def recording_replace(src, dst):
        sources.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", recording_replace)
    store._write_json_atomic(tmp_path / "a.json", 1)
    other = threading.Thread(target=store._write_json_atomic, args=(tmp_path / "a.json", 2))
    other.start()
    other.join()
    mine, theirs = sources
    assert mine.parent == tmp_path and mine.name.startswith(".a.json.") and mine.name.endswith(".tmp")
    assert str(os.getpid()) in mine.name and mine != theirs  # two writers never share a temporary file
    assert json.loads((tmp_path / "a.json").read_text()) == 2


def test_a_failed_json_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(SlimGPTError) as err:
        store._write_json_atomic(target, {"a": 1})
    assert str(err.value) == f"could not write {target}: Is a directory" and err.value.__cause__ is None
    assert err.value.__suppress_context__ and os.listdir(tmp_path) == ["a.json"]

    def no_reason(src, dst):
        raise OSError("quota")

    monkeypatch.setattr(store.os, "replace", no_reason)
    with pytest.raises(SlimGPTError) as err:
        store._write_json_atomic(tmp_path / "b.json", 1)
    assert str(err.value) == f"could not write {tmp_path / 'b.json'}: quota" and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(SlimGPTError) as err:  # no folder to write into: the temporary never existed
        store._write_json_atomic(tmp_path / "gone" / "c.json", 1)
    assert str(err.value) == f"could not write {tmp_path / 'gone' / 'c.json'}: No such file or directory"


# --- summaries ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, text", [
    ({"layers": 24, "kv_groups": 2, "heads": 6, "ffn": 1024, "hidden": 512}, "to 24 L · 2×3 heads · FFN 1024 · d 512"),
    ({"layers": 3, "kv_groups": 1, "heads": 5, "ffn": 7, "hidden": 9}, "to 3 L · 1×5 heads · FFN 7 · d 9"),
    ({"layers": 3, "kv_groups": 0, "heads": 5, "ffn": 7, "hidden": 9}, "to 3 L · 0×5 heads · FFN 7 · d 9"),
])
def test_shape_text(target, text):
    assert store.shape_text(target) == text


def test_summary_of_a_ratio_run():
    s = store.summary_of(_report())
    assert s == {"model": "stories260k", "method": "slimgpt", "schedule": "log", "ratio": 0.25, "sequential": True,
                 "calibration": {"calib": "wiki", "nsamples": 8, "seqlen": 64, "seed": 3},
                 "requested_ratio": pytest.approx((0.1 + 0.2 + 0.3 + 0.6) / 4), "achieved_layer_ratio": 1 - 500 / 800,
                 "achieved_ratio": 1 - 700 / 1000, "params_before": 1000, "params_after": 700, "source_run": None,
                 "trained": []}


def test_summary_of_a_report_without_settings_or_training_fields():
    report = SimpleNamespace(model="m", settings=None, requested_ratio=0.5, achieved_layer_ratio=0.4,
                             achieved_ratio=0.3, params_before=10, params_after=7)
    assert store.summary_of(report) == {
        "model": "m", "method": "slimgpt", "schedule": "", "ratio": None, "sequential": True,
        "calibration": {"calib": None, "nsamples": None, "seqlen": None, "seed": None}, "requested_ratio": 0.5,
        "achieved_layer_ratio": 0.4, "achieved_ratio": 0.3, "params_before": 10, "params_after": 7,
        "source_run": None, "trained": []}


def test_summary_of_a_shape_run_and_its_sources():
    target = {"layers": 2, "kv_groups": 2, "heads": 4, "ffn": 8, "hidden": 16}
    for schedule in (None, ""):
        s = store.summary_of(_report(settings={"method": "minitron", "schedule": schedule, "target": target,
                                               "sequential": False, "source_run": "from-settings"}))
        assert (s["method"], s["schedule"], s["sequential"]) == ("minitron", "to 2 L · 2×2 heads · FFN 8 · d 16", False)
        assert s["source_run"] == "from-settings"
    s = store.summary_of(_report(settings={"target": target, "schedule": "log"}))
    assert s["schedule"] == "log"  # a named schedule wins over a target
    s = store.summary_of(_report(pretrain={"source_run": "/w/runs/base-run"}, recovery={"source": "rec-src"},
                                 settings={"source_run": "from-settings"}))
    assert s["source_run"] == "base-run" and s["trained"] == ["recovery", "pretrain"]  # the latest derivation first
    s = store.summary_of(_report(pretrain={"steps": 3}, recovery={"source": "rec-src"}, settings={}))
    assert s["source_run"] == "rec-src" and s["trained"] == ["recovery", "pretrain"]
    s = store.summary_of(_report(recovery={}, pretrain={"steps": 1}))
    assert s["source_run"] is None and s["trained"] == ["pretrain"]  # an empty record is no training


def test_write_meta_with_and_without_a_report(tmp_path):
    store.write_meta(tmp_path, _report(), "lab", "some notes", created=12.5)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"label": "lab", "notes": "some notes", "created": 12.5, "summary": store.summary_of(_report())}
    before = time.time()
    store.write_meta(str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(meta) == {"label", "notes", "created"} and meta["label"] == meta["notes"] == ""
    assert before <= meta["created"] <= time.time()


# --- listing ---------------------------------------------------------------------------------------------

def test_title_and_latest_perplexity():
    info = store.RunInfo("r1", Path("r1"))
    assert info.title == "r1" and info.perplexity is None
    info.label = "r1"
    assert info.title == "r1"
    info.label = "My run"
    assert info.title == "My run (r1)"
    info.evaluations = [{"kind": "perplexity", "ppl": 3}, {"kind": "task"}, {"kind": "perplexity", "ppl": 2},
                        {"kind": "speed"}]
    assert info.perplexity == {"kind": "perplexity", "ppl": 2}
    info.evaluations = [{"kind": "task"}, {"ppl": 1}]
    assert info.perplexity is None


def test_read_run_takes_meta_and_evaluations(tmp_path):
    path = _fake_run(tmp_path, "r", {"label": "L", "notes": "N", "created": 42.0, "summary": {"model": "m"}})
    (path / "sub").mkdir()
    (path / "sub" / "tokenizer.json").write_text("abc" * 100)
    evaluations = '[{"kind": "perplexity", "ppl": 5}]'
    (path / "evaluations.json").write_text(evaluations)
    info = store.read_run(str(path))
    assert (info.name, info.path, info.label, info.notes, info.created) == ("r", path, "L", "N", 42.0)
    assert info.summary == {"model": "m"} and info.evaluations == [{"kind": "perplexity", "ppl": 5}]
    assert info.broken is None and info.size_bytes == _walk_size(path) == 8 + 2 + 300 + len(evaluations) + len(
        (path / "meta.json").read_text())


def test_read_run_of_a_bare_folder_uses_its_mtime(tmp_path):
    path = _fake_run(tmp_path, "bare", {})
    os.utime(path, (1234.0, 1234.0))
    info = store.read_run(path)
    assert (info.label, info.notes, info.created, info.summary, info.evaluations) == ("", "", 1234.0, {}, [])
    (path / "meta.json").unlink()
    os.utime(path, (99.0, 99.0))
    info = store.read_run(path)
    assert info.created == 99.0 and info.summary == {} and info.broken is None


def test_read_run_of_an_old_run_summarises_its_report(tmp_path):
    path = _fake_run(tmp_path, "old")
    _report().save(path / "report.json")
    assert store.read_run(path).summary == store.summary_of(_report())


@pytest.mark.parametrize("case, reason", [
    ("no config", "no config.json: not a model folder"),
    ("no weights", "no .safetensors weights"),
    ("bad meta", "unreadable: JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("meta folder", "unreadable: IsADirectoryError: [Errno 21] Is a directory: '{path}/meta.json'"),
    ("bad report", "unreadable: TypeError: RunReport.__init__() got an unexpected keyword argument 'bogus'"),
    ("report target", "unreadable: KeyError: 'heads'"),
    ("meta list", "unreadable: AttributeError: 'list' object has no attribute 'get'"),
    ("bad evaluations", "unreadable: JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
])
def test_read_run_says_why_a_folder_is_broken(tmp_path, case, reason):
    path = _fake_run(tmp_path, "r")
    if case == "no config":
        (path / "config.json").unlink()
    elif case == "no weights":
        (path / "model.safetensors").rename(path / "model.bin")
    elif case == "bad meta":
        (path / "meta.json").write_text("{oops")
    elif case == "meta list":  # valid JSON, not an object: once an exception that broke the whole listing
        (path / "meta.json").write_text("[1]")
    elif case == "meta folder":
        (path / "meta.json").mkdir()
    elif case == "bad report":
        (path / "report.json").write_text(json.dumps({**_report().to_dict(), "bogus": 1}))
    elif case == "report target":
        (path / "report.json").write_text(json.dumps(_report(settings={"target": {"layers": 1}}).to_dict()))
    else:
        (path / "evaluations.json").write_text("")
    assert store.read_run(path).broken == reason.format(path=path)


def test_list_runs_newest_first_without_hidden_folders_or_files(runs, tmp_path):
    runs.mkdir()
    for name, created in (("b", 20.0), ("a", 30.0), ("c", 10.0), (".tmp-x", 40.0), ("_trash", 50.0)):
        _fake_run(runs, name, {"created": created})
    (runs / "notes.txt").write_text("not a run")
    assert [r.name for r in store.list_runs()] == ["a", "b", "c"]
    other = tmp_path / "other"
    _fake_run(other, "z", {"created": 1.0})
    assert [r.name for r in store.list_runs(str(other))] == ["z"]


# --- names ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "..", "."])
def test_run_path_refuses_what_is_not_a_run_name(runs, name):
    with pytest.raises(SlimGPTError) as err:
        store.run_path(name, runs)
    assert str(err.value) == f"{name!r} is not a run name (a folder name inside the runs folder)"


def test_run_path_finds_runs_in_the_given_or_default_folder(runs, tmp_path):
    _fake_run(runs, "r")
    assert store.run_path("r") == runs / "r" and store.run_path("r", str(runs)) == runs / "r"
    (runs / "file").write_text("x")
    for name in ("missing", "file"):
        with pytest.raises(SlimGPTError) as err:
            store.run_path(name)
        assert str(err.value) == f"no run named {name!r} in {runs}"
    with pytest.raises(SlimGPTError, match="no run named 'r' in"):
        store.run_path("r", tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("My run: 50%/x", "My-run-50-x"), ("a.b_c-d", "a.b_c-d"), ("..a..", "a"), ("--a--", "a"), ("-.-a", "a"),
    ("Xmas X", "Xmas-X"), ("///", "run"), ("", "run"), ("é", "run"), ("x" * 70, "x" * 60), ("a  b", "a-b"),
])
def test_slug(text, expected):
    assert store.slug(text) == expected


def test_new_run_name_counts_up_from_two(runs, tmp_path):
    runs.mkdir()
    assert store.new_run_name("my run") == "my-run"
    (runs / "my-run").mkdir()
    assert store.new_run_name("my run") == "my-run-2"
    (runs / "my-run-2").write_text("a file takes the name too")
    assert store.new_run_name("my run") == "my-run-3"
    (runs / "my-run-3").mkdir()
    assert store.new_run_name("my run") == "my-run-4"
    assert store.new_run_name("my run", tmp_path) == "my-run"


# --- saving and managing runs ------------------------------------------------------------------------------

def test_save_run_names_and_labels_it(runs, stories, monkeypatch):
    monkeypatch.setattr(store.time, "strftime", lambda fmt: {"%Y%m%d-%H%M%S": "20260102-030405"}[fmt])
    m = stories
    info = store.save_run(m.model, m.tokenizer, _report(), label="first try", notes="n")
    assert info.path == runs / "20260102-030405-first-try" and info.name == "20260102-030405-first-try"
    assert (info.label, info.notes, info.broken) == ("first try", "n", None)
    assert info.summary == store.summary_of(_report()) and (info.path / "report.json").exists()
    info = store.save_run(m.model, m.tokenizer, _report())
    assert info.name == "20260102-030405-stories260k" and info.label == info.name and info.notes == ""
    info = store.save_run(m.model, m.tokenizer, _report(model=""), root=str(runs))
    assert info.name == "20260102-030405-run"
    elsewhere = runs.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "20260102-030405-only-here").mkdir()
    (elsewhere / "20260102-030405-only-here" / "x").write_text("taken")
    info = store.save_run(m.model, m.tokenizer, _report(), label="only here", root=elsewhere)
    assert info.path == elsewhere / "20260102-030405-only-here-2"  # named by what is taken there, not here
    assert sorted(os.listdir(elsewhere)) == ["20260102-030405-only-here", "20260102-030405-only-here-2"]
    with pytest.raises(SlimGPTError, match="already exists"):
        store.save_run(m.model, m.tokenizer, _report(), name="20260102-030405-run")
    again = store.save_run(m.model, m.tokenizer, _report(), name="20260102-030405-run", overwrite=True,
                           label="again")
    assert again.label == "again" and len(store.list_runs()) == 3 and len(store.list_runs(elsewhere)) == 2


def test_update_meta_changes_only_label_and_notes(runs):
    _fake_run(runs, "r", {"label": "a", "notes": "b", "created": 7.0, "summary": {"x": 1}})
    info = store.update_meta("r", label="new", created=99.0, summary={}, other=1)
    assert (info.label, info.notes, info.created, info.summary) == ("new", "b", 7.0, {"x": 1})
    assert json.loads((runs / "r" / "meta.json").read_text()) == {"label": "new", "notes": "b", "created": 7.0,
                                                                 "summary": {"x": 1}}
    info = store.update_meta("r", str(runs), notes="nn")
    assert (info.label, info.notes) == ("new", "nn")
    other = runs.parent / "other"
    _fake_run(other, "r", {"label": "there"})
    assert store.update_meta("r", other, notes="o").path == other / "r"
    assert json.loads((other / "r" / "meta.json").read_text()) == {"label": "there", "notes": "o"}
    assert store.read_run(runs / "r").notes == "nn"
    path = _fake_run(runs, "no-meta")
    os.utime(path, (55.0, 55.0))
    store.update_meta("no-meta", notes="x")
    assert json.loads((path / "meta.json").read_text()) == {"created": 55.0, "notes": "x"}


def test_rename_run(runs):
    _fake_run(runs, "r", {"label": "keep me", "created": 1.0})
    _fake_run(runs, "taken")
    info = store.rename_run("r", "new name!")
    assert info.name == "new-name" and info.path == runs / "new-name" and info.label == "keep me"
    assert sorted(os.listdir(runs)) == ["new-name", "taken"]
    with pytest.raises(SlimGPTError) as err:
        store.rename_run("new-name", "taken", str(runs))
    assert str(err.value) == "a run named 'taken' already exists" and (runs / "new-name").is_dir()
    other = runs.parent / "other"
    _fake_run(other, "new-name")
    assert store.rename_run("new-name", "moved", other).path == other / "moved"
    assert os.listdir(other) == ["moved"] and sorted(os.listdir(runs)) == ["new-name", "taken"]


def test_delete_run_leaves_the_listing_even_if_the_disk_refuses(runs, monkeypatch):
    _fake_run(runs, "a")
    _fake_run(runs, "b")
    store.delete_run("a")
    assert os.listdir(runs) == ["b"]
    other = runs.parent / "other"
    _fake_run(other, "b")
    store.delete_run("b", other)
    assert os.listdir(other) == [] and os.listdir(runs) == ["b"]
    leftovers = []

    def stubborn_rmtree(path, ignore_errors=False):  # shutil.rmtree's contract: raise unless told to ignore
        leftovers.append(Path(path))
        if not ignore_errors:
            raise OSError("device busy")

    monkeypatch.setattr(store.shutil, "rmtree", stubborn_rmtree)
    store.delete_run("b", str(runs))
    [doomed] = leftovers
    assert doomed.parent == runs and doomed.is_dir() and doomed.name.startswith(".deleting-b-")
    assert store.list_runs() == []  # what could not be deleted is hidden, never listed


# --- evaluations and studio state ---------------------------------------------------------------------------

def test_evaluations_are_appended_and_read_back(tmp_path):
    assert store.read_evaluations(tmp_path) == []
    store.add_evaluation(str(tmp_path), {"kind": "task", "i": 1})
    store.add_evaluation(tmp_path, {"kind": "task", "i": 2})
    assert json.loads((tmp_path / "evaluations.json").read_text()) == [{"kind": "task", "i": 1},
                                                                       {"kind": "task", "i": 2}]
    assert store.read_evaluations(str(tmp_path)) == [{"kind": "task", "i": 1}, {"kind": "task", "i": 2}]
    (tmp_path / "evaluations.json").write_text("[{")
    assert store.read_evaluations(tmp_path) == []
    (tmp_path / "evaluations.json").unlink()
    (tmp_path / "evaluations.json").mkdir()
    assert store.read_evaluations(tmp_path) == []


def test_add_measurement_records_its_provenance(tmp_path):
    before = time.time()
    store.add_measurement(tmp_path, "perplexity", {"ppl": 4.5, "windows": 2}, batch_size=3, device="cpu")
    [record] = json.loads((tmp_path / "evaluations.json").read_text())
    when = record.pop("when")
    assert before <= when <= time.time()
    assert record == {"kind": "perplexity", "ppl": 4.5, "windows": 2, "batch_size": 3, "device": "cpu",
                      "versions": store.versions()}


def test_versions_name_the_libraries_installed(monkeypatch):
    import torch
    import transformers
    expected = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        expected["lm_eval"] = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert store.versions() == expected and "lm_eval" in expected  # lm-eval is part of the install

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert store.versions() == {"torch": torch.__version__, "transformers": transformers.__version__}


def test_dense_evaluations_live_in_a_hidden_folder(runs, tmp_path):
    folder = store.dense_evaluations_folder("org/Model 1")
    assert folder == runs / ".dense" / "org-Model-1" and folder.is_dir()
    assert store.dense_evaluations_folder("org/Model 1") == folder  # again: already there
    assert store.dense_evaluations_folder("m", str(tmp_path / "x")) == tmp_path / "x" / ".dense" / "m"
    assert (tmp_path / "x" / ".dense" / "m").is_dir()


def test_remember_and_recall(runs, tmp_path):
    assert store.studio_state_path() == runs / ".studio.json"
    assert store.studio_state_path(str(tmp_path)) == tmp_path / ".studio.json"
    assert store.recall("model") is None and store.recall("model", "dflt") == "dflt"
    store.remember("model", "stories260k")
    store.remember("device", {"kind": "cpu"})
    assert json.loads((runs / ".studio.json").read_text()) == {"model": "stories260k", "device": {"kind": "cpu"}}
    assert store.recall("model") == "stories260k" and store.recall("device", "x") == {"kind": "cpu"}
    assert store.recall("other", 5) == 5
    store.remember("model", "smol")
    assert store.recall("model") == "smol" and store.recall("device") == {"kind": "cpu"}
    store.remember("k", 1, str(tmp_path))
    assert store.recall("k", root=str(tmp_path)) == 1 and store.recall("k") is None
    (runs / ".studio.json").write_text("{torn")
    assert store.recall("model", "d") == "d"
    store.remember("fresh", True)  # a corrupt state file is started anew
    assert json.loads((runs / ".studio.json").read_text()) == {"fresh": True}
    (runs / ".studio.json").write_text("[1, 2]")
    assert store.recall("fresh", "d") == "d"
    store.remember("again", 2)  # valid JSON that is not an object: started anew too (was a TypeError)
    assert json.loads((runs / ".studio.json").read_text()) == {"again": 2}
    (runs / ".studio.json").write_text("null")
    assert store.recall("again", "d") == "d"


def test_as_dict_is_json_ready(tmp_path):
    path = _fake_run(tmp_path, "r", {"label": "L", "created": 3.0})
    d = store.as_dict(store.read_run(path))
    assert json.loads(json.dumps(d)) == d and d["path"] == str(path) and d["label"] == "L" and d["created"] == 3.0
    assert set(d) == {"name", "path", "label", "notes", "created", "summary", "evaluations", "size_bytes", "broken"}
