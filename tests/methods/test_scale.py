"""Big-model machinery on CPU: torch.distributed (gloo) sharding, out-of-memory handling, TF32 scoping,
activation placement and the optional reference forward (issue 6)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests import ROOT
from tests.tiny_models import tiny_model
from slimgpt_core.methods import obs
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings

PRUNE = ["-m", "slimgpt_core", "prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "16",
         "--seqlen", "128", "--batch-size", "4", "--ratio", "0.4", "--quiet"]


def test_torchrun_two_processes_match_one_process_exactly(tmp_path):
    # one BLAS thread in both runs (torchrun's default): multi-threaded GEMMs may round differently
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, *PRUNE, "--out", str(tmp_path / "single")], capture_output=True,
                            text=True, env={**env, "SLIMGPT_CACHE": str(tmp_path / "c1")}, cwd=tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = shutil.which("torchrun")
    assert torchrun
    multi = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", *PRUNE[:1], *PRUNE[1:],
                            "--out", str(tmp_path / "multi")], capture_output=True, text=True,
                           env={**env, "SLIMGPT_CACHE": str(tmp_path / "c2")}, cwd=tmp_path, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(tmp_path / "multi" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "single" / "report.json").read_text())
    rb = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert [m["rel_error"] for m in ra["modules"]] == [m["rel_error"] for m in rb["modules"]]
    assert [h["removed"] for h in ra["heads"]] == [h["removed"] for h in rb["heads"]]
    assert multi.stdout.count('"out"') == 1  # only rank 0 writes and reports


def test_hessian_is_independent_of_batch_grouping():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, 16, generator=g)
    one = obs.HessianAccumulator(16)
    for chunk in x.split(4):
        one.add_batch(chunk)
    two_a, two_b = obs.HessianAccumulator(16), obs.HessianAccumulator(16)
    for i, chunk in enumerate(x.split(4)):
        (two_a if i % 2 == 0 else two_b).add_batch(chunk)
    merged = obs.HessianAccumulator(16)
    merged.sum, merged.nsamples = two_a.sum + two_b.sum, two_a.nsamples + two_b.nsamples
    assert torch.equal(one.H, merged.H)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")])
def test_out_of_memory_is_a_clear_message_and_the_loaded_model_is_untouched(monkeypatch, error):
    from slimgpt_core.models import load_model
    from slimgpt_core.services.prune import run_pruning

    loaded = load_model("stories260k")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # midway: layers 0 and 1 are already pruned in the working copy
            raise error
        return real(*args, **kwargs)

    real = obs.prune_head_groups
    monkeypatch.setattr(obs, "prune_head_groups", fail)
    with pytest.raises(SlimGPTError, match="out of memory .* lower --nsamples, --seqlen or --batch-size.*activations"):
        run_pruning(loaded, PruneSettings(ratio=0.3), "tinystories", 8, 64)
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tf32_only_around_forwards(monkeypatch, tokens):
    seen = {"forward": set(), "stats": set()}
    real_add = obs.HessianAccumulator.add_batch

    def add(self, x):
        seen["stats"].add(torch.backends.cuda.matmul.allow_tf32)
        return real_add(self, x)

    monkeypatch.setattr(obs.HessianAccumulator, "add_batch", add)
    model = tiny_model()
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: seen["forward"].add(torch.backends.cuda.matmul.allow_tf32))
    torch.backends.cuda.matmul.allow_tf32 = False
    prune_model(model, tokens, PruneSettings(ratio=0.3, tf32=True), use_cache=False)
    assert seen == {"forward": {True}, "stats": {False}}
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored


def test_skipping_the_reference_forward_gives_the_same_model(tokens):
    a, b = tiny_model(), tiny_model()
    ra = prune_model(a, tokens, PruneSettings(ratio=0.4), use_cache=False)
    rb = prune_model(b, tokens, PruneSettings(ratio=0.4, track_accumulation=False), use_cache=False)
    assert "dense" in ra.phase_seconds and "dense" not in rb.phase_seconds  # the reference forward is gone
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(e.accumulated_error != e.accumulated_error for e in rb.layers)  # NaN: not measured
    assert ra.layers[-1].accumulated_error > 0


def test_offload_mode_is_validated(tokens):
    with pytest.raises(SlimGPTError, match="offload_activations must be auto, never or always, got 'sometimes'"):
        prune_model(tiny_model(), tokens, PruneSettings(offload_activations="sometimes"))
