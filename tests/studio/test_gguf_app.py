"""The studio's llama.cpp parts through AppTest: the Export page writes a run's GGUF, Generate streams from it beside
transformers, Evaluate shows llama.cpp tokens/s beside transformers'."""
from __future__ import annotations

from slimgpt_core.evaluation import llamacpp
from slimgpt_core.workspace.gguf import default_gguf_path
from tests.studio.test_app import button, load_stories, settle
from tests.studio.test_app_small import two_runs


def test_export_page_writes_the_runs_gguf(app):
    run, _ = two_runs()
    app.session_state["current_run"] = run
    app.switch_page("studio_pages/export.py").run()
    app.radio(key="export_format").set_value("GGUF (llama.cpp, Ollama, LM Studio)").run()
    app.selectbox(key="export_weight_type").set_value("q8_0").run()
    button(app, "Export GGUF").click().run()
    settle(app, "export_gguf")
    target = default_gguf_path(run, "q8_0")
    assert any(f"Wrote {target}" in s.value.replace("`", "") for s in app.success), [s.value for s in app.success]
    text = "\n".join(m.value for m in app.markdown)
    assert "llama-cli -m" in text and f"FROM ./{target.name}" in text and "vLLM cannot serve" in text
    from slimgpt_core.workspace.store import runs_root
    import json

    config = json.loads((runs_root() / run / "config.json").read_text())
    meta = llamacpp.gguf_metadata(target)
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == config["layer_num_attention_heads"]
    assert meta["deci.feed_forward_length"] == config["layer_intermediate_size"]


def test_generate_streams_from_the_gguf_beside_transformers(app):
    load_stories(app)
    run, _ = two_runs()
    app.switch_page("studio_pages/generate.py").run()
    app.multiselect(key="gen_runs").set_value([run]).run()
    app.checkbox(key="gen_dense").uncheck().run()
    app.checkbox(key="gen_llamacpp").check().run()
    app.text_area(key="gen_prompts").input("Once upon a time").run()
    app.number_input(key="gen_max_new").set_value(16).run()
    button(app, "Generate").click().run()
    settle(app, "generate")
    from slimgpt_core.workspace.jobs import BOARD

    results = BOARD.latest("generate").result
    assert len(results) == 2 and results[1].model.endswith("· llama.cpp q8_0")
    assert results[1].device.startswith("llama.cpp") and 0 < len(results[1].token_ids) <= 16
    assert results[1].text.strip()
    captions = "\n".join(c.value for c in app.caption)
    assert "llama.cpp cpu, 2 threads" in captions


def test_evaluate_shows_llamacpp_speed_beside_transformers(app):
    load_stories(app)
    run, _ = two_runs()
    app.switch_page("studio_pages/evaluate.py").run()
    app.multiselect(key="eval_runs").set_value([run]).run()
    app.selectbox(key="eval_ppl").set_value("none").run()
    app.checkbox(key="eval_speed").check().run()
    app.checkbox(key="eval_llamacpp").check().run()
    button(app, "Evaluate").click().run()
    settle(app, "eval")
    settle(app, "eval_llamacpp")
    table = next(df.value for df in app.dataframe if "llama.cpp weights" in df.value.columns)
    assert len(table) == 2 and (table["decode tok/s (64 new)"] > 0).all()
    assert table["transformers decode tok/s b1"].notna().all()
