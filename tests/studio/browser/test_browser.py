"""End to end in a real headless Chromium: load the default model, prune, reload mid-run (the job, its live charts
and Cancel come back), evaluate, restart the server (runs and evaluations still listed), export and check the
download, see a run written by the command line appear, delete a run from disk."""
import json
import os
import subprocess
import sys
import zipfile

from tests.browser import (ROOT, assert_shows, browser_page, go, load_default_model, open_calibration, set_number,
                           start_pruning, studio_server, wait_idle, wait_pruned)


def calibration_shows(page, nsamples: int, seqlen: int) -> None:
    """The Prune page shows these samples and sequence length."""
    open_calibration(page)
    assert_shows(page, {"Samples": nsamples, "Sequence length": seqlen})


def test_studio_end_to_end_in_chromium(tmp_path):
    runs = tmp_path / "runs"
    env = {"SLIMGPT_RUNS": str(runs)}
    with studio_server(env) as url, browser_page() as page:
        load_default_model(page, url)
        start_pruning(page, nsamples=8, seqlen=64)
        # a reload mid-run re-attaches to the server's job: progress, live charts and Cancel come back
        page.reload()
        page.get_by_role("button", name="Cancel").wait_for(timeout=120_000)
        calibration_shows(page, 8, 64)  # the settings the running job used
        page.locator("[data-testid='stPlotlyChart']").filter(has_text="Accumulated error").first.wait_for(
            timeout=300_000)
        wait_pruned(page)
        sidebar = page.locator("[data-testid='stSidebar']")
        assert "Model: default" in sidebar.inner_text() and "achieved" in sidebar.inner_text()
        heatmap = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Head importance")
        heatmap.first.wait_for()
        [run] = [p for p in runs.iterdir() if not p.name.startswith(".")]
        report = json.loads((run / "report.json").read_text())
        assert report["settings"]["nsamples"] == 8 and report["params_after"] < report["params_before"]
        # evaluation runs as a polled background job; its result is stored with the run
        go(page, "Evaluate")
        set_number(page, "Windows (0: all)", 2)
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=300_000)
        ppl_chart = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Perplexity")
        ppl_chart.first.wait_for(timeout=60_000)  # drawn after the table, in the same rerun
        assert ppl_chart.count() == 1
        ppl = json.loads((run / "evaluations.json").read_text())[0]
        assert ppl["kind"] == "perplexity" and ppl["windows"] == 2
    # a server restart: the loaded model, the run and its evaluation are all still there
    with studio_server(env) as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("Loaded:").wait_for(timeout=300_000)
        go(page, "Runs")
        page.locator("[data-testid='stDataFrame']").first.wait_for()
        page.get_by_text(f"perplexity {ppl['ppl']:.2f} (wikitext2, 2 windows × 128)").wait_for()
        assert run.name in page.locator("[data-testid='stMain']").inner_text()
        go(page, "Prune")  # the settings the last job used, after a restart
        calibration_shows(page, 8, 64)
        go(page, "Export")
        page.get_by_role("button", name="Export", exact=True).click()
        download_button = page.get_by_role("button", name="Download")
        download_button.wait_for(timeout=300_000)
        with page.expect_download(timeout=300_000) as info:
            download_button.click()
        path = tmp_path / "model.zip"
        info.value.save_as(path)
        # a run written by the command line into the workspace appears without restarting anything
        cli = subprocess.run([sys.executable, "-m", "slimgpt_core", "prune", "--model", "stories260k", "--ratio",
                              "0.2", "--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--device",
                              "cpu", "--out", str(runs / "cli-run"), "--quiet"], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=300)
        assert cli.returncode == 0, cli.stderr
        go(page, "Runs")
        # the newest run comes first and is selected: the one the command line just wrote
        page.get_by_text("cli-run · model stories260k").wait_for()
        # delete it (with confirmation): gone from disk and from the list
        page.get_by_text("Yes, delete").click()
        wait_idle(page)
        page.get_by_role("button", name="Delete run").click()
        wait_idle(page)
        page.get_by_text("cli-run · model stories260k").wait_for(state="detached", timeout=60_000)
        assert not (runs / "cli-run").exists() and run.exists()
        page.get_by_text(f"{run.name}) · model default").wait_for()
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "report.json"} <= names
        config = json.loads(z.read("config.json"))
        zipped_report = json.loads(z.read("report.json"))
    assert config["num_hidden_layers"] == 30 and len(zipped_report["layers"]) == 30
    assert zipped_report == report or zipped_report["params_after"] == report["params_after"]
    # the downloaded checkpoint loads and runs
    z = zipfile.ZipFile(path)
    z.extractall(tmp_path / "model")
    from transformers import AutoModelForCausalLM
    import torch
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code="auto_map" in config)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
