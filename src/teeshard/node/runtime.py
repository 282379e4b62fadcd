"""Assemble a node from its config: load the shard, wire the next hop, build the app."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.loader import load_shard, parse_dtype
from teeshard.model.transformer import Shard
from teeshard.node.app import create_app
from teeshard.node.config import NodeConfig
from teeshard.node.service import NodeService
from teeshard.transport.peer import PeerClient

log = logging.getLogger(__name__)

_FRAME_HEADROOM = 1 << 20


@dataclass
class Node:
    config: NodeConfig
    checkpoint: Checkpoint
    shard: Shard
    service: NodeService
    app: FastAPI

    @property
    def max_frame_bytes(self) -> int:
        return frame_limit(self.config, self.shard)


def frame_limit(config: NodeConfig, shard: Shard) -> int:
    """Largest pipeline frame accepted: a full-context float32 prefill plus headroom."""
    if config.max_frame_bytes is not None:
        return config.max_frame_bytes
    spec = shard.spec
    return (
        spec.max_position_embeddings * max(spec.hidden_size, spec.vocab_size) * 4 + _FRAME_HEADROOM
    )


def load_with_progress(checkpoint: Checkpoint, config: NodeConfig, show: bool) -> Shard:
    keys = checkpoint.keys_for(config.layers)
    total = checkpoint.nbytes(keys)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)  # stdout stays clean for scripts
    with Progress(
        *columns, console=console, disable=not show or not console.is_terminal, transient=True
    ) as progress:
        task = progress.add_task(f"loading layers {config.layers}", total=total)
        return load_shard(
            checkpoint,
            config.layers,
            parse_dtype(config.dtype),
            progress=lambda n: progress.advance(task, n),
        )


def build_node(config: NodeConfig, show_progress: bool = False) -> Node:
    if config.threads:
        torch.set_num_threads(config.threads)
    checkpoint = Checkpoint(config.model_dir)
    config.validate(checkpoint.spec.num_layers)
    shard = load_with_progress(checkpoint, config, show_progress)
    model_name = config.model_name or checkpoint.name
    downstream = None
    if config.next_url is not None:
        downstream = PeerClient(
            _pipeline_url(config.next_url), max_frame_bytes=frame_limit(config, shard)
        )
    service = NodeService(shard, model_name, config.limits, downstream, config.resolved_node_id)
    serving = _entry_serving(config, service, model_name) if config.entry else None
    app = create_app(service, config, serving)
    log.info(
        "node ready: model %s, layers %s of %d, %s%s",
        model_name,
        config.layers,
        checkpoint.spec.num_layers,
        config.dtype,
        ", entry" if config.entry else "",
    )
    return Node(config, checkpoint, shard, service, app)


def _entry_serving(config: NodeConfig, service: NodeService, model_name: str):  # type: ignore[no-untyped-def]
    from teeshard.entry.generation import Generator
    from teeshard.entry.serving import OpenAIServing
    from teeshard.entry.text import TextCodec

    generator = Generator(
        service, TextCodec(config.model_dir), config.wire_dtype, config.default_max_tokens
    )
    return OpenAIServing(generator, model_name)


def _pipeline_url(url: str) -> str:
    """Accept ``ws://host:port`` as well as the full ``.../pipeline`` URL."""
    base = url.rstrip("/")
    return base if base.endswith("/pipeline") else base + "/pipeline"


def serve(config: NodeConfig, show_progress: bool = True) -> None:
    import uvicorn

    node = build_node(config, show_progress)
    uvicorn.run(
        node.app,
        host=config.host,
        port=config.port,
        log_level="warning",
        ws_max_size=node.max_frame_bytes,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=5,
    )
