"""Child processes that a test stops with Ctrl-C (SIGINT)."""

from __future__ import annotations

import signal


def answer_ctrl_c() -> None:
    """``preexec_fn`` for a child the test will stop with SIGINT.

    A shell starts background jobs with SIGINT ignored (``cmd &``, ``nohup``), and an
    ignored signal stays ignored across exec: Python then installs no Ctrl-C handler,
    and ``teeshard up`` could not be stopped the way a user stops it. The child gets
    the default disposition back, whatever launched the suite."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
