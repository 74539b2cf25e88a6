"""Bad input: one clear sentence, non-zero exit, nothing written to --out."""
import pytest

from slimgpt_core.cli import main

FAST = ["--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--quiet"]


def _fails(capsys, argv, message, out=None, code=1):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists()
    return err


def test_unknown_model_path(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", str(tmp_path / "nope"), "--out", str(out), *FAST], "model not found", out)


def test_hub_id_while_offline(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", "someorg/some-model", "--out", str(out), *FAST], "hub", out)


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", str(tmp_path / "gpt2"), "--out", str(out), *FAST],
           "unsupported architecture: gpt2", out)


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "abc"])
def test_ratio_out_of_range(tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "stories260k", "--ratio", ratio, "--out", str(tmp_path / "o"), *FAST])
    assert exc.value.code == 2
    assert "--ratio" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_more_heads_than_exist_and_gqa_mismatch(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", "stories260k", "--keep-heads", "8,8,8,8,16", "--out", str(out), *FAST],
           "layer 4 has 8 query heads: cannot keep 16", out)
    _fails(capsys, ["prune", "--model", "stories260k", "--keep-heads", "8,8,8,8,3", "--out", str(out), *FAST],
           "multiple of 2", out)
    _fails(capsys, ["prune", "--model", "stories260k", "--head-ratios", "0.1,0.2", "--out", str(out), *FAST],
           "2 ratios but the model has 5 layers", out)


def test_empty_and_too_short_calibration_text(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    out = tmp_path / "o"
    base = ["prune", "--model", "stories260k", "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--quiet"]
    _fails(capsys, base + ["--calib", str(empty)], "is empty", out)
    _fails(capsys, base + ["--calib", str(short)], "too short", out)
    _fails(capsys, base + ["--calib", str(tmp_path / "missing.txt")], "unknown data source", out)


def test_out_of_memory_says_what_to_lower(tmp_path, capsys):
    out = tmp_path / "o"
    err = _fails(capsys, ["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "200000",
                          "--seqlen", "512", "--out", str(out), "--quiet"], "lower --nsamples", out)
    assert "GiB" in err


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["prune", "--model", "stories260k", "--out", str(out), *FAST], "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_seqlen_beyond_context(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", "stories260k", "--calib", "tinystories", "--nsamples", "2", "--seqlen",
                    "1024", "--out", str(out), "--quiet"], "exceeds the model's context of 512", out)


def test_pickled_weights_are_refused(tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    folder = tmp_path / "bin"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", str(folder), "--out", str(out), *FAST], "no .safetensors weights", out)
