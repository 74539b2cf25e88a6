"""What a prune is asked to do, as plain dataclasses with nothing heavy imported: the command line builds its
options from these fields (flag, help, choices in each field's metadata, base/options.py), so `--help` never loads
torch.

Each method owns its settings: `PruneSettings` holds what every prune needs (the schedule, the OBS details, where it
runs, the method's name), and a method with options of its own reads them from its own settings object inside it
(`settings.surgeon`, a `SurgeonSettings`, for LLM Surgeon, K-OBD and multi-shot OBS; the registry pairs each method
with its class). A run's report.json keeps one flat `settings` record (`record`, `from_record`), the keys readers
have always looked up."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.options import option
from slimgpt_core.schedules.schedule import SCHEDULES, check_ratio

SURGEON_UNITS = ("heads", "rows")
SURGEON_UPDATES = ("dead-rows", "both", "columns")
FISHERS = ("empirical", "true")


@dataclass
class SurgeonSettings:
    """LLM Surgeon / K-OBD (methods/surgeon.py) and layer-wise multi-shot OBS."""
    shots: int = option(3, "--shots", "surgeon, kobd, obs-multishot: shots with linearly rising sparsity", "positive")
    surgeon_units: str = option(
        "heads", "--surgeon-units", "surgeon/kobd units: heads (KV groups + FFN channels: a smaller model) or rows "
        "(every row and column, the paper's units: zeros, the model keeps its size)", choices=SURGEON_UNITS)
    fisher: str = option("empirical", "--fisher", "surgeon/kobd curvature: labels from the data, or sampled from "
                         "the model", choices=FISHERS)
    surgeon_update: str = option(
        "dead-rows", "--surgeon-update", "surgeon, heads units: a KV group/FFN channel goes through its "
        "o_proj/down_proj columns (cost and update) and its q/k/v/gate/up rows are dead (default); both: summed "
        "costs, rows and columns compensated (over-compensates, docs/surgeon.md); columns: summed costs, columns only",
        choices=SURGEON_UPDATES)
    kfac_positions: int | None = option(None, "--kfac-positions", "surgeon/kobd: token positions per sequence "
                                        "feeding the KFAC factors (sub-sample; CPU)", "positive")
    surgeon_lora_steps: int = option(0, "--surgeon-lora-steps", "surgeon/kobd: LoRA steps (rank 8, lr 1e-4) on the "
                                     "calibration data after every shot, merged before the next (off: 0)", "int")

    def validate(self) -> None:
        """One clear sentence for the first bad field."""
        if self.surgeon_units not in SURGEON_UNITS:
            raise SlimGPTError(f"surgeon units must be heads or rows, got {self.surgeon_units!r}")
        if self.fisher not in FISHERS:
            raise SlimGPTError(f"fisher must be empirical or true, got {self.fisher!r}")
        if self.surgeon_update not in SURGEON_UPDATES:
            raise SlimGPTError(f"surgeon update must be dead-rows, both or columns, got {self.surgeon_update!r}")
        if self.shots < 1:
            raise SlimGPTError(f"shots must be >= 1, got {self.shots}")
        if self.kfac_positions is not None and self.kfac_positions < 1:
            raise SlimGPTError(f"KFAC positions per sequence must be >= 1, got {self.kfac_positions}")
        if self.surgeon_lora_steps < 0:
            raise SlimGPTError(f"LoRA steps between shots must be >= 0, got {self.surgeon_lora_steps}")


SURGEON_FIELDS = frozenset(f.name for f in fields(SurgeonSettings))


@dataclass
class PruneSettings:
    """Every prune: the schedule (how much each layer loses), the OBS details, where it runs, the method, and the
    own settings of the methods that have them."""
    ratio: float = option(0.2, "--ratio", "target mean pruning ratio per layer, in [0, 1)", "ratio")
    schedule: str = option("log", "--schedule", "how the ratio grows with depth (log: Incremental Pruning Ratio)",
                           choices=SCHEDULES)
    shape: float = option(4.0, "--shape", "last/first layer ratio for log and linear schedules", "float")
    head_ratio: float | None = option(None, "--head-ratio", "mean ratio for attention heads only (default: --ratio)",
                                      "ratio")
    ffn_ratio: float | None = option(None, "--ffn-ratio", "mean ratio for FFN channels only (default: --ratio)",
                                     "ratio")
    head_ratios: list[float] | None = option(None, "--head-ratios", "custom per-layer head ratios, comma separated",
                                             "floats")
    ffn_ratios: list[float] | None = option(None, "--ffn-ratios", "custom per-layer FFN ratios, comma separated",
                                            "floats")
    keep_heads: list[int] | None = option(None, "--keep-heads", "custom per-layer query heads to keep (overrides "
                                          "ratios)", "ints")
    keep_ffn: list[int] | None = option(None, "--keep-ffn", "custom per-layer FFN channels to keep (overrides "
                                        "ratios)", "ints")
    damp: float = option(0.01, "--damp", "Hessian damping λ (fraction of mean diagonal)", "float")
    head_error: str = option("exact", "--head-error", "exact group OBS error, or the authors' cheaper approximation",
                             choices=("exact", "approx"))
    ffn_group_floor: int = option(64, "--ffn-group-floor", "smallest FFN group (1 with ceiling 1: greedy)",
                                  "positive")
    ffn_group_ceiling: int = option(1024, "--ffn-group-ceiling", "largest FFN group", "positive")
    sequential: bool = option(True, "--dense-inputs", "calibrate every layer on the dense model's inputs (no error "
                              "accumulation)", negate=True)
    batch_size: int = 8  # the command line's --batch-size (shared with eval)
    device: str = "auto"  # the command line's --device
    method: str = option("slimgpt", "--method", "SlimGPT, or a baseline from the seed papers (same pipeline, events "
                         "and export); surgeon: LLM Surgeon (KFAC, global threshold, --shots); kobd: its costs "
                         "without update; obs-multishot: layer-wise OBS in --shots passes; minitron: activation "
                         "importance, no update")  # choices: the method registry's names (methods/registry.py)
    compensate: bool = option(True, "--no-compensation", "ablation: OBS choice without weight update", negate=True)
    offload_activations: str = option("auto", "--offload-activations", "calibration activations in pinned CPU memory "
                                      "(auto: when they do not fit the GPU)", choices=("auto", "never", "always"))
    tf32: bool = option(False, "--tf32", "TF32 for layer forwards on CUDA (statistics stay fp32)")
    track_accumulation: bool = option(True, "--no-accumulation", "skip the reference forward that measures "
                                      "accumulated error (faster)", negate=True)
    align: int | None = option(
        None, "--align", "keep a multiple of N FFN channels in every pruned layer (32: llama.cpp's Q8_0 blocks, 256: "
        "its K-quants; 1: any width); auto (default): 32 where the dense width is a multiple of 32 and at least 512 "
        "wide", "align", metavar="N|auto")  # None: prune_settings.layer_align decides per layer
    surgeon: SurgeonSettings = field(default_factory=SurgeonSettings)  # read by surgeon, kobd and obs-multishot

    def record(self) -> dict:
        """The flat record a run keeps (report.json's `settings`, config.json's `slimgpt`): the method's own fields
        beside the prune's, under the names runs have always used."""
        flat = asdict(self)
        flat.update(flat.pop("surgeon"))
        return flat

    @classmethod
    def from_record(cls, record: dict) -> PruneSettings:
        """The settings a run's flat record describes; keys that are no setting (calibration, dtype, ...) are left
        out and missing ones keep their defaults, so the records of older runs load too."""
        own = {k: v for k, v in record.items() if k in SURGEON_FIELDS}
        prune = {f.name: record[f.name] for f in fields(cls) if f.name in record and f.name != "surgeon"}
        return cls(**prune, surgeon=SurgeonSettings(**own))

    def updated(self, **changes) -> PruneSettings:
        """A copy with `changes`, which may name the prune's fields and the method's own fields alike (as a run's
        record does), e.g. `updated(method="surgeon", shots=4)`."""
        own = {k: changes.pop(k) for k in list(changes) if k in SURGEON_FIELDS}
        return replace(self, **changes, surgeon=replace(self.surgeon, **own))


