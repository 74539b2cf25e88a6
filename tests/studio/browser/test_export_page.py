"""The Export page in a real headless Chromium, with two stories260k runs in the workspace (a sequential run and
its newer "twin", which the page preselects): the folder follows the chosen run (a folder typed for the twin stays
with the twin), and the folder, zip, downloaded file and model card of an export all name the run chosen."""
import zipfile

from tests.browser import assert_shows, browser_page, go, studio_server, wait_idle

from slimgpt_core.data import calibration_tokens
from slimgpt_core.workspace.exports import EXPORTS
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.models import load_model
from slimgpt_core.workspace.store import save_run


def _make_runs(monkeypatch, runs):
    monkeypatch.setenv("SLIMGPT_RUNS", str(runs))
    made = []
    for label, settings in (("sequential", PruneSettings(ratio=0.5, schedule="log")),
                            ("twin dense inputs", PruneSettings(ratio=0.5, schedule="log", sequential=False))):
        loaded = load_model("stories260k")
        tokens = calibration_tokens(loaded.tokenizer, "tinystories", 8, 64)
        report = prune_model(loaded.model, tokens, settings, model_name="stories260k")
        made.append(save_run(loaded.model, loaded.tokenizer, report, label=label))
    return made


def _choose_run(page, title: str) -> None:
    """Pick a run and wait for the rerun that draws the page for it (its caption names it)."""
    page.locator("[data-testid='stSelectbox']").filter(has_text="Run").first.click()
    page.get_by_role("option", name=title, exact=True).click()
    page.get_by_text(f"Exports {title}").wait_for(timeout=60_000)
    wait_idle(page)


def _folder(page):
    return page.get_by_label("Folder", exact=True)


def _folder_shows(page, folder) -> None:
    assert_shows(page, {"Folder": str(folder)})


def test_export_follows_the_chosen_run_in_chromium(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    sequential, twin = _make_runs(monkeypatch, runs)
    exports = runs / EXPORTS
    with studio_server({"SLIMGPT_RUNS": str(runs), "SLIMGPT_CACHE": str(tmp_path / "cache")}) as url, \
            browser_page() as page:
        page.goto(url)
        go(page, "Export")
        # the newest run (the twin) is preselected, with its default folder inside the workspace
        _folder_shows(page, exports / twin.name)
        assert f"Exports {twin.title}" in page.locator("[data-testid='stMain']").inner_text()
        # a folder typed for the twin stays with the twin: switching runs shows the other run's own folder
        _folder(page).fill(str(tmp_path / "twin-export"))
        _folder(page).press("Enter")
        wait_idle(page)
        _choose_run(page, sequential.title)
        _folder_shows(page, exports / sequential.name)
        assert f"Exports {sequential.title}" in page.locator("[data-testid='stMain']").inner_text()
        page.get_by_role("button", name="Export", exact=True).click()
        download = page.get_by_role("button", name=f"Download {sequential.name}.zip")
        download.wait_for(timeout=300_000)
        page.get_by_text(f"Model card of {sequential.title}").wait_for(timeout=60_000)  # drawn after the button
        main_text = page.locator("[data-testid='stMain']").inner_text()
        assert f"Exported {sequential.title} to {exports / sequential.name}" in main_text
        assert f"Model card of {sequential.title}" in main_text and f"# {sequential.title}" not in main_text
        assert f"pruned with SlimGPT Studio as run {sequential.name}:" in main_text and twin.name not in main_text
        with page.expect_download(timeout=300_000) as info:
            download.click()
        assert info.value.suggested_filename == f"{sequential.name}.zip"
        path = tmp_path / "downloaded.zip"
        info.value.save_as(path)
        # back to the twin: its typed folder again, and the sequential run's export is not shown as the twin's
        _choose_run(page, twin.title)
        _folder_shows(page, tmp_path / "twin-export")
        # the rerun ends with the sequential run's result gone (stale elements stay until the run ends)
        page.get_by_text(f"The latest export is of {sequential.title}").wait_for(timeout=60_000)
        page.get_by_text(f"Model card of {sequential.title}").wait_for(state="detached", timeout=60_000)
        main_text = page.locator("[data-testid='stMain']").inner_text()
        assert page.get_by_role("button", name="Download").count() == 0 and "Exported" not in main_text
    with zipfile.ZipFile(path) as z:
        card = z.read("README.md").decode()
        assert z.read("model.safetensors") == (sequential.path / "model.safetensors").read_bytes()
    assert f"# {sequential.title}" in card and f"as run `{sequential.name}`" in card and twin.name not in card
    assert sorted(p.name for p in exports.iterdir()) == [sequential.name, f"{sequential.name}.zip"]
    assert (exports / sequential.name / "README.md").read_text() == card
    assert not (tmp_path / "twin-export").exists()
