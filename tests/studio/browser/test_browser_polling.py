"""In a real headless Chromium: a page's live view polls while its job runs and stops once the job has ended.

Every page draws its job's progress through `ui.state.live_fragment`. A fragment's poll interval is fixed when the
page is drawn, so without the helper's page rerun the view kept being redrawn every second after the job ended
(Evaluate and Compare did; on Export that replaced the Download button under the user's click)."""
import re

from tests.browser import ROOT, browser_page, studio_server, wait_idle


def draws(page) -> int:
    return int(re.search(r"draws (\d+)", page.get_by_text("draws").first.text_content()).group(1))


def test_the_live_view_polls_while_the_job_runs_and_stops_after(tmp_path):
    with studio_server({"SLIMGPT_CACHE": str(tmp_path / "cache")}, ROOT / "tests" / "apps" / "live_fragment_app.py") \
            as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("state none").wait_for(timeout=60_000)
        wait_idle(page)
        page.get_by_role("button", name="Start").click()
        page.get_by_text("state running").wait_for(timeout=30_000)
        first = draws(page)
        page.wait_for_function("(n) => { const m = document.body.innerText.match(/draws (\\d+)/);"
                               " return m && Number(m[1]) >= n + 1; }", arg=first, timeout=10_000)  # it polls
        page.get_by_text("state done").wait_for(timeout=30_000)
        wait_idle(page)
        ended = draws(page)
        page.wait_for_timeout(3500)  # three poll intervals and a half
        assert draws(page) == ended, "the view was still redrawn every second after its job ended"
