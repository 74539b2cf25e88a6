"""Side by side: stored evaluations grouped by provenance, differences judged against their noise, KV groups kept.

Records are built by hand (the shape `services.evaluate.evaluate` stores); the standard errors are the binomial ones
lm-eval reports, sqrt(p(1-p)/(n-1)), computed here independently."""
import json
import math

import pytest

from slimgpt_core.base.events import HeadImportance, RunReport
from slimgpt_core.workspace.run_comparison import (Side, compare_evaluations, kv_group_grid, provenance_rows, sides_for,
                                         verdict, Value)

VERSIONS = {"torch": "2.13.0", "transformers": "5.23.0", "lm_eval": "0.4.13"}


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1))


def task(name, acc, n, limit=None, device="cpu", when=1.0, versions=VERSIONS, se=True):
    return {"kind": "task", "task": name, "acc": acc, "acc_norm": None,
            "acc_stderr": binomial_se(acc, n) if se else None, "n": n, "limit": limit,
            "source": f"offline:{name}.jsonl", "seconds": 1.0, "batch_size": 8, "device": device,
            "parameters": 1, "when": when, "versions": versions}


def ppl(value, seqlen=128, windows=32, dataset="wikitext2", device="cpu", when=1.0):
    return {"kind": "perplexity", "dataset": dataset, "seqlen": seqlen, "windows": windows,
            "tokens": windows * (seqlen - 1), "nll": math.log(value), "ppl": value, "seconds": 1.0,
            "batch_size": 8, "device": device, "parameters": 1, "when": when, "versions": VERSIONS}


def side(label, records, model="smollm2", dense=False):
    return Side(label, label, model, dense, None, records, None, None)


def row(groups, name, kind="task"):
    found = [g for g in groups if g.name == name and g.kind == kind]
    assert len(found) == 1, found
    return found[0]


def test_forty_questions_cannot_tell_the_mean_apart_but_boolq_difference_is_large():
    """The issue's case: eval --limit 40, dense 0.325 vs pruned 0.775 on BoolQ, mean 0.38 vs 0.44."""
    dense_accs = {"boolq": 0.325, "piqa": 0.55, "hellaswag": 0.3, "winogrande": 0.5, "arc_easy": 0.45,
                  "arc_challenge": 0.2, "openbookqa": 0.335}
    pruned_accs = {"boolq": 0.775, "piqa": 0.5, "hellaswag": 0.275, "winogrande": 0.45, "arc_easy": 0.425,
                   "arc_challenge": 0.225, "openbookqa": 0.43}
    dense = side("dense", [task(t, a, 40, 40) for t, a in dense_accs.items()], dense=True)
    pruned = side("pruned 20%", [task(t, a, 40, 40) for t, a in pruned_accs.items()])
    groups = compare_evaluations([dense, pruned])
    boolq = row(groups, "boolq")
    se = math.sqrt(binomial_se(0.325, 40) ** 2 + binomial_se(0.775, 40) ** 2)
    v = boolq.verdicts["pruned 20%"]
    assert v.combined_stderr == pytest.approx(se) and v.difference == pytest.approx(0.45)
    assert v.within_noise is False and "beyond noise" in v.text  # 0.45 > 2 × 0.100: BoolQ alone does differ
    piqa = row(groups, "piqa").verdicts["pruned 20%"]
    assert piqa.within_noise is True and "within noise" in piqa.text
    mean = row(groups, "mean of 7 tasks", "mean accuracy")
    d = sum(dense_accs.values()) / 7
    p = sum(pruned_accs.values()) / 7
    assert mean.values["dense"].value == pytest.approx(d) and mean.values["pruned 20%"].value == pytest.approx(p)
    mean_se = math.sqrt(sum(binomial_se(a, 40) ** 2 for a in dense_accs.values())) / 7
    assert mean.values["dense"].stderr == pytest.approx(mean_se)
    assert mean.verdicts["pruned 20%"].within_noise is True  # 0.06 apart, 2σ ≈ 0.08: indistinguishable


