"""Process helpers for commands that start node processes."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for child nodes: the kernel sends SIGTERM when the parent dies.

    Without it, a supervisor killed with SIGKILL would leave its nodes running,
    holding ports and memory. Linux only; elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
