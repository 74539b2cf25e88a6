"""The Shear page (Sheared-LLaMA mask learning) through Streamlit's AppTest on stories260k: the target editor's
parameter count against models built with that shape, bad targets, a short job seen from a second session, Cancel."""
import json
import threading

import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.tiny_models import tiny_model
from tests.studio.test_app import APP, button, figures, load_stories

STORIES = {"layers": 5, "kv_groups": 4, "heads_per_group": 2, "ffn": 172, "hidden": 64}
EDITOR = {"layers": "shear_layers", "kv_groups": "shear_kv", "heads_per_group": "shear_qpg", "ffn": "shear_ffn",
          "hidden": "shear_hidden"}
SMALL = {"layers": 4, "kv_groups": 2, "heads_per_group": 1, "ffn": 128, "hidden": 48}


def built_parameters(config, layers, kv_groups, heads_per_group, ffn, hidden) -> int:
    """Parameters of a model that transformers builds from `config` changed to this shape (weights on `meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimgpt_core.base.shapes import count_parameters, head_dim
    d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version", "layer_types")}
    d.update(num_hidden_layers=layers, num_key_value_heads=kv_groups, num_attention_heads=kv_groups * heads_per_group,
             intermediate_size=ffn, hidden_size=hidden, head_dim=head_dim(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.model_type, **d))
    return count_parameters(model)


def shown_parameters(at) -> int:
    return int({m.label: m.value for m in at.metric}["Parameters after the cut"].replace(",", ""))


def shear_page(at) -> AppTest:
    load_stories(at)
    at.switch_page("studio_pages/shear.py").run()
    assert not at.exception
    return at


def set_target(at, **shape) -> None:
    for field, value in shape.items():
        at.number_input(key=EDITOR[field]).set_value(value).run()
    assert not at.exception


def small_job(at, steps: int, ppl_windows: int = 2) -> None:
    at.number_input(key="shear_steps").set_value(steps).run()
    at.number_input(key="shear_batch").set_value(2).run()
    at.number_input(key="shear_seqlen").set_value(64).run()
    at.multiselect(key="shear_data").set_value(["tinystories"]).run()
    at.number_input(key="shear_ppl_windows").set_value(ppl_windows).run()


def test_without_a_model_or_run_the_page_says_what_to_do(app):
    app.switch_page("studio_pages/shear.py").run()
    assert not app.exception
    assert any("Load a model" in i.value for i in app.info)


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("mistral", False), ("llama", True)])
def test_parameter_count_of_a_shape_equals_a_model_built_with_it(arch, tied):
    """Exact arithmetic, including qwen2's q/k/v biases and an untied head."""
    from slimgpt_core.methods.shear.size import parameter_count
    from slimgpt_core.methods.shear.target import resolve_target

    model = tiny_model(arch, heads=6, kv=3, layers=4, ffn=40, hidden=48)
    model.config.tie_word_embeddings = tied
    emb = model.model.embed_tokens.weight
    model.lm_head.weight = emb if tied else torch.nn.Parameter(emb.detach().clone())
    for shape in ({"layers": 4, "kv_groups": 3, "heads_per_group": 2, "ffn": 40, "hidden": 48},
                  {"layers": 2, "kv_groups": 1, "heads_per_group": 1, "ffn": 7, "hidden": 20},
                  {"layers": 3, "kv_groups": 2, "heads_per_group": 2, "ffn": 33, "hidden": 36}):
        target = resolve_target({"layers": shape["layers"], "kv_groups": shape["kv_groups"],
                                 "heads": shape["kv_groups"] * shape["heads_per_group"], "ffn": shape["ffn"],
                                 "hidden": shape["hidden"]}, model)
        assert parameter_count(model, target) == built_parameters(model.config, **shape), shape


def test_parameter_count_follows_the_target_as_it_is_set(app):
    from slimgpt_core.models import load_config

    shear_page(app)
    config = load_config("stories260k")[0]
    assert shown_parameters(app) == built_parameters(config, **STORIES) == 260_032  # starts at the source's shape
    shape, seen = dict(STORIES), {260_032}
    for field in ("layers", "kv_groups", "heads_per_group", "ffn", "hidden"):
        shape[field] = SMALL[field]
        set_target(app, **{field: SMALL[field]})
        shown = shown_parameters(app)
        assert shown == built_parameters(config, **shape), field
        seen.add(shown)
    assert len(seen) == 6  # every change moved the count
    assert not app.error


