"""The studio in a real Chromium: it stops promptly on SIGTERM/SIGINT with a tab open (and cancels a running job
cleanly), and its navigation shows page titles from the first paint, on any first URL."""
from __future__ import annotations

import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser import ROOT, assert_shows, browser_page, go, load_stories260k, set_number, studio_process, wait_idle

TITLES = re.findall(r'st\.Page\("[^"]+", title="([^"]+)"', (ROOT / "app.py").read_text())  # in app.py's order
STOP_BOUND_S = 10.0  # the bound the issue asks for (a plain Streamlit app stops in under 8 s)


@contextmanager
def fresh_studio(tmp_path: Path):
    """A fresh studio with its own workspace and cache; yields (process, url, log file)."""
    log_path = tmp_path / "streamlit.log"
    env = {"SLIMGPT_RUNS": str(tmp_path / "runs"), "SLIMGPT_CACHE": str(tmp_path / "cache"),
           "PYTHONFAULTHANDLER": "1"}  # a hung server, sent SIGABRT, writes every thread's stack to the log
    with studio_process(env, log_path=log_path) as (proc, url):
        yield proc, url, log_path


def stop_and_time(proc: subprocess.Popen, signum: int) -> float:
    """Send `signum` and return the seconds until the process has exited (after 60 s it is sent SIGABRT, which
    writes its threads' stacks to the log, and the answer is infinity)."""
    start = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return float("inf")
    return time.monotonic() - start


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_studio_stops_promptly_with_a_tab_open(tmp_path, signum):
    with fresh_studio(tmp_path) as (proc, url, log), browser_page() as page:
        page.goto(url)
        page.get_by_role("heading", name="Model").first.wait_for()
        wait_idle(page)
        seconds = stop_and_time(proc, signum)
        print(f"{signal.Signals(signum).name} with a tab open: exited after {seconds:.2f} s")
        assert seconds < STOP_BOUND_S, \
            f"still running {seconds:.1f} s after {signal.Signals(signum).name}:\n{log.read_text()[-6000:]}"
        assert proc.returncode == 0, log.read_text()[-2000:]


def test_a_running_job_is_cancelled_cleanly_when_the_studio_stops(tmp_path):
    """An evaluation of every window of WikiText-2 at length 16 runs for minutes on stories260k; SIGTERM must end
    it through its cancellation (the job's own cleanup runs) and the process must exit normally and promptly."""
    with fresh_studio(tmp_path) as (proc, url, log), browser_page() as page:
        page.goto(url)
        load_stories260k(page)
        go(page, "Evaluate")
        set_number(page, "Window length", 16)
        set_number(page, "Windows (0: all)", 0)
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.get_by_role("button", name="Cancel evaluation").wait_for(timeout=120_000)
        page.wait_for_timeout(2000)  # well inside the perplexity loop
        seconds = stop_and_time(proc, signal.SIGTERM)
        print(f"SIGTERM with an evaluation running: exited after {seconds:.2f} s")
        text = log.read_text()
        assert seconds < STOP_BOUND_S, text[-2000:]
        assert proc.returncode == 0, text[-2000:]
        assert "cancelling the running jobs: eval" in text and "every job was cancelled cleanly" in text, text[-2000:]
        assert "terminate called" not in text
    # nothing half-written: no temporary entry left in the cache or the workspace
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# every navigation link's text (its icon's ligature left out), recorded from the first paint on
NAV_RECORDER = """
window.__navTexts = [];
const record = () => {
  for (const link of document.querySelectorAll("a[data-testid='stSidebarNavLink'], a[data-testid='stTopNavLink']")) {
    const copy = link.cloneNode(true);
    copy.querySelectorAll("[data-testid='stIconMaterial']").forEach(icon => icon.remove());
    const text = copy.textContent.trim();
    if (!window.__navTexts.includes(text)) window.__navTexts.push(text);
  }
};
new MutationObserver(record).observe(document, {childList: true, subtree: true, characterData: true});
"""


@pytest.mark.parametrize("path,heading", [("", "Model"), ("runs", "Runs")], ids=["root", "runs"])
def test_the_first_visitor_after_a_start_sees_titles_and_the_wide_layout(tmp_path, path, heading):
    with fresh_studio(tmp_path) as (proc, url, log), browser_page() as page:
        page.add_init_script(NAV_RECORDER)
        page.goto(f"{url}/{path}")
        page.get_by_role("heading", name=heading).first.wait_for()
        wait_idle(page)
        page.wait_for_timeout(1000)
        shown = page.evaluate("window.__navTexts")
        assert shown == TITLES  # never a file name, from the first paint on, in the order of app.py
        width = page.locator("[data-testid='stMainBlockContainer']").bounding_box()["width"]
        assert width > 1000, f"main column {width:.0f} px wide in a 1440 px window: not the wide layout"


def test_saving_a_label_keeps_that_run_chosen_in_the_browser(tmp_path, monkeypatch):
    """The selector's value reached the browser as the run's title, which the label is part of."""
    from slimgpt_core.methods.prune_settings import PruneSettings
    from slimgpt_core.services.prune import prune_to_workspace
    from slimgpt_core.workspace.model_pool import POOL

    monkeypatch.setenv("SLIMGPT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    loaded = POOL.get("stories260k", "auto", "auto")
    older, newer = (prune_to_workspace(loaded, PruneSettings(ratio=r), "tinystories", 4, 32) for r in (0.2, 0.4))
    with fresh_studio(tmp_path) as (proc, url, log), browser_page() as page:
        page.goto(f"{url}/runs")
        page.get_by_role("heading", name="Runs").first.wait_for()
        wait_idle(page)
        picker = page.locator("[data-testid='stSelectbox']").filter(has_text="Run")
        picker.click()
        page.get_by_role("option", name=older.title).click()
        # the page drawn for the older run (on a busy server its rerun comes late, and a label typed before it
        # would go into the newer run's form)
        chosen = page.locator("[data-testid='stCaptionContainer']").filter(has_text="stored measurement")
        expect(chosen).to_have_text(re.compile("^" + re.escape(f"{older.title} · ")), timeout=60_000)
        wait_idle(page)
        page.wait_for_function("document.querySelectorAll(\"input[aria-label='Label']\").length === 1")
        page.get_by_label("Label", exact=True).fill("baseline for the paper")
        page.get_by_role("button", name="Save label and notes").click()
        wait_idle(page)
        # the chosen run's facts under its new title
        expect(chosen).to_have_text(re.compile("^" + re.escape(f"baseline for the paper ({older.name}) · ")),
                                    timeout=60_000)
        assert_shows(page, {"Label": "baseline for the paper"})
