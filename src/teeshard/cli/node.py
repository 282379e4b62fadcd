"""``teeshard node``: serve one shard of a model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from teeshard.attest import DEFAULT_PCCS_URL, TEE_CHOICES
from teeshard.entry.admission import QueueLimits
from teeshard.model.formats import QUANTIZE_CHOICES, NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.node import SchedulerLimits, SessionLimits
from teeshard.server.config import NodeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("node", help="serve layers START:END of a model")
    parser.add_argument(
        "--model", required=True, type=Path, help="Hugging Face checkpoint directory"
    )
    parser.add_argument(
        "--layers", required=True, type=LayerRange.parse, help="half-open range START:END"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port for HTTP and the pipeline socket"
    )
    parser.add_argument(
        "--next", dest="next_url", help="wss://HOST:PORT of the node serving the next layers"
    )
    parser.add_argument(
        "--entry", action="store_true", help="serve the OpenAI-compatible API (layers 0:N only)"
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve HTTPS/WSS with the attested certificate (default: on, except the entry node)",
    )
    parser.add_argument(
        "--public-host",
        action="append",
        default=[],
        help="a name or IP clients use for this node, for its certificate (repeatable)",
    )
    parser.add_argument(
        "--tee",
        default="auto",
        choices=TEE_CHOICES,
        help="attestation provider (default: auto-detect dstack, tsm, gramine); "
        "'simulated' is INSECURE, for development without a TEE",
    )
    parser.add_argument(
        "--node-id", default=None, help="this node's id in the pool (default: public host:port)"
    )
    parser.add_argument(
        "--operator",
        default=None,
        help="the ledger account that operates this node: its attested key signs this in the "
        "claim the pool's registration requires (GET /v1/operator-claim)",
    )
    parser.add_argument(
        "--behind-ingress",
        action="store_true",
        help="entry node: serve plain HTTP on a non-loopback address because a TLS-terminating "
        "ingress is in front (clients should then seal their requests)",
    )
    add_network_options(parser)
    add_trust_options(parser)
    add_billing_options(parser)
    add_runtime_options(parser)
    add_offload_options(parser)
    parser.set_defaults(func=run)


def add_offload_options(parser: argparse.ArgumentParser) -> None:
    """TSQP mode: linear layers on an untrusted accelerator (``teeshard accel``)."""
    parser.add_argument(
        "--offload",
        dest="offload_url",
        default=os.environ.get("TEESHARD_OFFLOAD") or None,
        help="tcp://HOST:PORT of the accelerator (TSQP mode; default $TEESHARD_OFFLOAD)",
    )
    parser.add_argument(
        "--offload-mode",
        default=os.environ.get("TEESHARD_OFFLOAD_MODE") or "blinded+verified",
        choices=("plain", "blinded", "verified", "blinded+verified"),
        help="what the accelerator may see and do (default blinded+verified); "
        "plain sends activations in the clear: INSECURE, for comparison only",
    )
    parser.add_argument(
        "--accel-key",
        default=os.environ.get("TEESHARD_ACCEL_KEY") or None,
        help="the accelerator's CURVE public key, Z85 or its .key file (pinned; "
        "default $TEESHARD_ACCEL_KEY)",
    )
    parser.add_argument(
        "--offload-second",
        help="two-server blinding: tcp://HOST:PORT of an independent accelerator",
    )
    parser.add_argument("--offload-second-key", help="its CURVE public key (pinned)")
    parser.add_argument(
        "--offload-pool", type=int, default=16, help="precomputed pads per matrix (default 16)"
    )


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """Entry node: routes per session from a network of replicas, and failover."""
    parser.add_argument(
        "--network",
        type=Path,
        default=None,
        help="entry node: TOML listing the nodes per layer range ([[nodes]] url, layers); "
        "each session gets a route of healthy, attested nodes and fails over between them",
    )
    parser.add_argument(
        "--network-from-ledger",
        action="store_true",
        help="entry node: also route over the nodes the ledger admits for this model "
        "(re-read every probe round; shared by every entry node on that ledger)",
    )
    parser.add_argument(
        "--ban-seconds",
        type=float,
        default=30.0,
        help="entry node: how long a node that failed is left out of routes (default 30)",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=5.0,
        help="entry node: seconds between attestation probes of the network (default 5)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=300.0,
        help="seconds a step may wait on the next node before that node counts as lost "
        "(a hung node: the entry then fails over; default 300)",
    )
    parser.add_argument(
        "--failover-attempts",
        type=int,
        default=4,
        help="entry node: new routes per request after transport faults (default 4)",
    )
    parser.add_argument(
        "--failover-deadline",
        type=float,
        default=60.0,
        help="entry node: seconds after a request's first fault during which it may wait "
        "for and try new routes (default 60)",
    )


def add_billing_options(parser: argparse.ArgumentParser) -> None:
    """Entry node: charge requests against a ledger (``teeshard ledger --help``)."""
    parser.add_argument(
        "--ledger",
        default=None,
        help="entry node: ledger URL, sqlite:///FILE, postgresql://..., "
        "evm+http(s)://HOST?contract=0x... (default $TEESHARD_LEDGER; none: requests are free)",
    )
    parser.add_argument("--pricing", type=Path, help="prices per model (TOML/JSON)")
    parser.add_argument(
        "--ledger-actor", help="this entry node's name in a SQL ledger (default: its node id)"
    )
    parser.add_argument(
        "--no-free-operators",
        action="store_true",
        help="charge operators of admitted nodes like everyone else",
    )


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        type=Path,
        help="policy the next node's attestation must satisfy, and the previous node's unless "
        "--upstream-policy is given (TOML/JSON)",
    )
    parser.add_argument(
        "--upstream-policy",
        type=Path,
        help="policy the previous node must satisfy before it may send a frame (TOML/JSON)",
    )
    parser.add_argument(
        "--allow-simulated-next-hop",
        action="store_true",
        help="accept the next node's INSECURE simulated attestation (development only)",
    )
    parser.add_argument("--collateral", type=Path, help="cached DCAP collateral JSON file")
    parser.add_argument(
        "--pccs-url",
        default=DEFAULT_PCCS_URL,
        help=f"PCCS to fetch DCAP collateral from (default {DEFAULT_PCCS_URL}, as the CLI's; "
        "--collateral takes precedence)",
    )
    parser.add_argument(
        "--no-manifest-cache",
        action="store_true",
        help="rehash every tensor at start (for checkpoints on storage the host can write)",
    )


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``node`` and ``up``."""
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="compute dtype of the weights (default float32; bfloat16 with --quantize); "
        "bfloat16 is fast on CPUs with AVX-512 BF16",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE_CHOICES,
        help="int8: weight-only int8 block linears and LM head, per-channel scales, bfloat16 "
        "activations; w8a8: the same int8 weights, and each of those products' input rows "
        "quantized to int8 too (faster batches on CPUs; its own, stated tolerances). The "
        "manifest names the recipe: give the same flag to `teeshard manifest`",
    )
    parser.add_argument(
        "--wire-dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of hidden states between nodes in the entry node's sessions; every node "
        "follows the session's choice (default float32)",
    )
    parser.add_argument(
        "--max-sessions", type=int, default=16, help="open sessions per node (default 16)"
    )
    parser.add_argument(
        "--max-cached-tokens",
        type=int,
        default=65536,
        help="KV positions reserved over all sessions (default 65536)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="seconds before an idle session is evicted (default 300)",
    )
    parser.add_argument(
        "--max-sessions-per-peer",
        type=int,
        default=None,
        help="open sessions one upstream may hold on a node (default: --max-sessions)",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=int,
        default=512,
        help="token positions one batched forward may hold over all sessions (default 512)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="a longer prompt is prefilled in chunks of this many positions, so sessions "
        "decoding beside it are not stalled (default 256)",
    )
    parser.add_argument(
        "--pipeline-groups",
        type=int,
        default=None,
        help="split the sessions into this many batches, so each node of a route that long "
        "computes one while the next computes another (default 1: one batch of all; "
        "`teeshard up`: its number of nodes)",
    )
    parser.add_argument(
        "--inline-step-ms",
        type=float,
        default=50.0,
        help="with one session decoding, run its step on the event loop's thread (two thread "
        "hand-offs fewer) while a step takes at most this long (default 50; 0: never)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=256,
        help="entry: requests that may wait for cache room before 429 (default 256)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="entry: seconds a request may wait for room before 429 (default 60)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 << 20,
        help="largest request body, plain or sealed (default 4 MiB)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="concurrent HTTP connections before 503 (default 256)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--model-name", default=None, help="name on /v1/models (default: directory name)"
    )
    parser.add_argument(
        "--max-tokens-default",
        type=int,
        default=512,
        help="completion budget when a request names none (default 512)",
    )


