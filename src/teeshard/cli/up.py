"""``teeshard up``: start a whole split on this machine, entry node first in the chain.

Nodes are separate processes, as on separate hosts, talking over loopback. With
``--replicas R``, every range after the entry's is served by R nodes, listed in a
network file the entry routes each session over (and fails over within). A node
that dies is restarted in its place (a new key, a new quote: it is attested
afresh) while the others keep serving; Ctrl-C stops every process this command
started.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from teeshard.cli.errors import CommandError
from teeshard.cli.node import add_billing_options, add_runtime_options
from teeshard.cli.supervise import supervise
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.plan import plan_checkpoint
from teeshard.paths import data_dir
from teeshard.procutil import die_with_parent, is_healthy, port_free
from teeshard.server.local_pipeline import write_local_policy

console = Console(stderr=True)


@dataclass(frozen=True)
class LaunchSpec:
    layers: LayerRange
    port: int
    next_port: int | None
    entry: bool
    network: Path | None = None  # the entry's network file (replicas); None: a static chain

    def health_url(self, host: str) -> str:
        # every node but the entry serves only TLS with its attested certificate
        scheme = "http" if self.entry else "https"
        return f"{scheme}://{host}:{self.port}/health"

    def argv(self, model: Path, host: str, passthrough: list[str]) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "teeshard.cli",
            "node",
            "--model",
            str(model),
            "--layers",
            str(self.layers),
            "--host",
            host,
            "--port",
            str(self.port),
        ]
        if self.next_port is not None:
            args += ["--next", f"wss://{host}:{self.next_port}"]
        if self.entry:
            args.append("--entry")
        if self.network is not None:
            args += ["--network", str(self.network)]
        return args + passthrough


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("up", help="start N nodes on this machine and serve the API")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Hugging Face checkpoint directory (default: the built-in demo model)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="number of layer ranges, the entry's included (default 2)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="nodes serving each range after the entry's; above 1 the entry routes every "
        "session over them and fails over (default 1: one static chain)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="entry node port; others follow (default 8000)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address every node binds (default 127.0.0.1)"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for nodes"
    )
    parser.add_argument(
        "--ban-seconds",
        type=float,
        default=30.0,
        help="with replicas: how long a node that failed is left out of routes (default 30)",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=5.0,
        help="with replicas: seconds between the entry's attestation probes (default 5)",
    )
    add_runtime_options(parser)
    add_billing_options(parser)
    parser.add_argument(
        "--offload-mode",
        choices=("plain", "blinded", "verified", "blinded+verified"),
        default=None,
        help="TSQP: start a local accelerator per node and offload its linear layers there "
        "(plain is INSECURE, for comparison only)",
    )
    parser.add_argument(
        "--accel-device", default="cpu", help="torch device of the accelerators (default cpu)"
    )
    parser.set_defaults(func=run)


def plan_launch(
    checkpoint: Checkpoint, nodes: int, port: int, replicas: int = 1, network: Path | None = None
) -> list[LaunchSpec]:
    """The processes to start: the entry on ``port``, then the nodes of each later range
    on the ports after it. With ``replicas > 1`` the entry routes over ``network``."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    plans = plan_checkpoint(checkpoint, nodes)
    if replicas == 1:
        ports = [port + i for i in range(nodes)]
        return [
            LaunchSpec(p.layers, ports[i], ports[i + 1] if i + 1 < nodes else None, entry=i == 0)
            for i, p in enumerate(plans)
        ]
    if network is None:
        raise ValueError("replicas need a network file for the entry node")
    launches = [LaunchSpec(plans[0].layers, port, None, entry=True, network=network)]
    for plan in plans[1:]:
        for _ in range(replicas):
            launches.append(LaunchSpec(plan.layers, port + len(launches), None, entry=False))
    return launches


def network_file(launches: list[LaunchSpec], host: str) -> str:
    """The entry's ``--network`` TOML: every node after it."""
    return "".join(
        f'[[nodes]]\nurl = "wss://{host}:{s.port}"\nlayers = "{s.layers}"\n\n'
        for s in launches
        if not s.entry
    )


def passthrough_options(args: argparse.Namespace) -> list[str]:
    options = [
        "--dtype",
        NumberFormat.resolve(args.dtype, args.quantize).dtype,
        "--wire-dtype",
        args.wire_dtype,
        "--max-sessions",
        str(args.max_sessions),
        "--max-cached-tokens",
        str(args.max_cached_tokens),
        "--idle-timeout",
        str(args.idle_timeout),
        "--max-tokens-default",
        str(args.max_tokens_default),
        "--max-body-bytes",
        str(args.max_body_bytes),
        "--max-connections",
        str(args.max_connections),
        # one batch group per node of the chain: each node computes one while the next
        # computes another (measured: 5.4x one session's decode at 8 sessions, 4.9x without)
        "--pipeline-groups",
        str(args.pipeline_groups or args.nodes),
    ]
    if args.max_sessions_per_peer is not None:
        options += ["--max-sessions-per-peer", str(args.max_sessions_per_peer)]
    if args.quantize:
        options += ["--quantize", args.quantize]
    if args.threads:
        options += ["--threads", str(args.threads)]
    if args.model_name:
        options += ["--model-name", args.model_name]
    return options


def entry_options(args: argparse.Namespace) -> list[str]:
    """Billing and routing belong to the entry node alone."""
    options = []
    if args.replicas > 1:
        options += ["--ban-seconds", str(args.ban_seconds)]
        options += ["--probe-interval", str(args.probe_interval)]
    if args.ledger:
        options += ["--ledger", args.ledger]
    if args.pricing:
        options += ["--pricing", str(args.pricing)]
    if args.ledger_actor:
        options += ["--ledger-actor", args.ledger_actor]
    if args.no_free_operators:
        options.append("--no-free-operators")
    return options


