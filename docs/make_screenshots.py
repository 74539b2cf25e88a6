"""Screenshots of every page of the studio, driven in headless Chromium: `python docs/make_screenshots.py`
(`python docs/make_screenshots.py shear`: only the Shear page; `… editor`: only the schedule editor)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from browser import (browser_page, go, load_stories260k, prune_default_model, set_number,  # noqa: E402
                     studio_server, wait_idle)


def shear() -> None:
    """The Shear page on stories260k after a short mask-learning run (the curves over the whole run)."""
    with studio_server() as url, browser_page(1440, 1900) as page:
        page.goto(url)
        load_stories260k(page)
        go(page, "Shear")
        for label, value in (("Layers", 4), ("KV groups per layer", 2), ("Query heads per group", 1),
                             ("FFN width", 128), ("Hidden size", 48), ("Steps", 200), ("Sequence length", 128)):
            set_number(page, label, value)
        page.get_by_role("button", name="Start shearing").click()
        page.get_by_text("Saved as run").wait_for(timeout=600_000)
        # the page reruns once the job has ended: the sidebar then names the new run
        page.locator("[data-testid='stSidebar']").get_by_text("achieved", exact=False).wait_for(timeout=60_000)
        wait_idle(page)
        charts = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Expected size").count()
        assert charts == 1, f"{charts} expected-size charts on the page"
        page.screenshot(path=str(HERE / "shear.png"), full_page=True)


def editor() -> None:
    """The schedule editor on SmolLM2 with its error curves (tests/apps/schedule_editor_app.py: 4 × 64 tinystories
    tokens; the curves are cached after the first time), one FFN bar dragged; prints the in-page redraw time of
    that drag and the size of the payload the editor got."""
    import statistics

    with studio_server(script=HERE.parent / "tests" / "apps" / "schedule_editor_app.py") as url, \
            browser_page(1280, 1300) as page:
        page.goto(f"{url}/?model=smollm2")
        page.get_by_text("server received 0 edits").wait_for(timeout=3_600_000)
        page.locator(".se-path").first.wait_for(state="attached")
        wait_idle(page)
        bar = page.locator(".se-hit[data-kind='fr'][data-layer='12']")
        box = bar.bounding_box()
        x = box["x"] + box["width"] / 2
        page.evaluate("window.slimgptEditor.editor().timings = {update: [], frame: []}")
        page.mouse.move(x, box["y"] + 0.8 * box["height"])
        page.mouse.down()
        page.mouse.move(x, box["y"] + 0.25 * box["height"], steps=40)
        page.mouse.up()
        page.get_by_text("server received 1 edits").wait_for()
        wait_idle(page)
        t = page.evaluate("window.slimgptEditor.editor().timings")
        size = page.evaluate("JSON.stringify(window.slimgptEditor.editor().payload).length")
        print(f"SmolLM2, {len(t['update'])} pointermoves: redraw median {statistics.median(t['update']):.2f} ms, "
              f"p95 {statistics.quantiles(t['update'], n=20)[-1]:.2f} ms; to the next frame median "
              f"{statistics.median(t['frame']):.2f} ms; payload {size / 1000:.1f} kB of JSON")
        page.locator("[data-testid='stBidiComponentIsolated']").screenshot(path=str(HERE / "editor.png"))


def main() -> None:
    with studio_server() as url, browser_page(1440, 2000) as page:
        prune_default_model(page, url, shots=HERE, nsamples=16, seqlen=128)
        page.get_by_role("button", name="Compute head importance").click()
        page.get_by_text("Dense head importance").wait_for(timeout=600_000)
        wait_idle(page)
        page.screenshot(path=str(HERE / "prune.png"), full_page=True)
        go(page, "Inspect")
        page.get_by_role("button", name="Run its twin with dense inputs").click()
        page.get_by_text("twin (dense inputs)").first.wait_for(timeout=600_000)
        wait_idle(page)
        page.screenshot(path=str(HERE / "inspect.png"), full_page=True)
        go(page, "Evaluate")
        set_number(page, "Windows (0: all)", 16)
        page.get_by_text("Speed and memory").click()
        wait_idle(page)
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=600_000)
        wait_idle(page)
        page.screenshot(path=str(HERE / "evaluate.png"), full_page=True)
        go(page, "Export")
        page.get_by_role("button", name="Export", exact=True).click()
        page.get_by_role("button", name="Download").wait_for(timeout=300_000)
        wait_idle(page)
        page.screenshot(path=str(HERE / "export.png"), full_page=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["shear"]:
        shear()
    elif sys.argv[1:] == ["editor"]:
        editor()
    else:
        main()
        shear()
