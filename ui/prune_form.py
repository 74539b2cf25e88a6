"""The Prune page's settings: one object that defines a run (calibration, method options, schedule), kept in the
workspace. Every tab, every page switch, a reload and a server restart read the same values, and a job freezes a
copy of them when it starts.

The page hands each widget its value from this object on every run and writes a change back in the widget's
callback, so what the page shows is always what Start would run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.schedules.schedule import balanced_targets, layer_ratios
from slimgpt_core.workspace import store as workspace

STATE_KEY = "prune_form"
CALIBRATION_SOURCES = ("c4", "wikitext2", "tinystories", "file…")
PRESETS = ("log", "linear", "uniform", "auto")
SCHEDULE_FIELDS = ("preset", "target_ratio", "ffn_target", "shape", "separate", "balance")


@dataclass
class PruneForm:
    model: str = ""  # the model the per-layer ratios were made for
    calib: str = "c4"
    calib_path: str = ""
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    damp: float = 0.01
    head_error: str = "exact"
    ffn_floor: int = 64
    ffn_ceiling: int = 1024
    align: str = "auto"  # kept FFN widths a multiple of this: "auto" or a number (llama.cpp's blocks are 32 / 256)
    dense_inputs: bool = False
    preset: str = "log"
    target_ratio: float = 0.2
    ffn_target: float = 0.2
    shape: float = 4.0
    separate: bool = False
    balance: float = 1.0
    hr: list[float] = field(default_factory=list)  # per-layer head ratios: what the run uses
    fr: list[float] = field(default_factory=list)  # per-layer FFN ratios
    origin: str = "preset"  # where hr/fr came from: preset | auto | hand
    custom: dict | None = None  # hand edits a preset replaced, kept to return to: {"hr": [...], "fr": [...]}
    preset_error: str | None = None  # why the preset's ratios could not be made (the schedule is then not runnable)

    @property
    def calibration(self) -> str:
        """The calibration source a run would use: a named set or the file's path."""
        return self.calib_path.strip() if self.calib == "file…" else self.calib

    def describe_calibration(self) -> str:
        return calibration_text({"calib": self.calibration or "(no file)", "nsamples": self.nsamples,
                                 "seqlen": self.seqlen, "seed": self.seed, "sequential": not self.dense_inputs})


PRUNE_FORM_FIELDS = frozenset(f.name for f in fields(PruneForm))


def calibration_text(settings: dict) -> str:
    """Which calibration a run used, from its report's settings."""
    inputs = "sequential inputs" if settings.get("sequential", True) else "dense inputs"
    return (f"{settings.get('calib', '?')}, {settings.get('nsamples', '?')} × {settings.get('seqlen', '?')} tokens, "
            f"seed {settings.get('seed', '?')}, {inputs}")


