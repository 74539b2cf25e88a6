"""Every page of the studio through Streamlit's AppTest, driving the real engine on stories260k."""
import json

import pytest
from streamlit.testing.v1 import AppTest

from tests import ROOT

APP = str(ROOT / "app.py")


def figures(at) -> dict[str, dict]:
    """Plotly figures on the page by title."""
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        title = spec["layout"].get("title", {}).get("text", "")
        out[title] = spec
    return out


def settle(at, job_name: str, timeout: float = 300) -> AppTest:
    from slimgpt_core.workspace.jobs import BOARD
    job = BOARD.latest(job_name)
    job.wait(timeout)
    assert job.state == "done", job.error
    at.run()
    at.run()  # the page reruns itself once a job has ended
    assert not at.exception, at.exception
    return at


def load_stories(at) -> AppTest:
    at.radio(key="model_source").set_value("stories260k (tiny, offline)").run()
    next(b for b in at.button if b.label == "Load model").click().run()
    assert not at.exception and not at.error
    return at


def button(at, label):
    return next(b for b in at.button if b.label == label)


def editor_data(at) -> dict:
    """What the Prune page hands the schedule editor component in this run: the payload and the schedule."""
    [editor] = at.get("bidi_component")
    proto = editor.proto
    return json.loads(proto.json if proto.WhichOneof("data") == "json" else proto.mixed.json)


def schedule_table(at):
    """The Prune page's per-layer table (a DataFrame: the schedule, and what whole units make of it)."""
    return next(t for t in at.data_editor if (t.key or "").startswith("schedule_table_")).value


def edit_schedule(at, ratios: dict[tuple[str, int], float]) -> AppTest:
    """Type ratios {("hr" | "fr", layer): ratio} into the per-layer table's cells, as a user does, and rerun."""
    column = {"hr": "heads ratio", "fr": "FFN ratio"}
    rows: dict[int, dict] = {}
    for (kind, layer), ratio in ratios.items():
        rows.setdefault(layer, {})[column[kind]] = ratio
    at.session_state[f"schedule_table_{at.session_state['schedule_table']}"] = {
        "edited_rows": rows, "added_rows": [], "deleted_rows": []}
    return at.run()


def small_calibration(at) -> None:
    at.number_input(key="nsamples").set_value(8).run()
    at.number_input(key="seqlen").set_value(64).run()


def test_model_page(app):
    assert app.radio(key="model_source").options[0].startswith("Offline default")
    assert {s.label for s in app.selectbox} == {"Device", "Weights dtype"}
    load_stories(app)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["layers"] == "5" and metrics["heads"] == "8" and metrics["KV heads"] == "4"
    assert metrics["FFN width"] == "172"
    assert any("KV groups of 2" in i.value for i in app.info)
    assert app.session_state["model_spec"] == ("stories260k", "auto", "auto")


def test_model_page_offline_hub_id_is_a_readable_error(app):
    app.radio(key="model_source").set_value("Hugging Face hub id").run()
    app.text_input(key="hub_id").set_value("someorg/some-model").run()
    button(app, "Load model").click().run()
    assert not app.exception
    assert "hub" in app.error[0].value and "offline" in app.error[0].value


def test_pages_without_a_model_or_run_say_what_to_do(app):
    for page, text in (("studio_pages/prune.py", "Load a model"), ("studio_pages/inspect_runs.py", "No runs yet"),
                       ("studio_pages/evaluate.py", "Load a model"), ("studio_pages/export.py", "No runs yet"),
                       ("studio_pages/compare.py", "Load a model")):
        app.switch_page(page).run()
        assert not app.exception
        assert any(text in i.value for i in app.info), page


def _decoder_layer_parameters(config, heads: int, kv_heads: int, ffn: int) -> int:
    """One llama decoder layer's weights from its shapes (no bias): q, k, v, o, gate, up, down, two RMSNorms."""
    hidden, d = config.hidden_size, config.head_dim
    shapes = [(heads * d, hidden), (kv_heads * d, hidden), (kv_heads * d, hidden), (hidden, heads * d),
              (ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden, 1), (hidden, 1)]
    return sum(a * b for a, b in shapes)


