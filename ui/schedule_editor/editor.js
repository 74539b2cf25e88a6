// The per-layer schedule editor: bars the user drags, and every consequence (predicted errors, the sensitivity
// map's path, parameters after, achieved ratios) recomputed here from the payload the engine sent once
// (slimgpt_core/schedules/editor_data.py). The server hears of an edit once, when a drag or a key press ends.

const MAX_RATIO = 0.95;
const SVG_NS = "http://www.w3.org/2000/svg";
const HEAD_COLOR = "#4C78A8";
const FFN_COLOR = "#F58518";

// --- pure functions, the same numbers as the engine's ----------------------------------------------------

// Python's round(x) on a float: the nearest integer, ties to the even one (x − floor(x) is exact in doubles).
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

// schedule.units_to_remove: whole units removed at this ratio, at least one kept.
export function unitsToRemove(nUnits, ratio) {
  return Math.max(0, Math.min(roundHalfEven(ratio * nUnits), nUnits - 1));
}

// numpy.interp (what curves.interpolate calls): piecewise linear, flat beyond the ends.
export function interp(x, xp, fp) {
  const n = xp.length;
  if (x <= xp[0]) return fp[0];
  if (x >= xp[n - 1]) return fp[n - 1];
  let lo = 0, hi = n - 1; // xp[lo] <= x < xp[hi]
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (xp[mid] <= x) lo = mid; else hi = mid;
  }
  if (xp[lo] === x) return fp[lo];
  const slope = (fp[lo + 1] - fp[lo]) / (xp[lo + 1] - xp[lo]);
  let value = slope * (x - xp[lo]) + fp[lo];
  if (Number.isNaN(value)) {
    value = slope * (x - xp[lo + 1]) + fp[lo + 1];
    if (Number.isNaN(value) && fp[lo] === fp[lo + 1]) value = fp[lo];
  }
  return value;
}

export function expandCounts(counts) {
  if (Array.isArray(counts)) return counts;
  const out = [];
  for (let c = 0; c < counts.last; c += counts.step) out.push(c);
  out.push(counts.last);
  return out;
}

const expandedCounts = new WeakMap(); // curve -> its counts as a list, expanded once per payload

function countsOf(curve) {
  let counts = expandedCounts.get(curve);
  if (!counts) {
    counts = expandCounts(curve.ffn_counts);
    expandedCounts.set(curve, counts);
  }
  return counts;
}

function headError(errors, k) {
  return errors[Math.max(0, Math.min(k, errors.length - 1))];
}

// prune_settings.aligned_width: the kept width rounded to the nearest multiple of `align`, halves up (at least one
// multiple, at most the full width); a layer left whole stays whole.
export function alignedWidth(keep, full, align) {
  if (align <= 1 || keep === full || full < align) return keep;
  return Math.min(Math.max(align, Math.floor((keep + Math.floor(align / 2)) / align) * align),
                  Math.floor(full / align) * align);
}

// prune_settings.plan_removals: units a layer loses at this ratio, its kept FFN width aligned when `align` > 1.
export function removedUnits(nUnits, ratio, align = 1) {
  const k = unitsToRemove(nUnits, ratio);
  return align > 1 ? nUnits - alignedWidth(nUnits - k, nUnits, align) : k;
}

// The largest number of units a bar can remove (what 0.95 gives).
export function maxUnits(nUnits, align = 1) {
  return removedUnits(nUnits, MAX_RATIO, align);
}

// The ratio a bar snaps to when it is set near `ratio`: whole (aligned) units, inside [0, 0.95], and giving them back.
export function snapRatio(nUnits, ratio, align = 1) {
  const k = removedUnits(nUnits, Math.max(0, Math.min(MAX_RATIO, ratio)), align);
  return Math.min(k / nUnits, MAX_RATIO);
}

