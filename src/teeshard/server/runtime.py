"""Assemble a node from its config: load and attest the shard, wire the next hop, serve.

Start-up order matters for trust: the shard's tensors are hashed as they load
(the manifest), the node's TLS key is created in process, and the TEE quotes
both together before the node accepts a single connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import torch
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from teeshard.attest import (
    ManifestBuilder,
    ManifestCache,
    NodeAttestation,
    NodeIdentity,
    select_provider,
)
from teeshard.entry import (
    AdmissionQueue,
    FailoverPolicy,
    GenerationLoop,
    OpenAIServing,
    Registry,
    TextCodec,
)
from teeshard.entry.node_load import metrics_reader
from teeshard.entry.registry import ledger_nodes, load_network
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.loader import TensorHook, load_shard, parse_dtype
from teeshard.model.transformer import Shard
from teeshard.node import NextHop, NodeService
from teeshard.offload import OffloadHandle, connect_offload
from teeshard.paths import simulated_tee_dir
from teeshard.server.app import create_app
from teeshard.server.config import NodeConfig
from teeshard.server.edge import header_deadline_protocol
from teeshard.server.trust import NodeTrust, trust_for
from teeshard.transport.peer import PeerClient

log = logging.getLogger(__name__)

_FRAME_HEADROOM = 1 << 20


@dataclass
class Node:
    config: NodeConfig
    checkpoint: Checkpoint
    shard: Shard
    service: NodeService
    trust: NodeTrust
    app: FastAPI

    @property
    def max_frame_bytes(self) -> int:
        return frame_limit(self.config, self.shard)


def frame_limit(config: NodeConfig, shard: Shard) -> int:
    """Largest pipeline frame accepted: a full-context float32 prefill plus headroom."""
    if config.max_frame_bytes is not None:
        return config.max_frame_bytes
    spec = shard.spec
    prefill = spec.max_position_embeddings * spec.hidden_size * 4
    return prefill + spec.vocab_size * 4 + _FRAME_HEADROOM


def load_with_progress(
    checkpoint: Checkpoint, config: NodeConfig, show: bool, on_tensor: TensorHook
) -> Shard:
    total = checkpoint.nbytes(checkpoint.keys_for(config.layers))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)  # stdout stays clean for scripts
    disable = not show or not console.is_terminal
    with Progress(*columns, console=console, disable=disable, transient=True) as progress:
        task = progress.add_task(f"loading and hashing layers {config.layers}", total=total)
        return load_shard(
            checkpoint,
            config.layers,
            parse_dtype(config.dtype),
            on_tensor=on_tensor,
            progress=lambda n: progress.advance(task, n),
            quantize=config.quantize,
            pack=config.offload_url is None,  # offloading replaces the plain linears itself
        )


def attest_node(
    config: NodeConfig, builder: ManifestBuilder, offload: OffloadHandle | None = None
) -> NodeTrust:
    provider = select_provider(
        config.tee, allow_simulated=config.tee == "simulated", data_dir=simulated_tee_dir()
    )
    hosts = {"localhost", "127.0.0.1", *config.public_hosts}
    if config.host not in ("0.0.0.0", "::"):
        hosts.add(config.host)
    else:
        hosts.add(socket.gethostname())
    identity = NodeIdentity.generate(hosts=sorted(hosts))
    statement = offload.statement.to_json() if offload is not None else None
    attestation = NodeAttestation.create(provider, builder.finish(statement), identity)
    return trust_for(config, attestation)


def build_node(config: NodeConfig, show_progress: bool = False) -> Node:
    if config.threads:
        torch.set_num_threads(config.threads)
    checkpoint = Checkpoint(config.model_dir)
    config.validate(checkpoint.spec.num_layers)
    model_name = config.model_name or checkpoint.name
    cache = ManifestCache.for_checkpoint(config.model_dir) if config.manifest_cache else None
    builder = ManifestBuilder(
        checkpoint, config.layers, config.dtype, model_name=model_name, cache=cache,
        entry_files=config.model_dir if config.entry else None,  # tokenizer, templates attested
        quantize=config.quantize,  # the manifest names the recipe applied to these tensors
    )  # fmt: skip
    shard = load_with_progress(checkpoint, config, show_progress, builder.on_tensor)
    offload = _offload(config, shard)
    trust = attest_node(config, builder, offload)
    next_hop = None
    if not shard.is_last:
        max_frame = frame_limit(config, shard)

        def connect(url: str) -> PeerClient:
            async def attest_next() -> ssl.SSLContext:
                return await trust.attest_next(url)

            return PeerClient(
                _pipeline_url(url),
                max_frame_bytes=max_frame,
                on_connect=attest_next,
                introduce=trust.introduce,
                request_timeout=config.step_timeout_s,
            )

        next_hop = NextHop(connect, config.next_url)
    service = NodeService(
        shard,
        model_name,
        config.limits,
        next_hop,
        config.resolved_node_id,
        trust.attestation,
        # the TSQP accelerator's round trips never run on the event loop's thread
        replace(config.scheduler, inline_step_s=0) if offload is not None else config.scheduler,
    )
    serving = _entry_serving(config, service, model_name, trust) if config.entry else None
    app = create_app(service, config, trust, serving)
    log.info(
        "node ready: model %s, layers %s of %d, %s%s, manifest %s",
        model_name, config.layers, checkpoint.spec.num_layers, shard.number_format.label,
        ", entry" if config.entry else "", trust.attestation.manifest.combined_hash.hex()[:16],
    )  # fmt: skip
    return Node(config, checkpoint, shard, service, trust, app)


def _offload(config: NodeConfig, shard: Shard) -> OffloadHandle | None:
    """TSQP mode: the shard's linear layers go to the pinned accelerator (after hashing)."""
    if config.offload_url is None or config.accel_key is None:
        return None
    return connect_offload(
        shard, config.offload_mode, config.offload_url, config.accel_key,
        second_endpoint=config.offload_second_url, second_key=config.offload_second_key,
        pool_rows=config.offload_pool_rows,
    )  # fmt: skip


