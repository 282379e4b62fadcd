"""A persistent local EVM dev chain: anvil (npm ``@foundry-rs/anvil``) with ``--state FILE``.

``start`` runs anvil in its own session, with its state loaded from and saved
to ``state`` (every ``state_interval_s`` seconds and at exit), and waits until
its JSON-RPC answers. ``stop`` ends it with SIGTERM (anvil saves its state)
and waits. A pid file beside the state file lets another process stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ANVIL_ENV = "TEESHARD_ANVIL"
# Chains this process started, so stop() can reap them (no zombies, no warnings).
_STARTED: dict[int, subprocess.Popen[bytes]] = {}
# anvil's first dev account (from its public default mnemonic): dev chains only.
DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def find_anvil(root: Path | None = None) -> str | None:
    """``$TEESHARD_ANVIL``, then ``.tools/`` (scripts/services.sh), then PATH."""
    configured = os.environ.get(ANVIL_ENV)
    if configured and Path(configured).is_file():
        return configured
    base = root or Path.cwd()
    for candidate in sorted(base.glob(".tools/node_modules/@foundry-rs/anvil-*/bin/anvil")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("anvil")


@dataclass(frozen=True)
class AnvilChain:
    pid: int
    rpc_url: str
    state: Path
    log: Path

    @property
    def pid_file(self) -> Path:
        return pid_file(self.state)


def pid_file(state: Path) -> Path:
    return state.with_name(state.name + ".pid")


def _rpc_ready(url: str) -> bool:
    try:
        response = httpx.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=1
        )
        return response.status_code == 200 and "result" in response.json()
    except (httpx.HTTPError, ValueError):
        return False


def start(
    state: Path,
    *,
    port: int = 8545,
    host: str = "127.0.0.1",
    anvil: str | None = None,
    state_interval_s: int = 1,
    ready_timeout_s: float = 30.0,
    block_time_s: float | None = None,
) -> AnvilChain:
    """Start anvil; it mines a block per transaction, or every ``block_time_s`` seconds."""
    binary = anvil or find_anvil()
    if binary is None:
        raise FileNotFoundError(
            "anvil not found: run scripts/services.sh (npm @foundry-rs/anvil into .tools/) "
            f"or set {ANVIL_ENV}"
        )
    state = state.resolve()
    state.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    if _rpc_ready(url):
        raise RuntimeError(f"something already answers JSON-RPC at {url}; stop it or pick --port")
    log = state.with_name(state.name + ".log")
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                binary,
                "--host",
                host,
                "--port",
                str(port),
                "--state",
                str(state),
                "--state-interval",
                str(state_interval_s),
                "--silent",
                *(["--block-time", str(block_time_s)] if block_time_s else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the command that started it
        )
    deadline = time.monotonic() + ready_timeout_s
    while not _rpc_ready(url):
        if process.poll() is not None:
            raise RuntimeError(f"anvil exited with status {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"anvil did not answer at {url} within {ready_timeout_s:.0f}s")
        time.sleep(0.1)
    _STARTED[process.pid] = process
    chain = AnvilChain(process.pid, url, state, log)
    chain.pid_file.write_text(json.dumps({"pid": process.pid, "rpc_url": url}))
    return chain


def running(state: Path) -> AnvilChain | None:
    path = pid_file(state.resolve())
    try:
        data = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return AnvilChain(int(data["pid"]), str(data["rpc_url"]), state.resolve(), Path())


def stop(state: Path, timeout_s: float = 15.0) -> bool:
    """Stop the anvil started for ``state``; False when none was running."""
    chain = running(state)
    if chain is None:
        return False
    os.kill(chain.pid, signal.SIGTERM)  # anvil writes its state on the way out
    process = _STARTED.pop(chain.pid, None)
    if process is not None:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        chain.pid_file.unlink(missing_ok=True)
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(chain.pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(chain.pid, os.WNOHANG)
        time.sleep(0.1)
    else:
        os.kill(chain.pid, signal.SIGKILL)
    chain.pid_file.unlink(missing_ok=True)
    return True
