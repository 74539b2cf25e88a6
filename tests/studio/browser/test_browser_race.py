"""Two races between the browser and the server, replayed deterministically in a real headless Chromium.

The first is the one behind "exported a run that removed nothing".

A rerun that starts while the server still holds unsent messages of the previous run drops them
(`ForwardMsgQueue.clear(retain_lifecycle_msgs=True)` on SCRIPT_STARTED). When that happens to the first run of the
Prune page, the browser never receives the schedule widgets' values, which Streamlit sends only in the run that
sets them. The next run renders the same widgets without a value, so the browser mounts them at their defaults
(0.0, the slider minimum) and sends those zeros back at the next interaction: the job then prunes nothing.

On a busy machine the drop happens by chance (the server's flush loop loses the race with the browser's rerun).
Here a WebSocket route stands between the browser and the real server and makes the timing deterministic: it holds
the server's messages after the "Samples" input until the browser's rerun has started the next run, then passes on
what the server itself would have kept, using Streamlit's own queue clear.

The second is the Prune page's lost edit. The browser applies a widget value the server sends (`set_value`) whenever
the message arrives. On a loaded machine a run's messages can reach the browser after the user has typed into the
next field: a run that began before that edit then puts the field's older value back on screen, and the next edit
sends it to the server as if the user had typed it. Here a route delivers the server's messages one edit late.
"""
import json
import re
import threading
from pathlib import Path

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.runtime.forward_msg_queue import ForwardMsgQueue
from streamlit.testing.v1 import AppTest

from tests import ROOT
from tests.browser import (assert_shows, browser_page, go, load_stories260k, open_calibration, set_number,
                           studio_process, studio_server, wait_idle)
from tests.studio.test_app import edit_schedule, editor_data, schedule_table
from ui.prune_form import PRESETS, load_form, save_form


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


class OneEditLate:
    """WebSocket route: once armed, the server's messages reach the browser only when the browser sends its next
    rerun request (after that request), as when a busy server flushes late. `captions` are the "Runs …" lines of
    the Prune page among the held messages, in order: they say how far the held runs got. `late` holds, for each
    release, the widget values of the rerun request that released it (by key) and the number inputs it delivered:
    (label, the value set, or the default where none is set)."""

    def __init__(self):
        self.armed = False
        self.held: list[bytes] = []
        self.held_inputs: list[tuple[str, float]] = []
        self.late: list[tuple[dict, list[tuple[str, float]]]] = []
        self.captions: list[str] = []
        self.lock = threading.Lock()
        self.ws = None

    def route(self, ws) -> None:
        server = ws.connect_to_server()
        self.ws = ws
        ws.on_message(lambda message: self.from_browser(message, server))
        server.on_message(self.from_server)

    def from_browser(self, message, server) -> None:
        server.send(message)
        msg = BackMsg.FromString(message)
        if msg.WhichOneof("type") == "rerun_script":
            states = msg.rerun_script.widget_states.widgets
            self.release({state.id.rsplit("-", 1)[-1]: getattr(state, state.WhichOneof("value"))
                          for state in states if state.WhichOneof("value")})  # a keyed widget's id ends in its key

    def from_server(self, message) -> None:
        with self.lock:
            if not self.armed:
                self.ws.send(message)
                return
            self.held.append(message)
            msg = ForwardMsg.FromString(message)
            element = msg.delta.new_element if msg.WhichOneof("type") == "delta" else None
            kind = element.WhichOneof("type") if element is not None else None
            if kind == "markdown" and element.markdown.body.startswith("Runs "):
                self.captions.append(element.markdown.body)
            elif kind == "number_input":
                box = element.number_input
                self.held_inputs.append((box.label, box.value if box.set_value else box.default))

    def release(self, sent: dict | None = None) -> None:
        with self.lock:
            for message in self.held:
                self.ws.send(message)
            if self.held_inputs:
                self.late.append((sent or {}, self.held_inputs))
            self.held, self.held_inputs = [], []

    def disarm(self) -> None:
        with self.lock:
            self.armed = False
        self.release()


CALIBRATION = ("Samples", "Sequence length", "Seed")


def calibration_shows(page, values: list) -> None:
    assert_shows(page, dict(zip(CALIBRATION, values, strict=True)))


def stored_calibration(runs: Path) -> list[str]:
    """Samples, sequence length and seed in the Prune form the workspace keeps."""
    form = json.loads((runs / ".studio.json").read_text())["prune_form"]
    return [str(form[name]) for name in ("nsamples", "seqlen", "seed")]


