"""Errors that the command line reports as bad usage (exit 2), without a traceback."""

from __future__ import annotations


class UtaUsageError(Exception):
    """Bad usage or bad input. The message names the problem and the fix."""

    exit_code = 2
