"""Offload wired into real nodes: a 2-node split, each node with its own accelerator process.

Greedy output equals the unsplit Hugging Face model; each node's attested manifest
states its mode and the accelerator's key fingerprint (and the entry node's
RA-TLS check of the next node still passes on the weights hash); receipts bind
the offload statement; a policy can forbid offload or require blinded+verified.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from teeshard.attest import Policy
from teeshard.attest.receipts import Receipt
from teeshard.ledger.registration import (
    ExpectedShards,
    RegistrationRefused,
    admit_from_url,
    default_verifier,
    register_from_url,
)
from teeshard.ledger.sql import SqlLedger
from teeshard.model.layer_range import LayerRange
from teeshard.offload import OffloadPolicyError, check_node_offload
from teeshard.offload.launch import AcceleratorProcess
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster
from tests.integration.test_split_exact import reference_generation
from tests.offload.conftest import StartAccel

PROMPT = [0, 17, 250, 33, 101, 7, 402, 99]
STEPS = 12


def offload_cluster(
    model: TinyModel,
    ranges: list[LayerRange],
    accels: list[AcceleratorProcess],
    modes: tuple[str, ...],
) -> LocalCluster:
    options: dict[int, dict[str, object]] = {
        i: {"offload_url": a.endpoint, "accel_key": a.public_key.decode(), "offload_mode": m}
        for i, (a, m) in enumerate(zip(accels, modes, strict=True))
    }
    return LocalCluster(model.path, len(ranges), ranges=ranges, node_options=options)


async def test_split_with_offload_matches_and_attests(
    start_accel: StartAccel, tiny_llama: TinyModel
) -> None:
    ranges = [LayerRange(0, 2), LayerRange(2, 4)]
    accels = [start_accel(tiny_llama.path, r, "field") for r in ranges]
    modes = ("blinded+verified", "verified")
    ref_tokens, _ = reference_generation(tiny_llama, PROMPT, STEPS)
    with offload_cluster(tiny_llama, ranges, accels, modes) as cluster:
        client = cluster.entry_stage()
        session = await client.open_session(max_len=len(PROMPT) + STEPS)
        token, _ = await client.step(session, PROMPT)
        tokens = [token]
        while len(tokens) < STEPS:
            token, _ = await client.step(session, [token])
            tokens.append(token)
        receipts = [Receipt.from_json(r) for r in await client.close_session(session, sign=True)]
        manifests = [n.node.trust.attestation.manifest for n in cluster.nodes if n.node]
        # one session decoding, yet the accelerator's round trips stayed off the loop
        inline = [n.node.service.counters.inline_batches for n in cluster.nodes if n.node]
    assert tokens == ref_tokens
    assert inline == [0, 0]
    for manifest, accel, mode in zip(manifests, accels, modes, strict=True):
        assert manifest.offload is not None
        assert manifest.offload["mode"] == mode
        assert manifest.offload["accelerator_keys"] == [accel.fingerprint]
        assert manifest.combined_hash != manifest.weights_hash  # the statement is quoted
        statement = check_node_offload("verified", manifest.offload)
        assert statement is not None and statement.mode.value == mode
        with pytest.raises(OffloadPolicyError, match="offload = forbid"):
            check_node_offload("forbid", manifest.offload)
    check_node_offload("blinded+verified", manifests[0].offload)
    with pytest.raises(OffloadPolicyError, match="requires offload = blinded"):
        check_node_offload("blinded+verified", manifests[1].offload)
    with pytest.raises(OffloadPolicyError, match="not allowed"):
        check_node_offload("any", manifests[0].offload, allowed_keys=("00" * 32,))
    # each stage's receipt names the manifest hash that includes its offload statement
    by_layers = {str(m.layers): m for m in manifests}
    assert {str(r.layers) for r in receipts} == set(by_layers)
    for receipt in receipts:
        assert receipt.manifest_hash == by_layers[str(receipt.layers)].combined_hash


def test_node_command_line_and_config_checks(tiny_llama: TinyModel) -> None:
    from teeshard.cli import build_parser
    from teeshard.cli.node import config_from_args

    args = build_parser().parse_args(
        ["node", "--model", str(tiny_llama.path), "--layers", "0:4", "--offload",
         "tcp://127.0.0.1:7100", "--accel-key", "k" * 40, "--offload-mode", "plain"]
    )  # fmt: skip
    config = config_from_args(args, layers=args.layers)
    assert (config.offload_url, config.offload_mode, config.accel_key) == (
        "tcp://127.0.0.1:7100", "plain", "k" * 40,
    )  # fmt: skip
    default = build_parser().parse_args(
        ["node", "--model", str(tiny_llama.path), "--layers", "0:4", "--offload", "tcp://h:1",
         "--accel-key", "k" * 40]
    )  # fmt: skip
    assert config_from_args(default, layers=default.layers).offload_mode == "blinded+verified"
    with pytest.raises(ValueError, match="--offload needs --accel-key"):
        replace(config, accel_key=None).validate(4)


async def test_a_lying_accelerator_fails_the_step_clearly(
    start_accel: StartAccel, tiny_llama: TinyModel
) -> None:
    liar = start_accel(
        tiny_llama.path, LayerRange(0, 4), "field",
        module="tests.offload.malicious_accel", extra=("--tamper", "flip"),
    )  # fmt: skip
    with offload_cluster(tiny_llama, [LayerRange(0, 4)], [liar], ("verified",)) as cluster:
        client = cluster.entry_stage()
        for _ in range(2):  # and again: that accelerator is not used any more
            session = await client.open_session(max_len=len(PROMPT) + 2)
            with pytest.raises(Exception, match="accelerator") as caught:
                await client.step(session, PROMPT)
            assert "Freivalds" in str(caught.value) or "refusing" in str(caught.value)


def test_a_node_that_offloads_registers_and_is_admitted_in_the_pool(
    start_accel: StartAccel, tiny_llama: TinyModel, tmp_path: Path
) -> None:
    """Expected shards list weights hashes; an offloading node quotes a combined hash
    (weights + offload statement). Registration checks the weights hash and records
    the combined one, which its receipts bind (it was refused before: issue 11)."""
    layers = LayerRange(2, 4)
    accel = start_accel(tiny_llama.path, layers, "field")
    options: dict[int, dict[str, object]] = {0: {
        "offload_url": accel.endpoint, "accel_key": accel.public_key.decode(),
        "offload_mode": "blinded+verified", "operator": "carol",
    }}  # fmt: skip
    owner = SqlLedger.open(f"sqlite:///{tmp_path / 'ledger.db'}", "owner")
    owner.open_account("carol")
    owner.authorize_entry("entry-1")
    with LocalCluster(tiny_llama.path, 1, ranges=[layers], node_options=options) as cluster:
        node = cluster.entry
        assert node.node is not None and node.config.policy_path is not None
        manifest = node.node.trust.attestation.manifest
        expected = ExpectedShards.from_policy(Policy.load(node.config.policy_path))
        verifier = default_verifier(node.config.policy_path)
        assert manifest.combined_hash.hex() not in expected.shards  # what was compared before
        assert manifest.weights_hash.hex() in expected.shards
        registered = register_from_url(owner.as_actor("carol"), node.http_url, expected, verifier)
        assert registered.node.manifest_hash == manifest.combined_hash.hex()
        assert registered.node.layers == "2:4"
        admitted = admit_from_url(owner.as_actor("entry-1"), node.http_url, expected, verifier)
        assert admitted.admitted and owner.is_operator("carol")
        # a shard of other weights is still refused, offload or not
        with pytest.raises(RegistrationRefused, match="not an expected shard"):
            other = ExpectedShards.of(["ab" * 32], model="tiny")
            register_from_url(owner.as_actor("carol"), node.http_url, other, verifier)
    owner.close()
