"""Small studio defects, each pinned: figures that read (horizontal evaluation bars, layer 0 in one place), the
Model page's next step, the Runs page keeping its selection, alerts that go with the state that caused them."""
from __future__ import annotations

import json
import math

import pytest

from slimgpt_core.services.evaluate import EvalResult
from slimgpt_core.workspace.jobs import BOARD
from tests.studio.test_app import button, load_stories, settle
from ui import charts


def result(label: str, ppl: float | None = None, tasks: dict | None = None) -> EvalResult:
    return EvalResult(label, {"ppl": ppl, "dataset": "wikitext2", "seqlen": 128} if ppl else None,
                      {t: {"acc": a} for t, a in (tasks or {}).items()}, None, 1000)


# --- the Evaluate page's bars: horizontal, labels never rotated, height follows the number of bars -----------------

def test_evaluation_bars_are_horizontal_with_upright_labels_and_grow_with_the_bars():
    two = [result("dense", tasks={"arc_easy": 0.5, "piqa": 0.6}), result("run a", tasks={"arc_easy": 0.4, "piqa": 0.55})]
    fig = charts.evaluation_bars(two)
    assert all(bar.orientation == "h" for bar in fig.data)
    assert [list(bar.y) for bar in fig.data] == [["arc_easy", "piqa"]] * 2  # task names as written, on the y axis
    assert [list(bar.x) for bar in fig.data] == [[0.5, 0.6], [0.4, 0.55]]
    assert fig.layout.yaxis.tickangle == 0 and fig.layout.xaxis.tickangle is None
    four = two + [result("run b", tasks={"arc_easy": 0.3, "piqa": 0.5}), result("run c", tasks={"arc_easy": 0.2,
                                                                                                  "piqa": 0.45})]
    assert charts.evaluation_bars(four).layout.height > fig.layout.height


def test_perplexity_bars_wrap_long_run_names_and_keep_them_whole_on_hover():
    long_name = "smollm2 · slimgpt · log 30% · calibrated on c4 with 128 samples"
    results = [result("dense", 20.0), result(long_name, 31.5), result("no perplexity")]
    fig = charts.perplexity_bars(results)
    bar = fig.data[0]
    assert bar.orientation == "h" and list(bar.x) == [20.0, 31.5]
    assert list(bar.customdata) == ["dense", long_name]  # what the hover shows
    axis_label = bar.y[1]
    assert "<br>" in axis_label and axis_label.replace("<br>", " ") == long_name  # wrapped, nothing cut
    assert max(len(line) for line in axis_label.split("<br>")) <= 24
    assert fig.layout.yaxis.tickangle == 0
    short = charts.perplexity_bars([result(f"run {k}", 10.0 + k) for k in range(12)])
    assert short.layout.height > charts.perplexity_bars([result("dense", 20.0), result("run", 31.5)]).layout.height
    wrapped = charts.perplexity_bars([result(f"{long_name} {k}", 10.0 + k) for k in range(12)])
    assert wrapped.layout.height > short.layout.height  # room for the wrapped lines


# --- layer 0 in the same place on every layer-axis heatmap ------------------------------------------------------

def test_every_layer_axis_heatmap_puts_layer_0_at_the_top():
    """Plotly draws a y axis upwards unless it is reversed: with the layers' indices ascending as data, a reversed
    axis puts layer 0 at the top, like a table."""
    head = charts.head_heatmap([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[0], [], [1]])
    sens = charts.sensitivity_map([0.1, 0.5], [[1e-3, 1e-2]] * 3, [[1e-3, 1e-2]] * 3, head_path=[0.1, 0.5, 0.5],
                                  ffn_path=[0.5, 0.1, 0.1])
    for name, fig in (("head_heatmap", head), ("sensitivity_map", sens)):
        heatmaps = [t for t in fig.data if t.type == "heatmap"]
        assert heatmaps, name
        for trace in heatmaps:
            assert list(trace.y) == [0, 1, 2], name
            ref = trace.yaxis or "y"
            axis = fig.layout[f"yaxis{ref[1:]}"]
            assert axis.autorange == "reversed", f"{name}: layer 0 at the bottom of {ref}"


