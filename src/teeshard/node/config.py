"""Configuration of one node process. Units are in the field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from teeshard.model.layer_range import LayerRange
from teeshard.node.sessions import SessionLimits


@dataclass(frozen=True)
class NodeConfig:
    model_dir: Path
    layers: LayerRange
    host: str = "127.0.0.1"
    port: int = 8000
    next_url: str | None = None  # ws://host:port of the node serving the following layers
    entry: bool = False  # serve the OpenAI-compatible API (needs layers starting at 0)
    dtype: str = "float32"  # compute dtype of the weights
    wire_dtype: str = "float32"  # dtype of hidden states sent to the next node
    limits: SessionLimits = field(default_factory=SessionLimits)
    max_frame_bytes: int | None = None  # default: one full-context prefill plus headroom
    threads: int | None = None  # torch intra-op threads; default: torch's choice
    model_name: str | None = None  # name served on /v1/models; default: directory name
    default_max_tokens: int = 512  # completion budget when a request names none
    node_id: str | None = (
        None  # how other parts (ledger, receipts) name this node; default host:port
    )

    @property
    def resolved_node_id(self) -> str:
        return self.node_id or f"{self.host}:{self.port}"

    def validate(self, num_layers: int) -> None:
        self.layers.check_within(num_layers)
        if self.entry and not self.layers.is_first():
            raise ValueError("--entry is only valid on the node whose layer range starts at 0")
        if self.next_url is None and not self.layers.is_last(num_layers):
            raise ValueError(
                f"layers {self.layers} do not end the model ({num_layers} layers): give --next"
            )
        if self.next_url is not None and self.layers.is_last(num_layers):
            raise ValueError(f"layers {self.layers} end the model: --next makes no sense here")
