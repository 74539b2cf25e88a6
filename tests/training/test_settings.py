"""The training runs' settings (training/settings.py) alone, without torch work: each bad value is refused with its
own sentence before anything loads, and the values derived from the settings (warm-up steps, the mix's update
interval, the distillation weight) are what the docs say."""
import pytest

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.training.pretrain import check_pretrain_settings
from slimgpt_core.training.recover import check_recover_settings
from slimgpt_core.training.settings import PretrainSettings, RecoverSettings


@pytest.mark.parametrize("changes, message", [
    ({"rank": 0}, "LoRA rank must be at least 1, got 0"),
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"alpha": 0.0}, "LoRA alpha must be positive, got 0.0"),
    ({"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, r"LoRA dropout must be in \[0, 1\), got -0.1"),
    ({"lr": 0.0}, "learning rate must be positive, got 0.0"),
    ({"seqlen": 1}, "seqlen must be at least 2, got 1"),
    ({"batch_size": 0}, "batch size must be at least 1, got 0"),
    ({"grad_accumulation": 0}, "gradient accumulation must be at least 1, got 0"),
    ({"heldout_samples": 0}, "held-out samples must be at least 1, got 0"),
    ({"heldout_fraction": 1.0}, r"held-out fraction must be in \(0, 1\), got 1.0"),
    ({"heldout_fraction": 0.0}, r"held-out fraction must be in \(0, 1\), got 0.0"),
    ({"eval_every": -1}, "eval-every must be 0 \\(end only\\) or positive, got -1"),
    ({"schedule": "linear"}, "unknown lr schedule 'linear' \\(cosine, constant\\)"),
    ({"data": []}, "no training data given"),
    ({"target_modules": []}, "no target modules given"),
    ({"ppl_windows": 0}, "ppl windows must be at least 1, got 0"),
    ({"checkpoint_every": -1}, "checkpoint-every must be 0 \\(none\\) or positive, got -1"),
    ({"resume": True}, "checkpoints and --resume need a checkpoint folder"),
    ({"checkpoint_every": 5}, "checkpoints and --resume need a checkpoint folder"),
])
def test_a_bad_recover_value_is_one_sentence(changes, message):
    with pytest.raises(SlimGPTError, match=f"^{message}$"):
        RecoverSettings(**changes).validate()


def test_good_recover_values_pass_and_the_warm_up_is_five_percent():
    RecoverSettings(eval_every=0, ppl_windows=None, checkpoint_folder="ck", checkpoint_every=5, resume=True).validate()
    RecoverSettings(checkpoint_folder="ck").validate()  # a folder without checkpoints asked for is fine
    assert RecoverSettings(steps=200).warmup == 10 and RecoverSettings(steps=10).warmup == 1  # at least one
    assert RecoverSettings(steps=30).warmup == 2 and RecoverSettings(steps=200, warmup_steps=0).warmup == 0


def test_recover_data_sources_are_checked_beside_the_values():
    with pytest.raises(SlimGPTError, match="training data 'no/such/file.txt' not found"):
        check_recover_settings(RecoverSettings(data=["c4", "no/such/file.txt"]))
    with pytest.raises(SlimGPTError, match="LoRA rank must be at least 1"):  # the values first
        check_recover_settings(RecoverSettings(rank=0, data=["no/such/file.txt"]))
    check_recover_settings(RecoverSettings(data=["c4", "tinystories", "wikitext2"]))


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"update_every": 0}, "update-every must be at least 1, got 0"),
    ({"mix_variant": "both"}, "unknown mix variant 'both' \\(paper, code\\)"),
    ({"lr": -1.0}, "learning rate must be positive, got -1.0"),
    ({"warmup": 1.0}, r"warm-up must be a fraction in \[0, 1\), got 1.0"),
    ({"warmup": -0.1}, r"warm-up must be a fraction in \[0, 1\), got -0.1"),
    ({"schedule": "step"}, "unknown lr schedule 'step' \\(cosine, constant\\)"),
    ({"seqlen": 1}, "seqlen must be at least 2, got 1"),
    ({"batch_size": 0}, "batch size must be at least 1, got 0"),
    ({"grad_accumulation": 0}, "gradient accumulation must be at least 1, got 0"),
    ({"heldout": 0}, "held-out windows must be at least 1, got 0"),
    ({"lora": True, "rank": 0}, "LoRA rank must be at least 1, got 0"),
    ({"lora": True, "alpha": 0.0}, "LoRA alpha must be positive, got 0.0"),
    ({"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\), got 1.0"),
    ({"distill_weight": 1.5}, r"distill weight must be in \[0, 1\], got 1.5"),
    ({"distill_weight": -0.5}, r"distill weight must be in \[0, 1\], got -0.5"),
    ({"ppl_windows": 0}, "ppl windows must be at least 1, got 0"),
    ({"resume": True}, "checkpoints and --resume need a checkpoint folder"),
    ({"ppl": ["tinystories", "books"]}, "unknown perplexity text 'books' \\(tinystories, wikitext2\\)"),
    ({"initial_weights": [1.0]}, r"initial weights need one value per domain \(2\), got 1"),
    ({"reference_losses": [1.0, 2.0, 3.0]}, r"reference losses need one value per domain \(2\), got 3"),
    ({"initial_weights": [1.0, -1.0]}, r"initial weights must be non-negative with a positive sum, got \[1.0, -1.0\]"),
    ({"initial_weights": [0.0, 0.0]}, r"initial weights must be non-negative with a positive sum, got \[0.0, 0.0\]"),
])
def test_a_bad_pretrain_value_is_one_sentence(changes, message):
    with pytest.raises(SlimGPTError, match=f"^{message}$"):
        PretrainSettings(**changes).validate()


def test_good_pretrain_values_pass_and_what_they_imply():
    PretrainSettings(lora=False, rank=0, alpha=0.0, ppl=[], ppl_windows=None, distill_weight=1.0,
                     initial_weights=[0.0, 2.0], reference_losses=[3.0, 4.0], warmup=0.0).validate()
    assert PretrainSettings(steps=400).every == 40 and PretrainSettings(steps=5).every == 1
    assert PretrainSettings(steps=400, update_every=7).every == 7
    assert PretrainSettings(steps=400).warmup_steps == 20 and PretrainSettings(steps=4).warmup_steps == 1
    assert PretrainSettings().distill(True) == 1.0 and PretrainSettings().distill(False) == 0.0
    assert PretrainSettings(distill_weight=0.25).distill(True) == 0.25


def test_pretrain_domains_are_checked_beside_the_values():
    with pytest.raises(SlimGPTError, match="unknown domain 'books'"):
        check_pretrain_settings(PretrainSettings(data=["c4", "books"], initial_weights=None))
    with pytest.raises(SlimGPTError, match="a domain is given twice"):
        check_pretrain_settings(PretrainSettings(data=["c4", "c4"]))
    with pytest.raises(SlimGPTError, match="steps must be at least 1"):  # the values first
        check_pretrain_settings(PretrainSettings(steps=0, data=["books"]))
