"""Activation placement, memory checks and distributed shards (methods/activations.py) edge by edge: the cases the
mutation pass (tools/mutation.py, docs/testing.md) showed untested. Shards and the relative distance run in two real
gloo processes; the distance is checked against fp64 norms of the whole tensors; peak RSS against the kernel's
VmHWM. A GPU is stood in for, as elsewhere in the suite, by the meta device and by recorders of torch.cuda's
memory queries; pinning (which needs a GPU) by a TorchFunctionMode that records what is asked to be pinned."""
import json
import re
import resource
from types import SimpleNamespace

import pytest
import torch

from tests.tiny_models import tiny_model
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base import devices
from slimgpt_core.base.devices import available_memory_bytes, peak_memory_mb
from slimgpt_core.methods.activations import (activation_device, activation_streams, buffer_like, check_memory,
                                              distributed_rank_world, fits, place, relative_distance, shard_tokens)
from slimgpt_core.methods.prune_settings import PruneSettings

GPU = torch.device("cuda", 1)
ADVICE = ("lower --nsamples, --seqlen or --batch-size, keep calibration activations on the CPU (--offload-activations "
          "always), use a smaller --dtype, or a device with more memory")


# --- distributed shards and the relative distance --------------------------------------------------------------

def test_one_process_keeps_every_token():
    tokens = torch.arange(12).reshape(6, 2)
    assert distributed_rank_world() == (0, 1)
    assert shard_tokens(tokens, 4) is tokens  # not even copied


def _fp64_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖/‖b‖ in fp64 of the whole tensors (the difference as the activations' dtype computes it)."""
    d, b = (a - b).double(), b.double()
    return float((d ** 2).sum().sqrt() / (b ** 2).sum().sqrt())


def _shard_worker(rank, world, init, A, B, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tokens = torch.arange(13 * 4).reshape(13, 4)  # row r holds 4r … 4r+3
    try:
        refusal = shard_tokens(tokens[:3], 8).tolist()  # one batch for two processes
    except SlimGPTError as exc:
        refusal = str(exc)
    rows = slice(0, 25) if rank == 0 else slice(25, 40)  # shards of different sizes
    result = {"rank_world": list(distributed_rank_world()), "shard": shard_tokens(tokens, 3).tolist(),
              "refusal": refusal, "distance": relative_distance(A[rows], B[rows])}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_two_processes_get_whole_batches_round_robin_and_one_distance(tmp_path):
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(40, 3, 5, generator=g), torch.randn(40, 3, 5, generator=g)
    out = tmp_path / "shard"
    mp.spawn(_shard_worker, args=(2, f"file://{tmp_path / 'store'}", A, B, str(out)), nprocs=2)
    got = [json.loads((tmp_path / f"shard.{r}").read_text()) for r in (0, 1)]
    row = lambda r: [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3]  # noqa: E731
    # batches of 3 of 13 rows: [0-2] [3-5] [6-8] [9-11] [12]; rank 0 takes the 1st, 3rd and 5th
    assert got[0]["shard"] == [row(r) for r in (0, 1, 2, 6, 7, 8, 12)]
    assert got[1]["shard"] == [row(r) for r in (3, 4, 5, 9, 10, 11)]
    assert [g["rank_world"] for g in got] == [[0, 2], [1, 2]]
    assert got[0]["refusal"] == [row(r) for r in (0, 1, 2)]
    assert got[1]["refusal"] == "1 calibration batches cannot feed 2 processes: lower --batch-size"
    whole = _fp64_distance(A, B)
    assert abs(_fp64_distance(A[:25], B[:25]) - whole) > 1e-3  # a shard's own distance differs
    for g_ in got:
        assert g_["distance"] == pytest.approx(whole, rel=1e-12)
    # one process holding everything gets the same (called here too: mutmut maps a test to the functions it
    # calls in its own process, and runs it for their mutants)
    assert relative_distance(A, B) == pytest.approx(whole, rel=1e-12)
    tokens = torch.arange(13 * 4).reshape(13, 4)
    assert shard_tokens(tokens, 3) is tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relative_distance_is_fp64_over_every_row(dtype):
    g = torch.Generator().manual_seed(1)
    for rows in (40, 16, 5):  # chunks of 16 rows: 16 + 16 + 8, exactly one, fewer than one
        a = torch.randn(rows, 3, 5, generator=g).to(dtype)
        b = (1e-3 * torch.randn(rows, 3, 5, generator=g)).to(dtype)  # ‖b‖ < 1
        assert relative_distance(a, b) == pytest.approx(_fp64_distance(a, b), rel=1e-12)
        with torch.device("meta"):  # nothing is made on the default device
            assert relative_distance(a, b) == pytest.approx(_fp64_distance(a, b), rel=1e-12)
    zero = torch.zeros(20, 4)
    assert relative_distance(zero, zero) == 0.0
    a = torch.full((20, 4), 0.5)  # ‖a‖ = 0.5·√80 against nothing: divided by 1e-30, not by 0
    assert relative_distance(a, zero) == pytest.approx(0.5 * 80 ** 0.5 * 1e30, rel=1e-12)


# --- memory ------------------------------------------------------------------------------------------------

def _vm_hwm_mb() -> float:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) / 1024


def test_peak_memory_is_the_process_peak_rss_or_the_gpu_peak(monkeypatch):
    # the kernel's high-water mark of resident memory in MiB (getrusage's per-CPU counters lag a little)
    assert peak_memory_mb(torch.device("cpu")) == pytest.approx(_vm_hwm_mb(), rel=0.01)
    who = []
    monkeypatch.setattr(resource, "getrusage", lambda w: who.append(w) or SimpleNamespace(ru_maxrss=5 * 2**9))
    assert peak_memory_mb(torch.device("cpu")) == 2.5 and who == [resource.RUSAGE_SELF]  # Linux: KiB
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 7 * 2**19)
    assert peak_memory_mb(GPU) == 3.5 and asked == [GPU]