def validate_settings(settings: PruneSettings, methods: tuple[str, ...]) -> None:
    """One clear sentence for the first bad field; `methods`: the names a prune may use (the registry's)."""
    check_ratio(settings.ratio)
    if settings.offload_activations not in ("auto", "never", "always"):
        raise SlimGPTError(f"offload_activations must be auto, never or always, got {settings.offload_activations!r}")
    for name in ("head_ratio", "ffn_ratio"):
        if getattr(settings, name) is not None:
            check_ratio(getattr(settings, name), name.replace("_", " "))
    if settings.schedule not in SCHEDULES:
        raise SlimGPTError(f"unknown schedule {settings.schedule!r} (choose from {', '.join(SCHEDULES)})")
    if not settings.damp >= 0:
        raise SlimGPTError(f"damping must be >= 0, got {settings.damp}")
    if settings.head_error not in ("exact", "approx"):
        raise SlimGPTError(f"head error must be 'exact' or 'approx', got {settings.head_error!r}")
    if settings.batch_size < 1:
        raise SlimGPTError(f"batch size must be >= 1, got {settings.batch_size}")
    if settings.method not in methods:
        raise SlimGPTError(f"unknown method {settings.method!r} (choose from {', '.join(methods)})")
    if settings.align is not None and settings.align < 1:
        raise SlimGPTError(f"align must be >= 1, got {settings.align}")
    settings.surgeon.validate()
    if settings.ffn_group_floor < 1 or settings.ffn_group_ceiling < settings.ffn_group_floor:
        raise SlimGPTError(f"FFN group sizes need 1 <= floor <= ceiling, got floor={settings.ffn_group_floor}, "
                           f"ceiling={settings.ffn_group_ceiling}")
