"""The schedule editor component in a real Chromium with Playwright's real mouse and keyboard, on stories260k and its
error curves (tests/apps/schedule_editor_app.py): drags, keys, shift-drag, snap back, what reaches the server, the
in-page redraw time, and the browser's numbers against the engine's."""
import json
import random
import statistics

import pytest

from tests.browser import ROOT, browser_page, studio_server, wait_idle
from slimgpt_core.data import calibration_tokens
from slimgpt_core.methods.prune_settings import PruneSettings, ffn_units_removed
from slimgpt_core.models import load_model
from slimgpt_core.schedules.curves import error_curves, predict, sensitivity_map
from slimgpt_core.schedules.editor_data import editor_payload, payload_curves
from slimgpt_core.schedules.schedule import layer_ratios, units_to_remove
from slimgpt_core.services.prune import preview_schedule

APP = ROOT / "tests" / "apps" / "schedule_editor_app.py"
TARGET = 0.3  # the app's preset: log at this mean


@pytest.fixture(scope="module")
def engine(tmp_path_factory, assets_root):
    """stories260k, its curves on the app's calibration (4 × 64 tinystories), the payload the app sends."""
    loaded = load_model("stories260k", "cpu")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 4, 64, 0)
    curves = error_curves(loaded.model, tokens, device="cpu", use_cache=False)
    n = len(loaded.model.model.layers)
    preset = layer_ratios(n, TARGET, "log", 4.0)
    return loaded.model, json.loads(json.dumps(editor_payload(loaded.model, curves, preset, preset)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, assets_root):
    folder = tmp_path_factory.mktemp("editor")
    log = folder / "received.jsonl"
    with studio_server({"SLIMGPT_EDITOR_LOG": str(log), "SLIMGPT_CACHE": str(folder / "cache")}, APP) as url:
        yield url, log


@pytest.fixture(scope="module")
def browser():
    with browser_page(1200, 1000) as page:
        yield page


@pytest.fixture
def page(browser, server):
    """A fresh session of the app (a reload is a new session: the preset schedule, nothing received)."""
    url, log = server
    log.write_text("")
    browser.goto(url)
    browser.get_by_text("server received 0 edits").wait_for(timeout=300_000)
    browser.locator(".se-hit").first.wait_for()
    wait_idle(browser)
    return browser


def received(server) -> list[dict]:
    return [json.loads(line) for line in server[1].read_text().splitlines() if line.strip()]


def wait_received(page, count: int) -> None:
    page.get_by_text(f"server received {count} edits").wait_for(timeout=60_000)
    wait_idle(page)
    page.wait_for_timeout(500)  # anything else on its way would have arrived by now


def hit(page, kind: str, layer: int):
    return page.locator(f".se-hit[data-kind='{kind}'][data-layer='{layer}']")


def bar_state(page, kind: str, layer: int) -> tuple[float, int]:
    h = hit(page, kind, layer)
    return float(h.get_attribute("data-ratio")), int(h.get_attribute("data-units"))


def y_for(page, kind: str, layer: int, ratio: float) -> tuple[float, float]:
    """The point of a bar's column that stands for `ratio` (the column spans 6 px beyond 0 and 0.95)."""
    box = hit(page, kind, layer).bounding_box()
    top, height = box["y"] + 6, box["height"] - 12
    return box["x"] + box["width"] / 2, top + height * (1 - ratio / 0.95)


def schedule_in_page(page) -> tuple[list[float], list[float]]:
    return tuple(page.evaluate(f"window.slimgptEditor.editor().{k}") for k in ("hr", "fr"))


def shown(page) -> dict:
    return page.evaluate("""() => {
        const root = document.querySelector('[data-testid="stBidiComponentIsolated"]').shadowRoot;
        const text = (k) => root.querySelector(`[data-se="${k}"]`).textContent;
        return {params: text('params'), layer_ratio: text('layer-ratio'), attn: text('err-attn'),
                mlp: [...root.querySelectorAll('.se-err[data-kind="mlp"]')].map((n) => +n.dataset.value),
                path_fr: root.querySelector('.se-path[data-kind="fr"]').getAttribute('points')};
    }""")


def test_drag_redraws_in_the_page_and_reaches_the_server_once(page, server, engine):
    model, payload = engine
    n_ffn = payload["layers"][2]["n_ffn"]
    before = shown(page)
    page.evaluate("window.slimgptEditor.editor().timings = {update: [], frame: []}")
    x, y0 = y_for(page, "fr", 2, 0.1)
    page.mouse.move(x, y0)
    page.mouse.down()
    _, y1 = y_for(page, "fr", 2, 0.7)
    page.mouse.move(x + 3, y1, steps=40)  # x drifts: a plain drag moves its own bar only
    during = shown(page)
    page.mouse.up()
    wait_received(page, 1)

    ratio, units = bar_state(page, "fr", 2)
    assert abs(units - 0.7 * n_ffn) <= 2  # where the pointer let go, in whole channels
    assert ratio == min(units / n_ffn, 0.95) and units_to_remove(n_ffn, ratio) == units
    assert received(server) == [{"hr": [], "fr": [[2, ratio]], "seq": 1}]  # one message, the snapped value

    # the redraw during the drag showed this schedule's consequences, as the engine computes them
    hr, fr = schedule_in_page(page)
    assert fr[2] == ratio and hr == payload["preset"]["hr"]
    preview = preview_schedule(model, PruneSettings(head_ratios=hr, ffn_ratios=fr))
    pred = predict(payload_curves(payload), hr, fr)
    assert during["mlp"] == pytest.approx(pred.mlp, rel=1e-9) and during["mlp"][2] > before["mlp"][2]
    assert during["params"].startswith(f"{preview.params_after / 1e6:.3f} M")
    assert during["params"] != before["params"] and during["path_fr"] != before["path_fr"]
    assert during["layer_ratio"] == f"{100 * preview.achieved_layer_ratio:.1f}%"

    # measured in the page: each pointermove to its finished redraw
    timings = page.evaluate("window.slimgptEditor.editor().timings")
    samples = timings["update"]
    assert len(samples) >= 30
    p95 = statistics.quantiles(samples, n=20)[-1]
    print(f"\nredraw per pointermove over {len(samples)} moves: median {statistics.median(samples):.2f} ms, "
          f"p95 {p95:.2f} ms; to the next animation frame: median {statistics.median(timings['frame']):.2f} ms")
    assert statistics.median(samples) <= 16 and p95 <= 50


def test_data_arriving_during_a_drag_waits_for_the_drop(page, server, engine):
    _, payload = engine
    x, y0 = y_for(page, "hr", 3, 0.0)
    page.mouse.move(x, y0)
    page.mouse.down()
    page.mouse.move(x, y_for(page, "hr", 3, 0.5)[1], steps=5)
    held = bar_state(page, "hr", 3)
    # a rerun's data (another schedule) reaches the component while the bar is held: nothing jumps
    page.evaluate("""() => { const ed = window.slimgptEditor.editor();
        ed.setData({...ed.payload, hr: ed.payload.preset.hr.map(() => 0), fr: ed.payload.preset.fr}, ed.sendEdit); }""")
    assert bar_state(page, "hr", 3) == held and bar_state(page, "hr", 4)[0] == payload["preset"]["hr"][4]
    page.mouse.up()
    wait_received(page, 1)
    assert received(server) == [{"hr": [[3, held[0]]], "fr": [], "seq": 1}]
    assert bar_state(page, "hr", 3) == held  # the dropped value stays, and the server's answer agrees
    assert json.loads(page.locator("code").last.text_content())["schedule"]["hr"][3] == held[0]


def test_arrow_keys_step_one_group_and_tell_the_server_on_release(page, server, engine):
    _, payload = engine
    n_kv = payload["layers"][1]["n_kv"]
    _, k0 = bar_state(page, "hr", 1)
    hit(page, "hr", 1).focus()
    page.keyboard.press("ArrowUp")
    wait_received(page, 1)
    ratio, k1 = bar_state(page, "hr", 1)
    assert k1 == k0 + 1 and ratio == (k0 + 1) / n_kv
    page.keyboard.press("ArrowLeft")  # focus moves to layer 0: nothing is sent
    page.keyboard.press("Shift+ArrowUp")
    wait_received(page, 2)
    assert received(server) == [{"hr": [[1, ratio]], "fr": [], "seq": 1},
                                {"hr": [[0, bar_state(page, "hr", 0)[0]]], "fr": [], "seq": 2}]
    assert bar_state(page, "hr", 0)[1] == units_to_remove(n_kv, payload["preset"]["hr"][0]) + 1


def test_shift_drag_sets_the_range_of_layers(page, server, engine):
    _, payload = engine
    x0, y0 = y_for(page, "hr", 0, 0.0)
    x3, y3 = y_for(page, "hr", 3, 0.5)
    page.keyboard.down("Shift")
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x3, y3, steps=20)
    page.mouse.up()
    page.keyboard.up("Shift")
    wait_received(page, 1)
    n_kv = payload["layers"][0]["n_kv"]
    edit = received(server)
    assert len(edit) == 1 and edit[0]["fr"] == []
    values = [bar_state(page, "hr", i) for i in range(5)]
    assert [v for v in values[:4]] == [values[0]] * 4 and values[0][1] == units_to_remove(n_kv, 0.5)
    assert values[4][0] == payload["preset"]["hr"][4]  # outside the range: untouched
    changed = [i for i in range(4) if payload["preset"]["hr"][i] != values[0][0]]
    assert edit[0]["hr"] == [[i, values[0][0]] for i in changed]


