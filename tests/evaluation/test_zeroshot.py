"""Zero-shot accuracy through lm-eval against hand-scored multiple-choice documents with known answers."""
import pytest

from tests.multiple_choice import DOCS, hand_scores, offline_assets
from slimgpt_core.models import load_model


def test_zero_shot_accuracy_matches_hand_scoring(tmp_path, monkeypatch, assets_root):
    from slimgpt_core.evaluation import zeroshot

    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLIMGPT_ASSETS", str(offline_assets(tmp_path, assets_root)))
    loaded = load_model("stories260k")
    acc, acc_norm, margin = hand_scores(loaded.model, loaded.tokenizer)
    assert margin > 5.0  # no near-ties: the expected answers do not hang on tokenisation details
    assert acc == 0.75  # the model picks the story every time; the third document's gold is the gibberish
    result = zeroshot.zero_shot(loaded.model, loaded.tokenizer, ["piqa"], limit=None)["piqa"]
    assert result.n == len(DOCS) and result.source == "offline:piqa.jsonl"
    assert result.acc == pytest.approx(acc) and result.acc_norm == pytest.approx(acc_norm)
