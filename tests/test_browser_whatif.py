"""In a real headless Chromium: compute the error curves on stories260k, drag a per-layer slider, and see the
what-if chart redraw with other predicted errors (no job started)."""
from browser import browser_page, go, open_calibration, set_number, studio_server, wait_idle


def whatif_title(page) -> str:
    chart = page.locator("[data-testid='stPlotlyChart']").filter(has_text="Predicted error per layer").first
    chart.wait_for(timeout=300_000)
    return chart.locator(".gtitle").first.text_content()


def test_dragging_a_layer_slider_redraws_the_whatif(tmp_path):
    with studio_server({"SLIMGPT_CACHE": str(tmp_path / "cache")}) as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("stories260k (tiny, offline)").click()
        wait_idle(page)
        page.get_by_role("button", name="Load model").click()
        page.get_by_text("Loaded:").wait_for(timeout=300_000)
        wait_idle(page)
        go(page, "Prune")
        open_calibration(page)
        set_number(page, "Samples", 8)
        set_number(page, "Sequence length", 64)
        page.get_by_role("button", name="Compute error curves").click()
        before = whatif_title(page)
        assert "dense inputs" in before
        wait_idle(page)
        slider = page.locator("[data-testid='stSlider']").filter(has_text="layer 0 heads")
        thumb = slider.locator("input[type='range']").locator("xpath=../..")  # the thumb holding the range input
        thumb.scroll_into_view_if_needed()
        box, track = thumb.bounding_box(), thumb.locator("xpath=..").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(track["x"] + 0.8 * track["width"], box["y"] + box["height"] / 2, steps=12)
        page.mouse.up()
        wait_idle(page)
        page.wait_for_function(
            """(before) => { const t = [...document.querySelectorAll('.gtitle')].map(e => e.textContent)
                   .find(s => s.startsWith('Predicted error per layer')); return t && t !== before; }""",
            arg=before, timeout=60_000)
        after = whatif_title(page)
        assert after != before
        assert float(after.split("attention ")[1].split(",")[0]) > float(before.split("attention ")[1].split(",")[0])
