"""Errors that the command line reports as bad usage (exit 2), without a traceback."""

from __future__ import annotations

import pickle

from safetensors import SafetensorError


class UtaUsageError(Exception):
    """Bad usage or bad input. The message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; reported as exit 1, the last good checkpoint kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM was received; a checkpoint was written before stopping (exit 143)."""


class OutOfMemory(RuntimeError):
    """Memory ran out (GPU or host); reported as exit 1 with the batch-size knobs to turn."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), MemoryError, and the host allocator's RuntimeError.

    Matched without importing torch: this module is imported before torch is.
    """
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "CUDA out of memory" in text
        or "out of memory" in text.lower() and "allocat" in text.lower())


# What open_clip, timm, safetensors and torch raise when the user's files are at fault: a missing
# or damaged file, a config that does not build, weights of other shapes (exit 2). The model
# builders catch these by name, never Exception: anything else is a bug and keeps its traceback
# (exit 1); out of memory, a RuntimeError too, is re-raised for the command line's
# out-of-memory message (`bad_input`).
BAD_CONFIG = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
BAD_FILE = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def bad_input(error: BaseException) -> BaseException:
    """`error`, caught as one of the types above, unless memory ran out: then raise it."""
    if is_out_of_memory(error):
        raise error
    return error