def _coerce(default, value):
    """A stored value of the field's type, or the default (a hand-edited or older state file must not break)."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else default
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else default
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    if isinstance(default, str):
        return value if isinstance(value, str) else default
    return value


def load_form() -> PruneForm:
    stored = workspace.recall(STATE_KEY) or {}
    form = PruneForm()
    if not isinstance(stored, dict):
        return form
    for f in fields(PruneForm):
        if f.name in stored:
            current = getattr(form, f.name)
            value = stored[f.name]
            if f.name in ("hr", "fr"):
                ok = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
                setattr(form, f.name, [float(v) for v in value] if ok else current)
            elif f.name == "custom":
                ok = isinstance(value, dict) and all(isinstance(value.get(k), list) for k in ("hr", "fr"))
                form.custom = value if ok else None
            elif f.name == "preset_error":
                form.preset_error = value if isinstance(value, str) else None
            elif f.name == "align":  # a number in state files written before "auto"
                form.align = str(value) if str(value) in ALIGN_CHOICES else form.align
            else:
                setattr(form, f.name, _coerce(current, value))
    if form.calib not in CALIBRATION_SOURCES:
        form.calib = "c4"
    if form.preset not in PRESETS:
        form.preset = "log"
    return form


def save_form(form: PruneForm) -> None:
    workspace.remember(STATE_KEY, asdict(form))


def apply_preset(form: PruneForm, n_layers: int, attn_params: int, mlp_params: int) -> None:
    """Fill the per-layer ratios from the preset (auto starts from log until a search ends). Hand edits that this
    replaces are kept in `custom`."""
    try:
        heads, ffn = preset_ratios(form, n_layers, attn_params, mlp_params)
    except SlimGPTError as exc:
        form.preset_error = str(exc)
        return
    if form.origin == "hand" and len(form.hr) == n_layers:
        form.custom = {"hr": list(form.hr), "fr": list(form.fr)}
    form.preset_error = None
    form.hr, form.fr = heads, ffn
    form.origin = "preset"


def preset_ratios(form: PruneForm, n_layers: int, attn_params: int, mlp_params: int) -> tuple[list[float], list[float]]:
    """The preset's per-layer (head, FFN) ratios at the form's target, shape and balance, rounded as the editor
    stores them (auto: log, where its search starts). Raises SlimGPTError when the preset cannot make them."""
    head_t, ffn_t = balanced_targets(form.target_ratio, form.balance, attn_params, mlp_params,
                                     form.ffn_target if form.separate else None)
    kind = "log" if form.preset == "auto" else form.preset
    return ([round(r, 4) for r in layer_ratios(n_layers, head_t, kind, form.shape)],
            [round(r, 4) for r in layer_ratios(n_layers, ffn_t, kind, form.shape)])


def set_schedule(form: PruneForm, head_ratios, ffn_ratios, origin: str = "hand") -> None:
    form.hr, form.fr = [float(r) for r in head_ratios], [float(r) for r in ffn_ratios]
    form.origin = origin
    form.preset_error = None


def restore_custom(form: PruneForm) -> None:
    """Back to the hand edits a preset replaced (the preset's ratios are a click away again through the preset)."""
    if form.custom is not None:
        set_schedule(form, form.custom["hr"], form.custom["fr"], "hand")
        form.custom = None


def copy_schedule_into_editor(head_ratios, ffn_ratios, model: str) -> None:
    """Another page hands the Prune page a schedule (a run's allocation, say): it becomes the hand-edited one."""
    form = load_form()
    if form.origin == "hand" and form.hr and list(form.hr) != list(head_ratios):
        form.custom = {"hr": list(form.hr), "fr": list(form.fr)}
    form.model = model
    set_schedule(form, head_ratios, ffn_ratios, "hand")
    save_form(form)


def problems(form: PruneForm, n_layers: int, context: int | None) -> list[str]:
    """Why these settings cannot run (empty when they can): one sentence each, shown beside a disabled Start."""
    out = []
    if form.calib == "file…" and not form.calib_path.strip():
        out.append("Choose a calibration file (a .txt or .jsonl path).")
    if form.nsamples < 1:
        out.append(f"Samples must be at least 1 (got {form.nsamples}).")
    if form.seqlen < 16:
        out.append(f"Sequence length must be at least 16 tokens (got {form.seqlen}).")
    elif context and form.seqlen > context:
        out.append(f"Sequence length {form.seqlen} is longer than the model's context of {context} tokens.")
    if form.ffn_floor > form.ffn_ceiling:
        out.append(f"The FFN group floor ({form.ffn_floor}) is above the ceiling ({form.ffn_ceiling}).")
    if form.preset_error:
        out.append(f"The schedule cannot be made: {form.preset_error}")
    if len(form.hr) != n_layers or len(form.fr) != n_layers:
        out.append(f"The schedule has {len(form.hr)} layers but the model has {n_layers}.")
    return out


def frozen(form: PruneForm) -> dict:
    """The settings a job was started with, for showing beside it while it runs and after."""
    return asdict(form)


ALIGN_CHOICES = ("auto", "1", "32", "64", "128", "256")


def align_setting(value) -> int | None:
    """The form's alignment as PruneSettings.align takes it: None for auto (runs saved before "auto" hold a number)."""
    return None if value in (None, "auto") else int(value)


def _describe_align(value) -> str:
    align = align_setting(value)
    if align is None:
        return ", FFN widths aligned automatically (32 where the dense width allows)"
    return f", FFN widths multiples of {align}" if align > 1 else ""


def describe_frozen(settings: dict) -> str:
    form = PruneForm(**{k: v for k, v in settings.items() if k in PRUNE_FORM_FIELDS})
    schedule = {"auto": "auto", "hand": "custom"}.get(form.origin, form.preset)
    mean = (sum(form.hr) + sum(form.fr)) / max(1, len(form.hr) + len(form.fr))
    return (f"schedule **{schedule}** (requested mean ratio {mean:.1%}, target {form.target_ratio:.0%}); calibration "
            f"{form.describe_calibration()}; damping {form.damp:g}, head error {form.head_error}, FFN groups "
            f"{form.ffn_floor}–{form.ffn_ceiling}" + _describe_align(form.align))
