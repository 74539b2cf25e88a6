import math

import pytest

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.schedules.schedule import (check_ratio, custom_ratios, kappa, layer_ratios, parse_ratio_list, profile,
                                   units_to_remove)


def test_kappa_32_is_the_published_constant():
    assert kappa(32) == pytest.approx(0.7354, abs=1e-4)


def test_layer_ratios_reproduce_the_published_log_recipe():
    """LLaMA-7B, 20%: r_i = 0.0625 + (0.25 - 0.0625)·ln(i+1)/ln 32 (first 0.0625, last 0.25, shape 4)."""
    published = [0.0625 + (0.25 - 0.0625) * math.log(i + 1) / math.log(32) for i in range(32)]
    mean = sum(published) / 32
    assert mean == pytest.approx(0.2004, abs=1e-4)
    assert layer_ratios(32, mean, "log", 4.0) == pytest.approx(published, abs=1e-12)
    rounded = layer_ratios(32, 0.2, "log", 4.0)  # the rounded target moves every ratio by 0.2%
    assert rounded == pytest.approx(published, rel=3e-3)


def test_linear_schedule_is_a_straight_line():
    r = layer_ratios(5, 0.3, "linear", 3.0)
    assert r == pytest.approx([0.15, 0.225, 0.3, 0.375, 0.45])  # r0 = 0.3 / (1 + 2·0.5), step (3r0 − r0)/4
    assert kappa(5, "linear") == 0.5 and kappa(1, "log") == 0.0 and kappa(1, "linear") == 0.0
    assert profile(1, "log") == [0.0] and profile(3, "linear") == [0.0, 0.5, 1.0]
    assert profile(3, "log") == pytest.approx([0.0, math.log(2) / math.log(3), 1.0])
    with pytest.raises(ValueError):
        kappa(3, "cosine")
    with pytest.raises(ValueError):
        profile(3, "cosine")


def test_shape_one_is_uniform_and_shape_below_one_refused():
    assert layer_ratios(4, 0.2, "log", 1.0) == pytest.approx([0.2] * 4)
    assert layer_ratios(1, 0.3, "log", 0.5) == [0.3]  # one layer: nothing to shape
    with pytest.raises(SlimGPTError, match="schedule shape must be >= 1 \\(last/first ratio\\), got 0.5"):
        layer_ratios(4, 0.2, "log", 0.5)
    with pytest.raises(SlimGPTError, match="unknown schedule 'cosine' \\(choose from log, linear, uniform, auto, or a custom"):
        layer_ratios(4, 0.2, "cosine")


@pytest.mark.parametrize("n", [1, 2, 5, 30, 32, 80])
@pytest.mark.parametrize("kind", ["log", "linear", "uniform"])
@pytest.mark.parametrize("target", [0.0, 0.2, 0.5])
def test_schedule_mean_equals_target(n, kind, target):
    r = layer_ratios(n, target, kind, shape=3.0)
    assert len(r) == n
    assert sum(r) / n == pytest.approx(target, abs=1e-12)
    assert all(0 <= x < 1 for x in r)
    if kind != "uniform" and n > 1 and target > 0:
        assert r[-1] / r[0] == pytest.approx(3.0)
        assert r == sorted(r)


def test_log_uses_the_layer_count_not_32():
    r = layer_ratios(5, 0.2, "log", 4.0)
    r0 = 0.2 / (1 + 3 * kappa(5))
    assert r[0] == pytest.approx(r0) and r[-1] == pytest.approx(4 * r0)
    assert r[2] == pytest.approx(r0 + 3 * r0 * math.log(3) / math.log(5))


def test_bad_schedules_are_refused():
    with pytest.raises(SlimGPTError, match="lower the shape"):
        layer_ratios(30, 0.85, "log", 4.0)
    with pytest.raises(SlimGPTError, match=r"\[0, 1\)"):
        layer_ratios(30, 1.0)
    with pytest.raises(SlimGPTError, match="3 ratios but the model has 4 layers"):
        custom_ratios([0.1, 0.2, 0.3], 4)
    with pytest.raises(SlimGPTError, match="ratio of layer 1"):
        custom_ratios([0.1, 1.5], 2)


def test_rounding_keeps_at_least_one_unit():
    assert units_to_remove(3, 0.2) == 1  # 0.6 rounds to one KV group
    assert units_to_remove(3, 0.99) == 2
    assert units_to_remove(1536, 0.25) == 384


