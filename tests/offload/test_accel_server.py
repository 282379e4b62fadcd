"""The accelerator as a separate process: CURVE pinning both ways, bad input, keeps serving."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from teeshard.model.layer_range import LayerRange
from teeshard.offload import field as gf
from teeshard.offload import messages as wire
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.errors import AcceleratorUnavailable
from teeshard.offload.keys import KeyPair, fingerprint
from teeshard.offload.launch import AcceleratorProcess
from tests.checkpoints import TinyModel
from tests.offload.conftest import StartAccel, connect


@pytest.fixture(scope="module")
def accel(start_accel: StartAccel, tiny_llama: TinyModel) -> AcceleratorProcess:
    return start_accel(tiny_llama.path, LayerRange(0, 4), "field")


def test_pinned_client_connects_and_sees_the_layout(accel: AcceleratorProcess) -> None:
    client = connect(accel)
    try:
        assert client.info is not None
        assert client.info.layers == "0:4" and client.info.arith == "field"
        assert client.info.groups["0.attn_in"] == (64 + 2 * 32, 64)
        assert "embed" not in client.info.groups  # field arithmetic: no token ids, ever
        assert client.fingerprint == accel.fingerprint == fingerprint(accel.public_key)
    finally:
        client.close()


def test_server_with_another_key_is_refused(accel: AcceleratorProcess) -> None:
    """The client pins key B; the server at that address holds key A: no session."""
    impostor_pin = KeyPair.generate().public
    client = AcceleratorClient(accel.endpoint, impostor_pin, timeout_s=2)
    try:
        with pytest.raises(AcceleratorUnavailable, match="no CURVE handshake with the pinned key"):
            client.connect(timeout_s=2)
    finally:
        client.close()


def test_client_without_the_key_gets_nothing(accel: AcceleratorProcess) -> None:
    """A client that does not speak CURVE to this key is never answered."""
    frame = wire.encode(wire.InfoRequest(id=1))
    context = zmq.Context()
    try:
        plain = context.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(accel.endpoint)
        plain.send(frame)
        assert plain.poll(1500) == 0
        plain.close(0)
    finally:
        context.term()
    client = connect(accel)  # and the server still serves the right client
    client.close()


def raw_call(client: AcceleratorClient, payload: dict[str, object]) -> dict[str, object]:
    client._sock.send(msgpack.packb(payload, use_bin_type=True))
    assert client._sock.poll(10_000)
    return msgpack.unpackb(client._sock.recv(), raw=False)


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(
    accel: AcceleratorProcess,
) -> None:
    client = connect(accel)
    try:
        x = wire.to_wire(torch.zeros(1, 64, dtype=torch.int64)).model_dump()
        cases = [
            ({"v": 2, "type": "info", "id": 5}, "version"),
            ({"v": 1, "type": "matmul", "id": 6, "group": "9.attn_in", "x": x}, "no group"),
            (
                {
                    "v": 1,
                    "type": "matmul",
                    "id": 7,
                    "group": "0.attn_in",
                    "x": {**x, "shape": [2, 64]},
                },
                "bytes",
            ),
            ({"v": 1, "type": "embed", "id": 8, "tokens": [1, 2]}, "no embedding"),
            ({"v": 1, "type": "info", "id": 9, "extra": 1}, "extra"),
        ]
        for payload, words in cases:
            reply = raw_call(client, payload)
            assert reply["type"] == "error" and words in str(reply["message"]), reply
        too_big = torch.full((1, 64), gf.P, dtype=torch.int64)
        reply = raw_call(client, {"v": 1, "type": "matmul", "id": 10, "group": "0.attn_in",
                                  "x": wire.to_wire(too_big).model_dump()})  # fmt: skip
        assert reply["type"] == "error" and "[0, p)" in str(reply["message"])
        client._next_id = 100
        y = client.matmul("0.attn_out", torch.ones(2, 64, dtype=torch.int64))
        assert y.shape == (2, 64)
    finally:
        client.close()


def test_client_allow_list(start_accel: StartAccel, tiny_llama: TinyModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With --allow-clients only listed client keys complete the handshake."""
    from teeshard.offload.keys import create_key_files, load_key_pair

    allowed_dir = tmp_path / "allowed"
    create_key_files(allowed_dir, "node")
    node_keys = load_key_pair(allowed_dir / "node.key_secret")
    (allowed_dir / "node.key_secret").rename(tmp_path / "node.key_secret")  # only public keys stay
    server = start_accel(
        tiny_llama.path, LayerRange(0, 4), "field", extra=("--allow-clients", str(allowed_dir))
    )
    listed = AcceleratorClient(server.endpoint, server.public_key, client_keys=node_keys)
    listed.connect()
    listed.close()
    stranger = AcceleratorClient(server.endpoint, server.public_key, timeout_s=2)
    try:
        with pytest.raises(AcceleratorUnavailable):
            stranger.connect(timeout_s=2)
    finally:
        stranger.close()


def test_keygen_and_a_key_file(start_accel: StartAccel, tiny_llama: TinyModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "teeshard.cli", "accel", "--keygen", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    keys = json.loads(out.stdout)
    assert oct((tmp_path / "accel.key_secret").stat().st_mode & 0o777) == "0o600"
    server = start_accel(
        tiny_llama.path, LayerRange(0, 4), "field",
        extra=("--key", str(tmp_path / "accel.key_secret")),
    )  # fmt: skip
    assert server.fingerprint == keys["fingerprint"]
    from teeshard.offload.keys import parse_public_key

    pinned = parse_public_key(str(tmp_path / "accel.key"))  # the node may pin the file
    assert pinned == keys["public_key"].encode()
    client = AcceleratorClient(server.endpoint, pinned)
    client.connect()
    client.close()


def test_a_dead_accelerator_is_a_clear_transport_error(
    start_accel: StartAccel, tiny_llama: TinyModel
) -> None:
    server = start_accel(tiny_llama.path, LayerRange(0, 4), "field", reuse=False)
    client = AcceleratorClient(server.endpoint, server.public_key, timeout_s=2)
    client.connect()
    server.stop()
    with pytest.raises(AcceleratorUnavailable, match="no answer within 2 s"):
        client.matmul("0.attn_out", torch.ones(1, 64, dtype=torch.int64))
    assert client.distrusted is None  # unavailable is not misbehaving: it may come back
    client.close()
