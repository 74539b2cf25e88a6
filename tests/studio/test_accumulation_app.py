"""The Accumulation page through AppTest on stories260k: one click prunes what the story needs (reusing a run the
Prune page made with identical settings), profiles every run, and the charts, the number row and the colours shared
with Inspect and Side by side are drawn; presenter mode shows one chart per screen in large type."""
import json

import pytest

from tests.studio.test_app import button, figures, load_stories, settle, small_calibration
from ui.colors import run_color

SEQUENTIAL = "Sequential vs dense-input calibration: total error per layer"
OWN = "SlimGPT (sequential, log): own vs inherited error per layer"
SCHEDULE = "Log vs uniform schedule at the same budget: total error per layer"
DIFFERENCE = "Sequential minus dense-input: below zero, sequential calibration carries less error"
STREAM = "The dense residual stream: where outlier dimensions switch on"


def small_demo(app, uniform_twin: bool = True) -> None:
    app.number_input(key="acc_nsamples").set_value(8).run()
    app.number_input(key="acc_seqlen").set_value(64).run()
    app.selectbox(key="acc_heldout").set_value("tinystories").run()
    app.number_input(key="acc_eval_seqlen").set_value(64).run()
    app.number_input(key="acc_windows").set_value(6).run()
    if not uniform_twin:
        app.checkbox(key="acc_uniform_twin").uncheck().run()


def traces(fig) -> dict[str, dict]:
    return {t["name"]: t for t in fig["data"]}


def test_one_click_reuses_the_prune_pages_run_and_draws_the_story(app):
    from slimgpt_core.workspace.jobs import BOARD
    from slimgpt_core.workspace.store import list_runs

    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()
    small_calibration(app)  # c4, 8 × 64, seed 0: the demo's calibration below
    app.slider(key="target_ratio").set_value(0.3).run()
    button(app, "Start pruning").click().run()
    settle(app, "prune")
    [made_on_prune_page] = list_runs()

    app.switch_page("studio_pages/accumulation.py").run()
    assert app.slider(key="acc_ratio").value == 0.3  # the Prune page's budget
    small_demo(app)
    # a rerun that changes nothing sets no value in the browser (a late message would overwrite a newer edit); the
    # settings go as the widgets' defaults
    app.run()
    shown = {key: app.number_input(key=key).proto for key in ("acc_nsamples", "acc_seqlen", "acc_eval_seqlen",
                                                               "acc_windows")}
    shown["acc_heldout"] = app.selectbox(key="acc_heldout").proto
    assert not [key for key, proto in shown.items() if proto.set_value]
    assert {key: proto.default for key, proto in shown.items()} == {
        "acc_nsamples": 8, "acc_seqlen": 64, "acc_eval_seqlen": 64, "acc_windows": 6, "acc_heldout": 2}
    to_prune = "to prune: dense inputs, log, sequential, uniform, dense inputs, uniform"
    assert any(to_prune in c.value for c in app.caption)
    button(app, "Run the demo").click().run()
    settle(app, "accumulation")
    result = BOARD.latest("accumulation").result
    assert result.runs["slimgpt"] == made_on_prune_page.name  # identical settings: reused, not pruned again
    assert result.made == ["twin", "uniform", "uniform-twin"]
    assert sorted(result.profiled) == ["slimgpt", "twin", "uniform", "uniform-twin"]
    # one event per stored profile: the page redraws on each while the job still runs
    assert sum(getattr(e, "phase", "").endswith("profiled") for e in BOARD.latest("accumulation").events) == 4
    infos = {i.name: i for i in list_runs()}
    assert len(infos) == 4 and set(result.runs.values()) == set(infos)
    assert not infos[result.runs["twin"]].summary["sequential"] and infos[result.runs["uniform"]].summary["sequential"]
    stored = {}
    for key, name in result.runs.items():
        [record] = [e for e in infos[name].evaluations if e["kind"] == "accumulation"]
        assert (record["dataset"], record["windows"], record["seqlen"], record["dense"]) == ("tinystories", 6, 64,
                                                                                           "stories260k")
        assert "torch" in record["versions"] and len(record["points"]["total_std"]) == 5
        stored[key] = record
    assert button(app, "Run the demo").disabled  # nothing left to make at this budget

    figs = figures(app)
    assert {OWN, SEQUENTIAL, SCHEDULE, DIFFERENCE, STREAM} <= set(figs)
    seq = figs[SEQUENTIAL]
    titles = {"slimgpt": "SlimGPT (sequential, log)", "twin": "dense inputs, log", "uniform": "sequential, uniform",
              "uniform-twin": "dense inputs, uniform"}
    # the twins first (drawn under the runs), dashed and thinner
    assert [t["name"] for t in seq["data"][:2]] == [titles["twin"], titles["uniform-twin"]]
    lines = traces(seq)
    for key, title in titles.items():
        assert lines[title]["y"] == pytest.approx(stored[key]["points"]["total_std"])  # the outlier-robust scale
        assert lines[title]["line"]["color"] == run_color(result.runs[key], infos)
    assert lines[titles["twin"]]["line"]["dash"] == "dash" and lines[titles["slimgpt"]]["line"]["dash"] == "solid"
    assert lines[titles["twin"]]["line"]["width"] < lines[titles["slimgpt"]]["line"]["width"]
    assert len({t["line"]["color"] for t in seq["data"]}) == 4  # every run its own colour
    own = traces(figs[OWN])
    assert own["own: pruned layer on dense inputs"]["y"] == pytest.approx(stored["slimgpt"]["points"]["own_std"])
    diff = traces(figs[DIFFERENCE])["SlimGPT (sequential, log) − twin"]["y"]
    assert diff == pytest.approx([a - b for a, b in zip(stored["slimgpt"]["points"]["total_std"],
                                                        stored["twin"]["points"]["total_std"])])
    # the number row: dense and every run, the stored perplexities and KLs
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["dense · PPL"] == f"{stored['slimgpt']['ppl_dense']:.2f}"
    for key, title in titles.items():
        assert metrics[f"{title} · PPL"] == f"{stored[key]['ppl']:.2f}"
        assert any(f"KL(dense‖run) {stored[key]['kl']:.4f}" in c.value for c in app.caption)
    assert any(c.value.startswith("log: sequential") for c in app.caption)  # the story, from the numbers

    app.radio(key="acc_scale").set_value("raw ‖Δh‖/‖h‖").run()  # the raw scale a click away
    raw = traces(figures(app)[SEQUENTIAL])
    assert raw[titles["slimgpt"]]["y"] == pytest.approx(stored["slimgpt"]["points"]["total_raw"])

    # the same run in the same colour on Inspect and Side by side; its twin dashed under it
    pair = [result.runs["slimgpt"], result.runs["twin"]]
    app.switch_page("studio_pages/inspect_runs.py").run()
    app.multiselect(key="inspect_runs").set_value(pair).run()
    robust = figures(app)["Accumulated error along depth · outlier-robust"]
    assert [t["name"] for t in robust["data"]] == [infos[pair[1]].title, infos[pair[0]].title]
    by_title = traces(robust)
    assert by_title[infos[pair[0]].title]["line"]["color"] == lines[titles["slimgpt"]]["line"]["color"]
    assert by_title[infos[pair[1]].title]["line"]["color"] == lines[titles["twin"]]["line"]["color"]
    assert by_title[infos[pair[1]].title]["line"]["dash"] == "dash"
    assert by_title[infos[pair[0]].title]["y"] == pytest.approx(stored["slimgpt"]["points"]["total_std"])
    app.radio(key="inspect_scale").set_value("raw (calibration)").run()
    calib = traces(figures(app)["Accumulated error along depth"])
    assert calib[infos[pair[0]].title]["line"]["color"] == lines[titles["slimgpt"]]["line"]["color"]
    app.switch_page("studio_pages/side_by_side.py").run()
    app.multiselect(key="sbs_runs").set_value(pair).run()
    sbs = traces(figures(app)["Accumulated error along depth"])
    assert sbs[infos[pair[0]].title]["line"]["color"] == lines[titles["slimgpt"]]["line"]["color"]
    assert sbs[infos[pair[1]].title]["line"]["color"] == lines[titles["twin"]]["line"]["color"]


