"""The accelerator server: untrusted, stateless, answers matrix products.

It loads the linear weights of a layer range (and the embedding and LM head when
the range holds them) onto its device and multiplies whatever it is sent: float32
activations in ``float`` arithmetic (the plain mode), or field elements in
``field`` arithmetic (every protected mode: it sees only residues, blinded or
not). It keeps no KV cache and no session state, and in field arithmetic it has
no embedding to look up, so it never sees token ids.

The socket is a ZeroMQ ROUTER with CURVE: traffic is encrypted to this server's
key, which the node pins; optionally only listed client keys may connect.
A bad request gets an ``error`` reply and the server keeps serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.offload import field as gf
from teeshard.offload import messages as wire
from teeshard.offload.groups import EMBED, release_weight, shard_groups
from teeshard.offload.keys import KeyPair
from teeshard.offload.quant import quantize_weight

log = logging.getLogger(__name__)

MAX_ROWS = 1 << 16  # rows per request: a full-context prefill is far below this


@dataclass
class Accelerator:
    """The compute half, free of sockets: ``handle(frame) -> frame``."""

    model: str
    layers: LayerRange
    arith: wire.Arith
    device: torch.device
    weights: dict[str, torch.Tensor]  # name -> (N, K): float32, or integer-valued field weights
    embedding: torch.Tensor | None = None  # (vocab, C), float arithmetic only
    served: int = field(default=0)

    @classmethod
    def load(
        cls, model_dir: Path, layers: LayerRange, arith: wire.Arith, device: str = "cpu"
    ) -> Accelerator:
        checkpoint = Checkpoint(model_dir)
        shard = load_shard(checkpoint, layers, torch.float32, pack=False)  # reads the weights
        target = torch.device(device)
        # On a GPU the field weights are widened to float64 once; on a CPU they stay
        # float32 (exact for 20-bit integers) and are widened chunk by chunk.
        field_dtype = torch.float64 if target.type == "cuda" else torch.float32
        weights: dict[str, torch.Tensor] = {}
        for group in shard_groups(shard):
            stacked = group.stacked_weight()  # (N, K)
            for member in group.members:
                release_weight(member.linear)
            if arith == "float":
                weights[group.name] = stacked.to(target)
            else:
                weights[group.name] = quantize_weight(stacked).q.to(target, field_dtype)
            del stacked
        embedding = None
        if arith == "float" and shard.embed_tokens is not None:
            embedding = shard.embed_tokens.weight.detach().to(target)
        return cls(checkpoint.name, layers, arith, target, weights, embedding)

    def info(self, request_id: int) -> wire.InfoReply:
        groups = {name: (int(w.shape[0]), int(w.shape[1])) for name, w in self.weights.items()}
        if self.embedding is not None:
            groups[EMBED] = (int(self.embedding.shape[1]), int(self.embedding.shape[0]))
        return wire.InfoReply(
            id=request_id,
            model=self.model,
            layers=str(self.layers),
            arith=self.arith,
            device=str(self.device),
            groups=groups,
        )

    def matmul(self, group: str, x: torch.Tensor) -> torch.Tensor:
        weight = self.weights.get(group)
        if weight is None:
            raise ValueError(f"this accelerator holds no group {group!r} (layers {self.layers})")
        rows, inner = x.shape
        if inner != weight.shape[1] or rows < 1 or rows > MAX_ROWS:
            raise ValueError(
                f"group {group} takes (T, {weight.shape[1]}) with 1 <= T <= {MAX_ROWS}, "
                f"got {tuple(x.shape)}"
            )
        x = x.to(self.device)
        if self.arith == "float":
            if x.dtype != torch.float32 or not bool(torch.isfinite(x).all()):
                raise ValueError("float arithmetic takes finite float32 activations")
            return torch.nn.functional.linear(x, weight).cpu()
        if x.dtype != torch.int64 or bool(((x < 0) | (x >= gf.P)).any()):
            raise ValueError("field arithmetic takes int64 residues in [0, p)")
        return gf.matmul(x, weight.t()).cpu()

    def embed(self, tokens: tuple[int, ...]) -> torch.Tensor:
        if self.embedding is None:
            raise ValueError("this accelerator holds no embedding (field arithmetic never does)")
        vocab = self.embedding.shape[0]
        if not tokens or any(t < 0 or t >= vocab for t in tokens):
            raise ValueError(f"token ids must be a non-empty list in [0, {vocab})")
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return self.embedding[ids].cpu()

    def handle(self, frame: bytes) -> bytes:
        request_id = 0
        try:
            request = wire.decode_request(frame)
            request_id = request.id
            reply: wire.InfoReply | wire.ResultReply
            if isinstance(request, wire.InfoRequest):
                reply = self.info(request.id)
            elif isinstance(request, wire.MatmulRequest):
                y = self.compute(request)
                reply = wire.ResultReply(id=request.id, y=wire.to_wire(y))
            else:
                reply = wire.ResultReply(id=request.id, y=wire.to_wire(self.embed(request.tokens)))
            self.served += 1
            return wire.encode(reply)
        except wire.WireError as exc:
            return wire.encode(wire.ErrorReply(id=exc.request_id or request_id, message=str(exc)))
        except ValueError as exc:
            return wire.encode(wire.ErrorReply(id=request_id, message=str(exc)))

    def compute(self, request: wire.MatmulRequest) -> torch.Tensor:
        """The product asked for; a malicious test accelerator overrides this."""
        return self.matmul(request.group, wire.from_wire(request.x, 2))


def bind_socket(
    context: zmq.Context,
    endpoint: str,
    keys: KeyPair,
    max_message_bytes: int = 1 << 30,
) -> zmq.Socket:
    sock = context.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    return sock


def serve(
    accel: Accelerator,
    endpoint: str,
    keys: KeyPair,
    *,
    allowed_clients: Path | None = None,
    stop: threading.Event | None = None,
    on_ready: object = None,
) -> None:
    """Answer requests until ``stop`` is set. ``on_ready(endpoint)`` gets the bound address."""
    context = zmq.Context()
    auth = None
    if allowed_clients is not None:
        # Only clients whose public keys are files in this directory may connect.
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(allowed_clients))
    sock = bind_socket(context, endpoint, keys)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    log.info(
        "accelerator ready: %s layers %s, %s arithmetic on %s, at %s, key %s",
        accel.model, accel.layers, accel.arith, accel.device, bound, keys.fingerprint[:16],
    )  # fmt: skip
    if callable(on_ready):
        on_ready(bound)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while stop is None or not stop.is_set():
            if not poller.poll(200):
                continue
            frames = sock.recv_multipart()
            if len(frames) != 2:
                continue  # not a DEALER frame pair: ignore
            identity, payload = frames
            sock.send_multipart([identity, accel.handle(payload)])
    finally:
        sock.close(0)
        if auth is not None:
            auth.stop()
        context.term()
