"""Sealed requests against a paying entry node (issue 8, item 7), on a real SQLite ledger.

The review's attacks: the ingress read the API key from a header outside the
seal; a captured sealed request replayed three times was charged three times.
Now the key is inside the seal, and a replay is refused and charged once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from teeshard.attest.errors import SealedRequestRefused
from teeshard.attest.sealed_client import SealedClient
from teeshard.attest.sealed_stream import ResponseReader
from teeshard.attest.sealing import (
    IDEMPOTENCY_HEADER,
    SEALED_CONTENT_TYPE,
    SEALED_PATH,
    OpenedRequest,
    seal_request,
)
from teeshard.attest.verify.bundle import VerifiedNode
from teeshard.attest.verify.policy import Policy
from teeshard.entry.sealed import _inner_scope
from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster

KEY = "tsk_erin_0123456789abcdef"


@dataclass
class Paying:
    cluster: LocalCluster
    owner: SqlLedger
    node: VerifiedNode

    @property
    def url(self) -> str:
        return self.cluster.entry.http_url

    def client(self, **options: Any) -> SealedClient:
        assert self.cluster.entry.config.policy_path is not None
        policy = Policy.load(self.cluster.entry.config.policy_path)
        return SealedClient(self.url, policy, **options)

    def balance(self) -> int:
        return self.owner.balance("erin").available

    def seal(self, body: dict[str, object], **options: Any) -> tuple[bytes, ResponseReader]:
        raw = json.dumps(body).encode()
        return seal_request(self.node.fingerprint, self.node.sealing_public_key,
                            "/v1/chat/completions", raw, **options)  # fmt: skip

    def post(self, sealed: bytes, **headers: str) -> httpx.Response:
        return httpx.post(self.url + SEALED_PATH, content=sealed, timeout=60,
                          headers={"content-type": SEALED_CONTENT_TYPE, **headers})  # fmt: skip


def chat(**extra: object) -> dict[str, object]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4, "temperature": 0, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def paying(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paying]:
    folder = tmp_path_factory.mktemp("sealed-market")
    url = f"sqlite:///{folder / 'ledger.db'}"
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account("erin")
    owner.deposit("erin", 1_000_000)
    owner.add_api_key("erin", KEY)
    options = {"ledger_url": url, "ledger_actor": "entry-1", "free_for_operators": False}
    with LocalCluster(tiny_llama.path, 2, entry_options=options) as cluster:
        paying = Paying(cluster, owner, None)  # type: ignore[arg-type]
        paying.node = paying.client().verify()
        yield paying
    owner.close()


def test_attack_the_ingress_sees_no_api_key(paying: Paying) -> None:
    seen: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [seen.append]}, timeout=60)
    client = paying.client(http=http, api_key=KEY)
    before = paying.balance()
    status, body = client.post_json("/v1/chat/completions", chat())
    assert status == 200 and body["usage"]["cost"] > 0
    assert paying.balance() == before - body["usage"]["cost"]  # the sealed key was billed
    sealed = [r for r in seen if r.url.path == SEALED_PATH]
    assert sealed and all("authorization" not in r.headers for r in sealed)
    for request in sealed:
        wire = b"".join(k + v for k, v in request.headers.raw) + request.read()
        assert KEY.encode() not in wire


def test_attack_a_replayed_sealed_request_is_refused_and_charged_once(paying: Paying) -> None:
    sealed, reader = paying.seal(chat(), api_key=KEY)
    before = paying.balance()
    first = paying.post(sealed)
    answer = reader.open_all(first.content)
    cost = json.loads(answer.body)["usage"]["cost"]
    assert first.status_code == answer.status == 200 and cost > 0
    for _ in range(3):  # the captured ciphertext, sent again
        replay = paying.post(sealed)
        assert replay.status_code == 409
        assert replay.json()["error"]["code"] == "sealed_request_replayed"
    assert paying.balance() == before - cost
    again = paying.client(api_key=KEY).post_json("/v1/chat/completions", chat())
    assert again[0] == 200  # and the node serves on


def test_a_stale_or_future_sealed_request_is_refused(paying: Paying) -> None:
    before = paying.balance()
    for skew in (-1000, +1000):
        sealed, _ = paying.seal(chat(), api_key=KEY, now=time.time() + skew)
        response = paying.post(sealed)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "sealed_request_expired"
    assert paying.balance() == before


def test_a_key_outside_the_seal_is_refused(paying: Paying) -> None:
    sealed, _ = paying.seal(chat(), api_key=KEY)
    response = paying.post(sealed, authorization=f"Bearer {KEY}")
    assert response.status_code == 400 and "inside the seal" in response.json()["error"]["message"]


def test_errors_of_the_inner_request_stay_inside_the_seal(paying: Paying) -> None:
    status, body = paying.client().post_json("/v1/chat/completions", chat())  # no key
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    with pytest.raises(SealedRequestRefused) as refused:
        paying.client(api_key=KEY).post_json("/v1/models", {})
    assert refused.value.status == 400


def test_the_inner_request_carries_the_key_and_the_idempotency_key() -> None:
    opened = OpenedRequest(1, bytes(16), KEY, "/v1/completions", b"{}", bytes(range(32)), bytes(32))
    scope = _inner_scope(
        Request({"type": "http", "headers": [], "client": ("127.0.0.1", 1)}), opened
    )
    headers = dict(scope["headers"])
    assert headers[b"authorization"] == f"Bearer {KEY}".encode()
    assert headers[IDEMPOTENCY_HEADER.lower().encode()] == bytes(range(32)).hex().encode()
    assert scope["path"] == "/v1/completions"


def test_an_abandoned_sealed_stream_closes_its_session(paying: Paying) -> None:
    """A client that stops reading and hangs up: the inner generation is released."""
    before = paying.owner.balance("erin")
    raw = json.dumps(chat(stream=True, max_tokens=200)).encode()
    with paying.client(api_key=KEY).stream("/v1/chat/completions", raw) as answer:
        first = next(answer.iter_bytes())
        assert first.startswith(b"data: ")
    # the back-pressure holds the generation (it cannot finish 200 tokens unread)
    deadline = time.monotonic() + 30
    open_sessions = -1
    while time.monotonic() < deadline:
        open_sessions = paying.cluster.entry.get("/health").json()["sessions"]["open"]
        if open_sessions == 0 and not paying.owner.balance("erin").reserved:
            break
        time.sleep(0.1)
    assert open_sessions == 0
    assert paying.owner.balance("erin").reserved == 0 == before.reserved
