"""Helpers for commands that start node processes: lifetime, ports, liveness."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time

import httpx

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


def port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel reports free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (``teeshard up`` numbers nodes so)."""
    while True:
        base = free_port(host)
        if all(port_free(host, base + i) for i in range(count)):
            return base


def is_healthy(health_url: str) -> bool:
    """Does the node answer ``/health``? Liveness only: trust comes from attestation,
    so the probe does not check the (self-signed, attested) certificate."""
    try:
        return httpx.get(health_url, timeout=1.0, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(
    health_url: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 600.0,
    interval: float = 0.1,
) -> None:
    """Poll until the node is healthy; fail at once if its process exits."""
    deadline = time.monotonic() + timeout
    while not is_healthy(health_url):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{health_url}: the node exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{health_url}: not healthy after {timeout:.0f}s")
        time.sleep(interval)