def test_schedule_editor_presets_table_and_preview(app):
    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()
    assert len(schedule_table(app)) == 5  # one row per layer
    before = list(schedule_table(app)["heads ratio"])
    assert before == sorted(before) and before[0] < before[-1]  # log increase
    # the editor component draws this schedule, with the preset as its ghost
    data = editor_data(app)
    assert data["hr"] == before and data["preset"]["hr"] == before and len(data["layers"]) == 5
    app.slider(key="target_ratio").set_value(0.5).run()
    after = list(schedule_table(app)["heads ratio"])
    assert sum(after) / 5 == pytest.approx(0.5, abs=0.01) and editor_data(app)["hr"] == after
    achieved = {m.label: m.value for m in app.metric}["Achieved (decoder layers)"]
    app.selectbox(key="preset").set_value("uniform").run()
    assert set(schedule_table(app)["heads ratio"]) == {0.5}
    edit_schedule(app, {("hr", 0): 0.0})  # one layer edited: fewer parameters removed
    assert not app.exception
    assert {m.label: m.value for m in app.metric}["Achieved (decoder layers)"] != achieved
    table = schedule_table(app)
    assert table["heads ratio"][0] == 0.0 and table["heads ratio"][1] == 0.5
    assert editor_data(app)["hr"][:2] == [0.0, 0.5] and editor_data(app)["preset"]["hr"][0] == 0.5  # ghost: uniform
    edit_schedule(app, {("hr", 1): 1.5})  # out of range: one sentence, the schedule as it was
    assert [e.value for e in app.error] == ["A per-layer ratio must be a number from 0 to 0.95; that cell was left "
                                            "as it was."]
    assert list(schedule_table(app)["heads ratio"][:2]) == [0.0, 0.5]

    # a hand-made schedule: the preview's numbers against a count from the config and against the real run
    heads_r, ffn_r = [0.95, 0.5, 0.25, 0.0, 0.75], [0.95, 0.9, 0.3, 0.0, 0.6]
    edit_schedule(app, {**{("hr", i): heads_r[i] for i in range(5)}, **{("fr", i): ffn_r[i] for i in range(5)}})
    from slimgpt_core.models import load_model
    config = load_model("stories260k").model.config
    groups, per_group, ffn = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads, \
        config.intermediate_size
    groups_left = [groups - min(round(r * groups), groups - 1) for r in heads_r]  # whole KV groups, one stays
    ffn_left = [ffn - min(round(r * ffn), ffn - 1) for r in ffn_r]
    assert groups_left == [1, 2, 3, 4, 1] and ffn_left == [9, 17, 120, 172, 69]
    dense_layers = 5 * _decoder_layer_parameters(config, config.num_attention_heads, groups, ffn)
    pruned_layers = sum(_decoder_layer_parameters(config, g * per_group, g, f) for g, f in zip(groups_left, ffn_left))
    embeddings = config.vocab_size * config.hidden_size + config.hidden_size  # tied input/output, final norm
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Achieved (decoder layers)"] == f"{1 - pruned_layers / dense_layers:.1%}"
    assert metrics["Achieved (whole model)"] == f"{1 - (pruned_layers + embeddings) / (dense_layers + embeddings):.1%}"
    assert metrics["Parameters after"] == f"{(pruned_layers + embeddings) / 1e6:.2f} M"
    table = schedule_table(app)
    assert list(table["heads ratio"]) == heads_r and list(table["FFN ratio"]) == ffn_r
    assert list(table["heads removed"]) == pytest.approx([1 - g / groups for g in groups_left])
    assert list(table["FFN removed (channels)"]) == pytest.approx([1 - f / ffn for f in ffn_left])
    assert (editor_data(app)["hr"], editor_data(app)["fr"]) == (heads_r, ffn_r)
    small_calibration(app)
    button(app, "Start pruning").click().run()
    settle(app, "prune")
    from slimgpt_core.base.shapes import count_parameters
    from slimgpt_core.workspace.store import list_runs
    [info] = list_runs()
    pruned = load_model(str(info.path)).model
    assert count_parameters(pruned.model.layers) == pruned_layers
    assert count_parameters(pruned) == pruned_layers + embeddings


