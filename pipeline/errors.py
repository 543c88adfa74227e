"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input or an unusable setting, described in one line that names the problem.

    The CLI prints ``error: <message>`` on stderr and exits with status 2. Raise it before
    anything is written to a store, so that a bad input leaves nothing half-done behind.
    """
