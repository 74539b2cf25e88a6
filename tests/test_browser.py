"""End to end in a real headless Chromium: start the server, load the default model, prune a little, see the
heatmap, download the zip and check it."""
import json
import zipfile


from browser import browser_page, go, prune_default_model, set_number, studio_server



def test_studio_end_to_end_in_chromium(tmp_path):
    with studio_server() as url, browser_page() as page:
        prune_default_model(page, url)
        sidebar = page.locator("[data-testid='stSidebar']")
        assert "Model: default" in sidebar.inner_text() and "achieved" in sidebar.inner_text()
        # the live heatmap of head importance with removed groups marked
        heatmap = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Head importance")
        heatmap.first.wait_for()
        assert heatmap.count() >= 1
        assert page.locator("[data-testid='stPlotlyChart']").filter(has_text="Accumulated error").count() == 1
        # evaluation runs as a polled background job too
        go(page, "Evaluate")
        set_number(page, "Windows (0: all)", 2)
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=300_000)
        assert page.locator("[data-testid='stPlotlyChart']").filter(has_text="Perplexity").count() == 1
        go(page, "Export")
        page.get_by_role("button", name="Export", exact=True).click()
        download_button = page.get_by_role("button", name="Download")
        download_button.wait_for(timeout=300_000)
        with page.expect_download(timeout=300_000) as info:
            download_button.click()
        path = tmp_path / "model.zip"
        info.value.save_as(path)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "report.json"} <= names
        config = json.loads(z.read("config.json"))
        report = json.loads(z.read("report.json"))
    assert config["num_hidden_layers"] == 30 and len(report["layers"]) == 30
    assert report["settings"]["nsamples"] == 4 and report["params_after"] < report["params_before"]
    # the downloaded checkpoint loads and runs
    z = zipfile.ZipFile(path)
    z.extractall(tmp_path / "model")
    from transformers import AutoModelForCausalLM
    import torch
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code="auto_map" in config)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
