"""GGUF files for llama.cpp (SPEC §11): what Ollama, LM Studio and llamafile run.

Layers of one shape are written in the source architecture's own layout (llama, qwen2; mistral as llama). Layers
of different shapes are written as llama.cpp's `deci` architecture, whose head counts and FFN widths are per-layer
arrays. f32/f16/bf16/q8_0 are written by the `gguf` package; llama.cpp's own quantizations (Q4_K_M, ...) go through
its quantize routine (llama-cpp-python) from an f32 file. The file is written under a hidden temporary name and
renamed into place: an interrupted or failed export leaves nothing behind.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import torch

from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import Progress, RunReport
from slimgpt_core.base.shapes import base_model_type, context_length, head_dim as config_head_dim
from slimgpt_core.evaluation.llamacpp import import_llama_cpp, speed_table
from slimgpt_core.models import _resolve_alias, load_config, load_model
from slimgpt_core.workspace.exports import _card_inputs, default_export_folder

# written directly by the gguf package: name -> (type of 2-D weights, llama.cpp's general.file_type)
DIRECT_TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
                "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
                "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
                "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# made by llama.cpp's quantize routine from an f32 file: name -> llama_ftype
LLAMACPP_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                  "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                  "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K, "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M,
                  "q4_k_s": gguf.LlamaFileType.MOSTLY_Q4_K_S, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
                  "q5_k_s": gguf.LlamaFileType.MOSTLY_Q5_K_S, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
                  "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
WEIGHT_TYPES = tuple(DIRECT_TYPES) + tuple(LLAMACPP_TYPES)
# base model type -> GGUF architecture for layers of one shape, and whether q/k rows need llama.cpp's rope order
UNIFORM_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTES_QK = {"llama": True, "qwen2": False, "deci": True}  # qwen2 runs NEOX rope: Hugging Face's own row order
MIXED_ARCH = "deci"


@dataclass
class GGUFExport:
    path: Path
    architecture: str  # the GGUF architecture written (llama, qwen2 or deci)
    weight_type: str
    bytes: int
    tokenizer_source: str  # "source GGUF <path>" or "Hugging Face tokenizer (<kind>)"
    fallback_tensors: list[str]  # 2-D weights kept in a wider type because their rows do not fit the blocks
    instructions: str = ""  # how to run the file (Markdown)


def normalise_weight_type(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in WEIGHT_TYPES:
        raise SlimGPTError(f"unknown GGUF weight type {name!r} (one of: {', '.join(WEIGHT_TYPES)})")
    return key


def layer_shapes(model) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, FFN width) per layer as the weights say; 0 where a layer's attention or FFN is gone."""
    hd = config_head_dim(model.config)
    return [(layer.self_attn.q_proj.out_features // hd, layer.self_attn.k_proj.out_features // hd,
             layer.mlp.down_proj.in_features) for layer in model.model.layers]


