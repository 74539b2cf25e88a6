"""Training past one process: the process group torchrun starts, FSDP2 sharding of a decoder, each rank's rows of
a global micro-batch, and sums reduced across ranks.

    rank, world, device = join_process_group("auto")    # under torchrun: gloo on CPU, NCCL on GPUs
    loaded = load_for_training(name, dtype)              # weights on rank 0; the other ranks on the meta device
    net = shard_model(net, torch.device(device), bf16=True, activation_checkpointing=False)
    part = rank_rows(batch)                              # this rank's rows of a micro-batch every rank drew

Every rank draws the same global stream of micro-batches (same seed, same domain weights) and trains on its own
rows of each, so N processes see exactly the batches one process would; gradients are averaged by FSDP's
reduce-scatter. With one process nothing is sharded and every helper is the identity.

Only rank 0 reads the weights: the other ranks build the same model on the meta device (no memory), every rank
shards its model, and rank 0's full state is broadcast into the shards (`set_model_state_dict` with
`broadcast_from_rank0`), so no rank but 0 ever holds the whole model.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimgpt_core.base.devices import resolve_dtype
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.modeling_slimgpt import CLASSES
from slimgpt_core.base.shapes import is_heterogeneous
from slimgpt_core.models import LoadedModel, load_config, load_model

FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 writes the run and the progress; the other ranks only compute."""
    return rank_world()[0] == 0


def join_process_group(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group; gloo on CPU, NCCL on GPUs (one per rank).
    Returns (rank, world, device), the device naming this rank's GPU when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), world, device


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_batch_rows(batch_size: int) -> None:
    """The micro-batch is split by rows over the ranks: every rank needs at least one."""
    world = rank_world()[1]
    if batch_size % world:
        raise SlimGPTError(f"--batch-size {batch_size} must be a multiple of the {world} processes (each trains on "
                           "its rows of every micro-batch)")


def rank_rows(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's contiguous rows of `batch` and whether they count. A rank left without rows (a short held-out
    batch) runs the first row anyway, since FSDP needs every rank in every forward, and counts nothing."""
    rank, world = rank_world()
    if world == 1:
        return batch, True
    n = next(iter(batch.values())).shape[0]
    if n <= rank:
        return {k: v[:1] for k, v in batch.items()}, False
    return {k: v.tensor_split(world)[rank] for k, v in batch.items()}, True


def all_reduce_sums(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks, in fp64 (the values themselves with one process)."""
    if rank_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_tensor(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of `t` on every rank (the domain weights every rank draws from)."""
    if rank_world()[1] > 1:
        t = t.clone()
        dist.broadcast(t, 0)
    return t


def average_gradients(params: list[torch.Tensor]) -> None:
    """Gradients of replicated (unsharded) parameters averaged over the ranks, in place: each rank's gradient is
    that of its rows' mean loss, so their mean is the micro-batch's, as one process computes it."""
    world = rank_world()[1]
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def clip_gradients(groups: list[list[torch.Tensor]], max_norm: float) -> float:
    """Gradients of all `groups` (sharded DTensors or replicated plain tensors, not mixed within a group) scaled
    together to a total L2 norm of at most `max_norm`, as one process's clip_grad_norm_ over their union.
    Returns the norm before clipping."""
    norms = []
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return 0.0
    total = torch.nn.utils.get_total_norm(norms)
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # clip_grad_norm_'s own coefficient
    for params in groups:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return float(total)


def load_for_training(name: str, dtype: str = "float32") -> LoadedModel:
    """The model and tokenizer `name` names, as `load_model` gives them on the CPU. Under torchrun only rank 0
    reads the weights; the other ranks get the same class and shapes on the meta device (no memory), which
    `shard_model` fills from rank 0."""
    if is_main():
        return load_model(name, "cpu", dtype)
    config, where = load_config(name)
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    with torch.device("meta"):
        if is_heterogeneous(config) and not config.model_type.startswith("slimgpt_"):  # as load_model reads it
            config_cls, model_cls = CLASSES[config.model_type]
            fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
            model = model_cls._from_config(config_cls(**fields), dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, where)


def on_meta(model) -> bool:
    """Whether `model` is a shell on the meta device (a rank other than 0 before sharding)."""
    return any(p.is_meta for p in model.parameters())


def to_device(model, device):
    """`model` moved to `device`, unless it is a meta shell (its weights come from rank 0 when it is sharded)."""
    return model if on_meta(model) else model.to(device)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def mixed_precision(device: torch.device, bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPUs that support it; full precision elsewhere (CPU)."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model, device: torch.device, bf16: bool = True, activation_checkpointing: bool = False):
    """FSDP2: each decoder layer its own shard group (mixed shapes and LoRA adapters included; frozen and
    trainable parameters may share a group), then the root (embeddings, final norm, head). Activation
    checkpointing recomputes each layer's activations in the backward pass (transformers' non-reentrant
    checkpointing). The weights are rank 0's on every rank: its full state is broadcast into the shards, so the
    other ranks may come as meta shells (load_for_training). One process: the model unchanged (moved to
    `device`)."""
    if activation_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    world = rank_world()[1]
    if world == 1:
        return model.to(device)
    full = model.state_dict() if is_main() else {}  # rank 0's full weights, kept while they are broadcast
    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision(device, bf16)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if on_meta(model):
        model.to_empty(device=device)  # this rank's shards (and buffers), uninitialised until filled below
    set_model_state_dict(model, full, options=FROM_RANK0)
    for buffer in model.buffers():  # rotary tables: not in the state dict, so broadcast on their own
        dist.broadcast(buffer.data, 0)
    return model


def resharded(model):
    """`model` with every parameter back in its shard. FSDP2 keeps the root's parameters (embeddings, final norm,
    head) gathered after a forward until the backward; after an evaluation with no backward they would stay
    gathered, and an optimizer made then would hold the gathered copies instead of the shards."""
    if isinstance(model, FSDPModule):
        model.reshard()
    return model


def gathered_model(net, rebuild: Callable | None = None):
    """The trained model gathered once, as a plain (unsharded) model on rank 0's CPU; None on the other ranks,
    which must call this too (the gather is a collective). The plain model is built on the meta device from the
    sharded one's class and config, passed through `rebuild` (e.g. the same LoRA wrapping), then given the
    gathered weights and the sharded model's buffers (rotary tables: FSDP does not shard buffers)."""
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    # fully_shard gave a sharded root a class of its own (FSDP<class>): build the class it was made from
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        fresh = cls(base.config)
    plain = rebuild(fresh) if rebuild is not None else fresh
    plain.load_state_dict(full, assign=True)
    for name, buffer in net.named_buffers():
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu").clone()
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return plain


def on_every_rank(work: Callable[[], int]) -> int:
    """A command's work in one process of a torchrun job. Success: the ranks leave the group together. A
    failure: one sentence naming the process (a SlimGPTError for the command line to print), and this process
    exits without waiting for the others, so torchrun ends them all. One process: `work()` as it is."""
    rank, world = rank_world()
    if world == 1:
        return work()
    try:
        code = work()
    except SlimGPTError as exc:
        raise SlimGPTError(f"process {rank} of {world}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a collective broken by another process's failure, or a bug
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimGPTError(f"process {rank} of {world} stopped: {first}") from None
    leave_process_group()
    return code
