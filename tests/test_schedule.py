import math

import pytest

from slimgpt_core.errors import SlimGPTError
from slimgpt_core.schedule import custom_ratios, kappa, layer_ratios, units_to_remove


def test_kappa_32_is_the_published_constant():
    assert kappa(32) == pytest.approx(0.7354, abs=1e-4)


def test_published_recipe_mean():
    r = [0.0625 + (0.25 - 0.0625) * math.log(i + 1) / math.log(32) for i in range(32)]
    assert sum(r) / 32 == pytest.approx(0.2004, abs=1e-4)


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
