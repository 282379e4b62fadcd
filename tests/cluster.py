"""Real node servers on loopback for tests: in this process (threads) or as subprocesses.

In-process nodes are real uvicorn servers with real sockets, each on its own
event loop in its own thread; subprocess nodes are started with the
``teeshard node`` command line, for tests that kill a node. Either way every
node attests (simulated provider), serves TLS with its attested certificate
except the entry node, and verifies the next node against a policy naming the
exact manifest of every shard, as ``teeshard up`` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
import uvicorn

from teeshard.attest import (
    NodeAttestation,
    NodeIdentity,
    Policy,
    compute_manifest,
    pinned_client_context,
    select_provider,
)
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.plan import split_even
from teeshard.model.sampling import SamplingParams
from teeshard.node import PipelineLimits, SessionLimits
from teeshard.paths import simulated_tee_dir
from teeshard.procutil import die_with_parent, free_port, wait_healthy
from teeshard.server.config import NodeConfig
from teeshard.server.local_pipeline import write_local_policy
from teeshard.server.runtime import Node, build_node, make_server
from teeshard.server.trust import NodeTrust
from teeshard.transport.messages import SamplingHistory, WireDtype

T = TypeVar("T")


@dataclass
class RunningNode:
    config: NodeConfig
    node: Node | None = None
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        return self.config.serves_tls

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.config.port}"

    @property
    def ws_url(self) -> str:
        """The pipeline socket (every node but the entry has one)."""
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.config.port}/pipeline"

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on this in-process node's own event loop; wait for its result.

        The entry node's stage is driven this way in tests, exactly as its own
        generation loop drives it (the entry node has no pipeline socket).
        """
        assert self.node is not None, "only in-process nodes run callers' coroutines"
        loop: asyncio.AbstractEventLoop = self.node.app.state.loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=120)

    async def acall(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """``call`` from a test's own event loop."""
        return await asyncio.to_thread(self.call, coroutine)

    def client_ssl(self) -> ssl.SSLContext | None:
        """A client context pinned to this (in-process) node's attested certificate."""
        if not self.tls:
            return None
        assert self.node is not None, "pinning needs the in-process node's identity"
        return pinned_client_context(self.node.trust.attestation.identity.certificate_pem)

    def get(self, path: str) -> httpx.Response:
        verify: ssl.SSLContext | bool = True
        if self.tls:
            verify = self.client_ssl() if self.node is not None else False
        return httpx.get(self.http_url + path, verify=verify, timeout=30)

    def kill(self) -> None:
        """SIGKILL a subprocess node: no goodbye, sockets simply drop."""
        assert self.process is not None, "only subprocess nodes can be killed"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@dataclass
class LocalCluster:
    model_dir: Path
    num_nodes: int
    subprocesses: bool = False
    limits: SessionLimits = field(default_factory=SessionLimits)
    pipeline: PipelineLimits = field(default_factory=PipelineLimits)
    wire_dtype: str = "float32"
    max_frame_bytes: int | None = None
    ranges: list[LayerRange] | None = None
    # node index -> checkpoint it loads instead (the policy still expects model_dir's)
    model_overrides: dict[int, Path] = field(default_factory=dict)
    # node index -> URL it is told is its next hop (an impostor, say)
    next_overrides: dict[int, str] = field(default_factory=dict)
    # extra NodeConfig fields for the entry node (a ledger, say)
    entry_options: dict[str, object] = field(default_factory=dict)
    # the number format every node computes in, and the one the policy's hashes are for
    number_format: NumberFormat = field(default_factory=NumberFormat)
    # a policy file to use instead of the one computed for number_format
    policy_path: Path | None = None
    # node index -> extra NodeConfig fields for that node (its operator, say)
    node_options: dict[int, dict[str, object]] = field(default_factory=dict)
    # nodes per range after the entry's; above 1 (or with ``network``) the entry gets a
    # network file of every other node and routes each session, the others no --next
    replicas: int = 1
    network: bool = False
    ban_s: float = 30.0
    probe_interval_s: float = 0.5
    expect_usable: int | None = None  # nodes the entry must attest before use; None: all
    # node index -> the policy it checks its neighbours with instead of the cluster's
    policy_overrides: dict[int, Path] = field(default_factory=dict)
    nodes: list[RunningNode] = field(default_factory=list)

    @property
    def entry(self) -> RunningNode:
        return self.nodes[0]

    def entry_stage(self) -> EntryStage:
        return EntryStage(self.entry)

    def upstream_of(self, index: int) -> NodeTrust:
        """An attested stand-in for node ``index``'s previous node: its layers, its manifest,
        a fresh identity quoted by the simulated provider, the cluster's policy."""
        target = self.nodes[index].config
        layers = self.nodes[index - 1].config.layers
        policy_path = target.policy_path
        return attested_stand_in(self.model_dir, layers, policy_path, entry=layers.is_first())

    @property
    def routed(self) -> bool:
        return self.network or self.replicas > 1

    def replicas_of(self, range_index: int) -> list[RunningNode]:
        """The nodes serving the ``range_index``-th range (0: the entry)."""
        layers = sorted({n.config.layers for n in self.nodes})[range_index]
        return [n for n in self.nodes if n.config.layers == layers]

    def by_url(self, url: str) -> RunningNode:
        """The node a route names (``wss://127.0.0.1:PORT``)."""
        port = int(url.rstrip("/").removesuffix("/pipeline").rsplit(":", 1)[1])
        return next(n for n in self.nodes if n.config.port == port)

    def network_state(self) -> dict[str, Any]:
        """The entry's ``/v1/network`` (detail: the tests' client is on loopback)."""
        return dict(self.entry.get("/v1/network").json())

    def wait_routable(self, usable: int | None = None, timeout: float = 30.0) -> None:
        """Until the entry's registry has attested ``usable`` nodes (default: all)."""
        want = len(self.nodes) - 1 if usable is None else usable
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.network_state()["nodes"]
            if sum(1 for n in nodes if n["usable"]) >= want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the entry's network never had {want} usable nodes: {nodes}")
            time.sleep(0.1)

    def configs(self) -> list[NodeConfig]:
        checkpoint = Checkpoint(self.model_dir)
        ranges = self.ranges or split_even(checkpoint.spec.num_layers, self.num_nodes)
        if self.routed:
            return self._routed_configs(checkpoint, ranges)
        ports = [free_port() for _ in ranges]
        base = self._base(checkpoint, ranges)
        configs = [
            replace(
                base,
                layers=r,
                port=ports[i],
                entry=i == 0 and r.is_first(),
                model_dir=self.model_overrides.get(i, self.model_dir),
                next_url=self.next_overrides.get(
                    i, f"wss://127.0.0.1:{ports[i + 1]}" if i + 1 < len(ranges) else None
                ),
            )
            for i, r in enumerate(ranges)
        ]
        if self.entry_options:
            configs[0] = replace(configs[0], **self.entry_options)  # type: ignore[arg-type]
        return self._with_node_options(configs)

    def _with_node_options(self, configs: list[NodeConfig]) -> list[NodeConfig]:
        for index, options in self.node_options.items():
            configs[index] = replace(configs[index], **options)  # type: ignore[arg-type]
        return configs

    def _base(self, checkpoint: Checkpoint, ranges: list[LayerRange]) -> NodeConfig:
        fmt = self.number_format
        policy = self.policy_path or write_local_policy(
            Path(tempfile.mkdtemp(prefix="teeshard-policy-")) / "policy.toml",
            checkpoint, ranges, fmt.dtype, "tiny", fmt.quantize,
        )  # fmt: skip
        return NodeConfig(
            dtype=fmt.dtype, quantize=fmt.quantize,
            model_dir=self.model_dir, layers=ranges[0], limits=self.limits,
            pipeline=self.pipeline, wire_dtype=self.wire_dtype,
            max_frame_bytes=self.max_frame_bytes, model_name="tiny", threads=1,
            tee="simulated", policy_path=policy,
        )  # fmt: skip

    def _routed_configs(self, checkpoint: Checkpoint, ranges: list[LayerRange]) -> list[NodeConfig]:
        """The entry, then ``replicas`` nodes per later range, none with a --next."""
        base = self._base(checkpoint, ranges)
        configs = [replace(base, layers=ranges[0], port=free_port(), entry=True)]
        for layers in ranges[1:]:
            for _ in range(self.replicas):
                index = len(configs)
                configs.append(
                    replace(
                        base, layers=layers, port=free_port(),
                        model_dir=self.model_overrides.get(index, self.model_dir),
                        policy_path=self.policy_overrides.get(index, base.policy_path),
                    )
                )  # fmt: skip
        network = Path(tempfile.mkdtemp(prefix="teeshard-network-")) / "network.toml"
        network.write_text(network_toml(configs[1:]))
        configs[0] = replace(
            configs[0], network_path=network, ban_s=self.ban_s,
            probe_interval_s=self.probe_interval_s, **self.entry_options,  # type: ignore[arg-type]
        )  # fmt: skip
        return self._with_node_options(configs)

    def __enter__(self) -> LocalCluster:
        try:
            for config in reversed(self.configs()):
                running = RunningNode(config)
                self.nodes.insert(0, running)
                if self.subprocesses:
                    self._spawn(running)
                else:
                    self._start_thread(running)
            for running in self.nodes:
                _wait_healthy(running)
            if self.routed:
                self.wait_routable(self.expect_usable)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_thread(self, running: RunningNode) -> None:
        running.node = build_node(running.config)
        running.server = make_server(running.node)
        running.thread = threading.Thread(target=running.server.run, daemon=True)
        running.thread.start()

    def _spawn(self, running: RunningNode) -> None:
        c = running.config
        argv = [
            sys.executable, "-m", "teeshard.cli", "node", "--model", str(c.model_dir),
            "--layers", str(c.layers), "--port", str(c.port), "--model-name", "tiny",
            "--threads", "1", "--wire-dtype", c.wire_dtype, "--tee", "simulated",
            "--policy", str(c.policy_path), "--max-sessions", str(c.limits.max_sessions),
            "--max-cached-tokens", str(c.limits.max_cached_tokens), "--dtype", c.dtype,
        ]  # fmt: skip
        if c.quantize:
            argv += ["--quantize", c.quantize]
        if c.next_url:
            argv += ["--next", c.next_url]
        if c.step_timeout_s != NodeConfig.step_timeout_s:
            argv += ["--step-timeout", str(c.step_timeout_s)]
        if c.entry:
            argv.append("--entry")
        if c.ledger_url:
            argv += ["--ledger", c.ledger_url]
        if c.ledger_actor:
            argv += ["--ledger-actor", c.ledger_actor]
        if c.operator:
            argv += ["--operator", c.operator]
        if c.pricing_path is not None:
            argv += ["--pricing", str(c.pricing_path)]
        if c.network_path is not None:
            argv += ["--network", str(c.network_path), "--ban-seconds", str(c.ban_s),
                     "--probe-interval", str(c.probe_interval_s),
                     "--failover-attempts", str(c.failover_attempts),
                     "--failover-deadline", str(c.failover_deadline_s)]  # fmt: skip
        running.process = subprocess.Popen(
            argv, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent
        )

    def restart(self, index: int) -> None:
        """Start a killed subprocess node again: a new process, a new identity, same place."""
        running = self.nodes[index]
        assert running.process is not None and running.process.poll() is not None
        self._spawn(running)
        _wait_healthy(running)

    def __exit__(self, *exc: object) -> None:
        for running in self.nodes:
            if running.server is not None:
                running.server.should_exit = True
            if running.process is not None and running.process.poll() is None:
                running.process.terminate()
        for running in self.nodes:
            if running.thread is not None:
                running.thread.join(timeout=10)
            if running.process is not None:
                try:
                    running.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    running.process.kill()


def network_toml(configs: list[NodeConfig]) -> str:
    """A network file listing ``configs`` (``teeshard node --network``)."""
    return "".join(
        f'[[nodes]]\nurl = "wss://127.0.0.1:{c.port}"\nlayers = "{c.layers}"\n\n' for c in configs
    )


def _wait_healthy(running: RunningNode) -> None:
    wait_healthy(running.http_url + "/health", running.process, timeout=60, interval=0.05)


def attested_stand_in(
    model_dir: Path, layers: LayerRange, policy_path: Path | None, entry: bool = False
) -> NodeTrust:
    """A node's trust as ``layers`` of ``model_dir`` would have it (simulated provider)."""
    manifest = compute_manifest(
        Checkpoint(model_dir), layers, "float32", model_name="tiny",
        entry_files=model_dir if entry else None,
    )  # fmt: skip
    provider = select_provider("simulated", allow_simulated=True, data_dir=simulated_tee_dir())
    attestation = NodeAttestation.create(provider, manifest, NodeIdentity.generate())
    return NodeTrust(attestation, Policy.load(policy_path))


class EntryStage:
    """The in-process entry node's stage, driven as its own generation loop drives it."""

    def __init__(self, node: RunningNode) -> None:
        assert node.node is not None
        self.node = node
        self.service = node.node.service

    async def open_session(
        self,
        max_len: int,
        sampling: SamplingParams | None = None,
        return_logits: bool = True,
        wire_dtype: WireDtype = "float32",
        history: SamplingHistory | None = None,
    ) -> str:
        session = uuid.uuid4().hex
        await self.node.acall(
            self.service.open_session(
                session,
                max_len,
                sampling or SamplingParams(),
                wire_dtype,
                return_logits,
                history=history,
            )
        )
        return session

    async def step(self, session: str, tokens: list[int]) -> tuple[int, torch.Tensor | None]:
        result = await self.node.acall(self.service.step_tokens(session, tokens))
        return result.token, result.logits

    async def close_session(self, session: str, sign: bool = False) -> list[dict[str, object]]:
        receipts = await self.node.acall(self.service.close_session(session, sign=sign))
        return [r.to_json() for r in receipts or []]