def gguf_architecture(model) -> str:
    base = base_model_type(model.config)
    if base not in UNIFORM_ARCH:
        raise SlimGPTError(f"the GGUF writer does not support the {base} architecture "
                           f"(supported: {', '.join(UNIFORM_ARCH)})")
    shapes = layer_shapes(model)
    uniform = len(set(shapes)) == 1 and all(shapes[0])
    return UNIFORM_ARCH[base] if uniform else MIXED_ARCH


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind not in (None, "default"):
        raise SlimGPTError(f"the GGUF writer does not write {kind} rope scaling yet (only plain rope)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise SlimGPTError("the model's config gives no rope theta")
    return float(theta)


def rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows -> llama.cpp's interleaved rope rows, head by head (works for biases too)."""
    if n_heads == 0:
        return weight
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensors(model, arch: str):
    """(GGUF name, float32 array) in file order."""
    m = model.model
    permute = PERMUTES_QK[arch]
    yield "token_embd.weight", m.embed_tokens.weight
    for i, (layer, (n_q, n_kv, n_ff)) in enumerate(zip(m.layers, layer_shapes(model))):
        attn, mlp = layer.self_attn, layer.mlp
        if n_q:
            yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
            for name, proj, heads in (("attn_q", attn.q_proj, n_q), ("attn_k", attn.k_proj, n_kv),
                                      ("attn_v", attn.v_proj, None)):
                rows = (lambda w, h=heads: rope_rows(w, h)) if permute and heads else (lambda w: w)
                yield f"blk.{i}.{name}.weight", rows(proj.weight)
                if proj.bias is not None:
                    yield f"blk.{i}.{name}.bias", rows(proj.bias)
            yield f"blk.{i}.attn_output.weight", attn.o_proj.weight
            if attn.o_proj.bias is not None:
                yield f"blk.{i}.attn_output.bias", attn.o_proj.bias
        if n_ff or n_q:
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            if not n_ff:
                # deci skips the rest of a layer without FFN, attention's residual add included: one channel of
                # zeros instead keeps the attention (silu(0)·0 = 0 adds nothing)
                gate, up = gate.new_zeros(1, gate.shape[1]), up.new_zeros(1, up.shape[1])
                down = down.new_zeros(down.shape[0], 1)
            yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
            yield f"blk.{i}.ffn_gate.weight", gate
            yield f"blk.{i}.ffn_up.weight", up
            yield f"blk.{i}.ffn_down.weight", down
    yield "output_norm.weight", m.norm.weight
    if not getattr(model.config, "tie_word_embeddings", False):
        yield "output.weight", model.lm_head.weight


def _metadata(writer: gguf.GGUFWriter, model, arch: str) -> None:
    config = model.config
    shapes = layer_shapes(model)
    hd = config_head_dim(config)
    q, kv, ff = ([s[k] for s in shapes] for k in range(3))
    ff = [f if f or not h else 1 for h, f in zip(q, ff)]  # the zero channel written for FFN-less layers
    per_layer = (lambda v: v) if arch == MIXED_ARCH else (lambda v: v[0])
    writer.add_context_length(int(context_length(config) or 2048))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(shapes))
    writer.add_feed_forward_length(per_layer(ff))
    writer.add_head_count(per_layer(q))
    writer.add_head_count_kv(per_layer(kv))
    # explicit: llama.cpp's default (embedding / heads of layer 0) is wrong once heads were removed
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def _provenance(writer: gguf.GGUFWriter, source: str, report: RunReport | None, evaluation: dict,
                layer_lists: dict) -> None:
    """What the file is: source model, method, schedule, achieved ratio, measured perplexity."""
    settings = dict(report.settings) if report is not None else {}
    source_model = (report.model if report is not None else "") or settings.get("source_model") or source
    writer.add_string("slimgpt.source_model", str(source_model))
    writer.add_string("slimgpt.method", str(settings.get("method", "slimgpt" if report is not None else "none")))
    if settings.get("schedule"):
        writer.add_string("slimgpt.schedule", str(settings["schedule"]))
    if report is not None:
        writer.add_float32("slimgpt.achieved_layer_ratio", float(report.achieved_layer_ratio))
        writer.add_float32("slimgpt.achieved_ratio", float(report.achieved_ratio))
        writer.add_string("slimgpt.settings", json.dumps({k: v for k, v in settings.items()
                                                          if k not in ("head_ratios", "ffn_ratios")}, default=str))
    for key, value in evaluation.items():
        if isinstance(value, dict) and "ppl" in value:
            writer.add_float32(f"slimgpt.{key}.ppl", float(value["ppl"]))
            writer.add_string(f"slimgpt.{key}.protocol",
                              f"{value.get('dataset', '')}, {value.get('seqlen', '')} tokens, "
                              f"{value.get('windows', '')} windows")
    for key, values in layer_lists.items():
        writer.add_array(f"slimgpt.{key}", [int(v) for v in values])
    writer.add_name(f"{Path(str(source_model)).name} pruned ({settings.get('method', 'slimgpt')})"
                    if report is not None else Path(str(source)).name)


# ---------------------------------------------------------------- tokenizer