def test_prune_run_produces_live_charts_and_heatmap(app):
    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()
    small_calibration(app)
    button(app, "Start pruning").click().run()
    settle(app, "prune")
    assert "Done in" in app.success[0].value
    from slimgpt_core.workspace.store import list_runs
    from slimgpt_core.base.events import RunReport
    [info] = list_runs()
    run = type("Run", (), {"report": RunReport.load(info.path / "report.json"), "id": info.name})
    figs = figures(app)
    recon = figs["Reconstruction error ‖WX−ŴX‖²/‖WX‖²"]
    attn = [t for t in recon["data"] if t["name"].endswith("attn")][0]
    assert attn["x"] == [0, 1, 2, 3, 4]
    assert attn["y"] == pytest.approx([max(m.rel_error, 1e-12) for m in run.report.modules if m.module == "attn"])
    acc = figs["Accumulated error along depth"]["data"][0]
    assert acc["y"] == pytest.approx([e.accumulated_error for e in run.report.layers])
    heat = figs["Head importance (log10 OBS error of removing each group)"]
    assert len(heat["data"][0]["z"]) == 5 and len(heat["data"][0]["z"][0]) == 4  # layers × KV groups
    marked = heat["data"][1]
    assert len(marked["x"]) == sum(len(h.removed) for h in run.report.heads) > 0
    assert app.session_state["current_run"] == run.id


