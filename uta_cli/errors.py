"""Errors that the command line reports as bad usage (exit 2), without a traceback."""

from __future__ import annotations


class UtaUsageError(Exception):
    """Bad usage or bad input. The message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; reported as exit 1, the last good checkpoint kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM was received; a checkpoint was written before stopping (exit 143)."""