def server_schedule(page) -> dict:
    return json.loads(page.locator("code").last.text_content())["schedule"]


def test_snap_back_to_the_preset_ghost(page, server, engine):
    _, payload = engine
    top = [min(units_to_remove(t["n_ffn"], 0.95) / t["n_ffn"], 0.95) for t in payload["layers"]]
    hit(page, "fr", 3).focus()
    page.keyboard.press("End")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("End")  # right after the first: both edits reach the schedule, however the reruns merge
    page.wait_for_function("""(top) => { const t = [...document.querySelectorAll('code')].pop();
        const s = t && JSON.parse(t.textContent).schedule; return s && s.fr[2] === top[2] && s.fr[3] === top[3]; }""",
                           arg=top, timeout=60_000)
    wait_idle(page)
    seq = received(server)[-1]["seq"]
    assert seq == 2 and bar_state(page, "fr", 2)[0] == top[2]
    count = len(received(server))
    page.keyboard.press("g")  # the focused bar (layer 2) back to the preset
    wait_received(page, count + 1)
    assert received(server)[-1] == {"hr": [], "fr": [[2, payload["preset"]["fr"][2]]], "seq": 3}
    page.locator("button", has_text="All → preset").click()
    wait_received(page, count + 2)
    assert received(server)[-1] == {"hr": [], "fr": [[3, payload["preset"]["fr"][3]]], "seq": 4}
    assert schedule_in_page(page) == (payload["preset"]["hr"], payload["preset"]["fr"])
    assert server_schedule(page) == payload["preset"]  # the server's schedule: the preset again


