"""The command line's options are built from the settings dataclasses' fields, and the parser loads no torch."""
import subprocess
import sys
from dataclasses import fields

from slimgpt_core.cli.parser import build_parser, settings_from_args
from slimgpt_core.methods import registry
from slimgpt_core.methods.settings import PruneSettings


def _settings(argv):
    args = build_parser().parse_args(["prune", *argv])
    return settings_from_args(PruneSettings, args, batch_size=args.batch_size, device=args.device)


def test_no_flags_give_the_dataclass_defaults():
    assert _settings([]) == PruneSettings()


def test_flags_set_the_fields_they_name():
    got = _settings(["--ratio", "0.3", "--schedule", "linear", "--shape", "2", "--head-ratios", "0.1,0.2",
                     "--keep-ffn", "8,16", "--damp", "0.1", "--head-error", "approx", "--dense-inputs",
                     "--no-compensation", "--no-accumulation", "--tf32", "--method", "kobd", "--shots", "5",
                     "--surgeon-units", "rows", "--fisher", "true", "--surgeon-update", "both",
                     "--kfac-positions", "16", "--surgeon-lora-steps", "2", "--align", "32",
                     "--offload-activations", "never", "--batch-size", "3", "--device", "cpu"])
    assert got == PruneSettings(ratio=0.3, schedule="linear", shape=2.0, head_ratios=[0.1, 0.2], keep_ffn=[8, 16],
                                damp=0.1, head_error="approx", sequential=False, compensate=False,
                                track_accumulation=False, tf32=True, method="kobd", shots=5, surgeon_units="rows",
                                fisher="true", surgeon_update="both", kfac_positions=16, surgeon_lora_steps=2,
                                align=32, offload_activations="never", batch_size=3, device="cpu")


def test_every_field_with_a_flag_is_in_the_help_and_the_methods_are_the_registry_s():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["prune"].format_help().split())
    for f in fields(PruneSettings):
        if "cli" in f.metadata:
            assert f.metadata["cli"]["flag"] in text, f.name
    assert "{" + ",".join(registry.names()) + "}" in text
    assert registry.names() == ("slimgpt", "magnitude", "wanda-sp", "surgeon", "kobd", "obs-multishot", "minitron")


def test_help_and_argument_errors_load_no_torch():
    """`-X importtime` lists every module the interpreter imported: --help must not reach torch or transformers."""
    for argv, code in ((["--help"], 0), (["prune", "--help"], 0), (["prune", "--ratio", "2"], 2)):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "slimgpt_core", *argv], capture_output=True,
                             text=True)
        assert run.returncode == code
        imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line]
        assert "slimgpt_core.cli.parser" in imported
        assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers")], argv
    assert "ratio must be in [0, 1), got 2.0" in run.stderr
