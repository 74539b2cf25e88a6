"""Sheared-LLaMA's mask learning past one process (methods/shear/train.py over training/distributed.py and
training/checkpoints.py): the dense stories260k (tied embeddings) sheared to a smaller shape, with its weights,
by two real gloo processes (FSDP2 model, replicated masks and multipliers, each rank its rows of every
micro-batch), against one process on the same global batch; runs stopped after a checkpoint and resumed against
uninterrupted ones; and `torchrun … -m slimgpt_core shear` end to end.

Two processes sum the same fp32 products in another order (each rank's rows, then the mean over the ranks) and
change the last bits of every gradient (relative ~1e-7). AdamW normalises each update by sqrt(v), so over 8
steps the weights, mask logits and multipliers drift by a few ulps of their updates, not more: losses rel 1e-5,
λ atol 1e-4, log α atol 1e-3 (it moves by up to 1 per step at the masks' rate 1.0, Adam's normalised step;
measured 3.6e-5, ~75 ulps of 4), cut weights atol 1e-5 (weights of magnitude ~0.1 moved by lr 3e-3 per step;
measured 5.7e-7, losses 1.3e-7) are far below one step's change (checked below: the loss, λ and log α move by
much more). A resumed run repeats exactly the
operations of the uninterrupted one on the same bytes (DCP stores fp32 as is; the gate generator, the RNG, the
optimizers and schedulers are restored; the data position is the step), so it must be equal bit for bit.
"""
import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.data import calibration_tokens
from slimgpt_core.methods.shear.target import resolve_target
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.train import shear_model
from slimgpt_core.models import load_model
from slimgpt_core.training.distributed import load_for_training, rank_world
from tests.training.torchrun import assert_three_processes_cannot_resume_two, torchrun

pytestmark = pytest.mark.usefixtures("one_thread_and_own_cache")

STEPS, EVERY, STOP_BEFORE = 8, 3, 5  # checkpoints at 3 and 6; the stopped run ends before step 5
TARGET = {"layers": 4, "kv_groups": 2, "heads": 2, "ffn": 96, "hidden": 48}  # every structure masked


def _settings(folder: str | None = None, resume: bool = False) -> ShearSettings:
    return ShearSettings(steps=STEPS, batch_size=4, grad_accumulation=2, lr=3e-3, device="cpu", seed=0,
                         checkpoint_folder=folder, checkpoint_every=EVERY if folder else 0, resume=resume)


def _tokens() -> torch.Tensor:
    tokenizer = load_model("stories260k", "cpu", "float32").tokenizer
    return calibration_tokens(tokenizer, "tinystories", STEPS * 8, 64)


def _stop_before(step: int):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) == step
    return should_stop


def _shear(settings: ShearSettings, should_stop=None, meta_seen: list | None = None):
    """(loss curve, {λ per step, log α}, cut weights) of one shear; None on ranks other than 0. `meta_seen`
    collects whether this rank's model was a meta shell before sharding."""
    loaded = load_for_training("stories260k", "float32")
    if meta_seen is not None:
        meta_seen.append(all(p.is_meta for p in loaded.model.parameters()))
    target = resolve_target(TARGET, loaded.model)
    result = shear_model(loaded.model, _tokens(), target, settings, should_stop=should_stop)
    if result is None:
        return None
    other = {"lambdas": [e.lambdas for e in result.history],
             "log_alpha": {k: v.tolist() for k, v in result.log_alpha.items()},
             "kept_layers": result.kept_layers}
    return [e.loss for e in result.history], other, {k: v.clone() for k, v in result.model.state_dict().items()}


def _save(out, name: str, got) -> None:
    curves, other, weights = got
    save_file({k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}, f"{out}/{name}.safetensors")
    with open(f"{out}/{name}.json", "w") as f:
        json.dump({"loss": curves, "other": other}, f)


def _load(out, name: str):
    data = json.loads(open(f"{out}/{name}.json").read())
    return data["loss"], data["other"], load_file(f"{out}/{name}.safetensors")