def test_a_difference_beyond_the_noise_is_said_so():
    dense = side("dense", [task("boolq", 0.62, 1000)], dense=True)
    pruned = side("pruned", [task("boolq", 0.70, 1000)])
    v = row(compare_evaluations([dense, pruned]), "boolq").verdicts["pruned"]
    assert v.within_noise is False and v.difference == pytest.approx(0.08)
    assert v.combined_stderr == pytest.approx(math.hypot(binomial_se(0.62, 1000), binomial_se(0.70, 1000)))
    # the same two accuracies on 40 documents are inside the noise
    dense40 = side("dense", [task("boolq", 0.62, 40, 40)], dense=True)
    pruned40 = side("pruned", [task("boolq", 0.70, 40, 40)])
    assert row(compare_evaluations([dense40, pruned40]), "boolq").verdicts["pruned"].within_noise is True


def test_records_with_different_provenance_are_never_one_row():
    dense = side("dense", [task("boolq", 0.6, 40, 40), ppl(20.0, seqlen=128)], dense=True)
    pruned = side("pruned", [task("boolq", 0.7, 200, 200), ppl(25.0, seqlen=256)])
    groups = compare_evaluations([dense, pruned])
    boolqs = [g for g in groups if g.name == "boolq"]
    assert len(boolqs) == 2 and all(len(g.values) == 1 and not g.verdicts for g in boolqs)
    assert {g.identity["n"] for g in boolqs} == {40, 200}
    ppls = [g for g in groups if g.kind == "perplexity"]
    assert len(ppls) == 2 and {g.identity["seqlen"] for g in ppls} == {128, 256}
    assert not any(g.kind == "mean accuracy" for g in groups)
    # the same text and window count, but another tokenizer: other windows, other row
    other = side("other model", [ppl(20.0)], model="stories260k")
    same = side("pruned", [ppl(25.0)])
    assert len([g for g in compare_evaluations([same, other]) if g.kind == "perplexity"]) == 2


def test_perplexity_on_identical_windows_is_comparable_without_a_stderr():
    groups = compare_evaluations([side("dense", [ppl(20.0)], dense=True), side("pruned", [ppl(26.0)])])
    [g] = groups
    v = g.verdicts["pruned"]
    assert v.difference == pytest.approx(6.0) and v.within_noise is None and v.combined_stderr is None
    assert "comparable" in v.text and "no standard error" in v.text
    assert "32 windows of 128 tokens" in g.setting and g.flag == ""


def test_other_circumstances_are_flagged_in_the_row_and_latest_repeat_wins():
    dense = side("dense", [task("piqa", 0.6, 100, 100, device="cuda:0")], dense=True)
    pruned = side("pruned", [task("piqa", 0.5, 100, 100, when=1.0), task("piqa", 0.55, 100, 100, when=2.0),
                             task("arc_easy", 0.4, 100, 100, versions={**VERSIONS, "lm_eval": "0.4.9"})])
    groups = compare_evaluations([dense, pruned])
    piqa = row(groups, "piqa")
    assert piqa.values["pruned"].value == 0.55 and piqa.values["pruned"].repeats == 2
    assert piqa.differing == {"device": ["cuda:0", "cpu"]} and "different device" in piqa.flag
    assert row(groups, "arc_easy").flag == ""  # one side only: nothing to differ from
    assert verdict(Value(0.5, None, {}), Value(0.6, 0.01, {}), "acc").within_noise is None


def test_a_missing_stderr_is_lm_evals_closed_form_from_acc_and_n():
    """Records stored by `services.evaluate.evaluate` carry acc_stderr None (lm-eval ran with bootstrap_iters=0)."""
    from lm_eval.api.metrics import mean_stderr
    answers = [1] * 31 + [0] * 9  # 40 documents, acc 0.775
    dense = side("dense", [task("boolq", 0.325, 40, 40, se=False)], dense=True)
    pruned = side("pruned", [task("boolq", sum(answers) / 40, 40, 40, se=False)])
    boolq = row(compare_evaluations([dense, pruned]), "boolq")
    assert boolq.values["pruned"].stderr == pytest.approx(mean_stderr(answers))
    assert boolq.values["pruned"].stderr_source == "computed"
    assert boolq.verdicts["pruned"].within_noise is False
    one = side("one", [task("piqa", 1.0, 1, 1, se=False)])  # a single document: no standard error at all
    assert row(compare_evaluations([one]), "piqa").values["one"].stderr is None


