"""FFN widths aligned for llama.cpp's quantization blocks: which layers the automatic default aligns, and the same
removals in the pipeline's plan, the what-if's predictions and the schedule editor's payload."""
from __future__ import annotations

import pytest

from slimgpt_core.methods.prune_settings import (AUTO_ALIGN, PruneSettings, aligned_width, ffn_units_removed,
                                                 layer_align, plan_removals)
from slimgpt_core.schedules.curves import LayerCurves, ModelCurves, predict
from slimgpt_core.schedules.editor_data import editor_payload
from slimgpt_core.schedules.schedule import units_to_remove
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("full, align, expected", [
    (1536, None, 32), (512, None, 32), (480, None, 1), (8192, None, 32), (1530, None, 1), (172, None, 1),
    (48, None, 1), (1536, 1, 1), (1536, 128, 128), (172, 4, 4)])
def test_auto_aligns_only_widths_that_are_whole_blocks_and_wide_enough(full, align, expected):
    assert layer_align(full, align) == expected


def test_removals_follow_the_layers_alignment():
    for full, ratio in [(1536, 0.2), (1536, 0.37), (1536, 0.949), (512, 0.5), (172, 0.3), (48, 0.25)]:
        plain = units_to_remove(full, ratio)
        auto = ffn_units_removed(full, ratio, None)
        if layer_align(full, None) == 1:
            assert auto == plain
        else:  # the nearest multiple of 32 kept: at most half a block from the unaligned choice
            assert (full - auto) % AUTO_ALIGN == 0 and abs(auto - plain) <= AUTO_ALIGN // 2
        assert ffn_units_removed(full, ratio, 1) == plain


def test_plan_predict_and_editor_payload_agree_on_aligned_widths():
    model = tiny_model(ffn=512, layers=3)
    ratios = [0.1, 0.33, 0.6]
    _, ffn_r, _, ffn_rm = plan_removals(model, PruneSettings(head_ratios=[0.0] * 3, ffn_ratios=ratios))
    assert ffn_rm == [512 - aligned_width(512 - units_to_remove(512, r), 512, 32) for r in ratios]
    assert all((512 - k) % 32 == 0 for k in ffn_rm) and ffn_r == [k / 512 for k in ffn_rm]
    _, _, _, plain = plan_removals(model, PruneSettings(head_ratios=[0.0] * 3, ffn_ratios=ratios, align=1))
    assert plain == [units_to_remove(512, r) for r in ratios] and plain != ffn_rm
    curves = ModelCurves([LayerCurves(2, 2, 512, [0.0, 0.1], [], [0, 256, 511], [0.0, 0.2, 0.9], [], 0.0, 0.0)] * 3)
    assert predict(curves, [0.0] * 3, ratios).ffn_removed == ffn_rm
    assert predict(curves, [0.0] * 3, ratios, align=1).ffn_removed == plain
    assert [t["align"] for t in editor_payload(model, None, [0.1] * 3, [0.1] * 3)["layers"]] == [32] * 3
    assert [t["align"] for t in editor_payload(model, None, [0.1] * 3, [0.1] * 3, align=1)["layers"]] == [1] * 3
    narrow = tiny_model(ffn=48, layers=3)
    assert [t["align"] for t in editor_payload(narrow, None, [0.1] * 3, [0.1] * 3)["layers"]] == [1] * 3