def _worker(rank, world, init, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    meta_seen: list = []
    full = _shear(_settings(f"{out}/ckpt-full"), meta_seen=meta_seen)
    try:
        _shear(_settings(f"{out}/ckpt-stopped"), _stop_before(STOP_BEFORE))
        raise AssertionError("the stopped run was not stopped")
    except JobCancelled:
        pass
    resumed = _shear(_settings(f"{out}/ckpt-stopped", resume=True))
    with open(f"{out}/meta-{rank}.json", "w") as f:
        json.dump(meta_seen, f)
    if rank == 0:
        _save(out, "full", full)
        _save(out, "resumed", resumed)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-shear")
    mp.spawn(_worker, args=(2, f"file://{out / 'store'}", str(out)), nprocs=2)
    return out


def test_two_processes_shear_with_the_masks_multipliers_and_weights_of_one(two_processes):
    one_loss, one_other, one_weights = _shear(_settings())
    two_loss, two_other, two_weights = _load(two_processes, "full")
    assert rank_world() == (0, 1) and len(one_loss) == STEPS
    assert max(one_loss) - min(one_loss) > 0.5  # the gates and weights move the loss far past the tolerance
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    for mine, theirs in zip(two_other["lambdas"], one_other["lambdas"]):
        for k in theirs:
            assert mine[k] == pytest.approx(theirs[k], abs=1e-4)
    assert max(abs(v) for v in one_other["lambdas"][-1]["ffn"]) > 0.1  # the multipliers moved
    assert one_other["log_alpha"].keys() == two_other["log_alpha"].keys() == set(TARGET)
    for k, theirs in one_other["log_alpha"].items():
        theirs = torch.tensor(theirs)
        assert float((theirs - 5.0).abs().max()) > 1.0  # the logits moved from their start
        torch.testing.assert_close(torch.tensor(two_other["log_alpha"][k]), theirs, rtol=0, atol=1e-3)
    assert two_other["kept_layers"] == one_other["kept_layers"]
    start = load_model("stories260k", "cpu", "float32").model.state_dict()
    assert float((one_weights["model.norm.weight"] - start["model.norm.weight"][:48]).abs().max()) > 1e-3
    for k, v in two_weights.items():  # the model cut on rank 0 from the gathered shards
        torch.testing.assert_close(v, one_weights[k], rtol=0, atol=1e-5)


def test_ranks_other_than_0_never_hold_the_whole_model(two_processes):
    meta = {r: json.loads((two_processes / f"meta-{r}.json").read_text()) for r in (0, 1)}
    assert meta == {0: [False], 1: [True]}  # rank 1 built a meta shell; its shards came from rank 0


def test_two_processes_resumed_after_a_stop_end_as_the_uninterrupted_shear(two_processes):
    full_loss, full_other, full_weights = _load(two_processes, "full")
    loss, other, weights = _load(two_processes, "resumed")
    assert loss == full_loss and other == full_other  # curve, λ after every step, final log α
    for k in full_weights:
        assert torch.equal(weights[k], full_weights[k]), k


def test_one_process_resumed_after_a_stop_ends_as_the_uninterrupted_shear(tmp_path):
    full = _shear(_settings(str(tmp_path / "full")))
    with pytest.raises(JobCancelled):
        _shear(_settings(str(tmp_path / "stopped")), _stop_before(STOP_BEFORE))
    assert (tmp_path / "stopped" / "latest").read_text() == "step-0000003"
    resumed = _shear(_settings(str(tmp_path / "stopped"), resume=True))
    assert resumed[0] == full[0] and resumed[1] == full[1]
    for k in full[2]:
        assert torch.equal(resumed[2][k], full[2][k]), k


def test_torchrun_shear_saves_one_run_and_a_failing_process_ends_all_with_one_sentence(tmp_path):
    common = ["shear", "--model", "stories260k", "--target", json.dumps(TARGET), "--data", "tinystories",
              "--steps", "4", "--seqlen", "64", "--quiet", "--checkpoint-dir", str(tmp_path / "ckpt"),
              "--checkpoint-every", "2"]
    done = torchrun(2, [*common, "--batch-size", "4", "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["shape"]["layers"] == "5->4"  # rank 0 alone prints
    history = json.loads((tmp_path / "two" / "shear.json").read_text())["history"]
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["settings"]["processes"] == 2
    sheared = load_model(str(tmp_path / "two"), "cpu", "float32").model  # a run like any other: it reloads
    assert sheared.config.hidden_size == 48 and len(sheared.model.layers) == 4
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-0000002").glob("rng-*")) == ["rng-0.safetensors",
                                                                                         "rng-1.safetensors"]
    assert_three_processes_cannot_resume_two([*common, "--batch-size", "6"], tmp_path / "ckpt" / "step-0000002",
                                             tmp_path / "three")