def test_the_pages_numbers_are_the_engines(page, engine):
    """The component's own compute functions, on random schedules, against preview_schedule and predict."""
    model, payload = engine
    rng = random.Random(5)
    n = len(payload["layers"])
    schedules = []
    for _ in range(150):
        # uniform draws, rounding points k/n, and the half-way points where round-half-even decides
        pick = lambda units: rng.choice([rng.uniform(0, 0.95), rng.randint(0, units - 1) / units,  # noqa: E731
                                         (rng.randint(0, units - 2) + 0.5) / units])
        schedules.append(([min(0.95, pick(t["n_kv"])) for t in payload["layers"]],
                          [min(0.95, pick(t["n_ffn"])) for t in payload["layers"]]))
    results = page.evaluate("([p, s]) => s.map(([hr, fr]) => window.slimgptEditor.compute(p, hr, fr))",
                            [payload, schedules])
    curves = payload_curves(payload)
    for (hr, fr), js in zip(schedules, results):
        preview = preview_schedule(model, PruneSettings(head_ratios=hr, ffn_ratios=fr))
        pred = predict(curves, hr, fr)
        assert (js["layer_params_before"], js["layer_params_after"], js["params_before"], js["params_after"]) == \
            (preview.layer_params_before, preview.layer_params_after, preview.params_before, preview.params_after)
        assert (js["kv_kept"], js["heads_kept"], js["ffn_kept"]) == (preview.kv_kept, preview.heads_kept,
                                                                    preview.ffn_kept)
        assert js["achieved_layer_ratio"] == pytest.approx(preview.achieved_layer_ratio, rel=1e-12)
        assert js["achieved_ratio"] == pytest.approx(preview.achieved_ratio, rel=1e-12)
        assert (js["kv_removed"], js["ffn_removed"]) == (pred.kv_removed, pred.ffn_removed)
        assert js["attn"] == pytest.approx(pred.attn, rel=1e-9, abs=1e-15)
        assert js["mlp"] == pytest.approx(pred.mlp, rel=1e-9, abs=1e-15)
        assert js["total_attn"] == pytest.approx(pred.total_attn, rel=1e-9)
    smap, js_map = sensitivity_map(curves), page.evaluate("(p) => window.slimgptEditor.sensitivityMap(p)", payload)
    assert js_map["ratios"] == smap.ratios
    for row, js_row in zip(smap.heads + smap.ffn, js_map["heads"] + js_map["ffn"]):
        assert js_row == pytest.approx(row, rel=1e-9, abs=1e-15)
    # Python's round is half-to-even on the float it is given; the page's must give the same integers
    xs = [k + 0.5 for k in range(-3, 12)] + [r * u for u in (3, 4, 172, 1536) for r in (0.125, 0.375, 0.95, 0.05)]
    assert page.evaluate("(xs) => xs.map(window.slimgptEditor.roundHalfEven)", xs) == [round(x) for x in xs]


