"""LLM Surgeon's allocation as a result (issue 17): the Inspect page shows a run's per-layer heads/FFN kept as a
schedule, and one button puts exactly its ratios into the Prune page's schedule editor."""
import pytest

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings, plan_removals
from slimgpt_core.methods.settings import SurgeonSettings
from slimgpt_core.schedules.run_schedule import run_schedule
from tests.studio.test_app import button, edit_schedule, editor_data, figures, load_stories, schedule_table


@pytest.fixture
def surgeon_run(app):
    """A 2-shot LLM Surgeon run of stories260k, written into the studio's workspace."""
    from slimgpt_core.workspace import store as workspace
    from slimgpt_core.data import calibration_tokens
    from slimgpt_core.models import load_model
    loaded = load_model("stories260k")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 9, 64)
    report = prune_model(loaded.model, tokens, PruneSettings(ratio=0.4, method="surgeon", device="cpu",
                                                             surgeon=SurgeonSettings(shots=2)),
                         model_name="stories260k")
    info = workspace.save_run(loaded.model, loaded.tokenizer, report, name="surgeon-40")
    return info, report, [(layer.self_attn.q_proj.out_features // layer.self_attn.head_dim,
                           layer.mlp.down_proj.in_features) for layer in loaded.model.model.layers]


def test_run_schedule_replays_the_run_shape(surgeon_run):
    """Independent of the studio: SlimGPT's planner, given the run's ratios, keeps exactly the run's heads and
    channels in every layer."""
    from slimgpt_core.models import load_model
    info, report, shape = surgeon_run
    sched = run_schedule(report)
    assert sched.capped == [] and sched.head_ratios == report.head_ratios
    assert list(zip(sched.heads_kept, sched.ffn_kept)) == shape
    dense = load_model("stories260k").model
    _, _, head_rm, ffn_rm = plan_removals(dense, PruneSettings(head_ratios=sched.head_ratios,
                                                               ffn_ratios=sched.ffn_ratios))
    for layer, (q, f), h, c in zip(dense.model.layers, shape, head_rm, ffn_rm):
        attn = layer.self_attn
        rep = attn.q_proj.out_features // attn.head_dim // (attn.k_proj.out_features // attn.head_dim)
        assert attn.q_proj.out_features // attn.head_dim - h * rep == q
        assert layer.mlp.down_proj.in_features - c == f
    rows = PruneSettings(method="surgeon", surgeon=SurgeonSettings(surgeon_units="rows")).record()
    report.settings = rows
    with pytest.raises(SlimGPTError, match="zeroes weights and keeps every head"):
        run_schedule(report)


def test_copy_the_allocation_into_the_schedule_editor(app, surgeon_run):
    info, report, _ = surgeon_run
    load_stories(app)
    app.switch_page("studio_pages/prune.py").run()  # the editor starts from its log preset
    log_preset = list(schedule_table(app)["heads ratio"])
    app.switch_page("studio_pages/inspect_runs.py").run()
    app.selectbox(key="detail_run").set_value(info.name).run()
    assert not app.exception
    assert "Pruning ratio per layer" in figures(app)
    table = app.dataframe[-1].value  # the allocation table is the last on the page
    assert list(table["FFN kept"]) == report.shots[-1].keep_ffn
    button(app, "Copy into the schedule editor").click().run()
    assert any("hold the allocation" in s.value for s in app.success)
    app.switch_page("studio_pages/prune.py").run()
    assert not app.exception
    heads = list(schedule_table(app)["heads ratio"])
    ffn = list(schedule_table(app)["FFN ratio"])
    assert heads == report.head_ratios and ffn == report.ffn_ratios and heads != log_preset
    assert app.session_state["schedule"] == {"hr": report.head_ratios, "fr": report.ffn_ratios}
    # the preview of that schedule is the run's size
    assert {m.label: m.value for m in app.metric}["Parameters after"] == f"{report.params_after / 1e6:.2f} M"
    assert (editor_data(app)["hr"], editor_data(app)["fr"]) == (report.head_ratios, report.ffn_ratios)
    # still editable: one layer changes, the others keep the run's values
    edit_schedule(app, {("fr", 0): 0.0})
    assert app.session_state["schedule"]["fr"] == [0.0] + report.ffn_ratios[1:]
