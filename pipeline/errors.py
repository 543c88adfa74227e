"""The exceptions that reach the user as a single line instead of a traceback, and the exit
status each gives the command."""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input or an unusable setting, described in one line that names the problem.

    The CLI prints ``error: <message>`` on stderr and exits with status 2. Raise it before
    anything is written to a store, so that a bad input leaves nothing half-done behind.
    """


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so it unwinds like Ctrl-C."""


INTERRUPT_STATUSES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def interrupt_status(exc: KeyboardInterrupt) -> int:
    """The exit status of a command ended by ``exc``: 128 + the signal's number, as a shell
    reports a process the signal killed (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def one_line(message: str) -> str:
    """``message`` on one line, whatever a user's value in it holds: newlines and carriage
    returns written as ``\\n`` and ``\\r``."""
    return message.replace("\r", "\\r").replace("\n", "\\n")
