"""Methods from the seed papers and SlimGPT ablations through the same pipeline (issue 5)."""
import json

import pytest

from conftest import tiny_model
from slimgpt_core.cli import main
from slimgpt_core.compare import VARIANTS, run_grid, write_outputs
from slimgpt_core.errors import SlimGPTError
from slimgpt_core.pipeline import PruneSettings, prune_model

METHOD_FLAGS = {"magnitude": ["--method", "magnitude"], "wanda-sp": ["--method", "wanda-sp"],
                "obs-multishot": ["--method", "obs-multishot", "--shots", "2"], "nocomp": ["--no-compensation"],
                "slimgpt": []}


@pytest.mark.parametrize("name", list(METHOD_FLAGS))
def test_each_method_end_to_end_on_stories260k(tmp_path, capsys, name):
    out = tmp_path / name
    code = main(["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "16", "--seqlen", "128",
                 "--ratio", "0.3", "--ppl", "tinystories", "--ppl-seqlen", "512", "--ppl-windows", "10",
                 "--out", str(out), "--quiet", *METHOD_FLAGS[name]])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dense_ppl"] < summary["pruned_ppl"] < 200
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == ("slimgpt" if name == "nocomp" else name)
    assert len(report["layers"]) == 5
    assert (out / "model.safetensors").exists()
    # the saved run reloads and evaluates
    assert main(["eval", "--model", str(out), "--ppl", "tinystories", "--seqlen", "512", "--max-windows", "10",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(summary["pruned_ppl"], rel=1e-3)


def test_equal_achieved_ratios_and_error_ordering(tokens):
    reports = {}
    for name in ("slimgpt", "magnitude", "wanda-sp", "obs-multishot", "slimgpt-nocomp", "slimgpt-approx",
                 "slimgpt-greedy", "slimgpt-dense"):
        settings = PruneSettings(**{"ratio": 0.5, "ffn_group_floor": 2, **VARIANTS[name][0]})
        reports[name] = prune_model(tiny_model(), tokens, settings, use_cache=False)
    achieved = {r.achieved_layer_ratio for r in reports.values()}
    assert len(achieved) == 1  # same schedule, same rounding: same parameters removed
    total = {n: sum(m.rel_error for m in r.modules) for n, r in reports.items()}
    assert total["slimgpt"] < total["slimgpt-nocomp"]  # compensation helps on the calibration data
    assert total["slimgpt"] < total["magnitude"] and total["slimgpt"] < total["wanda-sp"]


def test_scores_without_update_leave_other_columns_untouched(tokens):
    model = tiny_model()
    before = [layer.mlp.down_proj.weight.clone() for layer in model.model.layers]
    prune_model(model, tokens, PruneSettings(ratio=0.5, method="wanda-sp"), use_cache=False)
    for w0, layer in zip(before, model.model.layers):
        kept = layer.mlp.down_proj.weight
        # every kept column is an original column, unchanged
        matches = (w0.T[:, None, :] == kept.T[None, :, :]).all(-1).any(0)
        assert bool(matches.all())


def test_targeted_architecture_from_another_config(tmp_path, tokens, capsys):
    target = {"num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 100,
              "hidden_size": 32, "head_dim": 8}
    path = tmp_path / "target.json"
    path.write_text(json.dumps(target))
    out = tmp_path / "run"
    assert main(["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "8", "--seqlen", "64",
                 "--target-config", str(path), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["intermediate_size"] == 100  # uniform: a stock config
    target["layer_intermediate_size"] = [172, 150, 120, 100, 80]
    path.write_text(json.dumps(target))
    assert main(["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "8", "--seqlen", "64",
                 "--target-config", str(path), "--out", str(tmp_path / "run2"), "--quiet"]) == 0
    config = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert config["layer_intermediate_size"] == [172, 150, 120, 100, 80]
    target["num_hidden_layers"] = 7
    path.write_text(json.dumps(target))
    capsys.readouterr()
    assert main(["prune", "--model", "stories260k", "--target-config", str(path), "--out",
                 str(tmp_path / "run3"), "--quiet"]) == 1
    assert "7 layers but the model has 5" in capsys.readouterr().err


def test_compare_grid_writes_table_and_plots(tmp_path):
    rows = run_grid("stories260k", [0.2, 0.5], ["slimgpt", "magnitude", "slimgpt-uniform"], "tinystories", 8, 64,
                    ppl="tinystories", ppl_seqlen=256, ppl_windows=4, tasks=["piqa"], limit=3)
    assert len(rows) == 6
    by = {(r.variant, r.ratio): r for r in rows}
    for ratio in (0.2, 0.5):
        assert by[("slimgpt", ratio)].achieved_layer_ratio == by[("magnitude", ratio)].achieved_layer_ratio
        assert by[("slimgpt", ratio)].ppl < by[("magnitude", ratio)].ppl
    paths = write_outputs(rows, tmp_path / "grid", "python -m slimgpt_core compare ...")
    md = (tmp_path / "grid" / "compare.md").read_text()
    assert "python -m slimgpt_core compare" in md and md.count("| slimgpt |") == 2
    assert (tmp_path / "grid" / "compare_ppl.html").exists() and len(paths) == 5
    with pytest.raises(SlimGPTError, match="unknown variant"):
        run_grid("stories260k", [0.2], ["nope"])