def _dense_group_errors(model, tokens, damp: float) -> list[list[float]]:
    """The OBS error of removing each KV group of each layer alone, from the dense model's own o_proj inputs
    (hooks, fp64): H = 2XᵀX/N damped by damp·mean(diag H), B = (H⁻¹)_gg, ε_g = tr(W_g B⁻¹ W_gᵀ)."""
    import torch
    seen = {}
    layers = model.model.layers
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda module, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).double()))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    errors = []
    for i, layer in enumerate(layers):
        X, W = seen[i], layer.self_attn.o_proj.weight.detach().double()
        H = 2 * X.T @ X / X.shape[0]
        Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype))
        width = layer.self_attn.head_dim * (model.config.num_attention_heads // model.config.num_key_value_heads)
        errors.append([float(torch.trace(W[:, g:g + width] @ torch.linalg.inv(Hinv[g:g + width, g:g + width])
                                         @ W[:, g:g + width].T)) for g in range(0, W.shape[1], width)])
    return errors


def test_head_importance_preview_marks_what_the_schedule_removes(app):
    import math

    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()
    small_calibration(app)
    button(app, "Compute head importance").click().run()
    settle(app, "stats")
    title = "Dense head importance; ✕ = would be removed at these ratios"
    n_marked = len(figures(app)[title]["data"][1]["x"])
    app.selectbox(key="preset").set_value("uniform").run()
    app.slider(key="target_ratio").set_value(0.5).run()  # 2 of 4 groups in every layer
    heat = figures(app)[title]
    assert len(heat["data"][1]["x"]) == 10 != n_marked
    # a hand-made schedule: each layer loses its k least important groups, by an importance computed here
    ratios, k = [0.25, 0.5, 0.75, 0.0, 0.5], [1, 2, 3, 0, 2]
    edit_schedule(app, {("hr", i): r for i, r in enumerate(ratios)})
    dense = load_model("stories260k")
    errors = _dense_group_errors(dense.model, calibration_tokens(dense.tokenizer, "c4", 8, 64, 0), damp=0.01)
    heat = figures(app)[title]
    for row, mine in zip(heat["data"][0]["z"], errors):  # the heatmap shows log10 of these errors
        assert row == pytest.approx([math.log10(e) for e in mine], abs=1e-3)
    expected = set()
    for layer, (mine, n) in enumerate(zip(errors, k)):
        order = sorted(range(4), key=lambda g: mine[g])
        if 0 < n < 4:  # the cut between removed and kept is clear, not a near tie
            assert mine[order[n]] > 1.01 * mine[order[n - 1]]
        expected |= {(g, layer) for g in order[:n]}
    marks = heat["data"][1]
    assert set(zip(marks["x"], marks["y"])) == expected and len(marks["x"]) == sum(k)


def test_inspect_evaluate_export(app, tmp_path):
    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()
    small_calibration(app)
    button(app, "Start pruning").click().run()
    settle(app, "prune")
    # Inspect: a dense-input twin, overlaid
    app.switch_page("studio_pages/inspect_runs.py").run()
    assert not app.exception
    button(app, "Run its twin with dense inputs").click().run()
    settle(app, "twin")
    from slimgpt_core.workspace.store import list_runs
    assert len(list_runs()) == 2
    acc = figures(app)["Accumulated error along depth"]
    assert len(acc["data"]) == 2 and any("twin" in t["name"] for t in acc["data"])
    assert "OBS-predicted vs measured error" in figures(app)
    app.slider(key="detail_layer").set_value(4).run()
    assert any(t.startswith("Layer 4: FFN channel scores") for t in figures(app))
    # Evaluate: dense and pruned side by side; what the user just made (the twin) and its source are preselected
    app.switch_page("studio_pages/evaluate.py").run()
    twin, first = list_runs()
    assert app.multiselect(key="eval_runs").value == [twin.name, first.name]
    app.selectbox(key="eval_ppl").set_value("tinystories").run()
    app.number_input(key="eval_seqlen").set_value(256).run()
    app.number_input(key="eval_windows").set_value(4).run()
    app.multiselect(key="eval_tasks").set_value(["piqa"]).run()
    app.number_input(key="eval_limit").set_value(3).run()
    button(app, "Evaluate").click().run()
    settle(app, "eval")
    table = app.dataframe[0].value
    assert list(table["model"])[0] == "dense" and len(table) == 3
    assert table["ppl (tinystories, 256)"][0] < table["ppl (tinystories, 256)"][1]
    assert {"Perplexity (lower is better)", "Zero-shot acc"} <= set(figures(app))
    # every measurement was stored with its run (and the dense model's beside them), with its provenance
    from slimgpt_core.workspace.store import dense_evaluations_folder, read_evaluations
    for info in list_runs():
        kinds = {e["kind"]: e for e in info.evaluations}
        assert set(kinds) == {"perplexity", "task"}
        assert kinds["perplexity"]["windows"] == 4 and kinds["perplexity"]["seqlen"] == 256
        assert kinds["task"]["limit"] == 3 and "torch" in kinds["task"]["versions"]
        ppl_row = table[table["model"] == info.title]["ppl (tinystories, 256)"].iloc[0]
        assert kinds["perplexity"]["ppl"] == pytest.approx(ppl_row, abs=1e-3)
    dense = read_evaluations(dense_evaluations_folder("stories260k"))
    assert [e["kind"] for e in dense] == ["perplexity", "task"]
    # Export: folder, zip, model card
    app.switch_page("studio_pages/export.py").run()
    app.text_input(key="export_folder").set_value(str(tmp_path / "exported")).run()
    button(app, "Export").click().run()
    settle(app, "export")
    assert not app.exception and not app.error
    assert (tmp_path / "exported" / "model.safetensors").exists() and (tmp_path / "exported.zip").exists()
    assert any("Download exported.zip" in str(e.proto) for e in app.get("download_button"))
    assert any("pruned with SlimGPT" in m.value for m in app.markdown)


def test_jobs_cancel_and_fail_cleanly():
    import time

    from slimgpt_core.base.errors import SlimGPTError
    from slimgpt_core.workspace.jobs import start_job

    def slow(callback=None, should_stop=None):
        from slimgpt_core.base.errors import JobCancelled
        for i in range(1000):
            callback(i)
            if should_stop():
                raise JobCancelled()
            time.sleep(0.01)

    job = start_job("slow", slow)
    time.sleep(0.05)
    job.cancel()
    assert job.wait(5).state == "cancelled" and job.events

    def bad(callback=None, should_stop=None):
        raise SlimGPTError("ratio must be in [0, 1)")

    job = start_job("bad", bad)
    assert job.wait(5).state == "failed" and job.error == "ratio must be in [0, 1)"


def test_compare_page_runs_a_grid(app):
    load_stories(app)
    app.switch_page("studio_pages/compare.py").run()
    assert not app.exception
    app.multiselect(key="cmp_variants").set_value(["slimgpt", "magnitude"]).run()
    app.multiselect(key="cmp_ratios").set_value([0.3]).run()
    app.selectbox(key="cmp_calib").set_value("tinystories").run()
    app.number_input(key="cmp_nsamples").set_value(8).run()
    app.number_input(key="cmp_seqlen").set_value(64).run()
    app.selectbox(key="cmp_ppl").set_value("tinystories").run()
    app.number_input(key="cmp_windows").set_value(3).run()
    button(app, "Run grid").click().run()
    settle(app, "compare")
    table = app.dataframe[0].value
    assert list(table["variant"]) == ["slimgpt", "magnitude"]
    assert table["achieved_layer_ratio"][0] == table["achieved_layer_ratio"][1]
    ppl = figures(app)["Perplexity by variant (lower is better)"]
    assert ppl["data"][0]["x"] == ["slimgpt", "magnitude"]


def test_a_second_tab_reattaches_to_a_queued_then_running_job(app, tmp_path):
    """Jobs belong to the server: a new session (a reload, a second tab) sees the job, its place in the queue
    and its Cancel, and then its result. A heavy job holding the turn makes the ordering deterministic."""
    import threading

    from slimgpt_core.workspace.jobs import BOARD

    hold = threading.Event()
    blocker = BOARD.submit("stats", lambda callback=None, should_stop=None: hold.wait(60), job_label="blocker")
    try:
        load_stories(app)
        app.switch_page("studio_pages/prune.py").run()
        small_calibration(app)
        button(app, "Start pruning").click().run()
        prune_job = BOARD.latest("prune")
        assert prune_job.queued
        other = AppTest.from_file(APP, default_timeout=300)
        other.run()
        assert other.session_state["model_spec"] == ("stories260k", "auto", "auto")  # remembered, not re-chosen
        assert "queued" in other.sidebar.caption[-2].value or any("queued" in c.value for c in other.sidebar.caption)
        other.switch_page("studio_pages/prune.py").run()
        assert any(b.label == "Cancel" for b in other.button)
        assert any("queued" in str(p.proto) for p in other.get("progress"))
    finally:
        hold.set()
    blocker.wait(10)
    prune_job.wait(300)
    assert prune_job.state == "done"
    other.run()
    other.run()
    assert "Done in" in other.success[0].value
    assert other.session_state["current_run"] == prune_job.result.name
    assert figures(other)["Accumulated error along depth"]["data"][0]["y"]  # the live charts, from the job's events


def test_recover_page_makes_a_new_run_with_live_loss_and_perplexities(app):
    from slimgpt_core.base.events import RunReport
    from slimgpt_core.workspace.store import list_runs

    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()
    small_calibration(app)
    button(app, "Start pruning").click().run()
    settle(app, "prune")
    [pruned] = list_runs()
    app.switch_page("studio_pages/recover.py").run()
    assert app.selectbox(key="rec_run").value == pruned.name  # what the user just made
    app.number_input(key="rec_steps").set_value(4).run()
    app.selectbox(key="rec_data").set_value("tinystories").run()
    app.number_input(key="rec_seqlen").set_value(64).run()
    app.number_input(key="rec_batch").set_value(2).run()
    app.number_input(key="rec_ppl_windows").set_value(2).run()
    button(app, "Start recovery").click().run()
    settle(app, "recover")
    recovered, source = list_runs()
    assert source.name == pruned.name and recovered.summary["source_run"] == pruned.name
    report = RunReport.load(recovered.path / "report.json")
    assert report.recovery["steps"] == 4 and report.recovery["rank"] == 8
    assert report.params_after == RunReport.load(pruned.path / "report.json").params_after  # LoRA merged away
    loss = figures(app)["Loss (nats per token)"]
    assert [t["name"] for t in loss["data"]] == ["train", "held-out"] and loss["data"][0]["x"] == [1, 2, 3, 4]
    ppl = next(f for t, f in figures(app).items() if t.startswith("Perplexity (wikitext2"))
    assert ppl["data"][0]["x"] == ["dense", "pruned", "recovered"]
    stored = [e for e in recovered.evaluations if e["kind"] == "perplexity"]
    assert stored and stored[-1]["ppl"] == pytest.approx(ppl["data"][0]["y"][2])
    assert app.session_state["current_run"] == recovered.name
