"""Models the engine cannot prune are refused with one sentence naming the supported architectures, before any
weights are read: an unknown architecture, mixture-of-experts FFNs (by config, by GGUF header, by layer structure).
The folders and GGUF files here hold a config or a header only, so a check that came after loading would fail with
another message."""
import json

import gguf
import pytest
from transformers import AutoConfig

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import SUPPORTED_ARCHITECTURES, check_prunable_layers
from slimgpt_core.cli import main
from slimgpt_core.models import GGUF_ARCHITECTURES, load_model
from tests.tiny_models import tiny_model

SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"


def _config_only(folder, model_type, **kwargs):
    folder.mkdir()
    config = AutoConfig.for_model(model_type, **kwargs).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _gguf_header_only(path, arch, experts=0):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    if experts:
        writer.add_expert_count(experts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_supported_list_is_the_one_the_sentences_name():
    assert ", ".join(SUPPORTED_ARCHITECTURES) == SUPPORTED
    assert GGUF_ARCHITECTURES == ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


@pytest.mark.parametrize("model_type,kwargs,message", [
    ("qwen3_moe", dict(num_experts=8), "({}) has mixture-of-experts FFN layers, which the engine cannot prune: "
                                       f"supported are dense decoders ({SUPPORTED})"),
    ("mixtral", dict(num_local_experts=4), "({}) has mixture-of-experts FFN layers, which the engine cannot prune: "
                                           f"supported are dense decoders ({SUPPORTED})"),
    ("gpt2", {}, "unsupported architecture: {} in "),
])
def test_a_config_the_engine_cannot_prune(tmp_path, model_type, kwargs, message):
    folder = _config_only(tmp_path / model_type, model_type, **kwargs)
    with pytest.raises(SlimGPTError) as err:
        load_model(str(folder))
    text = str(err.value)
    assert message.format(model_type) in text and text.endswith(f"{SUPPORTED})") and "\n" not in text


def test_the_cli_says_so_and_writes_nothing(tmp_path, capsys):
    folder = _config_only(tmp_path / "moe", "qwen3_moe", num_experts=8)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--calib", "tinystories", "--nsamples", "2", "--seqlen", "16",
                 "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "mixture-of-experts FFN layers, which the engine cannot prune" in err and SUPPORTED in err
    assert not out.exists()


@pytest.mark.parametrize("arch,experts,message", [
    ("qwen3moe", 0, "x.gguf (qwen3moe) has mixture-of-experts FFN layers"),
    ("llama", 8, "x.gguf (llama) has mixture-of-experts FFN layers"),  # Mixtral is llama with experts in GGUF
    ("gpt2", 0, "unsupported architecture: gpt2 in x.gguf (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3, "
                "phi3)"),
])
def test_a_gguf_header_the_engine_cannot_prune(tmp_path, monkeypatch, arch, experts, message):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    path = _gguf_header_only(tmp_path / "x.gguf", arch, experts)
    with pytest.raises(SlimGPTError) as err:
        load_model(str(path))
    assert message in str(err.value)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())



@pytest.mark.parametrize("damage", ["not a gguf", "truncated header"])
def test_a_gguf_file_that_cannot_be_read_is_one_sentence(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "x.gguf"
    if damage == "not a gguf":
        path.write_bytes(b"PK\x03\x04" + bytes(200))
    else:
        whole = _gguf_header_only(tmp_path / "whole.gguf", "llama").read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    library_reader = gguf.GGUFReader
    with pytest.raises(SlimGPTError) as err:
        load_model(str(path))
    text = str(err.value)
    assert text.startswith(f"cannot read GGUF file {path}: ") and "\n" not in text
    assert gguf.GGUFReader is library_reader
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())

def test_expert_layers_in_a_supported_model_are_refused():
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    model = tiny_model("qwen3")
    check_prunable_layers(model, "tiny")  # dense: fine
    model.model.layers[1].mlp = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=8,
                                                                      num_experts=4, num_experts_per_tok=2))
    with pytest.raises(SlimGPTError, match=r"^layer 1 of tiny is not an attention block and a dense FFN \(experts\?\), "
                                           rf"which the engine cannot prune \(supported: {SUPPORTED}\)$"):
        check_prunable_layers(model, "tiny")
