"""hift's errors: one line for a person, an exit code for the shell.

Every error hift reports derives from :class:`HiftError`; library callers (a notebook,
the benches, the GPU check) catch it as any exception, and only the CLI turns it into a
message on stderr and its ``exit_code`` (``hift_cli/cli.py``):

* :class:`ConfigError` (``hift_cli.config``): bad input — 2;
* :class:`~hift_cli.checkpoint.CheckpointError`: a checkpoint that cannot be used (a
  resume that does not match the run) — 2; one that cannot be written
  (:class:`~hift_cli.checkpoint.DiskSpaceError`) — 74;
* :class:`TrainingStopped`: training ended early on purpose — 1 (out of memory,
  non-finite steps) or 128 + the signal (SIGINT, SIGTERM).
"""

from __future__ import annotations


class HiftError(Exception):
    """An error hift reports in one line (its message), with the CLI's exit code."""

    exit_code = 1


class ConfigError(HiftError, ValueError):
    """Bad user input: reported as one line, no traceback."""

    exit_code = 2


class TrainingStopped(HiftError):
    """Training ended early on purpose (signal, non-finite steps, out of memory): one
    line, an exit code; ``out_of_memory`` is ``"device"`` or ``"host"`` when memory ran out."""

    def __init__(self, message: str, code: int, out_of_memory: str | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = code
        self.out_of_memory = out_of_memory

    @property
    def code(self) -> int:
        """The exit code (as ``SystemExit.code``, which this was)."""
        return self.exit_code
