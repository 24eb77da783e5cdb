"""How a ``kombu-streams`` command ends: its exit codes, and the exception that carries one."""

from __future__ import annotations

#: Exit codes: ok, error (cannot connect, Redis error), usage, queue or dead letter not found.
OK, ERROR, USAGE, NOT_FOUND = 0, 1, 2, 3


class Failure(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


__all__ = ('OK', 'ERROR', 'USAGE', 'NOT_FOUND', 'Failure')
