"""Side by side and Generate: real pruned stories260k runs in a temporary workspace, through the engine and the
studio's pages (AppTest)."""
import copy
import json
import math

import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests import ROOT

APP = str(ROOT / "app.py")
PROMPT = "Once upon a time, there was a little girl named Lily. She"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two runs of stories260k (log and uniform 30%) written with save_run; perplexity measured for real on
    identical windows; task accuracies as `eval --limit 40` stores them."""
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    from slimgpt_core.methods.pipeline import prune_model
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.services.evaluate import evaluate
    from slimgpt_core.workspace.store import add_evaluation, dense_evaluations_folder, list_runs, save_run, versions

    tmp = tmp_path_factory.mktemp("sbs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMGPT_RUNS", str(tmp / "runs"))
        mp.setenv("SLIMGPT_CACHE", str(tmp / "cache"))
        dense = load_model("stories260k")
        tokens = calibration_tokens(dense.tokenizer, "tinystories", 8, 64)
        made = {}
        for label, settings in (("log 30%", PruneSettings(ratio=0.3)),
                                ("uniform 30%", PruneSettings(ratio=0.3, schedule="uniform"))):
            model = copy.deepcopy(dense.model)
            report = prune_model(model, tokens, settings, model_name="stories260k")
            report.settings.update(calib="tinystories", nsamples=8, seqlen=64, seed=0)
            made[label] = (save_run(model, dense.tokenizer, report, label=label), model)
        folders = {"dense": dense_evaluations_folder("stories260k")}
        folders.update({label: info.path for label, (info, _) in made.items()})
        models = {"dense": (dense.model, dense.tokenizer)}
        models.update({label: (model, dense.tokenizer) for label, (_, model) in made.items()})
        evaluate(models, "tinystories", 256, 4, [], None, False, record_to=folders)

        def task(acc, n, stderr=True):
            return {"kind": "task", "task": "boolq", "acc": acc, "acc_norm": None,
                    "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if stderr else None, "n": n, "limit": n,
                    "source": "offline:boolq.jsonl", "seconds": 1.0, "batch_size": 8, "device": "cpu",
                    "parameters": 1, "when": 2.0, "versions": versions()}
        add_evaluation(folders["dense"], task(0.325, 40))
        add_evaluation(folders["log 30%"], task(0.775, 40))
        add_evaluation(folders["uniform 30%"], task(0.4, 40))
        add_evaluation(folders["uniform 30%"], task(0.41, 200, stderr=False))  # other documents: a row of its own
        yield {"root": tmp, "runs": {r.label: r for r in list_runs()}}


@pytest.fixture
def app(workspace, monkeypatch):
    monkeypatch.setenv("SLIMGPT_RUNS", str(workspace["root"] / "runs"))
    monkeypatch.setenv("SLIMGPT_CACHE", str(workspace["root"] / "cache"))
    from slimgpt_core.workspace.store import remember
    remember("model_spec", ["stories260k", "auto", "auto"])
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception
    return at


def figures(at) -> dict[str, dict]:
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def reference_generation(folder, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers alone: the checkpoint as anyone loads it (its own modeling file when it needs one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    remote = "auto_map" in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, ids["input_ids"].shape[1]:].tolist(), tok


def test_greedy_text_of_a_run_equals_transformers_generate_on_its_checkpoint(workspace):
    from slimgpt_core.services.generation import TokenStreamed, generate_side_by_side
    run = workspace["runs"]["log 30%"]
    assert "auto_map" in json.loads((run.path / "config.json").read_text())  # layers of different shapes
    expected, tok = reference_generation(run.path, PROMPT, 40)
    events = []
    [gen] = generate_side_by_side([("log", str(run.path))], [PROMPT], 40, "cpu", callback=events.append)
    assert gen.token_ids == expected and gen.text == tok.decode(expected, skip_special_tokens=True)
    assert len(gen.text) > 20
    streamed = [e for e in events if isinstance(e, TokenStreamed)]
    assert [e.new_tokens for e in streamed] == list(range(1, len(expected) + 1))  # one event per token, in order
    assert streamed[-1].text == gen.text and streamed[0].text != gen.text
    assert gen.tokens_per_s > 0 and 0 < gen.first_token_s < gen.seconds


def test_generation_stops_when_asked_and_refuses_empty_prompts(workspace):
    from slimgpt_core.base.errors import JobCancelled, SlimGPTError
    from slimgpt_core.services.generation import TokenStreamed, generate_side_by_side
    run = workspace["runs"]["uniform 30%"]
    events = []
    stop = lambda: sum(isinstance(e, TokenStreamed) for e in events) >= 3  # noqa: E731
    with pytest.raises(JobCancelled):
        generate_side_by_side([("u", str(run.path))], [PROMPT], 40, "cpu", callback=events.append, should_stop=stop)
    assert sum(isinstance(e, TokenStreamed) for e in events) in (3, 4)  # at most one token after the request
    with pytest.raises(SlimGPTError, match="no prompt"):
        generate_side_by_side([("u", str(run.path))], ["  ", ""], 10)
    with pytest.raises(SlimGPTError, match="no model"):
        generate_side_by_side([], [PROMPT], 10)


def test_side_by_side_page(app, workspace):
    app.switch_page("studio_pages/side_by_side.py").run()
    assert not app.exception
    runs = workspace["runs"]
    app.multiselect(key="sbs_runs").set_value([runs["log 30%"].name, runs["uniform 30%"].name]).run()
    assert not app.exception
    facts = app.dataframe[0].value
    assert list(facts["model"]) == ["dense · stories260k", "log 30% (" + runs["log 30%"].name + ")",
                                    "uniform 30% (" + runs["uniform 30%"].name + ")"]
    assert all(facts["size on disk (MB)"][1:] > 0) and facts["parameters (M)"][0] > facts["parameters (M)"][1]
    figs = figures(app)
    assert {"Accumulated error along depth", "Accuracy ± 1 standard error"} <= set(figs)
    grid = next(f for t, f in figs.items() if t.startswith("KV groups kept per layer"))
    assert len(grid["data"][0]["z"]) == 5 and len(grid["data"][0]["z"][0]) == 4  # layers × KV groups
    table = app.dataframe[1].value
    ppl = table[table["measured"] == "tinystories (ppl)"].iloc[0]
    assert "4 windows of 256 tokens" in ppl["setting"] and "comparable" in ppl["vs the row's first model"]
    stored = {label: [e for e in runs[label].evaluations if e["kind"] == "perplexity"][0]["ppl"]
              for label in ("log 30%", "uniform 30%")}
    assert float(ppl[runs["log 30%"].title].split()[0]) == pytest.approx(stored["log 30%"], abs=1e-3)
    boolq = table[table["measured"] == "boolq (acc)"]
    assert len(boolq) == 2  # 40 documents and 200 documents: never one row
    forty = boolq[boolq["setting"].str.contains("40 documents")].iloc[0]
    assert forty["dense · stories260k"].startswith("0.325 ± 0.07")
    assert forty[runs["log 30%"].title].endswith("(Δ +0.450, beyond noise)")
    assert forty[runs["uniform 30%"].title].endswith("(Δ +0.075, within noise)")
    assert ppl[runs["log 30%"].title].endswith("same windows)")
    verdicts = forty["vs the row's first model"]
    assert f"{runs['log 30%'].title}: +0.450, beyond noise" in verdicts
    assert f"{runs['uniform 30%'].title}: +0.075, within noise" in verdicts
    two_hundred = boolq[boolq["setting"].str.contains("200 documents")].iloc[0]
    assert two_hundred["vs the row's first model"] == "one model only"
    assert two_hundred["note"] == "measured on some models only"
    se = math.sqrt(0.41 * 0.59 / 199)  # not stored: computed, and marked so
    assert two_hundred[runs["uniform 30%"].title] == f"0.410 ± {se:.3f} †"


def test_generate_page_streams_one_column_per_model(app, workspace):
    from slimgpt_core.workspace.jobs import BOARD
    run = workspace["runs"]["log 30%"]
    app.switch_page("studio_pages/generate.py").run()
    assert not app.exception
    app.multiselect(key="gen_runs").set_value([run.name]).run()
    app.text_area(key="gen_prompts").set_value(PROMPT).run()
    app.number_input(key="gen_max_new").set_value(16).run()
    next(b for b in app.button if b.label == "Generate").click().run()
    job = BOARD.latest("generate")
    job.wait(120)
    assert job.state == "done", job.error
    app.run()
    assert not app.exception
    expected, tok = reference_generation(run.path, PROMPT, 16)
    texts = [m.value for m in app.markdown]
    assert tok.decode(expected, skip_special_tokens=True) in texts
    from slimgpt_core.base.assets import asset_root
    dense_ids, _ = reference_generation(asset_root(required=True) / "models" / "stories260k", PROMPT, 16)
    captions = [c.value for c in app.caption]
    assert "dense · stories260k" in captions and run.title in captions
    assert sum("tokens/s" in c for c in captions) == 2
    assert tok.decode(dense_ids, skip_special_tokens=True) in texts