@pytest.mark.parametrize("change,words", [
    ({"layers": 0}, "at least one of the layers"),
    ({"ffn": 200}, "the source has only 172: shear can only shrink"),
    ({"heads_per_group": 3}, "12 query heads but the source has only 8"),
])
def test_an_invalid_target_says_so_and_starts_nothing(app, change, words):
    from slimgpt_core.workspace.jobs import BOARD
    from slimgpt_core.workspace.store import runs_root

    shear_page(app)
    set_target(app, **change)
    assert [e.value for e in app.error] == [next(e.value for e in app.error if words in e.value)]
    assert "Parameters after the cut" not in {m.label for m in app.metric}
    assert button(app, "Start shearing").disabled  # AppTest, like a browser, cannot click it
    app.run()
    assert BOARD.latest("shear") is None and not [p for p in runs_root().iterdir() if p.is_dir()]


def test_a_run_whose_layers_differ_is_refused_as_a_source(app):
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.services.prune import prune_to_workspace
    from ui.state import POOL

    shear_page(app)
    pruned = prune_to_workspace(POOL.get("stories260k", "auto", "auto"), PruneSettings(ratio=0.3), "tinystories", 4,
                                32, device="cpu")  # the log schedule: every layer a different shape
    app.run()
    app.selectbox(key="shear_source").set_value(pruned.name).run()
    assert [e.value for e in app.error] == ["shear needs a source whose layers all have one shape (a dense model, "
                                            "not a pruned run)"]
    assert not [b for b in app.button if b.label == "Start shearing"]


def test_copied_target_whose_heads_do_not_divide_says_so(app, tmp_path):
    from slimgpt_core.workspace.jobs import BOARD

    shear_page(app)
    app.radio(key="shear_mode").set_value("Copy the shape of").run()
    app.text_input(key="shear_copy_spec").set_value('{"layers": 3, "kv_groups": 2, "heads": 3}').run()
    assert any("3 query heads do not divide into 2 KV groups" in e.value for e in app.error)
    assert button(app, "Start shearing").disabled
    # a config file with a valid shape: its count is shown
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": 32,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                                      "head_dim": 8, "intermediate_size": 96}))
    app.text_input(key="shear_copy_spec").set_value(str(tmp_path / "config.json")).run()
    from slimgpt_core.models import load_config
    assert not app.error
    assert shown_parameters(app) == built_parameters(load_config("stories260k")[0], 3, 2, 2, 96, 32)
    assert BOARD.latest("shear") is None


