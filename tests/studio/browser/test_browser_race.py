"""The race behind "exported a run that removed nothing", replayed deterministically in a real headless Chromium.

A rerun that starts while the server still holds unsent messages of the previous run drops them
(`ForwardMsgQueue.clear(retain_lifecycle_msgs=True)` on SCRIPT_STARTED). When that happens to the first run of the
Prune page, the browser never receives the schedule widgets' values, which Streamlit sends only in the run that
sets them. The next run renders the same widgets without a value, so the browser mounts them at their defaults
(0.0, the slider minimum) and sends those zeros back at the next interaction: the job then prunes nothing.

On a busy machine the drop happens by chance (the server's flush loop loses the race with the browser's rerun).
Here a WebSocket route stands between the browser and the real server and makes the timing deterministic: it holds
the server's messages after the "Samples" input until the browser's rerun has started the next run, then passes on
what the server itself would have kept, using Streamlit's own queue clear."""
import re
import threading

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.runtime.forward_msg_queue import ForwardMsgQueue

from tests.browser import browser_page, load_stories260k, open_calibration, set_number, studio_server, wait_idle
from tests.studio.test_app import edit_schedule, editor_data, schedule_table


class LateFlush:
    """WebSocket route: once armed, stall the server's messages after the element labelled `label` and, when the
    browser's next rerun starts a new run, drop the stalled deltas as the server's queue clear does."""

    def __init__(self, label: str):
        self.label = label
        self.armed = False
        self.stalled: list[ForwardMsg] | None = None
        self.rerun_sent = False
        self.dropped = 0
        self.replayed = threading.Event()
        self.lock = threading.Lock()

    def route(self, ws) -> None:
        server = ws.connect_to_server()
        ws.on_message(lambda message: self.from_browser(message, server))
        server.on_message(lambda message: self.from_server(message, ws))

    def from_browser(self, message, server) -> None:
        with self.lock:
            if self.stalled is not None and BackMsg.FromString(message).WhichOneof("type") == "rerun_script":
                self.rerun_sent = True
        server.send(message)

    def from_server(self, message, ws) -> None:
        msg = ForwardMsg.FromString(message)
        with self.lock:
            if self.stalled is None:
                ws.send(message)
                element = msg.delta.new_element if msg.WhichOneof("type") == "delta" else None
                if self.armed and element is not None and element.WhichOneof("type") == "number_input" \
                        and element.number_input.label == self.label:
                    self.stalled, self.armed = [], False
                return
            if not (self.rerun_sent and msg.WhichOneof("type") == "new_session"):
                self.stalled.append(msg)
                return
            queue = ForwardMsgQueue()
            for held in self.stalled:
                queue.enqueue(held)
            queue.clear(retain_lifecycle_msgs=True)  # what the server does when the next run starts
            kept = queue.flush()
            self.dropped = len(self.stalled) - len(kept)
            self.stalled = None
            for held in kept:
                ws.send(held.SerializeToString())
            ws.send(message)
            self.replayed.set()


def on_screen(page, label: str) -> float:
    """The value a slider shows (its range input, snapped to the slider's step)."""
    return float(page.locator(f"input[type='range'][aria-label='{label}']").input_value())


def bar_on_screen(page, kind: str, layer: int) -> float:
    """The ratio the schedule editor holds for a layer's heads (hr) or FFN (fr) bar."""
    return float(page.locator(f".se-hit[data-kind='{kind}'][data-layer='{layer}']").get_attribute("data-ratio"))


def test_schedule_survives_a_rerun_that_drops_the_first_prune_run(tmp_path):
    late = LateFlush("Samples")
    with studio_server() as url, browser_page() as page:
        page.route_web_socket(re.compile(r"/_stcore/stream"), late.route)
        page.goto(url)
        load_stories260k(page)

        late.armed = True  # the first Prune run: its messages after "Samples" arrive too late
        page.locator("[data-testid='stSidebarNav'] a", has_text="Prune").first.click()
        open_calibration(page)
        samples = page.get_by_label("Samples", exact=True)
        samples.fill("4")
        samples.press("Enter")  # the browser's rerun starts the next run while those messages still wait
        for _ in range(600):
            if late.replayed.is_set():
                break
            page.wait_for_timeout(100)
        assert late.replayed.is_set() and late.dropped > 0, "the route did not replay the race"
        wait_idle(page)
        set_number(page, "Sequence length", 64)  # one more interaction: the browser sends every widget's value

        heads = [bar_on_screen(page, "hr", i) for i in range(5)]
        ffn = [bar_on_screen(page, "fr", i) for i in range(5)]
        requested = page.locator("[data-testid='stMetric']").filter(has_text="Requested mean").inner_text()
        # the browser shows the schedule the page was given (the log preset for the default mean 0.2), and the
        # label describes the schedule on screen
        assert on_screen(page, "Target mean ratio") == 0.2
        assert min(heads + ffn) > 0 and heads == sorted(heads), (heads, ffn)
        assert abs(float(requested.split()[-1].rstrip("%")) / 100 - sum(heads + ffn) / 10) < 0.005, (requested, heads)

        page.get_by_role("button", name="Start pruning").click()
        page.get_by_text("Done in").wait_for(timeout=300_000)
        done = page.get_by_text("Done in").inner_text()
    before, after = map(float, re.search(r"([\d.]+) M → ([\d.]+) M", done).groups())
    assert after < before, done


def test_every_schedule_widget_is_handed_its_value_on_every_run(tmp_path, monkeypatch):
    """The server half, through AppTest: on a rerun that changes nothing, every editor widget's message still carries
    its value (`set_value`), so a browser that missed an earlier run never falls back to a widget default; a dragged
    ratio and the settings survive a visit to another page."""
    from streamlit.testing.v1 import AppTest

    from tests import ROOT

    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.radio(key="model_source").set_value("stories260k (tiny, offline)").run()
    next(b for b in at.button if b.label == "Load model").click().run()
    at.switch_page("studio_pages/prune.py").run()
    at.slider(key="target_ratio").set_value(0.3).run()
    edit_schedule(at, {("hr", 2): 0.5})
    at.run()
    widgets = [at.slider(key="target_ratio"), at.number_input(key="shape"), at.selectbox(key="preset"),
               at.checkbox(key="separate")]
    assert all(w.proto.set_value for w in widgets), [w.key for w in widgets if not w.proto.set_value]
    shown = list(schedule_table(at)["heads ratio"])
    assert shown[2] == 0.5 and min(shown) > 0
    assert editor_data(at)["hr"] == shown  # the editor's message carries the schedule in every run
    at.switch_page("studio_pages/evaluate.py").run()
    at.switch_page("studio_pages/prune.py").run()
    assert not at.exception
    assert at.slider(key="target_ratio").value == 0.3
    assert list(schedule_table(at)["heads ratio"]) == shown == editor_data(at)["hr"]
    requested = {m.label: m.value for m in at.metric}["Requested mean"]
    ffn = editor_data(at)["fr"]
    assert requested == f"{sum(shown + ffn) / 10:.1%}"