def _entry_serving(
    config: NodeConfig, service: NodeService, model_name: str, trust: NodeTrust
) -> OpenAIServing:
    billing = None
    if config.ledger_url:
        from teeshard.ledger.billing import billing_from_url

        billing = billing_from_url(
            config.ledger_url,
            config.pricing_path,
            actor=config.ledger_actor or config.resolved_node_id,
            free_for_operators=config.free_for_operators,
        )
        log.info(
            "billing: ledger %s as %s",
            _redacted(config.ledger_url),
            config.ledger_actor or config.resolved_node_id,
        )
    registry = None
    if config.network_path is not None or config.network_from_ledger:
        source = None
        if config.network_from_ledger and billing is not None:
            ledger = billing.ledger
            source = lambda: ledger_nodes(ledger, model_name)  # noqa: E731
        registry = Registry(
            load_network(config.network_path) if config.network_path is not None else [],
            start=service.shard.layer_range.end,
            num_layers=service.shard.spec.num_layers,
            prober=trust.probe,
            ban_s=config.ban_s,
            probe_interval_s=config.probe_interval_s,
            source=source,
            load_reader=metrics_reader(config.admin_token),  # the nodes' step load
        )
        log.info(
            "network: %d nodes from %s%s", len(registry.records), config.network_path or "-",
            ", and the ledger's admitted nodes" if source is not None else "",
        )  # fmt: skip
    generations = GenerationLoop(
        service,
        TextCodec(config.model_dir),
        config.wire_dtype,
        config.default_max_tokens,
        billing,
        registry,
        FailoverPolicy(config.failover_attempts, config.failover_deadline_s),
        AdmissionQueue(config.queue),
    )
    return OpenAIServing(generations, model_name)


def _redacted(url: str) -> str:
    """A ledger URL for logs: no password."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _pipeline_url(url: str) -> str:
    """Accept ``wss://host:port`` as well as the full ``.../pipeline`` URL."""
    base = url.rstrip("/")
    return base if base.endswith("/pipeline") else base + "/pipeline"


def make_server(node: Node) -> uvicorn.Server:
    """A uvicorn server for ``node``, presenting its attested certificate when it serves TLS."""
    config = uvicorn.Config(
        node.app,
        host=node.config.host,
        port=node.config.port,
        log_level="warning",
        ws_max_size=node.max_frame_bytes,
        ws_max_queue=2,  # frames buffered while the pipeline handler is busy: back-pressure
        ws_per_message_deflate=False,
        http=header_deadline_protocol(node.config.header_timeout_s),
        limit_concurrency=node.config.max_connections,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    config.load()
    if node.config.serves_tls:
        # uvicorn builds contexts from key files; the identity builds its own instead
        config.ssl = node.trust.attestation.server_ssl_context()  # renewed on re-key
    return uvicorn.Server(config)


def serve(config: NodeConfig, show_progress: bool = True) -> None:
    make_server(build_node(config, show_progress)).run()
