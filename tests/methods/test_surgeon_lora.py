"""Optional low-rank recovery between LLM Surgeon shots (issue 17, 5): peft LoRA on the calibration sequences
after every shot, merged into plain weights; off by default. Real stories260k."""
import pytest
import torch

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.settings import SurgeonSettings


@pytest.fixture(scope="module")
def tokens():
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    return calibration_tokens(load_model("stories260k").tokenizer, "tinystories", 16, 64)


def _run(tokens, steps, **kw):
    from slimgpt_core.models import load_model
    loaded = load_model("stories260k")
    settings = PruneSettings(ratio=0.3, method="surgeon", device="cpu",
                             surgeon=SurgeonSettings(shots=2, surgeon_lora_steps=steps))
    report = prune_model(loaded.model, tokens, settings, **kw)
    return loaded.model, report


def test_lora_between_shots_lowers_the_held_out_loss_and_merges(tokens):
    assert PruneSettings().surgeon.surgeon_lora_steps == 0  # off by default
    plain_model, plain = _run(tokens, 0)
    model, report = _run(tokens, 20)
    # the held-out sequences are not trained on: the curve is still honest
    assert report.shots[1].heldout_loss < plain.shots[1].heldout_loss
    assert report.shots[-1].heldout_loss < plain.shots[-1].heldout_loss
    # merged: plain weights, no adapters, the same class and size as without LoRA
    assert type(model) is type(plain_model)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert report.params_after == plain.params_after
    assert report.settings["surgeon_lora_steps"] == 20
    # the first shot's choice is made before any LoRA: its layers are cut the same way, only their weights moved
    first = plain_model.model.layers[0].mlp.down_proj.weight
    assert model.model.layers[0].mlp.down_proj.weight.shape == first.shape
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, first)


def test_lora_stopped_or_bad_settings(tokens):
    """Cancel inside the LoRA steps: JobCancelled, and the adapters are gone (the weights as they came)."""
    from slimgpt_core.models import load_model
    loaded = load_model("stories260k")
    in_lora = {"now": False}

    def watch(event):
        if event.kind == "progress" and "LoRA" in event.phase:
            in_lora["now"] = True
    with pytest.raises(JobCancelled):
        prune_model(loaded.model, tokens, PruneSettings(ratio=0.3, method="surgeon", device="cpu",
                                                        surgeon=SurgeonSettings(shots=2, surgeon_lora_steps=50)),
                    callback=watch, should_stop=lambda: in_lora["now"])
    assert in_lora["now"]
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    assert all(p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(SlimGPTError, match="LoRA steps between shots must be >= 0"):
        _run(tokens, -1)


def test_cli_refuses_negative_lora_steps_and_writes_nothing(tmp_path, capsys):
    from slimgpt_core.cli import main
    out = tmp_path / "o"
    code = main(["prune", "--model", "stories260k", "--method", "surgeon", "--surgeon-lora-steps", "-1",
                 "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--quiet", "--out", str(out)])
    assert code != 0 and "LoRA steps between shots must be >= 0, got -1" in capsys.readouterr().err
    assert not out.exists()