def run(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        from teeshard.model.demo import ensure_demo

        model = ensure_demo()  # shipped, trained: see scripts/train_demo.py
        console.log(f"demo model at {model}")
    checkpoint = Checkpoint(model)
    number_format = NumberFormat.resolve(args.dtype, args.quantize)  # a bad pair fails here
    run_dir = data_dir() / "runs" / f"port-{args.port}"
    network = run_dir / "network.toml" if args.replicas > 1 else None
    launches = plan_launch(checkpoint, args.nodes, args.port, args.replicas, network)
    busy = [s.port for s in launches if not port_free(args.host, s.port)]
    if busy:
        raise ValueError(f"port(s) {', '.join(map(str, busy))} already in use; pass --port")
    if network is not None:
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text(network_file(launches, args.host))
    console.print(network_table(launches, args.host))

    model_name = args.model_name or checkpoint.name
    with console.status("hashing shards for the route's attestation policy"):
        policy = write_local_policy(
            run_dir / "policy.toml",
            checkpoint, sorted({s.layers for s in launches}), number_format.dtype, model_name,
            number_format.quantize,
        )  # fmt: skip
    console.log(f"attestation: simulated (INSECURE, no TEE here); policy {policy}")
    trust = ["--tee", "simulated", "--policy", str(policy)]

    processes: list[subprocess.Popen[bytes]] = []  # the nodes, supervised
    accelerators: list[subprocess.Popen[bytes]] = []  # TSQP: one per node, untrusted
    argvs: list[list[str]] = []
    try:
        offload = _start_accelerators(args, model, launches, accelerators)
        # Last node first, so each node's next hop is already listening when it starts;
        # the entry once all others serve, so its first routes find them attested.
        for spec in reversed(launches):
            extra = passthrough_options(args) + trust + offload.get(spec.port, [])
            if spec.entry:
                _wait_healthy(launches[1:], processes, args.host, args.startup_timeout)
                extra += entry_options(args)
            argvs.append(spec.argv(model, args.host, extra))
            processes.append(_start(argvs[-1]))
        _wait_healthy(launches, processes, args.host, args.startup_timeout)
        entry = f"http://{args.host}:{launches[0].port}"
        console.print(
            f"\n[bold green]teeshard is up[/]: {len(launches)} nodes serving {checkpoint.name}"
        )
        if network is not None:
            console.print(f"  network   {entry}/v1/network   (teeshard network --url {entry})")
        console.print(f"  API       {entry}/v1   (OpenAI-compatible)")
        console.print(f"  web page  {entry}/")
        console.print(f'  try       teeshard chat --url {entry} "Hello!"')
        console.print("Press Ctrl-C to stop every node.\n")
        print(entry, flush=True)  # stdout: the one line scripts need
        return supervise(processes, argvs, _start)
    finally:
        _stop(processes + accelerators)


def _start_accelerators(
    args: argparse.Namespace,
    model: Path,
    launches: list[LaunchSpec],
    processes: list[subprocess.Popen[bytes]],
) -> dict[int, list[str]]:
    """``--offload-mode``: one ``teeshard accel`` per node; returns each node's extra options."""
    if args.offload_mode is None:
        return {}
    from teeshard.offload.launch import accel_command, start_accelerator

    arith = "float" if args.offload_mode == "plain" else "field"
    options: dict[int, list[str]] = {}
    for spec in launches:
        command = accel_command(model, spec.layers, arith, device=args.accel_device)
        with console.status(f"starting the accelerator for layers {spec.layers}"):
            accel = start_accelerator(command, timeout=args.startup_timeout)
        processes.append(accel.process)
        console.log(
            f"accelerator for layers {spec.layers}: {accel.endpoint}, key {accel.fingerprint[:16]}"
            f", mode {args.offload_mode}" + (" (INSECURE)" if arith == "float" else "")
        )
        options[spec.port] = [
            "--offload", accel.endpoint, "--offload-mode", args.offload_mode,
            "--accel-key", accel.public_key.decode(),
        ]  # fmt: skip
    return options


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    # nodes write to our stderr: our stdout carries only the entry URL
    return subprocess.Popen(argv, stdout=sys.stderr.fileno(), preexec_fn=die_with_parent)


def network_table(launches: list[LaunchSpec], host: str) -> Table:
    table = Table(title="the network", title_justify="left")
    for column in ("node", "layers", "port", "role"):
        table.add_column(column)
    for index, spec in enumerate(launches):
        role = "entry (API)" if spec.entry else ("replica" if spec.next_port is None else "chain")
        table.add_row(str(index), str(spec.layers), f"{host}:{spec.port}", role)
    return table


def _wait_healthy(
    launches: list[LaunchSpec], processes: list[subprocess.Popen[bytes]], host: str, timeout: float
) -> None:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks = {
            s.port: progress.add_task(f"starting node on port {s.port} (layers {s.layers})")
            for s in launches
        }
        deadline = time.monotonic() + timeout
        pending = {s.port for s in launches}
        by_port = {s.port: s for s in launches}
        while pending:
            for process in processes:
                if process.poll() is not None:
                    raise CommandError(
                        f"a node exited during start-up (exit code {process.returncode})"
                    )
            for port in list(pending):
                if is_healthy(by_port[port].health_url(host)):
                    pending.discard(port)
                    progress.update(tasks[port], description=f"node on port {port} ready")
            if time.monotonic() > deadline:
                raise CommandError(
                    f"nodes on ports {sorted(pending)} not healthy after {timeout:.0f}s"
                )
            time.sleep(0.2)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
