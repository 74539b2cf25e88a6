"""Typed events the pipeline emits while it runs (the app draws them live) and the report they make up."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Union


@dataclass
class Progress:
    layer: int
    n_layers: int
    phase: str  # capture | dense | attn-stats | attn-prune | mlp-stats | mlp-prune | outputs | done
    elapsed_s: float
    kind: str = "progress"


@dataclass
class ModuleMeasured:
    """One compensated module of one layer (attn: o_proj, mlp: down_proj)."""
    layer: int
    module: str  # "attn" | "mlp"
    units_total: int
    units_removed: int
    ratio_requested: float
    rel_error: float  # ‖WX−ŴX‖²/‖WX‖² on the calibration inputs
    predicted_rel_error: float  # Σ OBS errors / ‖WX‖² (damped H: slightly differs)
    damping: float
    seconds: float
    kind: str = "module"


@dataclass
class HeadImportance:
    """Error of removing each head (or KV group under GQA) alone at the first greedy step."""
    layer: int
    scores: list[float]
    removed: list[int]  # in removal order
    heads_per_unit: int  # 1 for MHA, query heads per KV group under GQA
    kind: str = "heads"


@dataclass
class FFNScores:
    """Summary of the first-step OBS scores of the FFN channels of one layer."""
    layer: int
    n_channels: int
    n_removed: int
    quantiles: dict[str, float]
    histogram_counts: list[int]
    histogram_edges: list[float]  # log10 of the score
    group_steps: list[int]
    kind: str = "ffn"


@dataclass
class LayerDone:
    layer: int
    heads: int
    kv_heads: int
    ffn: int
    accumulated_error: float  # ‖h_pruned − h_dense‖/‖h_dense‖ after this layer, same inputs
    seconds: float
    peak_memory_mb: float
    kind: str = "layer"


@dataclass
class ShotDone:
    """One shot of a multi-shot method (LLM Surgeon, K-OBD); shot 0 is the dense model."""
    shot: int
    n_shots: int
    target_fraction: float  # t·α/T of the decoder-layer parameters
    removed_fraction: float  # achieved: removed (heads units) or zeroed (rows units) decoder-layer parameters
    heldout_loss: float  # mean next-token cross-entropy on the held-out calibration slice (nats)
    heldout_ppl: float
    keep_heads: list[int]  # the allocation so far: query heads kept per layer
    keep_ffn: list[int]  # FFN channels kept per layer
    seconds: float
    eta_s: float
    peak_memory_mb: float
    kind: str = "shot"


Event = Union[Progress, ModuleMeasured, HeadImportance, FFNScores, LayerDone, ShotDone]
Callback = Callable[[Event], None]


class AchievedRatios:
    """Parameter ratios removed, from params_before/after and layer_params_before/after fields."""

    @property
    def achieved_layer_ratio(self) -> float:
        return 1 - self.layer_params_after / self.layer_params_before

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before


@dataclass
class RunReport(AchievedRatios):
    """The record of a run (report.json): what was asked, what each layer lost, the parameters before and after.
    Pruning, shearing, recovery and continued pre-training each write one."""

    model: str
    settings: dict
    head_ratios: list[float]
    ffn_ratios: list[float]
    params_before: int
    params_after: int
    layer_params_before: int
    layer_params_after: int
    modules: list[ModuleMeasured] = field(default_factory=list)
    heads: list[HeadImportance] = field(default_factory=list)
    ffn: list[FFNScores] = field(default_factory=list)
    layers: list[LayerDone] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    device: str = "cpu"
    evaluation: dict = field(default_factory=dict)
    reused_statistics: int = 0  # Hessians read from cache/stats instead of recomputed
    recovery: dict | None = None  # LoRA recovery fine-tune of this run (recover.RecoverResult.record)
    pretrain: dict | None = None  # continued pre-training of this run (training.pretrain.PretrainResult.record)
    shots: list[ShotDone] = field(default_factory=list)  # multi-shot methods: the quality-vs-size curve

    @property
    def requested_ratio(self) -> float:
        return sum(self.head_ratios + self.ffn_ratios) / max(1, len(self.head_ratios) + len(self.ffn_ratios))

    def add(self, event: Event) -> None:
        target = {"module": self.modules, "heads": self.heads, "ffn": self.ffn, "layer": self.layers,
                  "shot": self.shots}.get(event.kind)
        if target is not None:
            target.append(event)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {"requested_ratio": self.requested_ratio, "achieved_layer_ratio": self.achieved_layer_ratio,
                        "achieved_ratio": self.achieved_ratio}
        return d

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=float))

    @classmethod
    def load(cls, path: Path) -> "RunReport":
        d = json.loads(Path(path).read_text())
        d.pop("summary", None)
        report = cls(**{k: v for k, v in d.items() if k not in ("modules", "heads", "ffn", "layers", "shots")})
        for key, typ in (("modules", ModuleMeasured), ("heads", HeadImportance), ("ffn", FFNScores),
                         ("layers", LayerDone), ("shots", ShotDone)):
            setattr(report, key, [typ(**e) for e in d.get(key, [])])
        return report
