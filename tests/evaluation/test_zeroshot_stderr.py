"""Every zero-shot accuracy comes with its standard error (what tells 40 questions apart from noise)."""
import math

import pytest


def test_accuracy_comes_with_its_closed_form_standard_error(assets_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    from slimgpt_core.models import load_model
    from slimgpt_core.evaluation.zeroshot import zero_shot

    m = load_model("stories260k", "cpu")
    [result] = zero_shot(m.model, m.tokenizer, ["piqa"], limit=12).values()
    assert result.n == 12 and result.acc_stderr is not None
    assert result.acc_stderr == pytest.approx(math.sqrt(result.acc * (1 - result.acc) / (result.n - 1)))
