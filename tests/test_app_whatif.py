"""The Prune page's what-if (error curves, no forward pass per move) and the auto preset, through AppTest on
stories260k."""
from test_app import button, figures, load_stories, settle, small_calibration
import pytest
from streamlit.testing.v1 import AppTest


def whatif(at) -> dict:
    return next(spec for title, spec in figures(at).items() if title.startswith("Predicted error per layer"))


def prune_page(at) -> AppTest:
    load_stories(at)
    at.switch_page("studio_pages/prune.py").run()
    assert not at.exception
    small_calibration(at)
    return at


def test_slider_changes_the_whatif_without_a_job(app):
    prune_page(app)
    button(app, "Compute error curves").click().run()
    settle(app, "curves")
    before = whatif(app)
    assert "Sensitivity map" in " ".join(figures(app))
    from slimgpt_core.workspace.jobs import BOARD
    jobs = {j.id for j in BOARD._jobs}
    app.slider(key="hr_0").set_value(0.75).run()
    app.slider(key="fr_3").set_value(0.6).run()
    after = whatif(app)
    assert not app.exception
    attn_before, attn_after = before["data"][0]["y"], after["data"][0]["y"]
    assert attn_after[0] > attn_before[0]  # layer 0 lost more KV groups: its predicted attention error rose
    assert after["data"][1]["y"][3] > before["data"][1]["y"][3]
    assert attn_after[1:] == attn_before[1:]
    assert {j.id for j in BOARD._jobs} == jobs  # no job was started by the moves


def test_auto_preset_searches_and_fills_the_sliders(app):
    prune_page(app)
    app.slider(key="target_ratio").set_value(0.5).run()
    log_heads = [app.session_state[f"hr_{i}"] for i in range(5)]
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
    sliders = [app.session_state[f"hr_{i}"] for i in range(5)]
    assert sliders == [round(r, 4) for r in result.head_ratios]
    assert [app.session_state[f"fr_{i}"] for i in range(5)] == [round(r, 4) for r in result.ffn_ratios]
    assert sliders != log_heads or result.start.startswith("log")
    assert any(t.startswith("Auto schedule search") for t in figures(app))
    app.slider(key="hr_1").set_value(0.0).run()  # still editable
    assert app.session_state["hr_1"] == 0.0 and not app.exception
    app.slider(key="target_ratio").set_value(0.3).run()  # a new target needs a new search: log at 0.3 until then
    from slimgpt_core.schedules.schedule import layer_ratios
    assert [app.session_state[f"hr_{i}"] for i in range(5)] == [round(r, 4) for r in layer_ratios(5, 0.3, "log")]


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
    from slimgpt_core.events import PruneReport
    from slimgpt_core.workspace.store import list_runs
    [info] = list_runs()
    run = type("Run", (), {"report": PruneReport.load(info.path / "report.json"), "label": info.title})
    measured = [m.rel_error for m in sorted(run.report.modules, key=lambda m: m.layer) if m.module == "mlp"]
    assert spec["data"][names.index("MLP (measured, sequential)")]["y"] == pytest.approx(measured)
    smap = next(s for t, s in figs.items() if t.startswith("Sensitivity map"))
    path = [t for t in smap["data"] if t["type"] == "scatter"]
    assert len(path) == 2 and path[0]["name"] == run.label