def config_from_args(args: argparse.Namespace, **overrides: object) -> NodeConfig:
    fields: dict[str, object] = dict(
        model_dir=args.model,
        dtype=NumberFormat.resolve(args.dtype, args.quantize).dtype,
        quantize=args.quantize,
        wire_dtype=args.wire_dtype,
        limits=SessionLimits(
            args.max_sessions,
            args.max_cached_tokens,
            args.idle_timeout,
            max_sessions_per_peer=args.max_sessions_per_peer,
        ),
        scheduler=SchedulerLimits(
            max_batch_rows=args.max_batch_rows,
            prefill_chunk=args.prefill_chunk,
            groups=args.pipeline_groups or 1,
            inline_step_s=args.inline_step_ms / 1000,
        ),
        queue=QueueLimits(max_waiting=args.queue_size, max_wait_s=args.queue_timeout),
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        admin_token=os.environ.get("TEESHARD_ADMIN_TOKEN") or None,
        threads=args.threads,
        model_name=args.model_name,
        default_max_tokens=args.max_tokens_default,
        policy_path=args.policy,
        upstream_policy_path=args.upstream_policy,
        allow_simulated_next_hop=args.allow_simulated_next_hop,
        collateral_path=args.collateral,
        pccs_url=args.pccs_url,
        manifest_cache=not args.no_manifest_cache,
        # $TEESHARD_LEDGER concerns the entry node only: the others never charge
        ledger_url=args.ledger or (os.environ.get("TEESHARD_LEDGER") if args.entry else None),
        pricing_path=args.pricing,
        ledger_actor=args.ledger_actor,
        free_for_operators=not args.no_free_operators,
    )
    if getattr(args, "offload_url", None):
        fields.update(
            offload_url=args.offload_url, offload_mode=args.offload_mode,
            accel_key=args.accel_key, offload_second_url=args.offload_second,
            offload_second_key=args.offload_second_key, offload_pool_rows=args.offload_pool,
        )  # fmt: skip
    fields.update(overrides)
    return NodeConfig(**fields)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    from teeshard.server.runtime import serve

    config = config_from_args(
        args,
        tee=args.tee,
        tls=args.tls,
        public_hosts=tuple(args.public_host),
        node_id=args.node_id,
        layers=args.layers,
        host=args.host,
        port=args.port,
        next_url=args.next_url,
        entry=args.entry,
        behind_ingress=args.behind_ingress,
        operator=args.operator,
        network_path=args.network,
        network_from_ledger=args.network_from_ledger,
        ban_s=args.ban_seconds,
        probe_interval_s=args.probe_interval,
        failover_attempts=args.failover_attempts,
        step_timeout_s=args.step_timeout,
        failover_deadline_s=args.failover_deadline,
    )
    serve(config)
    return 0