def source_gguf_of(name: str) -> Path | None:
    """The GGUF a model came from, when it did (an alias such as `default`, or a path to a .gguf)."""
    if not name:
        return None
    try:
        path = Path(_resolve_alias(str(name))).expanduser()
    except SlimGPTError:
        return None
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        path = found[0] if len(found) == 1 and not (path / "config.json").exists() else path
    return path if path.suffix == ".gguf" and path.is_file() else None


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _hf_tokenizer(writer: gguf.GGUFWriter, folders: list[Path], n_vocab: int) -> str:
    """The tokenizer from Hugging Face files through the gguf package's vocabulary helpers. A SentencePiece
    `tokenizer.model` (in the model's folder or the one it was pruned from) wins: llama.cpp then splits text with
    the model's own scores, as the Hugging Face tokenizer does; a tokenizer.json alone is read as BPE."""
    candidates = [(gguf.vocab.SentencePieceVocab, f) for f in folders if (f / "tokenizer.model").exists()]
    for folder in folders:
        if (folder / "tokenizer.json").exists():
            model = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
            kind = gguf.vocab.LlamaHfVocab if model.get("type") == "BPE" and model.get("byte_fallback") \
                else gguf.vocab.BpeVocab
            candidates.append((kind, folder))
    vocab = None
    for kind, folder in candidates:
        try:
            vocab = kind(folder)
            break
        except Exception:  # the helpers raise plain exceptions for files of another kind: try the next
            continue
    if vocab is None:
        raise SlimGPTError("cannot build a GGUF tokenizer: neither a SentencePiece tokenizer.model nor a BPE "
                           "tokenizer.json was readable")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise SlimGPTError(f"the tokenizer has {len(tokens)} tokens, more than the model's {n_vocab} embeddings")
    for i in range(len(tokens), n_vocab):  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        # llama.cpp picks its pre-tokenizer regex by name; "default" is GPT-2's
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return f"Hugging Face tokenizer ({vocab.name})"


# ---------------------------------------------------------------- writing

def _weights_array(name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType, fallback: list[str]):
    """(data, raw type) for one tensor: 1-D tensors (norms, biases) stay f32, as llama.cpp's converters keep them;
    a 2-D weight whose rows do not fill whole quantization blocks stays f16."""
    data = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        fallback.append(name)
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _write_file(model, tokenizer_folders: Callable[[], list[Path]], source_gguf: Path | None, out: Path, arch: str,
                weight_type: str, source: str, report, evaluation: dict, step: Callable[[str], None]) -> tuple[str, list]:
    qtype, ftype = DIRECT_TYPES[weight_type]
    writer = gguf.GGUFWriter(out, arch)
    fallback: list[str] = []
    try:
        _metadata(writer, model, arch)
        writer.add_file_type(int(ftype))
        shapes = layer_shapes(model)
        _provenance(writer, source, report, evaluation,
                    {"layer_query_heads": [s[0] for s in shapes], "layer_kv_heads": [s[1] for s in shapes],
                     "layer_ffn_width": [s[2] for s in shapes]})
        if source_gguf is not None:
            _copy_tokenizer(writer, source_gguf)
            tokenizer_source = f"source GGUF {source_gguf.name}"
        else:
            tokenizer_source = _hf_tokenizer(writer, tokenizer_folders(), int(model.config.vocab_size))
        with torch.no_grad():
            for name, tensor in _tensors(model, arch):
                data, raw = _weights_array(name, tensor, qtype, fallback)
                writer.add_tensor(name, data, raw_dtype=raw)
                step(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return tokenizer_source, fallback


def _llamacpp_quantize(src: Path, dst: Path, weight_type: str, threads: int) -> None:
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMACPP_TYPES[weight_type])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise SlimGPTError(f"llama.cpp could not quantize to {weight_type} (its quantize routine returned {rc})")


