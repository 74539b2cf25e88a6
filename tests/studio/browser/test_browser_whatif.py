"""In a real headless Chromium, the studio's Prune page: compute the error curves on stories260k, drag a layer's
heads bar in the schedule editor, see the predicted errors redraw in the page during the drag (no server run), and
the page's own preview follow the drop."""
from tests.browser import browser_page, go, load_stories260k, open_calibration, set_number, studio_server, wait_idle


def editor_text(page, name: str) -> str:
    return page.evaluate("""(name) => document.querySelector('[data-testid="stBidiComponentIsolated"]')
        .shadowRoot.querySelector(`[data-se="${name}"]`).textContent""", name)


def metric(page, label: str) -> str:
    return page.locator("[data-testid='stMetric']").filter(has_text=label).first.inner_text()


def test_dragging_a_bar_redraws_the_whatif_and_the_page_follows_the_drop(tmp_path):
    with studio_server({"SLIMGPT_CACHE": str(tmp_path / "cache")}) as url, browser_page() as page:
        page.goto(url)
        load_stories260k(page)
        go(page, "Prune")
        assert page.locator(".se-err").count() == 0  # no curves yet: bars and numbers only
        open_calibration(page)
        set_number(page, "Samples", 8)
        set_number(page, "Sequence length", 64)
        page.get_by_role("button", name="Compute error curves").click()
        page.locator(".se-err").first.wait_for(state="attached", timeout=300_000)  # the editor got the curves
        wait_idle(page)
        before = float(editor_text(page, "err-attn"))
        achieved = metric(page, "Achieved (decoder layers)")
        runs = page.evaluate("window.slimgptEditor.editor().sent.length")

        bar = page.locator(".se-hit[data-kind='hr'][data-layer='0']")
        bar.scroll_into_view_if_needed()
        box = bar.bounding_box()
        x = box["x"] + box["width"] / 2
        page.mouse.move(x, box["y"] + box["height"] - 7)  # at 0
        page.mouse.down()
        page.mouse.move(x, box["y"] + 0.1 * box["height"], steps=12)  # near 0.9
        during = float(editor_text(page, "err-attn"))
        assert metric(page, "Achieved (decoder layers)") == achieved  # the server has heard nothing yet
        page.mouse.up()
        assert during > before  # layer 0 lost KV groups: its predicted attention error rose, drawn by the page
        page.wait_for_function("""(before) => [...document.querySelectorAll("[data-testid='stMetric']")]
            .some(m => m.innerText.includes('Achieved (decoder layers)') && m.innerText !== before)""",
                               arg=achieved, timeout=60_000)
        wait_idle(page)
        assert page.evaluate("window.slimgptEditor.editor().sent.length") == runs + 1
        assert float(editor_text(page, "err-attn")) == during  # the server's new schedule is the dropped one
