"""Fixtures for the attestation tests: real DCAP vectors, tiny checkpoints, simulated nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.manifest import ShardManifest, compute_manifest
from teeshard.attest.providers.simulated import SimulatedProvider
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from tests.attest.helpers import NodeFactory, build_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("attest-llama"))


@pytest.fixture(scope="session")
def llama_bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("attest-llama-bf16"), torch.bfloat16)


@pytest.fixture(scope="session")
def manifests(llama_dir: Path) -> dict[str, ShardManifest]:
    """Manifests of the tiny Llama split in two: layers 0:2 and 2:3."""
    checkpoint = Checkpoint(llama_dir)
    return {
        spec: compute_manifest(checkpoint, LayerRange.parse(spec), "float32")
        for spec in ("0:2", "2:3")
    }


@pytest.fixture(scope="session")
def simulated_provider() -> SimulatedProvider:
    return SimulatedProvider()


@pytest.fixture
def make_node(simulated_provider: SimulatedProvider) -> NodeFactory:
    def make(manifest: ShardManifest) -> NodeAttestation:
        return NodeAttestation.create(simulated_provider, manifest)

    return make
