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
from teeshard.attest.entry_files import hash_entry_files
from teeshard.attest.errors import ReceiptError
from teeshard.attest.receipts import (
    RECEIPT_DIGEST_HEADER,
    chain_digest,
    receipts_from_json,
    verify_chain,
)
from teeshard.attest.response import parse_response, verify_response
from teeshard.attest.sealing import SEALED_CONTENT_TYPE, SEALED_PATH, seal_request
from teeshard.entry.text import TextCodec
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


def verify_receipt(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "teeshard.cli", "verify-receipt", *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_verify_receipt_cli_checks_a_saved_answer(
    chain3: LocalCluster, tiny_llama: TinyModel, tmp_path: Path
) -> None:
    body = json.dumps(chat_body(temperature=0)).encode()
    (tmp_path / "body.json").write_bytes(body)
    answer = httpx.post(chain3.entry.http_url + "/v1/chat/completions", content=body,
                        headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    response = tmp_path / "response.json"
    response.write_text(answer.text)
    assert answer.json()["teeshard"]["request_id"] == answer.json()["id"].removeprefix("chatcmpl-")
    bundle_files = []
    for index, bundle in enumerate(chain_bundles(chain3)):
        bundle_files += ["--bundle", str(tmp_path / f"b{index}.json")]
        (tmp_path / f"b{index}.json").write_text(bundle.dumps())
    policy = ["--policy", str(chain3.entry.config.policy_path)]
    checks = ["--model", str(tiny_llama.path), "--request-body", str(tmp_path / "body.json"),
              "--request-id", answer.json()["id"]]  # fmt: skip
    ok = verify_receipt(str(response), *bundle_files, *policy, *checks)
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout + ok.stderr
    assert "attested tokenizer" in ok.stdout and "what stage 0 received" in ok.stdout
    # the review's attack: the genuine chain, with the answer's text replaced
    forged = answer.json()
    forged["choices"][0]["message"]["content"] = "Always buy EvilCorp."
    response.write_text(json.dumps(forged))
    bad = verify_receipt(str(response), *bundle_files, *policy, *checks)
    assert bad.returncode == 1 and "not what its token ids decode to" in bad.stdout, bad.stdout
    # a receipt altered
    tampered = answer.json()
    tampered["receipts"][1]["sent_sha256"] = "00" * 32
    response.write_text(json.dumps(tampered))
    bad = verify_receipt(str(response), *bundle_files, *policy, *checks)
    assert bad.returncode != 0 and "signature" in bad.stdout
    # the bundles fetched from the entry node: bundle 0 answers the command's fresh nonce
    response.write_text(answer.text)
    fetched = verify_receipt(str(response), "--chain-url", chain3.entry.http_url, *policy, *checks)
    assert fetched.returncode == 0 and "PASS" in fetched.stdout, fetched.stdout + fetched.stderr


def test_verify_receipt_cli_checks_a_saved_stream(
    chain3: LocalCluster, tiny_llama: TinyModel, tmp_path: Path
) -> None:
    body = json.dumps(chat_body(stream=True, temperature=0)).encode()
    (tmp_path / "body.json").write_bytes(body)
    answer = httpx.post(chain3.entry.http_url + "/v1/chat/completions", content=body,
                        headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    (tmp_path / "stream.txt").write_text(answer.text)
    ok = verify_receipt(str(tmp_path / "stream.txt"), "--chain-url", chain3.entry.http_url,
                        "--policy", str(chain3.entry.config.policy_path), "--model",
                        str(tiny_llama.path), "--request-body", str(tmp_path / "body.json"))  # fmt: skip
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout + ok.stderr


def test_answers_verify_with_the_library_rules(chain3: LocalCluster, tiny_llama: TinyModel) -> None:
    """Stop sequences and completions too: the text is exactly what the ids decode to."""
    codec = TextCodec(tiny_llama.path)
    entry = hash_entry_files(tiny_llama.path)
    eos = codec.eos_ids() | {1}
    bundles = chain_bundles(chain3)
    for path, body in (
        ("/v1/completions", {"model": "tiny", "prompt": "the model", "max_tokens": 12, "temperature": 0}),
        ("/v1/completions", {"model": "tiny", "prompt": "the model", "max_tokens": 12, "temperature": 0,
                             "echo": True}),
        ("/v1/chat/completions", chat_body(max_tokens=12, temperature=0)),
        ("/generate", {"prompt": "the model", "max_tokens": 5}),
    ):  # fmt: skip
        raw = json.dumps(body).encode()
        answer = httpx.post(chain3.entry.http_url + path, content=raw,
                            headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        report = verify_response(parse_response(answer.text), bundles, entry_files=entry,
                                 decode=codec.decode, eos_token_ids=eos, request_body=raw)  # fmt: skip
        assert report.text_checked and report.body_checked
    # a stop sequence taken from what the model says cuts the text: still verifiable
    plain = httpx.post(chain3.entry.http_url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "the model", "max_tokens": 12, "temperature": 0}).json()  # fmt: skip
    text = plain["choices"][0]["text"]
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    raw = json.dumps({"model": "tiny", "prompt": "the model", "max_tokens": 12,
                      "temperature": 0, "stop": [stop]}).encode()  # fmt: skip
    answer = httpx.post(chain3.entry.http_url + "/v1/completions", content=raw,
                        headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    claims = parse_response(answer.text)
    assert len(claims.text) < len(text)
    verify_response(claims, bundles, entry_files=entry, decode=codec.decode,
                    eos_token_ids=eos, request_body=raw)  # fmt: skip


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


def test_sealed_request_round_trip(chain3: LocalCluster, tiny_llama: TinyModel) -> None:
    recorded: list[bytes] = []

    def ingress(request: httpx.Request) -> None:  # what an HTTP ingress outside the TEE sees
        recorded.append(b"".join(k + b": " + v for k, v in request.headers.raw) + request.read())

    http = httpx.Client(event_hooks={"request": [ingress]}, timeout=60)
    client = SealedClient(chain3.entry.http_url, policy_of(chain3), http=http)
    status, body = client.post_json("/v1/chat/completions", chat_body(temperature=0))
    plain = post(chain3, chat_body(temperature=0)).json()
    assert status == 200
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    # the sealed answer carries its receipts, and they prove it for the inner body
    verify_response(parse_response(json.dumps(body)), chain_bundles(chain3),
                    entry_files=hash_entry_files(tiny_llama.path),
                    decode=TextCodec(tiny_llama.path).decode, eos_token_ids={1},
                    request_body=json.dumps(chat_body(temperature=0)).encode())  # fmt: skip
    sealed_posts = [r for r in recorded if b"teeshard-sealed" in r]
    assert sealed_posts and all(SECRET.encode() not in r for r in sealed_posts)


def test_sealed_stream_arrives_record_by_record(chain3: LocalCluster) -> None:
    client = SealedClient(chain3.entry.http_url, policy_of(chain3))
    raw = json.dumps(chat_body(stream=True, max_tokens=8)).encode()
    with client.stream("/v1/chat/completions", raw) as answer:
        assert answer.status == 200 and answer.content_type.startswith("text/event-stream")
        chunks = list(answer.iter_bytes())
    events = [line for line in b"".join(chunks).decode().splitlines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(chunks) >= 3  # not one blob at the end
    assert receipts_from_json(json.loads(events[-2][5:]))


def test_tampered_sealed_request_is_rejected(chain3: LocalCluster) -> None:
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


async def test_a_stage_close_can_sign(chain3: LocalCluster) -> None:
    from teeshard.attest.receipts import Receipt

    client = chain3.entry_stage()
    session = await client.open_session(max_len=16, return_logits=False)
    token, _ = await client.step(session, [5, 6, 7])
    await client.step(session, [token])
    receipts = [Receipt.from_json(r) for r in await client.close_session(session, sign=True)]
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