// studio.preview_schedule's parameters and ratios, and curves.predict's errors (null without curves).
export function compute(payload, hr, fr) {
  const layers = payload.layers;
  const curves = payload.curves;
  const out = {
    kv_removed: [], ffn_removed: [], kv_kept: [], heads_kept: [], ffn_kept: [],
    layer_params_before: 0, layer_params_after: 0, params_before: payload.total_params, params_after: 0,
    attn: curves ? [] : null, mlp: curves ? [] : null, total_attn: null, total_mlp: null,
  };
  let totalAttn = 0, totalMlp = 0;
  for (let i = 0; i < layers.length; i++) {
    const t = layers[i];
    const kv = unitsToRemove(t.n_kv, hr[i]);
    const ch = removedUnits(t.n_ffn, fr[i], t.align || 1);
    out.kv_removed.push(kv);
    out.ffn_removed.push(ch);
    out.kv_kept.push(t.n_kv - kv);
    out.heads_kept.push((t.n_kv - kv) * t.heads_per_unit);
    out.ffn_kept.push(t.n_ffn - ch);
    out.layer_params_before += t.fixed_params + t.n_kv * t.kv_params + t.n_ffn * t.ffn_params;
    out.layer_params_after += t.fixed_params + (t.n_kv - kv) * t.kv_params + (t.n_ffn - ch) * t.ffn_params;
    if (curves) {
      const c = curves[i];
      const a = headError(c.head_errors, kv);
      const m = interp(ch, countsOf(c), c.ffn_errors);
      out.attn.push(a);
      out.mlp.push(m);
      totalAttn += a;
      totalMlp += m;
    }
  }
  out.params_after = payload.total_params - out.layer_params_before + out.layer_params_after;
  out.achieved_layer_ratio = 1 - out.layer_params_after / out.layer_params_before;
  out.achieved_ratio = 1 - out.params_after / out.params_before;
  if (curves) {
    out.total_attn = totalAttn;
    out.total_mlp = totalMlp;
  }
  return out;
}

// curves.sensitivity_map: predicted error of every layer at every map ratio (null without curves).
export function sensitivityMap(payload) {
  if (!payload.curves) return null;
  const ratios = payload.map_ratios;
  const heads = [], ffn = [];
  payload.layers.forEach((t, i) => {
    const c = payload.curves[i];
    const counts = countsOf(c);
    heads.push(ratios.map((r) => headError(c.head_errors, unitsToRemove(t.n_kv, r))));
    ffn.push(ratios.map((r) => interp(unitsToRemove(t.n_ffn, r), counts, c.ffn_errors)));
  });
  return { ratios, heads, ffn };
}

// --- drawing -------------------------------------------------------------------------------------------

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]; // viridis stops

