"""Exports that are what they say (stories260k runs in a workspace of their own): the folder, zip and model card
come from the run exported; a run exported as stored is copied byte for byte (no load, no re-save) into a zip that
stores its files and loads with transformers to the same logits; a dtype change re-saves; a cancelled or failed
export leaves nothing under the final names; an export never replaces what is not an earlier export."""
import errno
import filecmp
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from slimgpt_core.data import calibration_tokens
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.export import archive
from slimgpt_core.workspace import exports
from slimgpt_core.workspace.exports import EXPORTS, default_export_folder, export_model
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.models import load_model
from slimgpt_core.services.export import export_run
from slimgpt_core.workspace.store import list_runs, save_run

LOAD_AND_COMPARE = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ref = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
data = torch.load(ref, weights_only=True)
with torch.no_grad():
    logits = model(data["ids"]).logits
print(type(model).__name__, float((logits - data["logits"]).abs().max()))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two runs of stories260k with labels: a log schedule (layers of different shapes) and a uniform one."""
    root = tmp_path_factory.mktemp("workspace")
    old = {k: os.environ.get(k) for k in ("SLIMGPT_CACHE", "SLIMGPT_RUNS")}
    os.environ["SLIMGPT_CACHE"], os.environ["SLIMGPT_RUNS"] = str(root / "cache"), str(root / "runs")
    made = {}
    for label, settings in (("sequential log", PruneSettings(ratio=0.5, schedule="log")),
                            ("uniform twin", PruneSettings(keep_heads=[4] * 5, keep_ffn=[128] * 5))):
        loaded = load_model("stories260k")
        tokens = calibration_tokens(loaded.tokenizer, "tinystories", 8, 64)
        report = prune_model(loaded.model, tokens, settings, model_name="stories260k")
        made[label] = save_run(loaded.model, loaded.tokenizer, report, label=label)
    yield made
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _forbid_weight_saving(monkeypatch):
    """Loading or saving weights fails the test: the as-stored export must only copy files."""
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded or saved")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    monkeypatch.setattr(exports, "load_model", refuse)


def test_as_stored_export_copies_the_run_and_names_it(workspace, tmp_path, monkeypatch):
    run, other = workspace["sequential log"], workspace["uniform twin"]
    _forbid_weight_saving(monkeypatch)
    out = tmp_path / "smol-0.5"  # a dot in the name: the zip is smol-0.5.zip, not smol-0.zip
    result = export_model(str(run.path), out, make_zip=True)
    assert result.reused_weights and result.source == run.name and result.title == f"sequential log ({run.name})"
    assert result.zip_path == tmp_path / "smol-0.5.zip" and result.zip_is_current()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-0.5", "smol-0.5.zip"]  # no temporary left
    # the checkpoint and the report as the run holds them; the workspace's bookkeeping stays behind
    kept = {"config.json", "generation_config.json", "model.safetensors", "report.json", "tokenizer.json",
            "tokenizer_config.json"}
    assert set(result.files) == kept | {"README.md", "modeling_slimgpt.py"}
    for name in kept:
        assert filecmp.cmp(run.path / name, out / name, shallow=False), name
    with zipfile.ZipFile(result.zip_path) as z:
        assert sorted(z.namelist()) == result.files
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        assert z.read("model.safetensors") == (run.path / "model.safetensors").read_bytes()
        card = z.read("README.md").decode()
    # the card names this run, with its method, schedule and achieved ratio from its own report
    report = json.loads((run.path / "report.json").read_text())
    achieved = 1 - report["layer_params_after"] / report["layer_params_before"]
    assert card == result.card == (out / "README.md").read_text()
    assert f"# sequential log ({run.name})" in card
    assert f"`stories260k` pruned with SlimGPT Studio as run `{run.name}`" in card
    assert "method slimgpt" in card and "schedule log" in card
    assert f"achieved {achieved:.1%} of decoder-layer parameters removed" in card
    assert other.name not in card and "uniform twin" not in card
    assert f"({report['params_after']:,})" in card


def test_exported_zip_loads_with_transformers_to_the_runs_logits(workspace, tmp_path):
    run = workspace["sequential log"]
    result = export_model(str(run.path), tmp_path / "export", make_zip=True)
    assert result.heterogeneous and result.reused_weights
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(result.zip_path) as z:
        z.extractall(unpacked)
    model = load_model(str(run.path)).model
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    out = subprocess.run([sys.executable, "-c", LOAD_AND_COMPARE, str(unpacked), str(tmp_path / "ref.pt")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    name, diff = out.stdout.split()
    assert name == "SlimGPTLlamaForCausalLM" and float(diff) == 0.0  # the same float32 weights, the same model


def test_resaving_path_writes_the_same_export(workspace, tmp_path):
    """Loading and re-saving (the path a dtype change takes) gives the same card, files and tensors."""
    run = workspace["uniform twin"]
    copied = export_model(str(run.path), tmp_path / "copied", make_zip=True)
    resaved = export_model(str(run.path), tmp_path / "resaved", make_zip=True, reuse_files=False)
    assert copied.reused_weights and not resaved.reused_weights
    assert copied.card == resaved.card and copied.files == resaved.files and not copied.heterogeneous
    a, b = load_file(tmp_path / "copied" / "model.safetensors"), load_file(tmp_path / "resaved" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_change_resaves_and_same_dtype_copies(workspace, tmp_path, monkeypatch):
    run = workspace["sequential log"]
    stored = load_file(run.path / "model.safetensors")
    half = export_run(run.path, tmp_path / "half", True, "float16")
    assert not half.reused_weights and half.source == run.name
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), stored[key].half()), key
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    assert f"# sequential log ({run.name})" in half.card
    _forbid_weight_saving(monkeypatch)  # float32 is what is stored: copied, like "as stored"
    for asked in ("float32", "as stored"):
        same = export_run(run.path, tmp_path / asked.replace(" ", "-"), True, asked)
        assert same.reused_weights
        assert filecmp.cmp(run.path / "model.safetensors", same.folder / "model.safetensors", shallow=False)


@pytest.mark.parametrize("failure", ["cancel", "disk full"])
def test_interrupted_export_keeps_the_earlier_one_and_leaves_nothing(workspace, tmp_path, monkeypatch, failure):
    run, other = workspace["sequential log"], workspace["uniform twin"]
    out = tmp_path / "export"
    earlier = export_model(str(other.path), out, make_zip=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}, earlier.zip_path.read_bytes()
    phases = []

    def stop_while_zipping():
        return any(p.startswith("zipping model.safetensors") for p in phases)

    if failure == "disk full":
        real_advance = archive.ByteProgress.advance

        def advance(self, n, phase):
            if phase.startswith("zipping"):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_advance(self, n, phase)

        monkeypatch.setattr(archive.ByteProgress, "advance", advance)
    expected = (JobCancelled, "cancelled") if failure == "cancel" else (SlimGPTError, "disk full")
    with pytest.raises(expected[0], match=expected[1]):
        export_model(str(run.path), out, make_zip=True, overwrite=True,
                     callback=lambda event: phases.append(event.phase), should_stop=stop_while_zipping)
    if failure == "cancel":
        assert any(p.startswith("copying") for p in phases) and stop_while_zipping()
    # the earlier export, folder and zip, as it was; no temporary file or folder beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.zip"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before[0]
    assert earlier.zip_path.read_bytes() == before[1] and earlier.zip_is_current()


def test_an_export_replaces_only_an_earlier_export(workspace, tmp_path):
    run, other = workspace["sequential log"], workspace["uniform twin"]
    precious = tmp_path / "notes"
    (precious / "sub").mkdir(parents=True)
    (precious / "config.json").write_text("{}")
    targets = {precious: "not an earlier export", other.path: "not an earlier export",
               run.path: "the folder being exported", run.path.parent: "the folder being exported"}
    for target, message in targets.items():
        listing = sorted(p.name for p in target.iterdir())
        with pytest.raises(SlimGPTError, match=message):
            export_model(str(run.path), target, make_zip=True, overwrite=True)
        assert sorted(p.name for p in target.iterdir()) == listing
    export_model(str(run.path), tmp_path / "exp", overwrite=True)
    again = export_model(str(other.path), tmp_path / "exp", overwrite=True)  # an earlier export: replaced
    assert again.source == other.name
    assert f"# uniform twin ({other.name})" in (tmp_path / "exp" / "README.md").read_text()


def test_default_export_folder_is_in_the_workspace_and_not_listed(workspace):
    run = workspace["uniform twin"]
    folder = default_export_folder(run.name)
    assert folder == run.path.parent / EXPORTS / run.name
    result = export_run(run.path, folder, True, "as stored")
    assert result.folder.is_dir() and (folder.parent / f"{run.name}.zip").is_file()
    listed = list_runs()
    assert sorted(r.name for r in listed) == sorted(r.name for r in workspace.values())
    assert all(r.broken is None for r in listed)
