"""Every answer carries a receipt chain anyone can check; requests can be sealed end to end."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teeshard.attest import Bundle, Policy, SealedClient, verify_bundle
from teeshard.attest.errors import ReceiptError
from teeshard.attest.receipts import (
    RECEIPT_DIGEST_HEADER,
    chain_digest,
    receipts_from_json,
    verify_chain,
)
from teeshard.attest.sealing import SEALED_CONTENT_TYPE, SEALED_PATH
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster

SECRET = "the-password-is-tangerine"


@pytest.fixture(scope="module")
def chain3(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    with LocalCluster(tiny_llama.path, 3) as cluster:
        yield cluster


def policy_of(cluster: LocalCluster) -> Policy:
    policy_path = cluster.entry.config.policy_path
    assert policy_path is not None
    return Policy.load(policy_path)


def chain_bundles(cluster: LocalCluster) -> list[Bundle]:
    nonce = secrets.token_bytes(32)
    body = cluster.entry.get(f"/v1/attestation/chain?nonce={nonce.hex()}").json()
    bundles = [Bundle.from_json(b) for b in body["bundles"]]
    verify_bundle(bundles[0], policy_of(cluster), nonce=nonce)  # the entry answers our nonce
    return bundles


def post(cluster: LocalCluster, body: dict[str, Any]) -> httpx.Response:
    raw = json.dumps(body).encode()
    return httpx.post(cluster.entry.http_url + "/v1/chat/completions", content=raw,
                      headers={"content-type": "application/json"}, timeout=60)  # fmt: skip


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": SECRET}],
        "max_tokens": 6,
        **extra,
    }


def test_response_carries_a_verifiable_chain(chain3: LocalCluster) -> None:
    body = chat_body()
    response = post(chain3, body)
    assert response.status_code == 200
    answer = response.json()
    receipts = receipts_from_json(answer)
    bundles = chain_bundles(chain3)
    assert len(bundles) == 3 and len(receipts) == 3
    report = verify_chain(receipts, bundles, request_id=answer["id"].removeprefix("chatcmpl-"))
    assert report.stages == 3 and (report.layers.start, report.layers.end) == (0, 4)
    assert (
        response.headers[RECEIPT_DIGEST_HEADER]
        == chain_digest(receipts).hex()
        == answer["receipt_digest"]
    )
    # stage 0 says what it received: exactly the bytes this client sent
    assert receipts[0].received_sha256 == hashlib.sha256(json.dumps(body).encode()).digest()


def test_stream_ends_with_the_chain(chain3: LocalCluster) -> None:
    events = []
    with httpx.stream("POST", chain3.entry.http_url + "/v1/chat/completions",
                      json=chat_body(stream=True, stream_options={"include_usage": True}), timeout=60) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    assert "receipts" not in events[-2] and "usage" in events[-1]
    receipts = receipts_from_json(events[-1])
    verify_chain(
        receipts, chain_bundles(chain3), request_id=events[-1]["id"].removeprefix("chatcmpl-")
    )


def test_a_receipt_from_another_request_does_not_fit(chain3: LocalCluster) -> None:
    first = receipts_from_json(post(chain3, chat_body()).json())
    second_answer = post(chain3, chat_body()).json()
    second = receipts_from_json(second_answer)
    mixed = [second[0], first[1], second[2]]
    with pytest.raises(ReceiptError, match=r"request|link"):
        verify_chain(mixed, chain_bundles(chain3))


def test_verify_receipt_cli_checks_a_saved_response(chain3: LocalCluster, tmp_path: Path) -> None:
    response = tmp_path / "response.json"
    response.write_text(post(chain3, chat_body()).text)
    bundle_files = []
    for index, bundle in enumerate(chain_bundles(chain3)):
        bundle_files += ["--bundle", str(tmp_path / f"b{index}.json")]
        (tmp_path / f"b{index}.json").write_text(bundle.dumps())
    policy = str(chain3.entry.config.policy_path)
    command = [
        sys.executable,
        "-m",
        "teeshard.cli",
        "verify-receipt",
        str(response),
        *bundle_files,
        "--policy",
        policy,
    ]
    ok = subprocess.run(command, capture_output=True, text=True)
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout + ok.stderr
    tampered = json.loads(response.read_text())
    tampered["receipts"][1]["sent_sha256"] = "00" * 32
    response.write_text(json.dumps(tampered))
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode != 0 and "signature" in (bad.stdout + bad.stderr)
    # the same check with the bundles fetched from the entry node's chain endpoint
    by_url = [*command[:5], "--chain-url", chain3.entry.http_url, "--policy", policy]
    response.write_text(post(chain3, chat_body()).text)
    fetched = subprocess.run(by_url, capture_output=True, text=True)
    assert fetched.returncode == 0 and "PASS" in fetched.stdout, fetched.stdout + fetched.stderr


def test_attestation_endpoints_never_show_prompts(chain3: LocalCluster) -> None:
    post(chain3, chat_body())
    nonce = secrets.token_hex(32)
    for node in chain3.nodes:
        for path in (
            f"/v1/attestation?nonce={nonce}",
            f"/v1/attestation/chain?nonce={nonce}",
            "/health",
            "/metrics",
        ):
            assert SECRET not in node.get(path).text
    assert chain3.entry.get("/v1/attestation?nonce=abcd").status_code == 400  # too short
    assert chain3.entry.get("/v1/attestation").status_code == 400  # no nonce at all


def test_sealed_request_round_trip(chain3: LocalCluster) -> None:
    recorded: list[bytes] = []

    def ingress(request: httpx.Request) -> None:  # what an HTTP ingress outside the TEE sees
        recorded.append(request.read())

    http = httpx.Client(event_hooks={"request": [ingress]}, timeout=60)
    client = SealedClient(chain3.entry.http_url, policy_of(chain3), http=http)
    status, body = client.post_json("/v1/chat/completions", chat_body(temperature=0))
    plain = post(chain3, chat_body(temperature=0)).json()
    assert status == 200
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert receipts_from_json(body)  # the sealed answer carries its receipts too
    sealed_posts = [r for r in recorded if r]
    assert sealed_posts and all(SECRET.encode() not in r for r in sealed_posts)


def test_tampered_sealed_request_is_rejected(chain3: LocalCluster) -> None:
    from teeshard.attest.sealing import seal_request

    node = SealedClient(chain3.entry.http_url, policy_of(chain3)).verify()
    sealed, _ = seal_request(node.fingerprint, node.sealing_public_key, "/v1/chat/completions",
                             json.dumps(chat_body()).encode())  # fmt: skip
    tampered = bytearray(sealed)
    tampered[len(tampered) // 2] ^= 1
    response = httpx.post(chain3.entry.http_url + SEALED_PATH, content=bytes(tampered),
                          headers={"content-type": SEALED_CONTENT_TYPE})  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "sealed_request_invalid"
    assert post(chain3, chat_body()).status_code == 200  # and the node serves on


async def test_pipeline_socket_close_can_sign(chain3: LocalCluster) -> None:
    from teeshard.attest.receipts import Receipt
    from teeshard.transport.pipeline_client import PipelineClient

    client = PipelineClient(chain3.entry.ws_url)
    session = await client.open_session(max_len=16, return_logits=False)
    token, _ = await client.step(session, [5, 6, 7])
    await client.step(session, [token])
    receipts = [Receipt.from_json(r) for r in await client.close_session(session, sign=True)]
    await client.disconnect()
    report = verify_chain(receipts, chain_bundles(chain3), request_id=session)
    assert report.stages == 3


@pytest.mark.parametrize("node_index", [0, 2])
def test_verify_cli_against_live_nodes(
    chain3: LocalCluster, node_index: int, tmp_path: Path
) -> None:
    node = chain3.nodes[node_index]
    assert node.config.policy_path is not None
    strict = tmp_path / "strict.toml"  # the chain's policy without allow_simulated
    strict.write_text(node.config.policy_path.read_text().replace("allow_simulated = true", ""))
    base = [sys.executable, "-m", "teeshard.cli", "verify", node.http_url, "--policy", str(strict)]
    refused = subprocess.run(base, capture_output=True, text=True)
    assert refused.returncode != 0 and "simulated" in (refused.stdout + refused.stderr).lower()
    passed = subprocess.run([*base, "--allow-simulated", "--save-bundle", str(tmp_path / "b.json")],
                            capture_output=True, text=True)  # fmt: skip
    output = passed.stdout + passed.stderr
    assert passed.returncode == 0 and "PASS" in output and "INSECURE" in output, output
    assert Bundle.loads((tmp_path / "b.json").read_text()).manifest.layers == node.config.layers
