"""The Prune page's what-if (error curves, no forward pass per move) and the auto preset, through AppTest on
stories260k."""
from tests.studio.test_app import button, edit_schedule, editor_data, figures, load_stories, schedule_table, settle, \
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
    app.number_input(key="auto_seconds").set_value(3).run()
    app.number_input(key="auto_min_keep").set_value(0.25).run()
    button(app, "Find auto schedule").click().run()
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
    assert max(result.head_ratios + result.ffn_ratios) <= 0.75  # the minimum kept, 25%
    assert heads != log_heads or result.fast.startswith("log")
    [message] = [m.value for m in app.success if m.value.startswith("auto ")]
    assert message.startswith("auto finished: the editor holds ") and result.describe() in message
    edit_schedule(app, {("hr", 1): 0.0})  # still editable
    assert app.session_state["schedule"]["hr"][1] == 0.0 and not app.exception
    app.slider(key="target_ratio").set_value(0.3).run()  # a new target needs a new search: log at 0.3 until then
    from slimgpt_core.schedules.schedule import layer_ratios
    assert list(schedule_table(app)["heads ratio"]) == [round(r, 4) for r in layer_ratios(5, 0.3, "log")]


def _wait_for(job, condition, timeout=600.0):
    """Until an event of the running job satisfies `condition` (or the job ends); the event."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in list(job.events) if condition(e)]
        if found or not job.running:
            return found[-1] if found else None
        time.sleep(0.05)
    return None


def test_auto_sliders_follow_the_search_and_stop_keeps_the_best(app):
    """While auto runs the editor shows its best schedule so far; Stop ends it with that schedule and says which."""
    prune_page(app)
    app.slider(key="target_ratio").set_value(0.4).run()
    app.selectbox(key="preset").set_value("auto").run()
    app.number_input(key="auto_seconds").set_value(3600).run()
    button(app, "Find auto schedule").click().run()
    from slimgpt_core.workspace.jobs import BOARD
    job = BOARD.latest("auto")
    scored = _wait_for(job, lambda e: e.kind == "auto" and e.phase == "search" and e.best_kl == e.best_kl)
    assert scored is not None and job.running, job.error
    app.run()  # the fragment sees the newer best and reruns the page with it in the editor
    app.run()
    assert not app.exception
    shown = editor_data(app)["hr"]
    seen = [e for e in list(job.events) if e.head_ratios]
    assert any(shown == [round(r, 4) for r in e.head_ratios] for e in seen)
    texts = [p.proto.text for p in app.get("progress")]
    assert any(t.startswith("auto: refining (KL search) ") and "s left" in t and "editor: " in t for t in texts), texts
    button(app, "Stop (keep the best so far)").click().run()
    job.wait(600)
    assert job.state == "done", job.error
    app.run()
    app.run()
    result = job.result
    assert result.stopped and result.which in ("fast", "refined")
    assert result.kl == min(kl for _, _, kl in result.history)
    assert editor_data(app)["hr"] == [round(r, 4) for r in result.head_ratios]
    [message] = [m.value for m in app.success if m.value.startswith("auto ")]
    which = "the fast schedule" if result.which == "fast" else f"refined at generation {result.generation}"
    assert message.startswith(f"auto stopped: the editor holds {which} (KL {result.kl:.4f}")


def test_auto_stopped_before_its_first_schedule_says_so(app):
    prune_page(app)
    app.selectbox(key="preset").set_value("auto").run()
    before = editor_data(app)["hr"]
    button(app, "Find auto schedule").click()
    app.run()
    from slimgpt_core.workspace.jobs import BOARD
    BOARD.latest("auto").cancel()  # before its first phase has ended
    BOARD.latest("auto").wait(600)
    app.run()
    app.run()
    assert BOARD.latest("auto").state == "cancelled"
    assert [w.value for w in app.warning] == ["auto was stopped before its first schedule was ready: the editor keeps "
                                              "its schedule."]
    assert editor_data(app)["hr"] == before


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