def test_available_memory_reads_memavailable_or_the_gpu(monkeypatch, tmp_path):
    real = available_memory_bytes(torch.device("cpu"))
    assert real > 0 and real % 1024 == 0
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       24000000 kB\nMemFree:          100000 kB\nMemAvailable:    1234567 kB\n"
                    "Buffers:          2000 kB\n")
    monkeypatch.setattr(devices, "MEMINFO", str(fake))
    assert available_memory_bytes(torch.device("cpu")) == 1234567 * 1024
    fake.write_text("MemTotal:       24000000 kB\nMemFree:          100000 kB\n")  # kernels before 3.14
    assert available_memory_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(devices, "MEMINFO", str(tmp_path / "absent"))
    assert available_memory_bytes(torch.device("cpu")) is None
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (111, 999))
    assert available_memory_bytes(GPU) == 111 and asked == [GPU]  # free, not total


def _have(monkeypatch, value):
    asked = []
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: asked.append(device) or value)
    return asked


def test_check_memory_refuses_above_nine_tenths_of_what_is_free(monkeypatch):
    model = tiny_model()  # hidden 32, fp32: a token costs 128 bytes per buffer
    asked = _have(monkeypatch, None)
    check_memory(model, 10**6, 10**6, GPU)  # free memory unknown: no refusal
    assert asked == [GPU]
    assert 0.9 * 10240 == 9216  # 4 buffers x 18 tokens x 128 bytes = 9216: exactly nine tenths of 10240
    _have(monkeypatch, 10240)
    check_memory(model, 3, 6, GPU)
    check_memory(model, 2, 9, GPU, buffers=4)
    for n, s, buffers in ((3, 6, 5), (19, 1, 4), (3, 7, 4)):
        with pytest.raises(SlimGPTError):
            check_memory(model, n, s, GPU, buffers)
    _have(monkeypatch, 10239)
    with pytest.raises(SlimGPTError):
        check_memory(model, 3, 6, GPU)  # default: 4 buffers
    asked = _have(monkeypatch, 2 * 2**30)
    with pytest.raises(SlimGPTError) as refused:
        check_memory(model, 3584, 2048, GPU)  # 4 x 7340032 tokens x 128 bytes = 3.5 GiB
    assert str(refused.value) == f"calibration activations need 3.5 GiB but cuda:1 has 2.0 GiB free: {ADVICE}"
    assert asked == [GPU]


