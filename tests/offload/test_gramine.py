"""The Gramine template renders (as gramine-manifest does, Jinja2 with strict undefined)
with and without offload, and the offload variant pins the accelerator in loader.argv."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest

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


def node_config(manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The config ``teeshard node`` builds from the manifest's argv and environment."""
    from teeshard.cli import build_parser
    from teeshard.cli.node import config_from_args

    for name, value in manifest["loader"]["env"].items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(manifest["loader"]["argv"][3:])
    return config_from_args(args, layers=args.layers)


def test_without_offload_the_node_offloads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = render()
    assert manifest["loader"]["env"]["TEESHARD_OFFLOAD"] == ""
    assert node_config(manifest, monkeypatch).offload_url is None


def test_offload_pins_the_accelerator_in_the_measured_manifest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    manifest = render(offload_url="tcp://10.0.0.5:7100", accel_key=key, offload_mode="verified")
    config = node_config(manifest, monkeypatch)
    assert (config.offload_url, config.accel_key, config.offload_mode) == (
        "tcp://10.0.0.5:7100", key, "verified",
    )  # fmt: skip
    monkeypatch.setenv("TEESHARD_OFFLOAD_MODE", "")
    manifest = render(offload_url="tcp://10.0.0.5:7100", accel_key=key)
    assert node_config(manifest, monkeypatch).offload_mode == "blinded+verified"
