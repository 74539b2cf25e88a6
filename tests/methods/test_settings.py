"""A prune's settings: the method's own (the surgeon's) beside the prune's, one flat record in a run's report.json,
and the records of runs written before the surgeon's fields moved out of PruneSettings still load."""
import json

import pytest

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.methods import registry
from slimgpt_core.methods.prune_settings import validate_settings
from slimgpt_core.methods.settings import PruneSettings, SurgeonSettings

# report.json's `settings` of a surgeon run written when PruneSettings inherited the surgeon's fields (asdict of the
# flat class, then what the services add: calibration, dtype, the surgeon's factor placement)
OLD_SURGEON_RECORD = {
    "shots": 4, "surgeon_units": "heads", "fisher": "true", "surgeon_update": "both", "kfac_positions": 16,
    "surgeon_lora_steps": 2, "ratio": 0.3, "schedule": "log", "shape": 4.0, "head_ratio": None, "ffn_ratio": None,
    "head_ratios": None, "ffn_ratios": None, "keep_heads": None, "keep_ffn": None, "damp": 0.05,
    "head_error": "exact", "ffn_group_floor": 64, "ffn_group_ceiling": 1024, "sequential": True, "batch_size": 4,
    "device": "cpu", "method": "surgeon", "compensate": True, "offload_activations": "auto", "tf32": False,
    "track_accumulation": True, "align": None, "calib": "tinystories", "nsamples": 16, "seqlen": 128, "seed": 0,
    "dtype": "torch.float32", "heldout_samples": 2, "factor_device": "cpu", "factor_gib": 0.001}
EXPECTED = PruneSettings(ratio=0.3, damp=0.05, batch_size=4, device="cpu", method="surgeon",
                         surgeon=SurgeonSettings(shots=4, fisher="true", surgeon_update="both", kfac_positions=16,
                                                 surgeon_lora_steps=2))


def test_an_old_flat_record_loads_with_the_surgeon_s_fields_in_their_own_settings():
    assert PruneSettings.from_record(OLD_SURGEON_RECORD) == EXPECTED


def test_an_old_report_json_on_disk_gives_the_same_settings(tmp_path):
    """The studio's twin reads a run's settings back from its report.json: an old run's file, as saved then."""
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"model": "stories260k", "settings": OLD_SURGEON_RECORD, "head_ratios": [0.1],
                                "ffn_ratios": [0.2], "params_before": 100, "params_after": 80,
                                "layer_params_before": 60, "layer_params_after": 40}))
    assert PruneSettings.from_record(RunReport.load(path).settings) == EXPECTED


def test_the_record_stays_flat_with_the_keys_runs_always_had():
    record = EXPECTED.record()
    old_keys = set(OLD_SURGEON_RECORD) - {"calib", "nsamples", "seqlen", "seed", "dtype", "heldout_samples",
                                          "factor_device", "factor_gib"}
    assert set(record) == old_keys
    assert {k: record[k] for k in old_keys} == {k: OLD_SURGEON_RECORD[k] for k in old_keys}
    assert PruneSettings.from_record(record) == EXPECTED


def test_a_record_missing_newer_keys_keeps_their_defaults():
    old = {"ratio": 0.5, "schedule": "linear", "method": "slimgpt"}  # a run from before shots and align existed
    assert PruneSettings.from_record(old) == PruneSettings(ratio=0.5, schedule="linear")


def test_updated_routes_the_method_s_own_fields_to_its_settings():
    base = PruneSettings(device="cpu", surgeon=SurgeonSettings(kfac_positions=8))
    got = base.updated(ratio=0.4, method="surgeon", shots=4, surgeon_update="columns")
    assert got == PruneSettings(ratio=0.4, device="cpu", method="surgeon",
                                surgeon=SurgeonSettings(shots=4, surgeon_update="columns", kfac_positions=8))
    assert base == PruneSettings(device="cpu", surgeon=SurgeonSettings(kfac_positions=8))  # a copy
    with pytest.raises(TypeError):
        base.updated(shot=4)


@pytest.mark.parametrize("own, message", [
    (SurgeonSettings(shots=0), "shots must be >= 1, got 0"),
    (SurgeonSettings(fisher="exact"), "fisher must be empirical or true, got 'exact'"),
    (SurgeonSettings(surgeon_units="cols"), "surgeon units must be heads or rows, got 'cols'"),
    (SurgeonSettings(surgeon_update="rows"), "surgeon update must be dead-rows, both or columns, got 'rows'"),
    (SurgeonSettings(kfac_positions=0), "KFAC positions per sequence must be >= 1, got 0"),
    (SurgeonSettings(surgeon_lora_steps=-1), "LoRA steps between shots must be >= 0, got -1"),
])
def test_the_surgeon_s_settings_are_checked_with_the_prune_s(own, message):
    with pytest.raises(SlimGPTError, match=message):
        validate_settings(PruneSettings(method="obs-multishot", surgeon=own))


def test_the_registry_pairs_the_surgeon_s_methods_with_the_settings_prune_settings_holds():
    own = {name: m.settings for name, m in registry.METHODS.items() if m.kind == "prune"}
    assert {n for n, cls in own.items() if cls is SurgeonSettings} == {"surgeon", "kobd", "obs-multishot"}
    assert {n for n, cls in own.items() if cls is None} == {"slimgpt", "magnitude", "wanda-sp", "minitron"}
    held = {f.type for f in PruneSettings.__dataclass_fields__.values()}
    assert "SurgeonSettings" in held  # one field holds it (annotations are strings here)
