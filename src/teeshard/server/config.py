"""Configuration of one node process. Units are in the field names."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from teeshard.entry.admission import QueueLimits
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.node import PipelineLimits, SchedulerLimits, SessionLimits
from teeshard.transport.messages import WireDtype


@dataclass(frozen=True)
class NodeConfig:
    model_dir: Path
    layers: LayerRange
    host: str = "127.0.0.1"
    port: int = 8000
    next_url: str | None = None  # wss://host:port of the node serving the following layers
    network_path: Path | None = None  # entry: TOML of the nodes per range; routes per session
    network_from_ledger: bool = False  # entry: also route over the ledger's admitted nodes
    ban_s: float = 30.0  # entry: a node that failed mid-session is left out of routes this long
    probe_interval_s: float = 5.0  # entry: how often every node of the network is re-attested
    failover_attempts: int = 4  # entry: new routes per request after transport faults
    # how long a step may wait on the next node before it counts as lost (a hung node)
    step_timeout_s: float = 300.0
    failover_deadline_s: float = 60.0  # entry: no new route this long after a request's first fault
    entry: bool = False  # serve the OpenAI-compatible API (needs layers starting at 0)
    dtype: str = "float32"  # compute dtype of the weights (bfloat16 with quantize)
    quantize: str | None = None  # "int8" or "w8a8": int8 block linears (model/quantize.py)
    wire_dtype: WireDtype = "float32"  # dtype of hidden states sent to the next node
    limits: SessionLimits = field(default_factory=SessionLimits)
    pipeline: PipelineLimits = field(default_factory=PipelineLimits)
    scheduler: SchedulerLimits = field(default_factory=SchedulerLimits)  # batching of steps
    queue: QueueLimits = field(default_factory=QueueLimits)  # entry: requests waiting for room
    max_frame_bytes: int | None = None  # default: one full-context prefill plus headroom
    threads: int | None = None  # torch intra-op threads; default: torch's choice
    model_name: str | None = None  # name served on /v1/models; default: directory name
    default_max_tokens: int = 512  # completion budget when a request names none
    node_id: str | None = None  # how the ledger names this node; default host:port
    operator: str | None = None  # the ledger account of this node's operator, in its claims
    # -- trust --
    tee: str = "auto"  # attestation provider: auto, dstack, tsm, gramine, simulated
    policy_path: Path | None = None  # what the next node's attestation must show
    allow_simulated_next_hop: bool = False  # accept the next node's INSECURE simulated evidence
    # what a previous node must show to feed this one; default: policy_path
    upstream_policy_path: Path | None = None
    collateral_path: Path | None = None  # cached DCAP collateral for TDX/SGX quotes
    pccs_url: str | None = None  # else fetch collateral from this PCCS
    tls: bool | None = None  # serve TLS with the attested certificate; default: all but entry
    public_hosts: tuple[str, ...] = ()  # extra names/IPs for the certificate
    manifest_cache: bool = True  # reuse tensor hashes of unchanged checkpoint files
    # -- the HTTP edge --
    behind_ingress: bool = False  # entry: plain HTTP on a public address, TLS ends at an ingress
    admin_token: str | None = None  # bearer token for /metrics and detailed /health
    max_body_bytes: int = 4 << 20  # largest request body read, plain or sealed
    max_connections: int = 256  # concurrent HTTP connections and tasks; beyond: 503
    header_timeout_s: float = 10.0  # a client must send its request line and headers in time
    # -- billing (entry node) --
    ledger_url: str | None = None  # sqlite:///..., postgresql://..., evm+http(s)://...; None: free
    pricing_path: Path | None = None  # TOML/JSON prices; default 1000 units per 1k tokens
    ledger_actor: str | None = None  # who this entry is in the ledger; default its node id
    free_for_operators: bool = True  # operators of admitted nodes use the model free
    readmit_every_s: float = 600.0  # how often the entry attests the pool's nodes again
    # -- TSQP offload (teeshard.offload): linear layers on an untrusted accelerator --
    offload_url: str | None = None  # tcp://HOST:PORT of the accelerator; None: all in the TEE
    offload_mode: str = "blinded+verified"  # plain (INSECURE, by name only), blinded, verified
    accel_key: str | None = None  # the accelerator's CURVE public key (Z85 or key file), pinned
    offload_second_url: str | None = None  # two-server blinding: the accelerator that sees r
    offload_second_key: str | None = None
    offload_pool_rows: int = 16  # precomputed pads per matrix group (tokens)

    @property
    def serves_tls(self) -> bool:
        # The entry node's public face usually sits behind an ingress that terminates
        # TLS (clients then seal requests to its attested key); every other node
        # speaks only to attested peers and always serves its attested certificate.
        return self.tls if self.tls is not None else not self.entry

    @property
    def resolved_node_id(self) -> str:
        """``host:port`` as others reach this node; what the pool registers it under."""
        if self.node_id:
            return self.node_id
        host = self.public_hosts[0] if self.public_hosts else self.host
        return f"{host}:{self.port}"

    @property
    def binds_loopback(self) -> bool:
        return is_loopback(self.host)

    def validate(self, num_layers: int) -> None:
        self.layers.check_within(num_layers)
        NumberFormat(self.dtype, self.quantize)  # raises ValueError for a combination not offered
        if (
            self.entry
            and not self.serves_tls
            and not self.binds_loopback
            and not self.behind_ingress
        ):
            raise ValueError(
                f"the entry node would serve plain HTTP on {self.host}: serve TLS with the attested "
                "certificate (--tls), bind 127.0.0.1, or say a TLS-terminating ingress is in front "
                "(--behind-ingress; then clients should seal their requests)"
            )
        if self.entry and not self.layers.is_first():
            raise ValueError("--entry is only valid on the node whose layer range starts at 0")
        if self.ledger_url and not self.entry:
            raise ValueError("--ledger is for the entry node, which charges for requests")
        if (self.network_path is not None or self.network_from_ledger) and not self.entry:
            raise ValueError("--network is for the entry node, which chooses each session's route")
        if self.network_from_ledger and not self.ledger_url:
            raise ValueError("--network-from-ledger needs the ledger (--ledger) to read nodes from")
        if (
            self.entry
            and self.next_url is None
            and self.network_path is None
            and not self.network_from_ledger
            and not self.layers.is_last(num_layers)
        ):
            raise ValueError(
                f"layers {self.layers} do not end the model ({num_layers} layers): give --next "
                "or --network"
            )
        if self.next_url is not None and self.layers.is_last(num_layers):
            raise ValueError(f"layers {self.layers} end the model: --next makes no sense here")
        if self.offload_url is not None and self.accel_key is None:
            raise ValueError("--offload needs --accel-key: the accelerator's key is pinned")
        if self.offload_url is None and self.offload_second_url is not None:
            raise ValueError("--offload-second needs --offload")
        if self.next_url is not None and not self.next_url.startswith("wss://"):
            raise ValueError(
                f"--next {self.next_url}: hidden states go only over RA-TLS; use wss://HOST:PORT"
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a client's) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
