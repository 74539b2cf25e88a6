"""The command line's options are built from the settings dataclasses' fields, and the parser loads no torch."""
import subprocess
import sys
from dataclasses import fields

from slimgpt_core.cli.parser import build_parser, prune_settings_from_args, settings_from_args
from slimgpt_core.methods import registry
from slimgpt_core.methods.settings import PruneSettings, SurgeonSettings
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.training.settings import PretrainSettings, RecoverSettings

SHORT_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]  # the command line's default, resolved per model


def _settings(argv):
    return prune_settings_from_args(build_parser().parse_args(["prune", *argv]))


def _training(command, settings_class, argv):
    args = build_parser().parse_args([command, "--model", "m", "--out", "o", *argv])
    given = {"batch_size": args.batch_size} if command == "shear" else {}
    return settings_from_args(settings_class, args, device=args.device, **given)


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
                                track_accumulation=False, tf32=True, method="kobd", align=32,
                                offload_activations="never", batch_size=3, device="cpu",
                                surgeon=SurgeonSettings(shots=5, surgeon_units="rows", fisher="true",
                                                        surgeon_update="both", kfac_positions=16,
                                                        surgeon_lora_steps=2))


def test_recover_without_flags_is_the_dataclass_with_the_short_target_names():
    assert _training("recover", RecoverSettings, []) == RecoverSettings(target_modules=SHORT_TARGETS)


def test_recover_flags_set_the_fields_they_name():
    got = _training("recover", RecoverSettings, [
        "--data", "c4, tinystories", "--steps", "5", "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--lr", "0.001",
        "--warmup", "2", "--schedule", "constant", "--seqlen", "64", "--batch-size", "2", "--grad-accumulation", "3",
        "--target-modules", "q,v_proj", "--heldout", "7", "--eval-every", "0", "--seed", "3", "--ppl", "None",
        "--ppl-seqlen", "32", "--ppl-windows", "5", "--device", "cpu", "--checkpoint-dir", "ck",
        "--checkpoint-every", "2", "--resume", "--activation-checkpointing"])
    assert got == RecoverSettings(data=["c4", "tinystories"], steps=5, rank=4, alpha=8.0, dropout=0.1, lr=0.001,
                                  warmup_steps=2, schedule="constant", seqlen=64, batch_size=2, grad_accumulation=3,
                                  target_modules=["q", "v_proj"], heldout_samples=7, eval_every=0, seed=3,
                                  ppl_source=None, ppl_seqlen=32, ppl_windows=5, device="cpu", checkpoint_folder="ck",
                                  checkpoint_every=2, resume=True, activation_checkpointing=True)


def test_pretrain_without_flags_is_a_static_mix_with_the_short_target_names():
    assert _training("pretrain", PretrainSettings, []) == PretrainSettings(dynamic_mix=False,
                                                                           target_modules=SHORT_TARGETS)


def test_pretrain_flags_set_the_fields_they_name():
    got = _training("pretrain", PretrainSettings, [
        "--data", "wikitext2", "--steps", "9", "--dynamic-mix", "--update-every", "3", "--mix-variant", "code",
        "--lora", "--rank", "2", "--alpha", "4", "--target-modules", "up,down", "--distill-weight", "0.5",
        "--lr", "0.01", "--schedule", "constant", "--seqlen", "32", "--batch-size", "1", "--grad-accumulation", "2",
        "--heldout", "3", "--seed", "5", "--ppl", "none", "--ppl-seqlen", "16", "--ppl-windows", "2",
        "--checkpoint-dir", "ck", "--checkpoint-every", "4", "--resume"])
    assert got == PretrainSettings(data=["wikitext2"], steps=9, dynamic_mix=True, update_every=3, mix_variant="code",
                                   lora=True, rank=2, alpha=4.0, target_modules=["up", "down"], distill_weight=0.5,
                                   lr=0.01, schedule="constant", seqlen=32, batch_size=1, grad_accumulation=2,
                                   heldout=3, seed=5, ppl=[], ppl_seqlen=16, ppl_windows=2, checkpoint_folder="ck",
                                   checkpoint_every=4, resume=True)


def test_shear_flags_set_the_fields_they_name():
    target = ["--target", "{}"]
    assert _training("shear", ShearSettings, target) == ShearSettings()
    assert _training("shear", ShearSettings, [*target, "--steps", "7", "--lr", "0.5", "--mask-lr", "2", "--lambda-lr",
                                              "3", "--freeze-weights", "--seed", "4", "--batch-size", "2"]) == \
        ShearSettings(steps=7, lr=0.5, mask_lr=2.0, lambda_lr=3.0, train_weights=False, seed=4, batch_size=2)


def test_every_field_with_a_flag_is_in_the_help_and_the_methods_are_the_registry_s():
    commands = build_parser()._subparsers._group_actions[0].choices
    for command, classes in (("prune", (PruneSettings, SurgeonSettings)), ("recover", (RecoverSettings,)),
                             ("pretrain", (PretrainSettings,)), ("shear", (ShearSettings,))):
        shown = " ".join(commands[command].format_help().split())
        for f in [f for c in classes for f in fields(c)]:
            if "cli" in f.metadata:
                assert f.metadata["cli"]["flag"] + " " in shown, (command, f.name)
    text = " ".join(commands["prune"].format_help().split())
    assert "{" + ",".join(registry.names()) + "}" in text
    assert registry.names() == ("slimgpt", "magnitude", "wanda-sp", "surgeon", "kobd", "obs-multishot", "minitron")


def test_help_and_argument_errors_load_no_torch():
    """`-X importtime` lists every module the interpreter imported: --help must not reach torch or transformers."""
    for argv, code in ((["--help"], 0), (["prune", "--help"], 0), (["recover", "--help"], 0),
                       (["pretrain", "--help"], 0), (["shear", "--help"], 0), (["prune", "--ratio", "2"], 2)):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "slimgpt_core", *argv], capture_output=True,
                             text=True)
        assert run.returncode == code
        imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line]
        assert "slimgpt_core.cli.parser" in imported
        assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers")], argv
    assert "ratio must be in [0, 1), got 2.0" in run.stderr
