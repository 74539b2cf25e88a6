"""Drive the studio in a real headless Chromium (Debian's, through Playwright). Used by the test and by
docs/make_screenshots.py."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("SLIMGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def studio_process(env: dict | None = None, script: Path = ROOT / "app.py", log_path: Path | None = None):
    """A Streamlit `script` of this repository on a free port; yields (process, url). The process is ended on exit
    unless it already has."""
    port = free_port()
    log_path = log_path or ROOT / "cache" / f".streamlit-{port}.log"
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # ui/ for any script
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script), "--server.port",
                                 str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
                                 "--browser.gatherUsageStats", "false"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": python_path, **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            else:
                raise RuntimeError("streamlit did not start")
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def studio_server(env: dict | None = None, script: Path = ROOT / "app.py"):
    """A studio (or another Streamlit `script` of this repository) on a free port; its workspace is a fresh
    temporary folder unless `env` names one."""
    import tempfile
    with studio_process({"SLIMGPT_RUNS": tempfile.mkdtemp(prefix="slimgpt-runs-"), **(env or {})}, script) as (_, url):
        yield url


@contextmanager
def browser_page(width: int = 1440, height: int = 900):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(120_000)
        try:
            yield page
        finally:
            browser.close()


def wait_idle(page, timeout: float = 120) -> None:
    """Wait until Streamlit finished the current script run."""
    page.wait_for_timeout(400)
    page.wait_for_selector("[data-testid='stStatusWidget']", state="detached", timeout=timeout * 1000)


def assert_shows(page, values: dict[str, object], timeout: float = 30) -> None:
    """Each labelled input shows its value. A widget whose value the server set is first painted with its default
    and takes the set value a moment later, so reading the input once can see the default; this retries until
    `timeout` seconds and then fails with what the input holds."""
    for label, value in values.items():
        expect(page.get_by_label(label, exact=True)).to_have_value(str(value), timeout=timeout * 1000)


def go(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
    page.get_by_role("heading", name=title).first.wait_for()
    wait_idle(page)


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def load_stories260k(page) -> None:
    """On the Model page: load the tiny offline model and wait until it is loaded."""
    page.get_by_text("stories260k (tiny, offline)").click()
    wait_idle(page)
    page.get_by_role("button", name="Load model").click()
    page.get_by_text("Loaded:").wait_for(timeout=300_000)
    wait_idle(page)


def load_default_model(page, url: str, shots: Path | None = None) -> None:
    page.goto(url)
    page.get_by_role("button", name="Load model").click()
    page.get_by_text("Loaded:").wait_for(timeout=300_000)
    wait_idle(page)
    if shots:
        page.screenshot(path=str(shots / "model.png"), full_page=True)


def open_calibration(page) -> None:
    """The Prune page's calibration settings in view (their expander starts open)."""
    expander = page.locator("details", has_text="Calibration data and method").first
    expander.wait_for()
    if not expander.evaluate("e => e.open"):  # its content may show a moment after it is open: never click then
        page.get_by_text("Calibration data and method").click()
    page.get_by_label("Samples", exact=True).wait_for(state="visible")


def start_pruning(page, nsamples: int = 4, seqlen: int = 64) -> None:
    """On the Prune page: a small calibration, then Start pruning (returns once the job is running)."""
    go(page, "Prune")
    open_calibration(page)
    set_number(page, "Samples", nsamples)
    set_number(page, "Sequence length", seqlen)
    # Start once the page's own line says the server holds both values (the run for the last edit has been drawn)
    page.get_by_text(re.compile(rf"^Runs .*, {nsamples} × {seqlen} tokens,")).first.wait_for(timeout=120_000)
    page.get_by_role("button", name="Start pruning").click()
    page.get_by_role("button", name="Cancel").wait_for(timeout=120_000)


def wait_pruned(page) -> None:
    page.get_by_text("Done in").wait_for(timeout=600_000)
    # the page reruns once the job has ended: the sidebar then names the run
    page.locator("[data-testid='stSidebar']").get_by_text("achieved", exact=False).wait_for(timeout=60_000)
    wait_idle(page)


def prune_default_model(page, url: str, shots: Path | None = None, nsamples: int = 4, seqlen: int = 64) -> None:
    """Load the offline default model, run a small prune, wait for the live charts."""
    load_default_model(page, url, shots)
    start_pruning(page, nsamples, seqlen)
    wait_pruned(page)
