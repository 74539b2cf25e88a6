"""Training past one process (training/distributed.py, training/checkpoints.py): LoRA recovery and full
continued pre-training with dynamic batch loading of a pruned stories260k (mixed-shape SlimGPT layers), sharded
with FSDP2 over two real gloo processes, against one process on the same global batch; and runs stopped after a
checkpoint and resumed against uninterrupted ones. Rank 1 loads a meta shell (load_for_training) and gets its
shards from rank 0's weights, so the same results also show that broadcast filled every shard.

Two processes split every micro-batch by rows and FSDP averages their gradients; one process computes the same
sums in another order. In fp32 that changes the last bits of every gradient (relative ~1e-7); AdamW divides by
sqrt(v), so over a few steps the weights drift apart by a few ulps of the update size, not more: the tolerances
below (losses rel 1e-5, weights atol 1e-5 on weights of magnitude ~0.1 moved by lr 3e-3 per step) are about a
hundred times those bits and far below one step's change (checked: the first and last loss differ by > 0.1).
A resumed run repeats exactly the operations of the uninterrupted one on the same bytes (DCP stores fp32 as is,
the RNG and the data position are restored), so it must be equal bit for bit.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.data import calibration_tokens
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.models import load_model
from slimgpt_core.training.distributed import load_for_training, on_meta
from slimgpt_core.training.pretrain import pretrain
from slimgpt_core.training.recover import recover
from slimgpt_core.training.settings import PretrainSettings, RecoverSettings
from slimgpt_core.workspace.store import save_run_at
from tests.training.torchrun import assert_three_processes_cannot_resume_two, torchrun

pytestmark = pytest.mark.usefixtures("one_thread_and_own_cache")

STEPS, EVERY, STOP_BEFORE = 8, 3, 5  # checkpoints at 3 and 6; the stopped run ends before step 5


def _settings(train_file: str, folder: str | None = None, resume: bool = False) -> RecoverSettings:
    return RecoverSettings(data=[train_file], steps=STEPS, lr=3e-3, dropout=0.0, seqlen=64, batch_size=4,
                           grad_accumulation=2, eval_every=4, heldout_samples=8, ppl_source=None,
                           checkpoint_folder=folder, checkpoint_every=EVERY if folder else 0, resume=resume)


def _stop_before(step: int):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) == step
    return should_stop


def _run(run: str, settings: RecoverSettings, should_stop=None):
    """(loss curve, held-out curve, merged weights) of one recovery; None on ranks other than 0."""
    loaded = load_for_training(run, "float32")
    result = recover(loaded.model, loaded.tokenizer, settings, should_stop=should_stop)
    if result is None:
        return None
    return ([e.train_loss for e in result.steps], [h["loss"] for h in result.heldout],
            {k: v.detach().clone() for k, v in result.model.state_dict().items()})


def _pretrain_settings(folder: str | None = None, resume: bool = False) -> PretrainSettings:
    return PretrainSettings(data=["c4", "tinystories"], steps=STEPS, dynamic_mix=True, update_every=2, lr=3e-3,
                            seqlen=64, batch_size=4, grad_accumulation=2, heldout=4, device="cpu", ppl=[],
                            checkpoint_folder=folder, checkpoint_every=EVERY if folder else 0, resume=resume)


def _run_pretrain(run: str, settings: PretrainSettings, should_stop=None):
    """(loss curve, {mix history, draws per domain}, trained weights) of one continued pre-training; None on
    ranks other than 0."""
    loaded = load_for_training(run, "float32")
    result = pretrain(loaded.model, loaded.tokenizer, settings, should_stop=should_stop)
    if result is None:
        return None
    return ([e.loss for e in result.steps], {"mix": result.mix, "drawn": result.sequences_per_domain,
                                             "class": type(result.model).__name__},
            {k: v.detach().clone() for k, v in result.model.state_dict().items()})


def _save(out, name: str, got) -> None:
    curves, other, weights = got
    save_file(weights, f"{out}/{name}.safetensors")
    with open(f"{out}/{name}.json", "w") as f:
        json.dump({"loss": curves, "other": other}, f)


def _load(out, name: str):
    data = json.loads(open(f"{out}/{name}.json").read())
    return data["loss"], data["other"], load_file(f"{out}/{name}.safetensors")


def _full_stopped_resumed(job, settings, out: str):
    """The uninterrupted run, a run stopped before step STOP_BEFORE, and that run resumed."""
    full = job(settings(f"{out}/ckpt-full"))
    try:
        job(settings(f"{out}/ckpt-stopped"), _stop_before(STOP_BEFORE))
        raise AssertionError("the stopped run was not stopped")
    except JobCancelled:
        pass
    return full, job(settings(f"{out}/ckpt-stopped", resume=True))


def _worker(rank, world, init, run, train_file, outs):
    """Both jobs in the same two processes (one start of each): recovery, then continued pre-training."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for kind, out in outs.items():
        with open(f"{out}/meta-{rank}.json", "w") as f:  # what each rank's loading holds before sharding
            json.dump(on_meta(load_for_training(run, "float32").model), f)
        if kind == "recover":
            full, resumed = _full_stopped_resumed(lambda s, stop=None: _run(run, s, stop),
                                                  lambda f, resume=False: _settings(train_file, f, resume), out)
        else:
            full, resumed = _full_stopped_resumed(lambda s, stop=None: _run_pretrain(run, s, stop),
                                                  _pretrain_settings, out)
        if rank == 0:
            _save(out, "full", full)
            _save(out, "resumed", resumed)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """stories260k pruned 50% (log): layers of different shapes (the SlimGPT mixed-shape classes)."""
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 16, 128)
    report = prune_model(loaded.model, tokens, PruneSettings(ratio=0.5), model_name="stories260k")
    return save_run_at(loaded.model, loaded.tokenizer, report, tmp_path_factory.mktemp("runs") / "s50")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, assets_root):
    text = (assets_root / "data" / "tinystories" / "tinystories_val_head.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("stories") / "train.txt"
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def two_processes_both(pruned_run, train_file, tmp_path_factory):
    outs = {"recover": str(tmp_path_factory.mktemp("two")), "pretrain": str(tmp_path_factory.mktemp("two-pretrain"))}
    store = tmp_path_factory.mktemp("store") / "store"
    mp.spawn(_worker, args=(2, f"file://{store}", str(pruned_run), train_file, outs), nprocs=2)
    return {kind: Path(out) for kind, out in outs.items()}


@pytest.fixture(scope="module")
def two_processes(two_processes_both):
    return two_processes_both["recover"]


@pytest.fixture(scope="module")
def two_processes_pretrain(two_processes_both):
    return two_processes_both["pretrain"]


def test_two_processes_give_the_loss_curve_and_weights_of_one(pruned_run, train_file, two_processes):
    one_loss, one_held, one_weights = _run(str(pruned_run), _settings(train_file))
    two_loss, two_held, two_weights = _load(two_processes, "full")
    assert len(one_loss) == STEPS and one_loss[0] - one_loss[-1] > 0.1  # it trains: the tolerance is meaningful
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert two_held == pytest.approx(one_held, rel=1e-5) and len(one_held) == 3  # steps 0, 4, 8
    assert two_weights.keys() == one_weights.keys() and not any("lora" in k for k in one_weights)
    start = load_model(str(pruned_run), "cpu", "float32").model.state_dict()
    moved = max(float((one_weights[k] - start[k]).abs().max()) for k in one_weights)
    assert moved > 1e-3  # the merged adapters changed the weights by much more than the tolerance
    for k in one_weights:
        torch.testing.assert_close(two_weights[k], one_weights[k], rtol=0, atol=1e-5)


def test_ranks_other_than_0_load_a_meta_shell(two_processes, two_processes_pretrain):
    for out in (two_processes, two_processes_pretrain):
        assert [json.loads((out / f"meta-{r}.json").read_text()) for r in (0, 1)] == [False, True]


def test_two_processes_resumed_after_a_stop_end_with_the_uninterrupted_weights(two_processes):
    full_loss, full_held, full_weights = _load(two_processes, "full")
    loss, held, weights = _load(two_processes, "resumed")
    assert loss == full_loss and held == full_held  # the curve before the stop comes back from the checkpoint
    for k in full_weights:
        assert torch.equal(weights[k], full_weights[k]), k


def test_one_process_resumed_after_a_stop_ends_with_the_uninterrupted_weights(pruned_run, train_file, tmp_path):
    run = str(pruned_run)
    full = _run(run, _settings(train_file, str(tmp_path / "full")))
    with pytest.raises(JobCancelled):
        _run(run, _settings(train_file, str(tmp_path / "stopped")), _stop_before(STOP_BEFORE))
    assert (tmp_path / "stopped" / "latest").read_text() == "step-0000003"
    resumed = _run(run, _settings(train_file, str(tmp_path / "stopped"), resume=True))
    assert resumed[0] == full[0] and resumed[1] == full[1]
    for k in full[2]:
        assert torch.equal(resumed[2][k], full[2][k]), k


def test_two_processes_pretrain_with_the_mix_and_weights_of_one(pruned_run, two_processes_pretrain):
    one_loss, one_other, one_weights = _run_pretrain(str(pruned_run), _pretrain_settings())
    two_loss, two_other, two_weights = _load(two_processes_pretrain, "full")
    assert one_loss[0] - one_loss[-1] > 0.1
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    # the same domains drawn: every rank drew from the reduced, broadcast weights, as one process does
    assert two_other["drawn"] == one_other["drawn"]
    assert two_other["class"] == one_other["class"] == "SlimGPTLlamaForCausalLM"  # gathered into the plain class
    updates = one_other["mix"]
    assert [m["step"] for m in updates] == [0, 2, 4, 6, 8]
    assert abs(updates[-1]["weights"]["tinystories"] - 0.5) > 0.01  # the mix moved
    for mine, theirs in zip(two_other["mix"], updates):
        assert mine["weights"] == pytest.approx(theirs["weights"], rel=1e-5)
        assert mine["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
    for k in one_weights:  # full fine-tuning: every weight trained, sharded over the two ranks
        torch.testing.assert_close(two_weights[k], one_weights[k], rtol=0, atol=1e-5)


def test_two_processes_pretrain_resumed_after_a_stop_ends_as_the_uninterrupted_one(two_processes_pretrain):
    full_loss, full_other, full_weights = _load(two_processes_pretrain, "full")
    loss, other, weights = _load(two_processes_pretrain, "resumed")
    assert loss == full_loss and other == full_other  # loss curve, mix history and domain draws
    for k in full_weights:
        assert torch.equal(weights[k], full_weights[k]), k


def test_torchrun_recover_saves_one_run_and_a_failing_process_ends_all_with_one_sentence(pruned_run, train_file,
                                                                                           tmp_path):
    common = ["recover", "--model", str(pruned_run), "--data", train_file, "--steps", "4", "--seqlen", "64",
              "--batch-size", "4", "--dropout", "0", "--ppl", "none", "--quiet",
              "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    done = torchrun(2, [*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["steps"] == 4  # rank 0 alone prints and saves
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert [p["step"] for p in report["recovery"]["loss_curve"]] == [1, 2, 3, 4]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-0000002"
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-0000002").glob("rng-*")) == ["rng-0.safetensors",
                                                                                         "rng-1.safetensors"]
    assert_three_processes_cannot_resume_two([*common, "--batch-size", "6"], tmp_path / "ckpt" / "step-0000002",
                                             tmp_path / "three")


def test_activation_checkpointing_recomputes_each_layer_and_trains_the_same(pruned_run, train_file):
    """With checkpointing every decoder layer runs its forward twice per micro-batch (again in the backward pass);
    the recomputation repeats the same fp32 operations, so the losses and weights are those of a plain run."""
    calls = []

    def counted(run, settings):
        loaded = load_model(run, "cpu", "float32")
        mlp = loaded.model.model.layers[0].mlp
        forward = mlp.forward  # counted by wrapping: the recomputation runs forward, not the module's hooks
        mlp.forward = lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]
        result = recover(loaded.model, loaded.tokenizer, settings)
        return [e.train_loss for e in result.steps], result.model.state_dict()

    plain = dataclasses.replace(_settings(train_file), steps=2, eval_every=0)
    loss, weights = counted(str(pruned_run), plain)
    plain_calls, calls[:] = len(calls), []
    ac_loss, ac_weights = counted(str(pruned_run), dataclasses.replace(plain, activation_checkpointing=True))
    assert len(calls) - plain_calls == 2 * 2  # 2 steps x 2 micro-batches, each recomputed once
    assert ac_loss == pytest.approx(loss, rel=1e-6)
    for k in weights:
        torch.testing.assert_close(ac_weights[k], weights[k], rtol=0, atol=1e-6)