def report_with(removed: list[list[int]], units: int = 4, method: str = "slimgpt") -> RunReport:
    r = RunReport("stories260k", {"method": method}, [0.25] * len(removed), [0.2] * len(removed), 100, 80, 90, 70)
    r.heads = [HeadImportance(i, [float(u) for u in range(units)], rm, 2) for i, rm in enumerate(removed)]
    return r


def test_kv_group_grid_is_all_groups_minus_removed():
    a = Side("a", "a", "stories260k", False, report_with([[0], [1, 2], []]), [], 80, 1)
    b = Side("b", "b", "stories260k", False, report_with([[0], [3, 1], [2]]), [], 80, 1)
    s = Side("s", "s", "stories260k", False, report_with([[0], [0], [0]], units=4, method="obs-multishot"), [], 80, 1)
    dense = Side("d", "dense", "stories260k", True, None, [], 100, None)
    grid = kv_group_grid([dense, a, b, s])
    assert grid.labels == ["a", "b"] and "s" in grid.left_out and grid.units == [4, 4, 4]
    assert grid.kept["a"] == [[1, 2, 3], [0, 3], [0, 1, 2, 3]]
    assert grid.kept["b"] == [[1, 2, 3], [0, 2], [0, 1, 3]]
    assert grid.kept_by(1, 2) == ["b"] and grid.differs(1, 2) and grid.kept_by(1, 3) == ["a"]
    assert not grid.differs(0, 0) and grid.kept_by(0, 0) == []  # both removed group 0 of layer 0
    assert not grid.differs(1, 0) and grid.kept_by(1, 0) == ["a", "b"]
    assert grid.n_differing == 3  # layer 1: groups 2 and 3; layer 2: group 2


def test_sides_from_a_workspace_folder(tmp_path):
    from slimgpt_core.workspace.store import dense_evaluations_folder, read_run
    folder = tmp_path / "run-a"
    folder.mkdir()
    r = report_with([[0], [1]])
    r.settings.update(calib="c4", nsamples=8, seqlen=64, seed=3, schedule="log")
    r.save(folder / "report.json")
    (folder / "evaluations.json").write_text(json.dumps([task("piqa", 0.5, 40, 40)]))
    (dense_evaluations_folder("stories260k", tmp_path) / "evaluations.json").write_text(
        json.dumps([task("piqa", 0.6, 40, 40)]))
    dense, run = sides_for([read_run(folder)], include_dense=True, root=tmp_path)
    assert dense.dense and dense.parameters == 100 and run.parameters == 80
    assert run.calibration == {"calib": "c4", "nsamples": 8, "seqlen": 64, "seed": 3}
    assert run.achieved_ratio == pytest.approx(0.2)
    [g] = compare_evaluations([dense, run])
    assert g.reference == dense.label and g.verdicts[run.label].difference == pytest.approx(-0.1)
    rows = provenance_rows([dense, run])
    assert [r["model"] for r in rows] == [dense.label, run.label] and "torch 2.13.0" in rows[0]["versions"]


def test_a_model_folder_without_a_report_is_one_clear_error(tmp_path):
    from slimgpt_core.base.errors import SlimGPTError
    from slimgpt_core.workspace.store import read_run
    (tmp_path / "copied").mkdir()
    with pytest.raises(SlimGPTError, match="no report.json"):
        sides_for([read_run(tmp_path / "copied")], root=tmp_path)
    (tmp_path / "copied" / "report.json").write_text("{not json")
    with pytest.raises(SlimGPTError, match="unreadable"):
        sides_for([read_run(tmp_path / "copied")], root=tmp_path)
