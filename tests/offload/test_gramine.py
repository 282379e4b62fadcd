"""The Gramine template renders (as gramine-manifest does, Jinja2 with strict undefined)
with and without offload, and the offload variant pins the accelerator in loader.argv."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE = (
    Path(__file__).resolve().parents[2] / "deploy" / "gramine" / "teeshard-node.manifest.template"
)
BASE = {
    "entrypoint": "/usr/bin/python3.11", "log_level": "error", "arch_libdir": "/lib/x86_64-linux-gnu",
    "venv": "/opt/teeshard-venv", "model_dir": "/srv/shard", "config_dir": "/srv/etc", "layers": "0:11",
    "gramine": {"libos": "/usr/lib/gramine/libsysdb.so", "runtimedir": lambda: "/usr/lib/gramine/runtime"},
}  # fmt: skip


def render(**extra: Any) -> dict[str, Any]:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return tomllib.loads(env.from_string(TEMPLATE.read_text()).render(**BASE, **extra))


def test_without_offload_the_command_line_is_unchanged() -> None:
    argv = render()["loader"]["argv"]
    assert "--offload" not in argv and argv[-2:] == ["--policy", "/etc/teeshard/policy.toml"]


def test_offload_pins_the_accelerator_in_the_measured_command_line() -> None:
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    argv = render(offload_url="tcp://10.0.0.5:7100", accel_key=key)["loader"]["argv"]
    tail = argv[argv.index("--offload") :]
    assert tail == ["--offload", "tcp://10.0.0.5:7100", "--accel-key", key,
                    "--offload-mode", "blinded+verified", "--offload-pool", "16"]  # fmt: skip
    argv = render(offload_url="tcp://h:1", accel_key=key, offload_mode="verified")["loader"]["argv"]
    assert argv[argv.index("--offload-mode") + 1] == "verified"
