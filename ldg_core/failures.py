"""What stops a generation, and the words the user reads then. No torch, no host.

Two moments: before sampling, bad settings or an unsupported set-up raise `GuidanceError`
from the host's sampling call (hosts log and ignore exceptions from script hooks). During
sampling, our code runs inside the host's callbacks, which catch every `Exception` and go on
(A1111 `modules/script_callbacks.py`, the callers at L330-350): an error there would repeat at
every step and leave an unguided image. So our sampling-time code raises `StopSampling`, a
`BaseException` as the WebUI's own interrupt is (`sd_samplers_common.InterruptedException`),
which passes those handlers, ends the sampler's run at once, and is turned back into a
`GuidanceError` where the host called sampling.
"""

from __future__ import annotations

import contextlib

PREFIX = "Latent Diffusion Guidance: "
ROW_LIMIT_SETTING = "Settings > Latent Diffusion Guidance > Max rows per UNet call"


class GuidanceError(ValueError):
    """Stops the generation with a message for the user (the UI's info box, the API's error)."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith(PREFIX) else PREFIX + message)


class StopSampling(BaseException):
    """Ends a sampler's run from inside it; `message` is what the user reads."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def is_out_of_memory(error: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA, XPU), and the RuntimeErrors of the CPU and MPS allocators.
    text = str(error).lower()
    return ("OutOfMemory" in type(error).__name__ or "out of memory" in text
            or "can't allocate memory" in text)


def sampling_failure(error: BaseException, *, step: int, rows: int, what: str) -> str:
    """The message for `error`, raised at `step` while our code did `what` with `rows` rows
    (concept rows it evaluated, 0 if none)."""
    if is_out_of_memory(error):
        return (f"out of memory at step {step} while {what} ({rows} concept "
                f"row{'' if rows == 1 else 's'}): lower "
                f"'{ROW_LIMIT_SETTING}' (2 x batch size keeps every model call no larger than "
                "one without guidance) or use fewer concepts")
    return (f"failed at step {step} while {what}: {type(error).__name__}: {error}. The "
            "generation was stopped rather than finished without guidance")


@contextlib.contextmanager
def stop_on_error(*, step: int, rows: int, what: str):
    """Code of ours running inside a host's sampling: any error stops the sampling run with
    `sampling_failure`'s words (StopSampling itself is not an Exception and passes)."""
    try:
        yield
    except Exception as error:
        raise StopSampling(sampling_failure(error, step=step, rows=rows, what=what)) from error