def test_a_last_ratio_above_one_is_refused():
    # two layers, linear: r0 = mean / (1 + (shape − 1)/2), last = shape·r0
    assert layer_ratios(2, 0.5, "linear", 5.0)[-1] == pytest.approx(5 / 6)
    with pytest.raises(SlimGPTError, match=r"a linear schedule with mean 0.6 and shape 6.0 asks the last layer for "
                                           r"1.029 >= 1: lower the shape or the ratio"):
        layer_ratios(2, 0.6, "linear", 6.0)  # last 6·0.6/3.5


def test_check_ratio_and_custom_lists():
    assert check_ratio(0) == 0.0 and isinstance(check_ratio(0), float)
    assert check_ratio(0.999) == 0.999
    for bad in (1, -0.01, float("nan"), "0.2", None):
        with pytest.raises(SlimGPTError, match=r"head ratio must be in \[0, 1\), got"):
            check_ratio(bad, "head ratio")
    assert custom_ratios([0, 0.5, 0.25], 3) == [0.0, 0.5, 0.25]
    assert parse_ratio_list("0.1, 0.2;0.3,") == [0.1, 0.2, 0.3]
    with pytest.raises(SlimGPTError, match=r"cannot read a list of ratios from '0.1,x' \(write e.g. 0.1,0.2,0.3\)"):
        parse_ratio_list("0.1,x")


def test_units_to_remove_rounds_to_nearest_and_respects_keep_min():
    assert units_to_remove(10, 0.24) == 2 and units_to_remove(10, 0.26) == 3
    assert units_to_remove(4, 0.0) == 0
    assert units_to_remove(4, 0.99, keep_min=2) == 2 and units_to_remove(4, 0.5, keep_min=3) == 1
    assert units_to_remove(1, 0.9) == 0


def test_defaults_and_messages_name_what_is_wrong():
    assert layer_ratios(5, 0.2) == layer_ratios(5, 0.2, "log", 4.0)
    assert layer_ratios(5, 0.2)[-1] == pytest.approx(4 * layer_ratios(5, 0.2)[0])  # default shape 4
    assert layer_ratios(4, 0.0, "log", 0.5) == [0.0] * 4  # nothing to prune: the shape is not looked at
    with pytest.raises(SlimGPTError, match=r"^ratio must be in \[0, 1\), got 2$"):
        check_ratio(2)
    with pytest.raises(SlimGPTError, match=r"^target ratio must be in \[0, 1\), got 1.0$"):
        layer_ratios(5, 1.0)
    with pytest.raises(ValueError, match="cosine"):
        kappa(4, "cosine")
    with pytest.raises(ValueError, match="cosine"):
        profile(4, "cosine")


def test_a_last_ratio_of_exactly_one_is_refused():
    # two layers, linear, mean 0.75, shape 2: r0 = 0.75 / 1.5 = 0.5 and the last is exactly 1.0
    with pytest.raises(SlimGPTError, match=r"asks the last layer for 1.000 >= 1"):
        layer_ratios(2, 0.75, "linear", 2.0)
    # three layers: the message quotes the last ratio (0.28, 0.70, 1.12), not another
    with pytest.raises(SlimGPTError, match=r"mean 0.7 and shape 4.0 asks the last layer for 1.120 >= 1"):
        layer_ratios(3, 0.7, "linear", 4.0)


def test_the_auto_schedule_has_no_formula():
    with pytest.raises(SlimGPTError, match=r"^the auto schedule has no formula: it is found by a search for a parameter "
                                           r"budget \(prune --schedule auto, or slimgpt_core\.schedules\.refine\.auto_schedule\)$"):
        layer_ratios(4, 0.2, "auto")


def test_balanced_targets_keep_the_parameter_cut():
    from slimgpt_core.schedules.schedule import balanced_targets
    attn, mlp = 4 * 576 * 576, 3 * 576 * 1536
    for target, balance in ((0.2, 1.0), (0.3, 0.5), (0.5, 1.5), (0.1, 0.0)):
        head, ffn = balanced_targets(target, balance, attn, mlp)
        assert head == pytest.approx(balance * target)
        assert head * attn + ffn * mlp == pytest.approx(target * (attn + mlp), rel=1e-12)
    assert balanced_targets(0.8, 2.0, attn, mlp)[0] == 0.9  # the heads' share is capped
    assert balanced_targets(0.8, 0.0, attn, attn) == (0.0, 0.9)  # and the FFN's (unbounded: 1.6)
    assert balanced_targets(0.05, 2.0, attn, 10 * attn) == pytest.approx((0.1, 0.045))
    assert balanced_targets(0.05, 9.0, attn, attn)[1] == 0.0  # never a negative FFN ratio
    assert balanced_targets(0.3, 1.0, attn, mlp, ffn_target=0.1) == (0.3, 0.1)  # separate targets as given