def test_a_shear_job_runs_live_in_a_second_session_and_becomes_a_run(app):
    """Session A starts a short job (queued behind another job, so the order is deterministic); session B (a
    reload, a second tab) finds it with its Cancel, then its curves and result. The run has the target shape."""
    from slimgpt_core.base.events import RunReport
    from slimgpt_core.workspace.jobs import BOARD
    from slimgpt_core.workspace.store import list_runs

    shear_page(app)
    set_target(app, **SMALL)
    promised = shown_parameters(app)
    small_job(app, steps=10)
    hold = threading.Event()
    blocker = BOARD.submit("stats", lambda callback=None, should_stop=None: hold.wait(60), job_label="blocker")
    try:
        button(app, "Start shearing").click().run()
        job = BOARD.latest("shear")
        assert job.queued and not app.error
        other = AppTest.from_file(APP, default_timeout=300)
        other.run()
        other.switch_page("studio_pages/shear.py").run()
        assert any(b.label == "Cancel shear" for b in other.button)
        assert any("queued" in str(p.proto) for p in other.get("progress"))
    finally:
        hold.set()
    blocker.wait(10)
    assert job.wait(300).state == "done", job.error
    other.run()
    other.run()  # the page reruns itself once the job has ended
    assert not other.exception
    assert "Saved as run" in other.success[0].value
    [run] = list_runs()
    assert other.session_state["current_run"] == run.name
    # the run: the target shape, the promised parameter count, listed like every run
    config = json.loads((run.path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["num_attention_heads"],
            config["intermediate_size"], config["hidden_size"]) == (4, 2, 2, 128, 48)
    report = RunReport.load(run.path / "report.json")
    assert report.params_after == promised == run.summary["params_after"]
    assert run.summary["method"] == "shear" and report.settings["target"] == {
        "layers": 4, "kv_groups": 2, "heads": 2, "ffn": 128, "hidden": 48}
    assert [e["kind"] for e in run.evaluations] == ["perplexity"]
    # live curves drawn from the job's events
    figs = figures(other)
    assert figs["Loss (nats per token)"]["data"][0]["x"] == list(range(1, 11))
    sizes = figs["Expected size / source (dashed: target)"]["data"]
    assert [t["name"] for t in sizes] == [n for s in ("layers", "KV groups", "query heads per group", "FFN channels",
                                                      "hidden size") for n in (s, f"{s} target")]
    history = json.loads((run.path / "shear.json").read_text())["history"]
    assert sizes[0]["y"] == pytest.approx([e["expected"]["layers"] / 5 for e in history])
    assert sizes[1]["line"]["dash"] == "dash" and sizes[1]["y"][0] == 1.0 and sizes[1]["y"][-1] == pytest.approx(0.8)
    assert sizes[9]["y"][-1] == pytest.approx(48 / 64)
    lam = figs["Lagrange multipliers λ"]["data"]
    assert len(lam) == 10 and lam[0]["y"] == pytest.approx([e["lambdas"]["layers"][0] for e in history])
    # Runs, Evaluate and Export list it
    other.switch_page("studio_pages/runs.py").run()
    assert run.name in list(other.dataframe[0].value["run"])
    other.switch_page("studio_pages/evaluate.py").run()
    assert run.title in other.multiselect(key="eval_runs").options
    other.switch_page("studio_pages/export.py").run()
    assert not other.exception
    # its shape can be copied as a target, and the run itself sheared further (read from disk, not changed)
    other.switch_page("studio_pages/shear.py").run()
    other.radio(key="shear_mode").set_value("Copy the shape of").run()
    assert other.selectbox(key="shear_copy_from").value == run.name and shown_parameters(other) == promised
    other.radio(key="shear_mode").set_value("Set the counts").run()
    other.selectbox(key="shear_source").set_value(run.name).run()
    assert other.number_input(key="shear_layers").value == 4 and shown_parameters(other) == promised
    set_target(other, layers=3, hidden=40)
    small_job(other, steps=3, ppl_windows=0)
    button(other, "Start shearing").click().run()
    assert BOARD.latest("shear").wait(300).state == "done"
    second = list_runs()[0]
    assert second.summary["source_run"] == run.name and second.summary["params_after"] == shown_parameters(other)
    assert json.loads((second.path / "config.json").read_text())["num_hidden_layers"] == 3
    assert RunReport.load(run.path / "report.json").params_after == promised


def test_cancel_from_another_session_writes_nothing(app):
    from slimgpt_core.workspace.jobs import BOARD
    from slimgpt_core.workspace.store import runs_root

    shear_page(app)
    set_target(app, **SMALL)
    small_job(app, steps=300, ppl_windows=0)
    button(app, "Start shearing").click().run()
    job = BOARD.latest("shear")
    for _ in range(600):  # until the masks are learning
        if sum(e.kind == "shear" for e in list(job.events)) >= 2 or not job.running:
            break
        threading.Event().wait(0.1)
    other = AppTest.from_file(APP, default_timeout=300)
    other.run()
    other.switch_page("studio_pages/shear.py").run()
    button(other, "Cancel shear").click().run()
    assert job.wait(120).state == "cancelled"
    assert sum(e.kind == "shear" for e in job.events) < 300  # stopped between steps, not at the end
    other.run()
    assert any("nothing was written" in w.value for w in other.warning)
    assert not [p.name for p in runs_root().iterdir() if p.is_dir()]  # no run, no temporary folder
