"""Keep the processes of ``teeshard up`` running: a node that dies is started again.

A restarted node has a new key and a new quote; its neighbours attest it afresh
when they next connect, and the entry's registry re-probes it before routing to
it again. A node that keeps dying (``max_restarts`` within ``window_s``) is a
broken configuration, not a fault to ride out: then everything stops.
"""

from __future__ import annotations

import subprocess
import time
from collections import deque
from collections.abc import Callable

from rich.console import Console

console = Console(stderr=True)


def supervise(
    processes: list[subprocess.Popen[bytes]],
    argvs: list[list[str]],
    start: Callable[[list[str]], subprocess.Popen[bytes]],
    *,
    max_restarts: int = 5,
    window_s: float = 60.0,
    poll_s: float = 0.5,
) -> int:
    """Restart dead processes in place, in ``processes``; return 1 once one keeps dying."""
    restarts: list[deque[float]] = [deque() for _ in processes]
    while True:
        for index, process in enumerate(processes):
            if process.poll() is None:
                continue
            now = time.monotonic()
            recent = restarts[index]
            while recent and now - recent[0] > window_s:
                recent.popleft()
            if len(recent) >= max_restarts:
                console.print(
                    f"[red]a node died {len(recent) + 1} times within {window_s:.0f}s "
                    f"(exit code {process.returncode}); stopping the others[/]"
                )
                return 1
            recent.append(now)
            console.print(
                f"[yellow]a node exited (code {process.returncode}); restarting it: "
                f"{_where(argvs[index])}[/]"
            )
            processes[index] = start(argvs[index])
        time.sleep(poll_s)


def _where(argv: list[str]) -> str:
    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv else "?"

    return f"layers {value('--layers')} on port {value('--port')}"