def _check_target(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise SlimGPTError(f"{out} does not end in .gguf")
    if out.is_dir():
        raise SlimGPTError(f"{out} is a folder: give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise SlimGPTError(f"{out} already exists (choose another name or pass --force)")


def _export_steps(total: int, progress: Callable | None, cancel: Callable[[], bool] | None) -> Callable[[str], None]:
    """`step(phase)`: one of `total` steps done (reported to `progress`); `cancel()` True stops the export."""
    done = [0]

    def step(phase: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(Progress(done[0], total, phase, 0.0))
        if cancel is not None and cancel():
            raise JobCancelled("GGUF export was cancelled: nothing was kept")
    return step


def _tokenizer_folders(loaded, source_name: str, holders: list[tempfile.TemporaryDirectory]) -> list[Path]:
    """The model's folder, the folder of the model it was pruned from, and the loaded tokenizer saved afresh (in a
    temporary folder added to `holders`, which the caller cleans up)."""
    folders = [Path(p) for p in (getattr(loaded, "path", ""), _resolve_alias(str(source_name)) if source_name
                                 else "") if p and Path(p).is_dir()]
    holder = tempfile.TemporaryDirectory(prefix="slimgpt-tokenizer-")
    holders.append(holder)
    loaded.tokenizer.save_pretrained(holder.name)
    return folders + [Path(holder.name)]


def export_gguf(source, path: str | Path, weight_type: str = "f16", progress: Callable | None = None,
                cancel: Callable[[], bool] | None = None, overwrite: bool = False, threads: int | None = None,
                report: RunReport | None = None, evaluation: dict | None = None) -> GGUFExport:
    """Write `source` (a run folder, model name, or an object with `.model`, `.tokenizer`, `.name`) as one GGUF file.

    `progress(Progress)` is called per tensor; `cancel()` returning True stops the export, leaving nothing. A run
    folder's report and stored perplexity go into the file's metadata."""
    weight_type = normalise_weight_type(weight_type)
    out = Path(path).expanduser()
    _check_target(out, overwrite)
    if weight_type in LLAMACPP_TYPES:
        import_llama_cpp()  # before any work: one sentence when llama.cpp is missing
    loaded, report, evaluation, name = _resolve_source(source, report, evaluation)
    model = loaded.model
    arch = gguf_architecture(model)
    _rope_theta(model.config)
    source_name = report.model if report is not None and report.model else name
    source_gguf = source_gguf_of(source_name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimGPTError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    total = sum(1 for _ in _tensors(model, arch)) + (1 if weight_type in LLAMACPP_TYPES else 0)
    step = _export_steps(total, progress, cancel)
    tmp = _temporary_name(out)
    staging = _temporary_name(out.with_suffix(".f32.gguf")) if weight_type in LLAMACPP_TYPES else None
    tok_dir: list[tempfile.TemporaryDirectory] = []
    try:
        direct = "f32" if staging is not None else weight_type
        tokenizer_source, fallback = _write_file(model, lambda: _tokenizer_folders(loaded, source_name, tok_dir),
                                                 source_gguf, staging or tmp, arch, direct, name, report, evaluation,
                                                 step)
        if staging is not None:
            _llamacpp_quantize(staging, tmp, weight_type, threads or max(1, os.cpu_count() or 1))
            fallback = []  # llama.cpp chooses its own fallbacks (it logs them)
            step(f"llama.cpp quantize {weight_type}")
        os.replace(tmp, out)
    except OSError as exc:
        hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise SlimGPTError(f"could not write {out}: {exc.strerror or exc}{hint}; nothing was kept") from None
    finally:
        tmp.unlink(missing_ok=True)
        if staging is not None:
            staging.unlink(missing_ok=True)
        for holder in tok_dir:
            holder.cleanup()
    return GGUFExport(out, arch, weight_type, out.stat().st_size, tokenizer_source, fallback,
                      run_instructions(out.name, arch == MIXED_ARCH))


def _resolve_source(source, report, evaluation):
    """(loaded model, report, evaluation, name) from a run folder / model name or an already loaded model."""
    if hasattr(source, "model") and hasattr(source, "tokenizer"):
        return source, report, dict(evaluation or {}), str(getattr(source, "name", "") or "")
    config, where = load_config(str(source))
    base = base_model_type(config)
    if base not in UNIFORM_ARCH:
        raise SlimGPTError(f"the GGUF writer does not support the {base} architecture "
                           f"(supported: {', '.join(UNIFORM_ARCH)})")
    folder = Path(where) if Path(where).is_dir() else None
    folder_report, folder_eval, _ = _card_inputs(folder)
    loaded = load_model(str(source), "cpu", "float32")
    merged = dict(folder_report.evaluation) if folder_report is not None and folder_report.evaluation else {}
    merged.update(folder_eval)
    merged.update(evaluation or {})
    return loaded, report or folder_report, merged, str(source)


# ---------------------------------------------------------------- the studio and the model card

def default_gguf_path(run_name: str, weight_type: str) -> Path:
    """Where the studio writes a run's GGUF unless told otherwise: beside its safetensors export in the workspace."""
    folder = default_export_folder(run_name)
    return folder.with_name(f"{folder.name}.{normalise_weight_type(weight_type)}.gguf")


def gguf_for(source, label: str, weight_type: str = "q8_0", progress: Callable | None = None,
             cancel: Callable[[], bool] | None = None) -> Path:
    """A GGUF of a run folder (or of the loaded dense model, `source` with .model) for llama.cpp measurements: the
    one in the workspace's exports when it is newer than the run's weights, else written there now."""
    out = default_gguf_path(label, weight_type)
    folder = Path(source) if isinstance(source, (str, Path)) and Path(source).is_dir() else None
    if out.exists() and folder is not None:
        newest = max(p.stat().st_mtime for p in folder.glob("*.safetensors"))
        if out.stat().st_mtime >= newest:
            return out
    if out.exists() and folder is None and out.stat().st_size > 0:
        return out  # the dense model does not change under its name
    return export_gguf(source, out, weight_type, progress, cancel, overwrite=True).path


def run_instructions(file_name: str, mixed: bool) -> str:
    """How to run the file (Markdown): llama.cpp, Ollama, LM Studio; what cannot load it."""
    lines = ["## Run the GGUF", "",
             "llama.cpp (`llama-cli` from a llama.cpp build, or `llama-server` for an OpenAI-style API):", "",
             "```bash", f"llama-cli -m {file_name} -p \"Once upon a time\" -n 128 -t 2", "```", "",
             "Ollama: a file named `Modelfile` beside the GGUF", "", "```", f"FROM ./{file_name}",
             "PARAMETER temperature 0", "```", "",
             "then `ollama create pruned -f Modelfile && ollama run pruned`. LM Studio: import the file.", ""]
    if mixed:
        lines += ["Its layers differ in shape, so the file uses llama.cpp's `deci` architecture (per-layer head "
                  "counts and FFN widths; checked with llama.cpp as bundled in llama-cpp-python 0.3.36). vLLM "
                  "cannot serve this model today: its query-head count is one for all layers.", ""]
    return "\n".join(lines)


def export_run_gguf(run_folder: str | Path, out: str | Path, weight_type: str = "q8_0", overwrite: bool = True,
                    callback: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> GGUFExport:
    """The Export page's GGUF job: one run as one GGUF file."""
    return export_gguf(str(run_folder), out, weight_type, callback, should_stop, overwrite=overwrite)

def llamacpp_speed(models: dict[str, object], weight_type: str = "q8_0", threads: int = 2, prompt_tokens: int = 128,
                   new_tokens: int = 64, repeats: int = 3, callback: Callable | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """The Evaluate page's llama.cpp speed: each model (label -> run folder, or a loaded model for the dense one)
    as a GGUF of `weight_type` (exported once into the workspace), then `speed_table`."""
    import_llama_cpp()
    files = {}
    for label, source in models.items():
        name = Path(source).name if isinstance(source, (str, Path)) else \
            "dense-" + "".join(c if c.isalnum() or c in "-_." else "-"
                               for c in Path(str(getattr(source, "name", "") or label)).name)
        files[label] = gguf_for(source, name, weight_type, cancel=should_stop)
    rows = speed_table(files, prompt_tokens, new_tokens, threads, repeats, callback, should_stop)
    for row in rows:
        row["weight_type"] = weight_type
    return rows
