"""Deployment files: pinned images, the dstack socket, health checks, Gramine attestation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["docker-compose.node1.yml", "docker-compose.node2.yml"])
def test_compose_files(name: str) -> None:
    compose = yaml.safe_load((DEPLOY / name).read_text())
    node = compose["services"]["teeshard"]
    for service in compose["services"].values():
        image = service["image"]
        assert not image.endswith(":latest") and re.search(r":\d+\.\d+\.\d+|@sha256:", image)
    assert "/var/run/dstack.sock:/var/run/dstack.sock" in node["volumes"]
    assert any(v.startswith("models:/models") for v in node["volumes"])
    assert "/health" in " ".join(node["healthcheck"]["test"])
    command = node["command"]
    assert "--tee=dstack" in command and "--policy=/etc/teeshard/policy.toml" in command
    assert "allowed_tcb_statuses" in compose["configs"]["policy"]["content"]
    if name.endswith("node1.yml"):
        assert "--entry" in command and any(c.startswith("--next=wss://") for c in command)
        assert "compose_hashes" in compose["configs"]["policy"]["content"]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pin_their_bases(name: str) -> None:
    text = (DEPLOY / name).read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert re.search(r":\d+\.\d+\.\d+-", base) and "latest" not in base
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert "download.pytorch.org/whl/c" in text


def test_gramine_template() -> None:
    text = (DEPLOY / "gramine" / "teeshard-node.manifest.template").read_text()
    assert 'sgx.remote_attestation = "dcap"' in text
    assert "sgx.debug = false" in text
    assert '"file:{{ model_dir }}/"' in text.split("sgx.trusted_files")[1]
    assert "loader.entrypoint.uri" in text and "sgx.enclave_size" in text
    assert '"--tee", "gramine"' in text
