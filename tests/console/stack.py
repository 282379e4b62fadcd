"""A live ``teeshard up`` for the console tests: the tiny Llama split over two nodes.

The entry node bills through a real ledger (a SQLite file, or an EVM contract on
anvil), as ``teeshard up --ledger`` runs it; its stdout's one line is the URL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from teeshard.procutil import free_port_block, wait_healthy
from tests.signals import answer_ctrl_c


@dataclass(frozen=True)
class Stack:
    url: str  # the entry node
    port: int  # the entry node's; the second node listens on port + 1
    ledger_url: str

    @property
    def downstream_url(self) -> str:
        return f"https://127.0.0.1:{self.port + 1}"

    @property
    def entry_id(self) -> str:
        return f"127.0.0.1:{self.port}"


def entry_port() -> int:
    return free_port_block(2)


@contextmanager
def teeshard_up(
    model: Path,
    port: int,
    ledger_url: str,
    pricing: Path,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),  # more ``teeshard up`` options (``--replicas 2``, say)
) -> Iterator[Stack]:
    argv = [
        sys.executable, "-m", "teeshard.cli", "up", "--model", str(model), "--nodes", "2",
        "--port", str(port), "--threads", "1", "--model-name", "tiny",
        "--ledger", ledger_url, "--pricing", str(pricing), *extra,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="teeshard-up-") as folder:
        log = Path(folder) / "stderr.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                text=True,
                preexec_fn=answer_ctrl_c,
            )
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()  # printed once every node is healthy
            if not url:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"teeshard up exited with code {process.wait()}:\n{tail}")
            wait_healthy(url + "/health", timeout=30)
            yield Stack(url, port, ledger_url)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextmanager
def operator_node(model: Path, stack: Stack, operator: str) -> Iterator[str]:
    """One more node for the last layers, outside the chain, claiming ``operator``.

    What an operator registers in the pool: a node started with ``--operator``,
    whose attested key signs the claim the registration checks. It takes the
    policy ``teeshard up`` wrote, so it serves the same shard (the same manifest).
    """
    from teeshard.paths import data_dir
    from teeshard.procutil import free_port

    port = free_port()
    policy = data_dir() / "runs" / f"port-{stack.port}" / "policy.toml"
    argv = [
        sys.executable, "-m", "teeshard.cli", "node", "--model", str(model), "--layers", "2:4",
        "--port", str(port), "--model-name", "tiny", "--threads", "1", "--tee", "simulated",
        "--policy", str(policy), "--operator", operator,
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        url = f"https://127.0.0.1:{port}"
        wait_healthy(url + "/health", process, timeout=120)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
