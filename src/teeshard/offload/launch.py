"""Start an accelerator as a separate process and learn its endpoint and key.

For ``teeshard up --offload-mode``, the benchmark and the tests: the process is
``teeshard accel`` (or any module speaking its command line, such as a test's
malicious accelerator), and it announces itself with one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from teeshard.model.layer_range import LayerRange
from teeshard.procutil import die_with_parent


@dataclass
class AcceleratorProcess:
    process: subprocess.Popen[bytes]
    endpoint: str
    public_key: bytes  # Z85
    fingerprint: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def accel_command(
    model_dir: Path,
    layers: LayerRange,
    arith: str,
    *,
    device: str = "cpu",
    bind: str = "tcp://127.0.0.1:*",
    key_file: Path | None = None,
    threads: int | None = None,
    module: str = "teeshard.cli",
) -> list[str]:
    command = [sys.executable, "-m", module]
    if module == "teeshard.cli":
        command.append("accel")
    command += ["--model", str(model_dir), "--layers", str(layers), "--arith", arith]
    command += ["--device", device, "--bind", bind]
    if key_file is not None:
        command += ["--key", str(key_file)]
    if threads:
        command += ["--threads", str(threads)]
    return command


def start_accelerator(
    command: list[str], timeout: float = 600.0, env: dict[str, str] | None = None
) -> AcceleratorProcess:
    """Run ``command`` and wait for its ready line; raise if it exits or stays silent."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"accelerator {' '.join(command[2:5])} did not start")
        if selector.select(min(left, 0.5)):
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                continue
            line += chunk
    selector.close()
    ready = json.loads(line.split(b"\n", 1)[0])
    return AcceleratorProcess(
        process, ready["endpoint"], ready["public_key"].encode(), ready["fingerprint"]
    )