# --- the Model page says what to do next ------------------------------------------------------------------------

def test_the_model_page_links_to_the_next_steps_once_a_model_is_loaded(app):
    assert not app.get("page_link")  # nothing to go on with before a model is loaded
    load_stories(app)
    links = {link.proto.page: link.proto.label for link in app.get("page_link")}
    assert set(links) == {"prune", "shear", "evaluate"}, links  # the pages' URL names under st.navigation
    assert "Prune" in links["prune"] and "Shear" in links["shear"] and "Evaluate" in links["evaluate"]


# --- the Runs page keeps the run the user works on ----------------------------------------------------------------

def two_runs() -> list[str]:
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.services.prune import prune_to_workspace
    from slimgpt_core.workspace.model_pool import POOL

    loaded = POOL.get("stories260k", "auto", "auto")
    return [prune_to_workspace(loaded, PruneSettings(ratio=r), "tinystories", 4, 32).name for r in (0.2, 0.4)]


def test_saving_a_label_or_renaming_keeps_that_run_chosen(app):
    older, newer = two_runs()
    app.session_state["current_run"] = newer  # the run the other pages show: the selector's default
    app.switch_page("studio_pages/runs.py").run()
    assert app.selectbox(key="runs_pick").value == newer
    app.selectbox(key="runs_pick").set_value(older).run()
    app.text_input(key=f"label_{older}").input("baseline for the paper")
    button(app, "Save label and notes").click().run()
    assert not app.exception
    assert app.selectbox(key="runs_pick").value == older
    assert "baseline for the paper" in app.selectbox(key="runs_pick").format_func(older)  # its new title shown
    app.text_input(key=f"rename_{older}").input("paper-baseline").run()
    button(app, "Rename").click().run()
    assert not app.exception
    assert app.selectbox(key="runs_pick").value == "paper-baseline"
    assert "(paper-baseline)" in app.selectbox(key="runs_pick").format_func("paper-baseline")


# --- alerts belong to the job that caused them -------------------------------------------------------------------

def test_a_failed_evaluation_alert_is_dismissed_and_replaced_by_the_next_run(app):
    load_stories(app)
    app.switch_page("studio_pages/evaluate.py").run()
    app.number_input(key="eval_seqlen").set_value(1024).run()  # longer than stories260k's context of 512
    button(app, "Evaluate").click().run()
    BOARD.latest("eval").wait(120)
    app.run()
    assert [e.value for e in app.error] == ["evaluation length 1024 exceeds the model's context of 512 tokens"]
    button(app, "Dismiss").click().run()
    assert not app.error and not [b for b in app.button if b.label == "Dismiss"]
    app.number_input(key="eval_seqlen").set_value(1000).run()
    button(app, "Evaluate").click().run()
    BOARD.latest("eval").wait(120)
    app.run()
    assert [e.value for e in app.error] == ["evaluation length 1000 exceeds the model's context of 512 tokens"]
    app.number_input(key="eval_seqlen").set_value(64).run()  # the cause fixed: the next run replaces the alert
    app.number_input(key="eval_windows").set_value(2).run()
    button(app, "Evaluate").click().run()
    settle(app, "eval")
    assert not app.error and not app.warning


def test_an_old_cancelled_job_says_nothing_to_a_new_session(app):
    from slimgpt_core.base.errors import JobCancelled
    from streamlit.testing.v1 import AppTest

    from tests import ROOT

    def cancelled(callback, should_stop):
        raise JobCancelled()

    load_stories(app)
    BOARD.submit("eval", cancelled, heavy=False).wait(10)  # cancelled before this session ever looked
    fresh = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    fresh.run()
    fresh.switch_page("studio_pages/evaluate.py").run()
    assert not fresh.exception
    assert not [w.value for w in fresh.warning if w.value == "Cancelled."]
