"""The errors of the checkpoint store (every store module raises these; imports nothing of
hpcdqn)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupted, or does not fit this run."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is valid but belongs to another environment / network."""