def set_number_now(page, label: str, value) -> None:
    """Type a number and press Enter, without waiting for the run it starts (a user typing on)."""
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def wait_until(condition, page, what: str) -> None:
    """Poll `condition` (state the route keeps) for at most a minute."""
    for _ in range(600):
        if condition():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"gave up waiting: {what}")


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


def schedule_widgets(at) -> dict:
    """The Prune page's schedule widgets' messages in this run, by key."""
    return {"target_ratio": at.slider(key="target_ratio").proto, "shape": at.number_input(key="shape").proto,
            "preset": at.selectbox(key="preset").proto, "separate": at.checkbox(key="separate").proto}


def test_a_schedule_widget_sets_its_value_only_when_the_form_changed_elsewhere(tmp_path, monkeypatch):
    """The server half, through AppTest. On a rerun that changes nothing, no editor widget sets its value in the
    browser (a late message would overwrite a newer edit) and each carries the form's value as its default (what a
    browser that missed an earlier run mounts it at). A value another tab writes into the form is set in the next
    run. A dragged ratio and the settings survive a visit to another page."""
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLIMGPT_RUNS", str(tmp_path / "runs"))  # its own workspace, so its own form
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.radio(key="model_source").set_value("stories260k (tiny, offline)").run()
    next(b for b in at.button if b.label == "Load model").click().run()
    at.switch_page("studio_pages/prune.py").run()
    at.slider(key="target_ratio").set_value(0.3).run()
    edit_schedule(at, {("hr", 2): 0.5})
    at.run()
    shown = schedule_widgets(at)
    assert not [k for k, w in shown.items() if w.set_value]
    assert (list(shown["target_ratio"].default), shown["shape"].default, PRESETS[shown["preset"].default],
            shown["separate"].default) == ([0.3], 4.0, "log", False)
    other_tab = load_form()
    other_tab.target_ratio, other_tab.shape, other_tab.preset = 0.4, 6.0, "linear"
    save_form(other_tab)
    at.run()
    shown = schedule_widgets(at)
    assert [k for k, w in shown.items() if w.set_value] == ["target_ratio", "shape", "preset"]
    assert (list(shown["target_ratio"].value), shown["shape"].value, shown["preset"].raw_value) == ([0.4], 6.0,
                                                                                                     "linear")
    at.run()
    shown = schedule_widgets(at)
    assert not [k for k, w in shown.items() if w.set_value]
    assert (list(shown["target_ratio"].default), shown["shape"].default, PRESETS[shown["preset"].default],
            shown["separate"].default) == ([0.4], 6.0, "linear", False)
    at.slider(key="target_ratio").set_value(0.3).run()
    edit_schedule(at, {("hr", 2): 0.5})
    at.run()
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


def test_fields_typed_in_quick_succession_all_keep_the_value_typed(tmp_path):
    """Samples, then Sequence length, then Seed, each typed while the server's messages for the edit before it are
    still on the way: the stored form, the page and a reload all end with the three values typed."""
    late = OneEditLate()
    runs = tmp_path / "runs"
    with studio_process({"SLIMGPT_RUNS": str(runs)}) as (_, url), browser_page() as page:
        page.route_web_socket(re.compile(r"/_stcore/stream"), late.route)
        page.goto(url)
        load_stories260k(page)
        go(page, "Prune")
        open_calibration(page)
        calibration_shows(page, [32, 256, 0])  # the form's defaults

        late.armed = True
        set_number_now(page, "Samples", 8)
        # the run for Samples went through the whole page; its messages wait in the route
        wait_until(lambda: any(" 8 × 256 tokens" in c for c in late.captions), page, "the run for Samples")
        set_number_now(page, "Sequence length", 64)  # sent first, then the run for Samples arrives
        page.get_by_text(re.compile(r"^Runs .*, 8 × 256 tokens,")).wait_for()
        # the race was replayed: the browser got the Samples run's Sequence length (256) after it had sent 64
        assert any(sent.get("seqlen") == 64 and ("Sequence length", 256) in inputs for sent, inputs in late.late), \
            late.late
        wait_until(lambda: any(" 8 × 64 tokens" in c for c in late.captions), page, "the run for Sequence length")
        set_number_now(page, "Seed", 5)  # again one run behind
        late.disarm()
        caption = page.get_by_text(re.compile(r"^Runs .*, seed 5,"))  # the run for Seed has been drawn
        caption.wait_for()
        wait_idle(page)
        assert stored_calibration(runs) == ["8", "64", "5"], caption.inner_text()
        assert " 8 × 64 tokens, seed 5," in caption.inner_text()
        calibration_shows(page, [8, 64, 5])
        page.reload()
        open_calibration(page)
        wait_idle(page)
        calibration_shows(page, [8, 64, 5])
