"""Offload wired into real nodes: a 2-node split, each node with its own accelerator process.

Greedy output equals the unsplit Hugging Face model; each node's attested manifest
states its mode and the accelerator's key fingerprint (and the entry node's
RA-TLS check of the next node still passes on the weights hash); receipts bind
the offload statement; a policy can forbid offload or require blinded+verified.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from teeshard.attest.receipts import Receipt
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
    assert tokens == ref_tokens
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
