"""The Pretrain page (continued pre-training with dynamic batch loading) through Streamlit's AppTest on
stories260k: a short job with distillation becomes a run whose report, curves and stored perplexities agree;
bad input starts nothing; Cancel from a second session writes nothing."""
import threading

import pytest
from streamlit.testing.v1 import AppTest

from tests.studio.test_app import APP, button, figures, load_stories, settle, small_calibration


def pruned_run(at):
    """A stories260k run made on the Prune page (the page the user comes from)."""
    from slimgpt_core.workspace.store import list_runs

    load_stories(at)
    at.switch_page("studio_pages/prune.py").run()
    small_calibration(at)
    button(at, "Start pruning").click().run()
    settle(at, "prune")
    [run] = list_runs()
    return run


def small_job(at, steps: int, ppl_windows: int = 2) -> None:
    at.number_input(key="pretrain_steps").set_value(steps).run()
    at.number_input(key="pretrain_batch").set_value(2).run()
    at.number_input(key="pretrain_seqlen").set_value(64).run()
    at.multiselect(key="pretrain_data").set_value(["tinystories", "wikitext2"]).run()
    at.number_input(key="pretrain_every").set_value(2).run()
    at.number_input(key="pretrain_ppl_windows").set_value(ppl_windows).run()


def test_a_distilled_dynamic_mix_job_becomes_a_run_with_its_curves(app):
    from slimgpt_core.base.events import RunReport
    from slimgpt_core.workspace.store import list_runs

    source = pruned_run(app)
    app.switch_page("studio_pages/pretrain.py").run()
    assert not app.exception
    assert app.selectbox(key="pretrain_source").value == source.name  # what the user just made
    assert any("stories260k" in c.value for c in app.caption)  # the reference named
    small_job(app, steps=5)
    app.checkbox(key="pretrain_teacher").check().run()
    button(app, "Start continued pre-training").click().run()
    settle(app, "pretrain")
    trained, first = list_runs()
    assert first.name == source.name and trained.summary["source_run"] == source.name
    assert trained.summary["trained"] == ["pretrain"] and first.summary["trained"] == []
    app.switch_page("studio_pages/runs.py").run()
    methods = dict(zip(app.dataframe[0].value["run"], app.dataframe[0].value["method"]))
    assert methods == {trained.name: "slimgpt + pretrain", source.name: "slimgpt"}
    app.switch_page("studio_pages/pretrain.py").run()
    assert app.session_state["current_run"] == trained.name
    assert "Saved as run" in app.success[0].value
    record = RunReport.load(trained.path / "report.json").pretrain
    assert record["steps"] == 5 and record["dynamic_mix"] and record["update_every"] == 2
    assert record["teacher"] == "stories260k" and record["distill_weight"] == 1.0
    assert [u["step"] for u in record["updates"]] == [2, 4]  # not after the last step: nothing would use it
    # the curves are the job's own numbers
    figs = figures(app)
    assert figs["Training loss (nats per token)"]["data"][0]["y"] == pytest.approx(
        [s["loss"] for s in record["loss_curve"]])
    weights = figs["Domain weights"]["data"]
    assert [t["name"] for t in weights] == ["tinystories", "wikitext2"]
    for k in range(5):  # a mix: the shares of every step add up to one
        assert sum(t["y"][k] for t in weights) == pytest.approx(1.0)
    assert weights[0]["y"] == pytest.approx([s["weights"]["tinystories"] for s in record["loss_curve"]])
    held = {t["name"]: t for t in figs["Held-out loss per domain (dashed: reference)"]["data"]}
    assert held["wikitext2 reference"]["y"][0] == pytest.approx(record["reference"]["wikitext2"])
    assert held["wikitext2 reference"]["line"]["dash"] == "dash"
    # the perplexities after training are stored with the run, as every measurement is
    stored = {e["dataset"]: e["ppl"] for e in trained.evaluations if e["kind"] == "perplexity"}
    assert stored == pytest.approx({k: v["ppl"] for k, v in record["ppl_after"].items()})


def test_no_domain_is_one_sentence_and_starts_nothing(app):
    from slimgpt_core.workspace.jobs import BOARD

    pruned_run(app)
    app.switch_page("studio_pages/pretrain.py").run()
    app.multiselect(key="pretrain_data").set_value([]).run()
    button(app, "Start continued pre-training").click().run()
    assert [e.value for e in app.error] == ["choose at least one domain"]
    assert BOARD.latest("pretrain") is None


def test_cancel_from_another_session_writes_nothing(app):
    from slimgpt_core.workspace.jobs import BOARD
    from slimgpt_core.workspace.store import list_runs

    source = pruned_run(app)
    app.switch_page("studio_pages/pretrain.py").run()
    small_job(app, steps=500, ppl_windows=0)
    button(app, "Start continued pre-training").click().run()
    job = BOARD.latest("pretrain")
    for _ in range(1200):  # until it is training
        if sum(getattr(e, "kind", "") == "pretrain-step" for e in list(job.events)) >= 2 or not job.running:
            break
        threading.Event().wait(0.1)
    other = AppTest.from_file(APP, default_timeout=300)
    other.run()
    other.switch_page("studio_pages/pretrain.py").run()
    button(other, "Cancel continued pre-training").click().run()
    assert job.wait(120).state == "cancelled"
    assert sum(getattr(e, "kind", "") == "pretrain-step" for e in job.events) < 500
    other.run()
    assert any("nothing was written" in w.value for w in other.warning)
    assert [r.name for r in list_runs()] == [source.name]
