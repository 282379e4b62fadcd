"""RA-TLS between nodes: an untrusted next node is refused before any hidden state reaches it.

Three ways a next node can be untrustworthy, each with real servers on loopback:
it serves other weights (its manifest is not the expected one), its evidence
does not verify (a tampered nonce signature), or the TLS endpoint is not the
attested node (an impostor relaying a genuine bundle with its own certificate).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, WebSocket

from teeshard.attest.identity import NodeIdentity
from teeshard.model.layer_range import LayerRange
from teeshard.procutil import free_port
from tests.checkpoints import TinyModel, build_tiny_model
from tests.cluster import LocalCluster

Tamper = Callable[[dict[str, Any]], dict[str, Any]]


class Impostor:
    """An HTTPS/WSS server with its own certificate that relays a real node's attestation.

    It records every pipeline connection: the tests assert there are none.
    """

    def __init__(self, real_url: str, tamper: Tamper | None = None) -> None:
        self.real_url = real_url
        self.tamper = tamper
        self.pipeline_connections = 0
        self.port = free_port()
        app = FastAPI()

        @app.get("/v1/attestation/chain")
        async def chain(request: Request) -> dict[str, Any]:
            async with httpx.AsyncClient(verify=False) as client:
                real = await client.get(
                    self.real_url + "/v1/attestation/chain", params=dict(request.query_params)
                )
            body = real.json()
            return self.tamper(body) if self.tamper else body

        @app.websocket("/pipeline")
        async def pipeline(websocket: WebSocket) -> None:
            self.pipeline_connections += 1
            await websocket.close()

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        config.load()
        config.ssl = NodeIdentity.generate().server_ssl_context()
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def __enter__(self) -> Impostor:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def chat(cluster: LocalCluster) -> httpx.Response:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "secret prompt"}],
        "max_tokens": 3,
    }
    return httpx.post(cluster.entry.http_url + "/v1/chat/completions", json=body, timeout=60)


def assert_refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "attestation_failed", error
    assert reason in error["message"], error["message"]


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Same architecture as the tiny Llama, different weights."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("other-llama"), seed=1)


def test_next_node_with_other_weights_is_refused(
    tiny_llama: TinyModel, other_weights: TinyModel
) -> None:
    with LocalCluster(tiny_llama.path, 2, model_overrides={1: other_weights.path}) as cluster:
        assert_refused(chat(cluster), "is not the expected")
        downstream = cluster.nodes[1]
        metrics = downstream.get("/metrics").text
        assert 'teeshard_pipeline_connections_total{model="tiny",layers="2:4"} 0.0' in metrics
        assert downstream.get("/health").json()["sessions"]["open"] == 0
        assert cluster.entry.get("/health").json()["status"] == "ok"
        assert cluster.entry.get("/health").json()["sessions"]["open"] == 0


@pytest.fixture
def real_downstream(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    """The second node of a 2-node chain alone (layers 2:4), for impostors to relay."""
    with LocalCluster(tiny_llama.path, 1, ranges=[LayerRange(2, 4)]) as cluster:
        yield cluster


def flip_signature(body: dict[str, Any]) -> dict[str, Any]:
    bundle = body["bundles"][0]
    signature = bytearray.fromhex(bundle["nonce_signature"])
    signature[-1] ^= 1
    bundle["nonce_signature"] = signature.hex()
    return body


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (flip_signature, "signature"),
        (None, "certificate other than the attested one"),
    ],
    ids=["evidence-signature-does-not-verify", "certificate-is-not-the-attested-one"],
)
def test_impostors_are_refused(
    tiny_llama: TinyModel, real_downstream: LocalCluster, tamper: Tamper | None, reason: str
) -> None:
    real = real_downstream.entry
    with (
        Impostor(real.http_url, tamper) as impostor,
        LocalCluster(tiny_llama.path, 2, next_overrides={0: impostor.url}, ranges=None) as cluster,
    ):
        assert_refused(chat(cluster), reason)
        assert impostor.pipeline_connections == 0  # nothing, not even a socket, reached it
        metrics = real.get("/metrics").text
        assert (
            "teeshard_steps_total" in metrics
            and 'teeshard_steps_total{model="tiny",layers="2:4"} 0.0' in metrics
        )
        assert cluster.entry.get("/health").json()["status"] == "ok"
