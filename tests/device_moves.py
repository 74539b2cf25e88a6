"""Which device each `tensor.to(...)` names, for CPU-only tests of code that must send tensors to a GPU."""
import torch


class DeviceMoves(torch.overrides.TorchFunctionMode):
    """Records the device named by every `tensor.to(...)` call (None when the call names none). A move to `pretend`
    (e.g. meta, a device without data) is recorded and not made: CPU-only tests can check that code sends tensors to
    the device it was given, as it would to a GPU."""

    def __init__(self, pretend: str | None = None):
        super().__init__()
        self.moves: list[torch.device | None] = []
        self.pretend = torch.device(pretend) if pretend else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            device = torch.device(device) if device is not None else None
            self.moves.append(device)
            if device is not None and device == self.pretend:
                dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
                return args[0] if dtype is None else args[0].to(dtype=dtype)
        return func(*args, **kwargs)
