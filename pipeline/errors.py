"""Errors a user can act on. None of them is worth a retry: each names what is wrong and the fix."""
from __future__ import annotations


class StageFailed(RuntimeError):
    """A stage stopped on purpose (bad input, a guard tripped): the reason is recorded, no retry helps."""


class RegistryError(StageFailed):
    """The run directory holds something that cannot be trusted: names the file and the fix."""


class CorruptArtifact(RegistryError):
    """An artifact's manifest is unreadable, or a file no longer matches its checksum."""


class Interrupted(BaseException):
    """The process was asked to stop (SIGTERM) while building a stage; the rerun resumes."""
