"""Errors a command reports as one line (``teeshard: error: ...``) and exit status 2."""


class CommandError(Exception):
    """The command cannot do what was asked; the message says why."""