function rampColor(t) {
  const x = Math.max(0, Math.min(1, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const c = RAMP[i].map((v, j) => Math.round(v + f * (RAMP[i + 1][j] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function formatParams(n) {
  return `${(n / 1e6).toFixed(3)} M`;
}

function formatError(e) {
  return e === null ? "–" : e.toPrecision(3);
}

function percent(x) {
  return `${(100 * x).toFixed(1)}%`;
}

function niceMax(v) {
  if (!(v > 0)) return 1e-6;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : null;
}

class Editor {
  constructor(root) {
    this.root = root;
    this.payload = null;
    this.signature = null;
    this.hr = [];
    this.fr = [];
    this.drag = null;
    this.keyEdit = null;
    this.focus = null; // {kind, layer}
    this.sent = [];
    // edits sent and not yet in the schedule the server sent back (data.acked: the last seq it applied). Streamlit
    // merges two rerun requests that arrive before the first run starts, keeping the newer trigger only, so every
    // message carries these too, and the drawing keeps them over older data.
    this.unacked = [];
    this.seq = 0;
    this.timings = { update: [], frame: [] };
    this.sendEdit = () => {};
    this.pending = null; // data that arrived during an edit
    this.width = 0;
    this.resizeObserver = new ResizeObserver(() => {
      const w = this.root.clientWidth;
      if (this.payload && Math.abs(w - this.width) > 4) this.build();
    });
    this.resizeObserver.observe(this.root);
  }

  // A new payload rebuilds the drawing, a new schedule is drawn; both wait while the user holds a bar or a key.
  setData(data, sendEdit) {
    this.sendEdit = sendEdit;
    if (this.drag || this.keyEdit) {
      this.pending = data;
      return;
    }
    this.pending = null;
    const { hr: serverHr, fr: serverFr, acked = 0, ...payload } = data;
    this.seq = Math.max(this.seq, acked);
    this.unacked = this.unacked.filter((e) => e.seq > acked);
    const hr = [...serverHr], fr = [...serverFr];
    for (const e of this.unacked) {
      for (const [i, v] of e.hr) if (i < hr.length) hr[i] = v;
      for (const [i, v] of e.fr) if (i < fr.length) fr[i] = v;
    }
    const signature = JSON.stringify(payload);
    if (signature !== this.signature) {
      this.signature = signature;
      this.payload = payload;
      this.map = sensitivityMap(payload);
      this.hr = [...hr];
      this.fr = [...fr];
      this.build();
      return;
    }
    this.hr = [...hr];
    this.fr = [...fr];
    this.update();
  }

  // After an edit ends: data that came in the meantime (drawn with the edit over it, as the edit is unacknowledged).
  applyPending() {
    if (this.pending && !this.drag && !this.keyEdit) this.setData(this.pending, this.sendEdit);
  }

  nUnits(kind, i) {
    const t = this.payload.layers[i];
    return kind === "hr" ? t.n_kv : t.n_ffn;
  }

  // KV groups go one at a time; FFN channels in blocks of the layer's alignment.
  unitAlign(kind, i) {
    return kind === "hr" ? 1 : this.payload.layers[i].align || 1;
  }

  build() {
    const p = this.payload;
    const n = p.layers.length;
    this.root.innerHTML = "";
    const W = Math.max(560, this.root.clientWidth || 900);
    this.width = W;
    const left = 52, right = 14;
    const plotW = W - left - right;
    const slot = plotW / n;
    const barW = Math.max(2, slot * 0.36);
    this.geom = { left, right, plotW, slot, barW, barsTop: 14, barsH: 200 };
    const g = this.geom;

    // numbers and buttons (HTML: text updates are cheapest there)
    const head = document.createElement("div");
    head.className = "se-head";
    head.innerHTML = `
      <div class="se-metrics">
        <span class="se-metric"><b data-se="params"></b><small>parameters after</small></span>
        <span class="se-metric"><b data-se="layer-ratio"></b><small>achieved (decoder layers)</small></span>
        <span class="se-metric"><b data-se="model-ratio"></b><small>achieved (whole model)</small></span>
        <span class="se-metric"><b data-se="err-attn"></b><small>Σ predicted attention error</small></span>
        <span class="se-metric"><b data-se="err-mlp"></b><small>Σ predicted MLP error</small></span>
      </div>
      <div class="se-buttons">
        <button type="button" data-se="snap-layer" title="set the focused layer's heads and FFN bars to the preset">
          Layer → preset</button>
        <button type="button" data-se="snap-all" title="set every bar to the preset (the dashed ghost)">
          All → preset</button>
      </div>`;
    this.root.appendChild(head);
    this.text = {};
    head.querySelectorAll("[data-se]").forEach((node) => { this.text[node.dataset.se] = node; });
    this.text["snap-all"].addEventListener("click", () => this.snapToPreset(null));
    this.text["snap-layer"].addEventListener("click", () => {
      if (this.focus) this.snapToPreset(this.focus.layer);
    });

    const hint = document.createElement("div");
    hint.className = "se-hint";
    hint.textContent = "Drag a bar (removed fraction, snapped to whole KV groups / channels). Shift-drag: every " +
      "layer from where the drag started to the one under the pointer takes the value. Keys on a focused bar: " +
      "↑/↓ one step (Shift: one unit), PgUp/PgDn 10%, Home/End, ←/→ next layer, G: back to the preset " +
      "(the dashed ghost).";
    this.root.appendChild(hint);

    // the bars
    const barsH = g.barsTop + g.barsH + 40;
    const bars = el("svg", { class: "se-bars", width: W, height: barsH, viewBox: `0 0 ${W} ${barsH}` });
    this.root.appendChild(bars);
    this.barsSvg = bars;
    const yOf = (r) => g.barsTop + g.barsH * (1 - r / MAX_RATIO);
    this.yOf = yOf;
    for (const r of [0, 0.25, 0.5, 0.75, 0.95]) {
      el("line", { x1: left, x2: W - right, y1: yOf(r), y2: yOf(r), class: "se-grid" }, bars);
      el("text", { x: left - 6, y: yOf(r) + 4, class: "se-axis", "text-anchor": "end" }, bars).textContent =
        r.toFixed(2);
    }
    this.barNodes = { hr: [], fr: [] };
    this.hitNodes = { hr: [], fr: [] };
    const ghostPoints = { hr: [], fr: [] };
    for (let i = 0; i < n; i++) {
      for (const kind of ["hr", "fr"]) {
        const x = this.barX(kind, i);
        const bar = el("rect", { x, width: barW, class: `se-bar se-${kind}`,
          fill: kind === "hr" ? HEAD_COLOR : FFN_COLOR }, bars);
        this.barNodes[kind].push(bar);
        ghostPoints[kind].push(`${x + barW / 2},${yOf(p.preset[kind][i])}`);
      }
      if (n <= 40 || i % Math.ceil(n / 40) === 0) {
        el("text", { x: left + slot * (i + 0.5), y: g.barsTop + g.barsH + 14, class: "se-axis",
          "text-anchor": "middle" }, bars).textContent = String(i);
      }
    }
    for (const kind of ["hr", "fr"]) {
      el("polyline", { points: ghostPoints[kind].join(" "), class: `se-ghost se-ghost-${kind}`,
        stroke: kind === "hr" ? HEAD_COLOR : FFN_COLOR }, bars);
    }
    // transparent hit areas on top, full height, focusable
    for (let i = 0; i < n; i++) {
      for (const kind of ["hr", "fr"]) {
        const hit = el("rect", { x: this.barX(kind, i) - slot * 0.06, y: g.barsTop - 6, width: barW + slot * 0.12,
          height: g.barsH + 12, class: "se-hit", tabindex: 0, role: "slider",
          "aria-label": `layer ${i} ${kind === "hr" ? "heads" : "FFN"} ratio`, "data-layer": i, "data-kind": kind },
        bars);
        this.hitNodes[kind].push(hit);
        hit.addEventListener("pointerdown", (e) => this.onPointerDown(e, kind, i));
        hit.addEventListener("keydown", (e) => this.onKeyDown(e, kind, i));
        hit.addEventListener("keyup", (e) => this.onKeyUp(e));
        hit.addEventListener("blur", () => this.finishKeyEdit());
        hit.addEventListener("focus", () => { this.focus = { kind, layer: i }; this.text["snap-layer"].textContent =
          `Layer ${i} → preset`; });
      }
    }
    bars.addEventListener("pointermove", (e) => this.onPointerMove(e));
    bars.addEventListener("pointerup", (e) => this.onPointerUp(e));
    bars.addEventListener("pointercancel", () => this.cancelDrag());
    const legend = el("g", {}, bars);
    el("rect", { x: left, y: barsH - 12, width: 10, height: 8, fill: HEAD_COLOR }, legend);
    el("text", { x: left + 14, y: barsH - 4, class: "se-axis" }, legend).textContent = "heads (KV groups)";
    el("rect", { x: left + 130, y: barsH - 12, width: 10, height: 8, fill: FFN_COLOR }, legend);
    el("text", { x: left + 144, y: barsH - 4, class: "se-axis" }, legend).textContent = "FFN channels";
    el("line", { x1: left + 240, x2: left + 262, y1: barsH - 8, y2: barsH - 8, class: "se-ghost", stroke: "#888" },
      legend);
    el("text", { x: left + 266, y: barsH - 4, class: "se-axis" }, legend).textContent = "preset";

    // predicted errors per layer, and the sensitivity map
    if (p.curves) {
      const errH = 120;
      const errs = el("svg", { class: "se-errors", width: W, height: errH + 26, viewBox: `0 0 ${W} ${errH + 26}` });
      this.root.appendChild(errs);
      el("text", { x: left, y: 11, class: "se-title" }, errs).textContent =
        "Predicted relative error per layer (dense inputs)";
      this.errGeom = { top: 18, h: errH - 18 };
      this.errAxis = el("text", { x: left - 6, y: 22, class: "se-axis", "text-anchor": "end" }, errs);
      el("line", { x1: left, x2: W - right, y1: 18 + errH - 18, y2: 18 + errH - 18, class: "se-grid" }, errs);
      this.errNodes = { attn: [], mlp: [] };
      for (let i = 0; i < n; i++) {
        this.errNodes.attn.push(el("rect", { x: this.barX("hr", i), width: barW, fill: HEAD_COLOR, class: "se-err",
          "data-layer": i, "data-kind": "attn" }, errs));
        this.errNodes.mlp.push(el("rect", { x: this.barX("fr", i), width: barW, fill: FFN_COLOR, class: "se-err",
          "data-layer": i, "data-kind": "mlp" }, errs));
      }
      this.buildMap();
    } else {
      this.errNodes = null;
      const none = document.createElement("div");
      none.className = "se-hint";
      none.textContent = "No error curves yet: compute them to see the predicted errors and the sensitivity map here.";
      this.root.appendChild(none);
    }
    this.update();
  }

  barX(kind, i) {
    const g = this.geom;
    return g.left + g.slot * i + g.slot * 0.1 + (kind === "fr" ? g.barW + g.slot * 0.08 : 0);
  }

  buildMap() {
    const p = this.payload;
    const n = p.layers.length;
    const W = this.width;
    const left = this.geom.left, gap = 40;
    const mapW = (W - left - this.geom.right - gap) / 2;
    const rowH = Math.max(5, Math.min(24, 260 / n));
    const top = 18, H = top + rowH * n + 34;
    const svg = el("svg", { class: "se-map", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
    this.root.appendChild(svg);
    const ratios = this.map.ratios;
    const colW = mapW / ratios.length;
    const all = [...this.map.heads.flat(), ...this.map.ffn.flat()].filter((v) => v > 0);
    const lo = Math.log10(Math.min(...all, 1)), hi = Math.log10(Math.max(...all, 1e-12));
    const shade = (v) => rampColor(v > 0 && hi > lo ? (Math.log10(v) - lo) / (hi - lo) : 0);
    this.mapPaths = {};
    this.mapGeom = { top, rowH, colW };
    [["hr", "heads", this.map.heads, left], ["fr", "mlp", this.map.ffn, left + mapW + gap]].forEach(
      ([kind, name, values, x0]) => {
        el("text", { x: x0, y: 11, class: "se-title" }, svg).textContent =
          `Sensitivity: ${kind === "hr" ? "attention" : "MLP"} error by layer × ratio; line: this schedule`;
        const cells = el("g", { class: "se-cells" }, svg);
        for (let i = 0; i < n; i++) {
          for (let j = 0; j < ratios.length; j++) {
            const cell = el("rect", { x: x0 + j * colW, y: top + i * rowH, width: colW + 0.3, height: rowH + 0.3,
              fill: shade(values[i][j]) }, cells);
            const title = el("title", {}, cell);
            title.textContent = `layer ${i}, ratio ${ratios[j]}: ${formatError(values[i][j])}`;
          }
        }
        for (const r of [0, 0.3, 0.6, 0.9]) {
          el("text", { x: x0 + (r / 0.05 + 0.5) * colW, y: top + rowH * n + 12, class: "se-axis",
            "text-anchor": "middle" }, svg).textContent = r.toFixed(1);
        }
        el("text", { x: x0 - 4, y: top + 8, class: "se-axis", "text-anchor": "end" }, svg).textContent = "0";
        el("text", { x: x0 - 4, y: top + rowH * n, class: "se-axis", "text-anchor": "end" }, svg).textContent =
          String(n - 1);
        this.mapPaths[kind] = el("polyline", { class: "se-path", "data-kind": kind }, svg);
        this.mapPaths[kind]._x0 = x0;
      });
  }

  // Redraws everything that depends on the schedule; timed by the callers.
  update() {
    const p = this.payload;
    if (!p) return;
    const res = compute(p, this.hr, this.fr);
    this.last = res;
    const g = this.geom;
    const n = p.layers.length;
    for (let i = 0; i < n; i++) {
      for (const [kind, removed, units] of [["hr", res.kv_removed[i], p.layers[i].n_kv],
        ["fr", res.ffn_removed[i], p.layers[i].n_ffn]]) {
        const shown = removed / units;
        const y = this.yOf(shown);
        const bar = this.barNodes[kind][i];
        bar.setAttribute("y", y);
        bar.setAttribute("height", g.barsTop + g.barsH - y);
        const hit = this.hitNodes[kind][i];
        const ratio = kind === "hr" ? this.hr[i] : this.fr[i];
        hit.setAttribute("data-ratio", ratio);
        hit.setAttribute("data-units", removed);
        hit.setAttribute("aria-valuenow", shown.toFixed(4));
        const what = kind === "hr" ? "KV groups" : "channels";
        hit.setAttribute("aria-valuetext", `${removed} of ${units} ${what} removed`);
      }
    }
    const t = this.text;
    const cut = formatParams(res.params_before - res.params_after);
    t.params.textContent = `${formatParams(res.params_after)} (−${cut})`;
    t["layer-ratio"].textContent = percent(res.achieved_layer_ratio);
    t["model-ratio"].textContent = percent(res.achieved_ratio);
    t["err-attn"].textContent = formatError(res.total_attn);
    t["err-mlp"].textContent = formatError(res.total_mlp);
    if (this.errNodes) {
      const top = Math.max(...res.attn, ...res.mlp);
      const scale = niceMax(top);
      this.errAxis.textContent = scale.toPrecision(2);
      const base = this.errGeom.top + this.errGeom.h;
      for (let i = 0; i < n; i++) {
        for (const kind of ["attn", "mlp"]) {
          const v = res[kind][i];
          const h = this.errGeom.h * v / scale;
          const node = this.errNodes[kind][i];
          node.setAttribute("y", base - h);
          node.setAttribute("height", h);
          node.setAttribute("data-value", v);
        }
      }
      const { top: mt, rowH, colW } = this.mapGeom;
      for (const [kind, removed] of [["hr", res.kv_removed], ["fr", res.ffn_removed]]) {
        const path = this.mapPaths[kind];
        const pts = removed.map((k, i) => {
          const r = k / this.nUnits(kind, i);
          return `${(path._x0 + (r / 0.05 + 0.5) * colW).toFixed(2)},${(mt + (i + 0.5) * rowH).toFixed(2)}`;
        });
        path.setAttribute("points", pts.join(" "));
      }
    }
  }

  timed(fn) {
    const t0 = performance.now();
    fn();
    const t1 = performance.now();
    this.timings.update.push(t1 - t0);
    requestAnimationFrame(() => this.timings.frame.push(performance.now() - t0));
  }

  ratioAt(clientY) {
    const box = this.barsSvg.getBoundingClientRect();
    const y = clientY - box.top;
    return MAX_RATIO * (1 - (y - this.geom.barsTop) / this.geom.barsH);
  }

  layerAt(clientX) {
    const box = this.barsSvg.getBoundingClientRect();
    const i = Math.floor((clientX - box.left - this.geom.left) / this.geom.slot);
    return Math.max(0, Math.min(this.payload.layers.length - 1, i));
  }

  onPointerDown(e, kind, i) {
    if (e.button !== 0) return;
    e.preventDefault();
    this.finishKeyEdit();
    this.hitNodes[kind][i].focus();
    this.barsSvg.setPointerCapture(e.pointerId);
    this.drag = { kind, anchor: i, range: e.shiftKey, start: [...this[kind]], pointerId: e.pointerId };
    this.timed(() => this.dragTo(e));
  }

  onPointerMove(e) {
    if (!this.drag || e.pointerId !== this.drag.pointerId) return;
    this.timed(() => this.dragTo(e));
  }

  dragTo(e) {
    const d = this.drag;
    const values = this[d.kind];
    const raw = this.ratioAt(e.clientY);
    const to = d.range ? this.layerAt(e.clientX) : d.anchor;
    const lo = Math.min(d.anchor, to), hi = Math.max(d.anchor, to);
    for (let i = 0; i < values.length; i++) {
      values[i] = i >= lo && i <= hi ? snapRatio(this.nUnits(d.kind, i), raw, this.unitAlign(d.kind, i)) : d.start[i];
    }
    this.update();
  }

  onPointerUp(e) {
    if (!this.drag || e.pointerId !== this.drag.pointerId) return;
    const d = this.drag;
    this.drag = null;
    this.send({ [d.kind]: this.changes(d.kind, d.start) });
    this.applyPending();
  }

  cancelDrag() {
    if (!this.drag) return;
    this[this.drag.kind] = [...this.drag.start];
    this.drag = null;
    this.update();
    this.applyPending();
  }

  changes(kind, before) {
    const out = [];
    this[kind].forEach((v, i) => { if (v !== before[i]) out.push([i, v]); });
    return out;
  }

  // One message per finished edit: {hr: [[layer, ratio], …], fr: […], seq}, with the changes of every edit the
  // server has not acknowledged yet; nothing when nothing changed.
  send(edit) {
    const entry = { hr: edit.hr || [], fr: edit.fr || [] };
    if (!entry.hr.length && !entry.fr.length) return;
    this.seq += 1;
    entry.seq = this.seq;
    this.unacked.push(entry);
    const merged = { hr: new Map(), fr: new Map() };
    for (const e of this.unacked) for (const kind of ["hr", "fr"]) for (const [i, v] of e[kind]) merged[kind].set(i, v);
    const message = { hr: [...merged.hr], fr: [...merged.fr], seq: this.seq };
    this.sent.push(message);
    this.sendEdit(message);
  }

  onKeyDown(e, kind, i) {
    const n = this.nUnits(kind, i);
    const a = this.unitAlign(kind, i);
    const values = this[kind];
    const k = removedUnits(n, values[i], a);
    const step = a * (e.shiftKey ? 1 : Math.max(1, Math.round(0.01 * n / a)));
    const page = a * Math.max(1, Math.round(0.1 * n / a));
    let target = null;
    switch (e.key) {
      case "ArrowUp": target = k + step; break;
      case "ArrowDown": target = k - step; break;
      case "PageUp": target = k + page; break;
      case "PageDown": target = k - page; break;
      case "Home": target = 0; break;
      case "End": target = maxUnits(n, a); break;
      case "ArrowLeft": case "ArrowRight": {
        e.preventDefault();
        const j = i + (e.key === "ArrowLeft" ? -1 : 1);
        if (j >= 0 && j < values.length) this.hitNodes[kind][j].focus();
        return;
      }
      case "g": case "G":
        e.preventDefault();
        this.snapToPreset(i, kind);
        return;
      default:
        return;
    }
    e.preventDefault();
    if (!this.keyEdit) this.keyEdit = { kind, start: [...values] };
    else if (this.keyEdit.kind !== kind) { this.finishKeyEdit(); this.keyEdit = { kind, start: [...values] }; }
    const clamped = Math.max(0, Math.min(maxUnits(n, a), target));
    this.timed(() => {
      values[i] = snapRatio(n, clamped / n, a);
      this.update();
    });
  }

  onKeyUp(e) {
    if (["ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"].includes(e.key)) this.finishKeyEdit();
  }

  finishKeyEdit() {
    if (!this.keyEdit) return;
    const { kind, start } = this.keyEdit;
    this.keyEdit = null;
    this.send({ [kind]: this.changes(kind, start) });
    this.applyPending();
  }

  // Bars back to the preset's own ratios: one bar (layer and kind), a layer's two bars (kind null), or all.
  snapToPreset(layer, kind = null) {
    this.finishKeyEdit();
    const before = { hr: [...this.hr], fr: [...this.fr] };
    for (const kd of kind ? [kind] : ["hr", "fr"]) {
      this[kd].forEach((_, i) => { if (layer === null || i === layer) this[kd][i] = this.payload.preset[kd][i]; });
    }
    this.timed(() => this.update());
    this.send({ hr: this.changes("hr", before.hr), fr: this.changes("fr", before.fr) });
  }

  destroy() {
    this.resizeObserver.disconnect();
  }
}

// --- the Streamlit component ---------------------------------------------------------------------------

const instances = new Map(); // Streamlit calls the default export again with each new `data`

// for tests and the curious: the pure functions, and the first editor on the page (its timings and sent edits)
const api = { compute, sensitivityMap, unitsToRemove, removedUnits, alignedWidth, roundHalfEven, interp, snapRatio,
  maxUnits, expandCounts,
  median, instances, editor: () => instances.values().next().value };
window.slimgptEditor = api;

export default function (component) {
  const { data, parentElement, setTriggerValue, key } = component;
  const root = parentElement.querySelector(".slimgpt-editor");
  let editor = instances.get(key);
  if (!editor || editor.root !== root) {
    if (editor) editor.destroy();
    editor = new Editor(root);
    instances.set(key, editor);
  }
  editor.setData(data, (edit) => setTriggerValue("edit", edit));
  return () => {
    editor.destroy();
    if (instances.get(key) === editor) instances.delete(key);
  };
}