def test_a_kept_buffer_fits_below_a_quarter_of_what_is_free(monkeypatch):
    asked = _have(monkeypatch, 4000)
    assert fits(999, GPU) and not fits(1000, GPU) and not fits(4000, GPU)
    assert asked == [GPU] * 3
    _have(monkeypatch, None)
    assert fits(10**15, GPU)  # unknown: assumed to fit


def test_one_memory_comparison_at_most_or_below_a_share(monkeypatch):
    asked = _have(monkeypatch, 1000)
    assert devices.fits_in_memory(900, GPU) and not devices.fits_in_memory(901, GPU)  # at most nine tenths
    assert devices.fits_in_memory(499, GPU, 0.5, below=True) and not devices.fits_in_memory(500, GPU, 0.5, below=True)
    assert asked == [GPU] * 4
    _have(monkeypatch, None)
    assert devices.fits_in_memory(10**15, GPU, 0.25, below=True)  # unknown: assumed to fit


def test_activation_device_asks_the_gpu_it_would_use(monkeypatch, tokens):
    model = tiny_model()
    asked = []
    need = 4 * tokens.numel() * 32 * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (2 * need + 1, 0))
    assert activation_device(model, tokens, GPU, "auto") == GPU
    assert asked == [GPU]


@pytest.mark.parametrize("sequential,track,streams", [
    (True, True, (True, True)), (True, False, (False, True)),
    (False, True, (True, True)), (False, False, (True, False))])
def test_activation_streams(sequential, track, streams):
    assert activation_streams(PruneSettings(sequential=sequential, track_accumulation=track)) == streams


# --- buffers and placement -------------------------------------------------------------------------------------

class _Pinning(torch.overrides.TorchFunctionMode):
    """Pinned memory needs a GPU: tensors listed in `pinned` report is_pinned(); each request for pinned memory
    (`pin_memory=True`, `.pin_memory()`) is recorded and served unpinned. A copy from meta (standing for a GPU)
    to the CPU gives a CPU tensor of the same shape and dtype."""

    def __init__(self, pinned=()):
        super().__init__()
        self.pinned = {id(t) for t in pinned}
        self.requests = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.is_pinned:
            return id(args[0]) in self.pinned
        if func is torch.Tensor.pin_memory:
            self.requests.append("pin_memory()")
            return args[0]
        if kwargs.pop("pin_memory", False):
            self.requests.append(f"{func.__name__}(pin_memory=True)")
        if func is torch.Tensor.to and args[0].device.type == "meta" and torch.device(args[1]).type == "cpu":
            return torch.zeros(args[0].shape, dtype=args[0].dtype)
        return func(*args, **kwargs)


def test_buffer_like_keeps_shape_dtype_device_and_pinning():
    for x in (torch.randn(3, 4, 5).to(torch.bfloat16), torch.zeros(2, 3, dtype=torch.float64),
              torch.zeros(4, 2, dtype=torch.int64), torch.empty(2, 7, 3, device="meta")):
        for pinned in (False, True):
            with _Pinning([x] if pinned else []) as mode:
                buf = buffer_like(x)
            assert (buf.shape, buf.dtype, buf.device) == (x.shape, x.dtype, x.device) and buf is not x
            # pinned when x is pinned CPU memory (for non-blocking copies to the GPU), else not
            want = ["empty(pin_memory=True)"] if pinned and x.device.type == "cpu" else []
            assert mode.requests == want, (x.device, pinned)


@pytest.mark.parametrize("gpu_here", [True, False])
def test_place_pins_cpu_activations_only_when_a_gpu_computes(monkeypatch, gpu_here):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_here)
    cpu, meta = torch.device("cpu"), torch.device("meta")  # meta stands for the GPU
    x = torch.randn(2, 3)
    with _Pinning() as mode:
        assert place(x, cpu) is x  # already there: no copy
        on_gpu = place(x, meta)
        back = place(torch.empty(2, 3, device="meta"), cpu)
    assert on_gpu.device == meta and on_gpu.shape == x.shape
    assert back.device == cpu and back.shape == (2, 3)
    assert mode.requests == (["pin_memory()"] if gpu_here else [])  # only the copy back to the CPU
