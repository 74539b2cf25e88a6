"""The Prune page's settings are one object kept in the workspace: page switches, reloads (a new session) and
restarts show what the last job used; invalid settings disable Start with the reason; a preset keeps the hand edits
it replaces; a job's settings are frozen and shown beside it."""
import json

from streamlit.testing.v1 import AppTest

from tests import ROOT
from tests.studio.test_app import button, edit_schedule, load_stories, settle
from slimgpt_core.schedules.schedule import layer_ratios
from slimgpt_core.workspace.jobs import BOARD
from ui.prune_form import PruneForm, load_form

APP = str(ROOT / "app.py")


def prune_page(at) -> AppTest:
    at.switch_page("studio_pages/prune.py").run()
    assert not at.exception, at.exception
    return at


def start_button(at):
    return button(at, "Start pruning")


def fresh_session() -> AppTest:
    """A reload or another tab: a new browser session on the same server and workspace."""
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    return prune_page(at)


def test_settings_survive_page_switches_reloads_and_restarts(app, tmp_path):
    load_stories(app)
    prune_page(app)
    app.number_input(key="nsamples").set_value(8).run()
    app.number_input(key="seqlen").set_value(64).run()
    app.number_input(key="seed").set_value(3).run()
    app.slider(key="target_ratio").set_value(0.3).run()
    app.checkbox(key="dense_inputs").check().run()
    app.switch_page("studio_pages/runs.py").run()
    prune_page(app)
    assert app.number_input(key="nsamples").value == 8 and app.number_input(key="seqlen").value == 64
    assert app.slider(key="target_ratio").value == 0.3 and app.checkbox(key="dense_inputs").value
    # the workspace holds them: a new session (a reload, another tab, a restarted server) shows the same
    stored = json.loads((tmp_path / "runs" / ".studio.json").read_text())["prune_form"]
    assert (stored["nsamples"], stored["seqlen"], stored["seed"], stored["target_ratio"]) == (8, 64, 3, 0.3)
    other = fresh_session()
    assert other.number_input(key="nsamples").value == 8 and other.number_input(key="seqlen").value == 64
    assert other.number_input(key="seed").value == 3 and other.slider(key="target_ratio").value == 0.3
    assert other.session_state["schedule"]["hr"] == [round(r, 4) for r in layer_ratios(5, 0.3, "log", 4.0)]


def test_invalid_settings_disable_start_with_the_reason(app):
    load_stories(app)
    prune_page(app)
    assert not start_button(app).disabled
    app.number_input(key="nsamples").set_value(0).run()
    assert start_button(app).disabled
    assert any("Samples must be at least 1 (got 0)" in e.value for e in app.error)
    app.number_input(key="nsamples").set_value(4).run()
    assert not start_button(app).disabled and not app.error
    # a target the preset cannot make: the page says why and Start does not run the previous schedule
    app.slider(key="balance").set_value(2.0).run()
    app.slider(key="target_ratio").set_value(0.9).run()
    assert start_button(app).disabled
    assert any("Start is disabled" in e.value and "schedule cannot be made" in e.value for e in app.error)
    app.number_input(key="seqlen").set_value(100_000).run()
    assert any("longer than the model's context" in e.value for e in app.error)


def test_a_preset_keeps_the_hand_edits_it_replaces(app):
    load_stories(app)
    prune_page(app)
    edit_schedule(app, {("hr", 0): 0.5})
    hand = list(app.session_state["schedule"]["hr"])
    assert hand[0] == 0.5 and load_form().origin == "hand"
    assert any("your hand edits" in c.value for c in app.caption)
    app.selectbox(key="preset").set_value("uniform").run()
    assert app.session_state["schedule"]["hr"] == [0.2] * 5  # the preset's ratios now
    assert any("hand-edited schedule was replaced" in i.value for i in app.info)
    button(app, "Back to my hand edits").click().run()
    assert app.session_state["schedule"]["hr"] == hand and load_form().origin == "hand"
    assert not any("hand-edited schedule was replaced" in i.value for i in app.info)


def test_a_job_shows_its_frozen_settings_and_the_calibration_it_used(app):
    load_stories(app)
    prune_page(app)
    app.number_input(key="nsamples").set_value(4).run()
    app.number_input(key="seqlen").set_value(32).run()
    app.selectbox(key="calib_source").set_value("tinystories").run()
    start_button(app).click().run()
    frozen = BOARD.latest("prune").settings
    assert (frozen["calib"], frozen["nsamples"], frozen["seqlen"]) == ("tinystories", 4, 32)
    settle(app, "prune")
    assert any("calibrated on tinystories, 4 × 32 tokens, seed 0, sequential inputs" in s.value for s in app.success)
    assert any("was started with" in c.value and "tinystories, 4 × 32 tokens" in c.value for c in app.caption)
    # the editor moves on; the job's settings stay what they were, and one click brings them back
    app.number_input(key="nsamples").set_value(16).run()
    assert BOARD.latest("prune").settings["nsamples"] == 4
    button(app, "The editor has changed since: show this job's settings in it").click().run()
    app.run()
    assert app.number_input(key="nsamples").value == 4 and load_form().nsamples == 4


def test_a_broken_state_file_falls_back_to_defaults(app, tmp_path):
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "runs" / ".studio.json").write_text(json.dumps({"prune_form": {"nsamples": "many", "hr": ["x"],
                                                                               "preset": "zigzag", "seed": 5}}))
    form = load_form()
    assert form.nsamples == PruneForm().nsamples and form.hr == [] and form.preset == "log" and form.seed == 5