def test_aligned_widths_are_counted_and_snapped_as_the_engine_does(page, engine):
    """With FFN widths aligned (a payload made with align 4 on stories260k's 172 channels, and SmolLM2's 1536 at
    the automatic 32), the page's removals, counts and predictions are plan_removals' and predict's."""
    model, _ = engine
    loaded_curves = payload_curves(engine[1])
    n = len(model.model.layers)
    payload = json.loads(json.dumps(editor_payload(model, loaded_curves, [0.3] * n, [0.3] * n, align=4)))
    assert [t["align"] for t in payload["layers"]] == [4] * n
    rng = random.Random(7)
    schedules = [([rng.uniform(0, 0.95) for _ in range(n)], [rng.uniform(0, 0.95) for _ in range(n)])
                 for _ in range(60)]
    results = page.evaluate("([p, s]) => s.map(([hr, fr]) => window.slimgptEditor.compute(p, hr, fr))",
                            [payload, schedules])
    for (hr, fr), js in zip(schedules, results):
        preview = preview_schedule(model, PruneSettings(head_ratios=hr, ffn_ratios=fr, align=4))
        pred = predict(loaded_curves, hr, fr, align=4)
        assert js["ffn_kept"] == preview.ffn_kept and all(w % 4 == 0 for w in js["ffn_kept"])
        assert (js["layer_params_after"], js["params_after"]) == (preview.layer_params_after, preview.params_after)
        assert js["ffn_removed"] == pred.ffn_removed
        assert js["mlp"] == pytest.approx(pred.mlp, rel=1e-9, abs=1e-15)
    ratios = [rng.uniform(0, 1) for _ in range(200)] + [0.0, 0.95, 1.0, 16 / 1536, 17 / 1536]
    removed, snapped = page.evaluate("""(rs) => [rs.map((r) => window.slimgptEditor.removedUnits(1536, r, 32)),
        rs.map((r) => window.slimgptEditor.snapRatio(1536, r, 32))]""", ratios)
    assert removed == [ffn_units_removed(1536, r, None) for r in ratios]
    for r, s in zip(ratios, snapped):  # a snapped bar removes whole blocks and gives the same removal back
        k = ffn_units_removed(1536, min(0.95, r), None)
        assert (1536 - k) % 32 == 0 and s == min(k / 1536, 0.95) and ffn_units_removed(1536, s, None) == k


def test_without_curves_the_editor_still_counts(browser, server, engine):
    model, payload = engine
    url, _ = server
    browser.goto(f"{url}/?curves=0")
    browser.get_by_text("server received 0 edits").wait_for(timeout=300_000)
    browser.locator(".se-hit").first.wait_for()
    wait_idle(browser)
    assert browser.locator(".se-err").count() == 0 and browser.locator(".se-path").count() == 0
    browser.get_by_text("No error curves yet").wait_for()
    assert browser.locator(".se-ghost-hr").count() == 1
    hit(browser, "hr", 4).focus()
    browser.keyboard.press("Home")
    wait_received(browser, 1)
    hr, fr = schedule_in_page(browser)
    preview = preview_schedule(model, PruneSettings(head_ratios=hr, ffn_ratios=fr))
    params = browser.evaluate("""() => document.querySelector('[data-testid="stBidiComponentIsolated"]')
        .shadowRoot.querySelector('[data-se="params"]').textContent""")
    assert hr[4] == 0.0 and params.startswith(f"{preview.params_after / 1e6:.3f} M")
