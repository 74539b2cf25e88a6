"""The Prune page's what-if (error curves, no forward pass per move) and the auto preset, through AppTest on
stories260k."""
from test_app import button, edit_schedule, editor_data, figures, load_stories, schedule_table, settle, \
    small_calibration
import pytest
from streamlit.testing.v1 import AppTest

from slimgpt_core.schedules.curves import predict
from slimgpt_core.schedules.editor_data import payload_curves


def whatif(at):
    """The predicted errors the editor draws in the browser, from the curves and schedule the page hands it."""
    data = editor_data(at)
    assert data["curves"] is not None
    return predict(payload_curves(data), data["hr"], data["fr"])


def prune_page(at) -> AppTest:
    load_stories(at)
    at.switch_page("studio_pages/prune.py").run()
    assert not at.exception
    small_calibration(at)
    return at


def test_edit_changes_the_whatif_without_a_job(app):
    prune_page(app)
    assert editor_data(app)["curves"] is None
    button(app, "Compute error curves").click().run()
    settle(app, "curves")
    before = whatif(app)
    # the curves the editor gets are the page's curves, compacted
    [model_curves] = app.session_state["error_curves"].values()
    assert predict(model_curves, editor_data(app)["hr"], editor_data(app)["fr"]).attn == \
        pytest.approx(before.attn, rel=1e-4)
    from slimgpt_core.workspace.jobs import BOARD
    jobs = {j.id for j in BOARD._jobs}
    edit_schedule(app, {("hr", 0): 0.75})
    edit_schedule(app, {("fr", 3): 0.6})
    after = whatif(app)
    assert not app.exception
    assert after.attn[0] > before.attn[0]  # layer 0 lost more KV groups: its predicted attention error rose
    assert after.mlp[3] > before.mlp[3]
    assert after.attn[1:] == before.attn[1:]
    assert {j.id for j in BOARD._jobs} == jobs  # no job was started by the moves


def test_auto_preset_searches_and_fills_the_editor(app):
    prune_page(app)
    app.slider(key="target_ratio").set_value(0.5).run()
    log_heads = list(schedule_table(app)["heads ratio"])
    app.selectbox(key="preset").set_value("auto").run()
    app.number_input(key="auto_generations").set_value(3).run()
    button(app, "Search auto schedule").click().run()
    from slimgpt_core.workspace.jobs import BOARD
    job = BOARD.latest("auto")
    job.wait(600)
    assert job.state == "done", job.error
    app.run()
    app.run()
    assert not app.exception
    result = job.result
    heads = list(schedule_table(app)["heads ratio"])
    assert heads == [round(r, 4) for r in result.head_ratios] == editor_data(app)["hr"]
    assert list(schedule_table(app)["FFN ratio"]) == [round(r, 4) for r in result.ffn_ratios]
    assert heads != log_heads or result.start.startswith("log")
    assert any(t.startswith("Auto schedule search") for t in figures(app))
    edit_schedule(app, {("hr", 1): 0.0})  # still editable
    assert app.session_state["schedule"]["hr"][1] == 0.0 and not app.exception
    app.slider(key="target_ratio").set_value(0.3).run()  # a new target needs a new search: log at 0.3 until then
    from slimgpt_core.schedules.schedule import layer_ratios
    assert list(schedule_table(app)["heads ratio"]) == [round(r, 4) for r in layer_ratios(5, 0.3, "log")]


def test_inspect_overlays_predicted_and_measured(app):
    prune_page(app)
    button(app, "Compute error curves").click().run()
    settle(app, "curves")
    app.slider(key="target_ratio").set_value(0.4).run()
    button(app, "Start pruning").click().run()
    settle(app, "prune")
    app.switch_page("studio_pages/inspect_runs.py").run()
    assert not app.exception
    figs = figures(app)
    spec = next(s for t, s in figs.items() if t.startswith("Predicted error per layer"))
    names = [trace["name"] for trace in spec["data"]]
    assert "attention (measured, sequential)" in names and "MLP (predicted)" in names
    from slimgpt_core.base.events import RunReport
    from slimgpt_core.workspace.store import list_runs
    [info] = list_runs()
    run = type("Run", (), {"report": RunReport.load(info.path / "report.json"), "label": info.title})
    measured = [m.rel_error for m in sorted(run.report.modules, key=lambda m: m.layer) if m.module == "mlp"]
    assert spec["data"][names.index("MLP (measured, sequential)")]["y"] == pytest.approx(measured)
    smap = next(s for t, s in figs.items() if t.startswith("Sensitivity map"))
    path = [t for t in smap["data"] if t["type"] == "scatter"]
    assert len(path) == 2 and path[0]["name"] == run.label
