"""Attestation pins the number format: an int8 node is admitted only by an int8 policy.

The attack: a node computes with other numbers than the policy names, here int8
weights where the verifier expects float32 (before the manifest's ``quantize``
field, both hashed alike, so a verifier could not tell them apart). Each policy
below is built from ``teeshard manifest`` output, as an operator would, and real
nodes on loopback are verified against it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from teeshard.attest import simulated_public_key
from teeshard.cli import main
from teeshard.model.formats import NumberFormat
from teeshard.model.quantize import INT8_RECIPE, W8A8_RECIPE
from teeshard.paths import simulated_tee_dir
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster
from tests.integration.test_ra_tls import assert_refused

INT8 = NumberFormat("bfloat16", "int8")
W8A8 = NumberFormat("bfloat16", "w8a8")


def manifest_hash(capsys: pytest.CaptureFixture[str], model: Path, layers: str, *extra: str) -> str:
    """What ``teeshard manifest`` prints as the expected hash."""
    capsys.readouterr()
    argv = ["manifest", "--model", str(model), "--layers", layers, "--model-name", "tiny"]
    assert main([*argv, *extra]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("manifest:")]
    return lines[0].split()[1]


def policy_from_cli(
    capsys: pytest.CaptureFixture[str], model: Path, path: Path, *extra: str
) -> Path:
    key = simulated_public_key(simulated_tee_dir()).hex()
    lines = ["allow_simulated = true", f'simulated_keys = ["{key}"]', ""]
    for layers, entry in (("0:2", ("--entry",)), ("2:4", ())):
        digest = manifest_hash(capsys, model, layers, *entry, *extra)
        lines += ["[[manifests]]", 'model = "tiny"', f'layers = "{layers}"', f'hash = "{digest}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def complete(cluster: LocalCluster) -> httpx.Response:
    body = {"model": "tiny", "prompt": [3, 17, 250, 33], "max_tokens": 4, "temperature": 0}
    return httpx.post(cluster.entry.http_url + "/v1/completions", json=body, timeout=60)


def test_an_int8_node_passes_against_the_int8_manifest(
    tiny_llama: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = policy_from_cli(capsys, tiny_llama.path, tmp_path / "int8.toml", "--quantize", "int8")
    with LocalCluster(tiny_llama.path, 2, number_format=INT8, policy_path=policy) as cluster:
        response = complete(cluster)
        assert response.status_code == 200, response.text
        assert len(response.json()["receipts"]) == 2
        downstream = cluster.nodes[1]
        assert downstream.get("/health").json()["quantize"] == "int8"
        assert downstream.node is not None
        manifest = downstream.node.trust.attestation.manifest  # what its quote binds
        assert (manifest.quantize, manifest.dtype) == (INT8_RECIPE, "bfloat16")


def test_an_int8_node_is_refused_against_the_float32_manifest(
    tiny_llama: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = policy_from_cli(capsys, tiny_llama.path, tmp_path / "float32.toml")
    with LocalCluster(tiny_llama.path, 2, number_format=INT8, policy_path=policy) as cluster:
        assert_refused(complete(cluster), "is not the expected")
        downstream = cluster.nodes[1]
        assert downstream.get("/health").json()["sessions"]["open"] == 0
        assert cluster.entry.get("/health").json()["status"] == "ok"


def test_a_bfloat16_node_is_refused_against_the_int8_manifest(
    tiny_llama: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same dtype field, same source tensors: only the recipe tells them apart."""
    policy = policy_from_cli(capsys, tiny_llama.path, tmp_path / "int8.toml", "--quantize", "int8")
    bf16 = NumberFormat("bfloat16")
    with LocalCluster(tiny_llama.path, 2, number_format=bf16, policy_path=policy) as cluster:
        assert_refused(complete(cluster), "is not the expected")


def test_a_w8a8_node_is_refused_against_the_int8_manifest_of_the_same_weights(
    tiny_llama: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """w8a8 holds int8's exact weights but rounds the activations too: another computation,
    so an int8 policy must not admit it, and its own policy must."""
    int8 = policy_from_cli(capsys, tiny_llama.path, tmp_path / "int8.toml", "--quantize", "int8")
    with LocalCluster(tiny_llama.path, 2, number_format=W8A8, policy_path=int8) as cluster:
        assert_refused(complete(cluster), "is not the expected")
    own = policy_from_cli(capsys, tiny_llama.path, tmp_path / "w8a8.toml", "--quantize", "w8a8")
    with LocalCluster(tiny_llama.path, 2, number_format=W8A8, policy_path=own) as cluster:
        response = complete(cluster)
        assert response.status_code == 200, response.text
        downstream = cluster.nodes[1]
        assert downstream.get("/health").json()["quantize"] == "w8a8"
        assert downstream.node is not None
        assert downstream.node.trust.attestation.manifest.quantize == W8A8_RECIPE
