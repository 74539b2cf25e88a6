"""User-facing errors: one clear sentence each, no traceback needed."""


class SlimGPTError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class JobCancelled(SlimGPTError):
    """Raised when a caller asked a running job to stop."""

    def __init__(self, message: str = "pruning was cancelled"):
        super().__init__(message)


MEMORY_ADVICE = ("lower --nsamples, --seqlen or --batch-size, keep calibration activations on the CPU "
                 "(--offload-activations always), use a smaller --dtype, or a device with more memory")


def out_of_memory_message(what: str, device: str) -> str:
    return f"out of memory on {device} while {what}: {MEMORY_ADVICE}"
