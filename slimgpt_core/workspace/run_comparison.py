"""Runs side by side: what each run kept, what it cost, and what was measured of it, with the noise said.

Two numbers go in one row only when they were measured the same way (same text, windows and tokenizer for a
perplexity; same task, documents and source for an accuracy). Settings that should not change a result but
might (device, batch size, library versions) are not split on; a row where they differ says so. An accuracy
difference smaller than `z` times the combined standard error sqrt(se1² + se2²) is "within noise": with 40
questions per task the standard error of an accuracy is about 0.08, so two models cannot be told apart unless
they differ by some 0.2. An accuracy stored without its standard error (the studio runs lm-eval with
bootstrap_iters=0, which skips it) gets the closed form lm-eval would have reported, computed from the stored
accuracy and document count, and is marked so. No function here reads weights."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.workspace.store import RunInfo, dense_evaluations_folder, read_evaluations

NOISE_Z = 2.0  # about a 95% two-sided interval for a difference of two independent means

# what defines a measurement: records that differ here are different measurements, never one row
IDENTITY = {"perplexity": ("dataset", "seqlen", "windows", "tokens", "tokenizer"),
            "task": ("task", "n", "limit", "source")}
# what should not change a result but might (numerics, library fixes): flagged when it differs within a row
CIRCUMSTANCES = ("device", "batch_size", "versions")


@dataclass
class Side:
    """One model in the comparison: a run of the workspace or the dense model it came from."""
    key: str  # the run's folder name, or "dense:<model>"
    label: str
    model: str  # the base model (its tokenizer defines what a perplexity window is)
    dense: bool
    report: RunReport | None
    evaluations: list[dict]
    parameters: int | None
    size_bytes: int | None  # on disk; None for the dense model (not a run folder)
    method: str = "dense"
    schedule: str = ""
    requested_ratio: float = 0.0
    achieved_ratio: float = 0.0  # of all parameters
    calibration: dict = field(default_factory=dict)  # source, samples, length, seed


def run_side(info: RunInfo) -> Side:
    path = Path(info.path) / "report.json"
    if not path.exists():
        raise SlimGPTError(f"run {info.name!r} has no report.json, so there is no schedule or error to compare "
                           "(a model folder copied into the workspace, not a pruning run)")
    try:
        report = RunReport.load(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SlimGPTError(f"the report of run {info.name!r} is unreadable: {type(exc).__name__}: {exc}") from None
    s = report.settings or {}
    return Side(info.name, info.title, report.model, False, report, list(info.evaluations), report.params_after,
                info.size_bytes, s.get("method", "slimgpt"), s.get("schedule", ""), report.requested_ratio,
                report.achieved_ratio, {k: s.get(k) for k in ("calib", "nsamples", "seqlen", "seed")})


def dense_side(model: str, parameters: int | None = None, root: Path | None = None) -> Side:
    return Side(f"dense:{model}", f"dense · {model}", model, True, None,
                read_evaluations(dense_evaluations_folder(model, root)), parameters, None)


def sides_for(runs: list[RunInfo], include_dense: bool = True, root: Path | None = None) -> list[Side]:
    """The runs as sides, preceded (when asked) by the dense model of each base model among them; the first
    side is the reference the others are measured against."""
    run_sides = [run_side(info) for info in runs]
    dense = []
    if include_dense:
        for model in dict.fromkeys(s.model for s in run_sides):
            before = next(s.report.params_before for s in run_sides if s.model == model)
            dense.append(dense_side(model, before, root))
    return dense + run_sides


# --- which KV groups each run kept, per layer -------------------------------------------------------------

@dataclass
class KVGroupGrid:
    """Layers × KV groups (query-head groups under GQA): which of the compared runs kept each group (the dense
    model keeps them all)."""
    labels: list[str]
    units: list[int]  # KV groups per layer in the dense model
    kept: dict[str, list[list[int]]]  # label -> per layer, the indices of the groups kept
    left_out: dict[str, str] = field(default_factory=dict)  # label -> why it is not in the grid

    def kept_by(self, layer: int, unit: int) -> list[str]:
        return [label for label in self.labels if unit in self.kept[label][layer]]

    def differs(self, layer: int, unit: int) -> bool:
        return 0 < len(self.kept_by(layer, unit)) < len(self.labels)

    @property
    def n_differing(self) -> int:
        return sum(self.differs(i, u) for i, n in enumerate(self.units) for u in range(n))


def kv_group_grid(sides: list[Side]) -> KVGroupGrid:
    """From the reports' head events: kept = all groups of the layer minus `removed`. Sides of another base
    model than the first run's, and multi-shot runs (whose last shot numbers the groups of an already pruned
    layer), are left out with the reason."""
    runs = [s for s in sides if not s.dense]
    left_out: dict[str, str] = {}
    if not runs:
        return KVGroupGrid([], [], {}, {})
    base = runs[0]
    units = [len(h.scores) for h in sorted(base.report.heads, key=lambda h: h.layer)]
    kept: dict[str, list[list[int]]] = {}
    for s in sides:
        if s.model != base.model:
            left_out[s.label] = f"another base model ({s.model}, not {base.model})"
        elif s.dense:
            continue
        elif (s.report.settings or {}).get("method") == "obs-multishot":
            left_out[s.label] = "multi-shot run: its report numbers the groups of an already pruned layer"
        elif not s.report.heads:
            left_out[s.label] = "its report does not record which KV groups were removed"
        else:
            heads = sorted(s.report.heads, key=lambda h: h.layer)
            if [len(h.scores) for h in heads] != units:
                left_out[s.label] = "its layers have other group counts than the first run's"
                continue
            kept[s.label] = [sorted(set(range(n)) - set(h.removed)) for n, h in zip(units, heads)]
    return KVGroupGrid(list(kept), units, kept, left_out)


# --- stored evaluations, grouped by what was measured -----------------------------------------------------

@dataclass
class Value:
    value: float
    stderr: float | None
    record: dict  # the stored measurement, with its provenance
    repeats: int = 1  # records with the same identity (the latest is shown)
    stderr_source: str = "lm-eval"  # lm-eval | computed (from acc and n) | none stored


@dataclass
class Verdict:
    """One side's value against the reference side's, in the same row."""
    difference: float  # side − reference
    combined_stderr: float | None
    within_noise: bool | None  # None: no standard error to judge by
    text: str


@dataclass
class MeasureGroup:
    """One row: one quantity measured the same way on several sides."""
    kind: str  # perplexity | task | mean accuracy
    name: str  # the dataset or task (or "mean of k tasks")
    metric: str  # ppl | acc
    identity: dict  # the provenance every value in the row shares
    values: dict[str, Value]  # side label -> value
    reference: str | None  # the label the verdicts compare against (the first side that has a value)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    differing: dict[str, list] = field(default_factory=dict)  # circumstance -> the distinct values in this row

    @property
    def setting(self) -> str:
        i = self.identity
        if self.kind == "perplexity":
            return f"{i['dataset']} · {i['windows']} windows of {i['seqlen']} tokens · tokenizer of {i['tokenizer']}"
        if self.kind == "task":
            return f"{i['task']} · {i['n']} documents (limit {i['limit']}) · {i['source']}"
        return "; ".join(f"{t}: {n} docs" for t, n in i.get("tasks", {}).items())

    @property
    def flag(self) -> str:
        """What in this row was measured differently (empty when nothing was)."""
        return "; ".join(f"measured with different {k}: " + " vs ".join(map(str, v)) for k, v in self.differing.items())


def _identity(record: dict, side: Side) -> tuple | None:
    kind = record.get("kind")
    if kind not in IDENTITY:
        return None
    full = {**record, "tokenizer": side.model}
    return (kind,) + tuple((k, full.get(k)) for k in IDENTITY[kind])


def accuracy_stderr(acc: float, n: int) -> float:
    """The standard error of a mean of n right/wrong answers: sample stdev / sqrt(n) = sqrt(acc(1−acc)/(n−1)),
    the closed form lm-eval itself reports for `acc` (it skips it when run with bootstrap_iters=0)."""
    return math.sqrt(acc * (1 - acc) / (n - 1))


def _value(record: dict) -> tuple[float, float | None, str]:
    if record["kind"] == "perplexity":
        return float(record["ppl"]), None, "none stored"
    se, acc, n = record.get("acc_stderr"), float(record["acc"]), record.get("n") or 0
    if se is not None:
        return acc, float(se), "lm-eval"
    if n >= 2:  # stored without one: the same closed form, from what was stored
        return acc, accuracy_stderr(acc, n), "computed"
    return acc, None, "none stored"


def verdict(ref: Value, other: Value, metric: str, z: float = NOISE_Z) -> Verdict:
    diff = other.value - ref.value
    if ref.stderr is None or other.stderr is None:
        why = ("comparable: identical windows of the same text; no standard error stored, so how much of the "
               "difference is noise is not known" if metric == "ppl" else "no standard error stored")
        return Verdict(diff, None, None, why)
    se = math.sqrt(ref.stderr ** 2 + other.stderr ** 2)
    inside = abs(diff) < z * se
    text = (f"within noise: |Δ| = {abs(diff):.3f} < {z:g}·σ = {z * se:.3f}" if inside
            else f"beyond noise: |Δ| = {abs(diff):.3f} ≥ {z:g}·σ = {z * se:.3f}")
    return Verdict(diff, se, inside, text)


def _circumstance(record: dict, key: str) -> str:
    v = record.get(key)
    return ", ".join(f"{k} {x}" for k, x in sorted(v.items())) if isinstance(v, dict) else str(v)


def _finish(group: MeasureGroup, z: float) -> MeasureGroup:
    if group.reference is not None:
        ref = group.values[group.reference]
        group.verdicts = {label: verdict(ref, v, group.metric, z) for label, v in group.values.items()
                          if label != group.reference}
    for key in CIRCUMSTANCES:
        seen = list(dict.fromkeys(_circumstance(v.record, key) for v in group.values.values()
                                  if key in v.record))
        if len(seen) > 1:
            group.differing[key] = seen
    return group


def compare_evaluations(sides: list[Side], z: float = NOISE_Z) -> list[MeasureGroup]:
    """One row per distinct measurement (kind + identity), sides as columns. A side measured twice the same
    way shows its latest record. Rows are ordered perplexities first, then tasks by name; a row for the
    mean accuracy follows when some tasks were measured the same way on every side."""
    rows: dict[tuple, MeasureGroup] = {}
    for side in sides:
        for record in sorted(side.evaluations, key=lambda r: r.get("when", 0)):
            ident = _identity(record, side)
            if ident is None:
                continue
            if ident not in rows:
                kind = ident[0]
                rows[ident] = MeasureGroup(kind, record["dataset"] if kind == "perplexity" else record["task"],
                                           "ppl" if kind == "perplexity" else "acc", dict(ident[1:]), {}, None)
            value, se, se_source = _value(record)
            repeats = rows[ident].values[side.label].repeats + 1 if side.label in rows[ident].values else 1
            rows[ident].values[side.label] = Value(value, se, record, repeats, se_source)
    order = [s.label for s in sides]
    groups = []
    for g in sorted(rows.values(), key=lambda g: (g.kind != "perplexity", g.name, str(g.identity))):
        g.values = {label: g.values[label] for label in order if label in g.values}
        g.reference = next(iter(g.values), None)
        groups.append(_finish(g, z))
    mean = mean_accuracy(groups, order, z)
    return groups + ([mean] if mean else [])


def mean_accuracy(groups: list[MeasureGroup], labels: list[str], z: float = NOISE_Z) -> MeasureGroup | None:
    """The mean accuracy over the task rows that every side has (one row per task: if a task was measured in
    two ways on every side, the one with the most documents). Its standard error assumes the tasks are
    independent: sqrt(Σ se²)/k."""
    by_task: dict[str, MeasureGroup] = {}
    for g in groups:
        if g.kind == "task" and set(labels) <= set(g.values):
            if g.name not in by_task or g.identity["n"] > by_task[g.name].identity["n"]:
                by_task[g.name] = g
    if len(by_task) < 2:
        return None
    tasks = sorted(by_task)
    values = {}
    for label in labels:
        vals = [by_task[t].values[label] for t in tasks]
        ses = [v.stderr for v in vals]
        se = None if None in ses else math.sqrt(sum(s * s for s in ses)) / len(vals)
        source = "none stored" if se is None else \
            "computed" if any(v.stderr_source == "computed" for v in vals) else "lm-eval"
        values[label] = Value(sum(v.value for v in vals) / len(vals), se,
                              {"kind": "mean accuracy", "tasks": tasks, **{k: vals[0].record.get(k)
                                                                          for k in CIRCUMSTANCES}}, 1, source)
    identity = {"tasks": {t: by_task[t].identity["n"] for t in tasks}}
    group = MeasureGroup("mean accuracy", f"mean of {len(tasks)} tasks", "acc", identity, values, labels[0])
    group = _finish(group, z)
    for t in tasks:  # the mean inherits what differed in its tasks
        for key, seen in by_task[t].differing.items():
            group.differing.setdefault(key, seen)
    return group


def provenance_rows(sides: list[Side]) -> list[dict]:
    """Every stored measurement of every side, flat, with all its provenance (for a table)."""
    rows = []
    for side in sides:
        for r in side.evaluations:
            row = {"model": side.label, "kind": r.get("kind")}
            row.update({k: v for k, v in r.items() if k not in ("kind", "versions", "points")})
            row["versions"] = _circumstance(r, "versions")
            rows.append(row)
    return rows