def test_presenter_mode_shows_one_chart_per_screen_in_large_type(app):
    load_stories(app)
    app.switch_page("studio_pages/accumulation.py").run()
    small_demo(app, uniform_twin=False)
    button(app, "Run the demo").click().run()
    settle(app, "accumulation")
    normal = app.get("plotly_chart")
    assert len(normal) == 5 and all("size" not in json.loads(c.proto.spec)["layout"].get("font", {}) for c in normal)
    app.toggle(key="acc_presenter").set_value(True).run()
    [chart] = app.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    assert spec["layout"]["font"]["size"] == 20 and spec["layout"]["height"] == 640
    assert spec["layout"]["title"]["text"] == OWN
    assert any("1/6 · Own vs inherited" in m.value for m in app.markdown)
    assert any("font-size: 1.45rem" in m.value for m in app.markdown)  # larger type for the whole page
    assert any(m.value.startswith("Each bar is what layer i adds") for m in app.markdown)  # the story, full size
    button(app, "Next ▶").click().run()
    [chart] = app.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    assert spec["layout"]["title"]["text"] == SEQUENTIAL and len(spec["data"]) == 3  # no uniform twin asked for
    for _ in range(3):
        button(app, "Next ▶").click().run()
    assert not app.get("plotly_chart") and any(m.label == "dense · PPL" for m in app.metric)  # the outcome slide
    app.toggle(key="acc_presenter").set_value(False).run()
    assert len(app.get("plotly_chart")) == 5
