"""Speed measurement's shape (not its timings): which points are measured."""
from tests.tiny_models import tiny_model

from slimgpt_core.base.shapes import check_context_length, context_length, fits_context
from slimgpt_core.evaluation.speed import measure_speed


def test_points_longer_than_the_context_are_left_out():
    model = tiny_model(layers=1)  # a context of 128 tokens
    assert context_length(model.config) == 128
    assert fits_context(model.config, 128) and not fits_context(model.config, 129)
    check_context_length(model.config, 128)
    report = measure_speed(model, batch_sizes=(1,), prompt_lens=(8, 112, 113), new_tokens=16, repeats=1)
    assert [(p.batch, p.prompt_len) for p in report.points] == [(1, 8), (1, 112)]  # 113 + 16 > 128

    class Silent:  # a config that does not say how long its context is: nothing is left out
        pass
    assert context_length(Silent()) is None and fits_context(Silent(), 10**9)
