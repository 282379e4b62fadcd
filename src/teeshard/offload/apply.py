"""Turn a loaded :class:`Shard` into one whose linear layers run on an accelerator.

gpt-fast style: a transformation applied to an ordinary model. Every linear
module of the shard (q/k/v/o, gate/up/down, the LM head) is replaced by an
:class:`OffloadedLinear`; norms, rotary embedding, attention, the KV cache, SiLU
and sampling are the model's own code, untouched, in the TEE. The embedding
stays in the TEE unless the mode is plain. The weights the TEE no longer needs
are released: all of them in plain and verified modes (after the Freivalds
vectors are made), and the quantized copy is kept in blinded modes, for pads.

Call it after the shard is loaded and hashed, so the manifest still says which
weights the node serves; the accelerator must serve the same layers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from teeshard.model.transformer import Shard
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.errors import OffloadConfigError
from teeshard.offload.freivalds import FreivaldsKey
from teeshard.offload.groups import EMBED, release_weight, shard_groups
from teeshard.offload.linear import (
    GroupRunner,
    OffloadedEmbedding,
    OffloadedLinear,
    ProductObserver,
    Scales,
)
from teeshard.offload.modes import OffloadAttestation, OffloadMode
from teeshard.offload.pads import PadObserver, PadPool, PadSource, PadStats
from teeshard.offload.quant import QuantWeight, quantize_weight
from teeshard.offload.twoserver import TwoServerPads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadOptions:
    pool_rows: int | Mapping[str, int] = 16  # pads kept ready per group (rows = tokens)
    chunk_rows: int = 8  # rows the background worker makes at a time
    background: bool = True  # refill the pool in a background thread
    pad_observer: PadObserver | None = None  # tests: every pad handed out
    product_observer: ProductObserver | None = None  # tests: xq and the unblinded product


@dataclass
class OffloadHandle:
    """What :func:`offload_shard` did: the attested statement, the runners, the pads."""

    statement: OffloadAttestation
    runners: dict[str, GroupRunner]
    clients: tuple[AcceleratorClient, ...]
    pool: PadPool | None = None
    pads: PadSource | None = None
    closed: bool = field(default=False)

    @property
    def pad_stats(self) -> PadStats | None:
        return self.pool.stats if self.pool is not None else None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pads is not None:
            self.pads.close()
        for client in self.clients:
            client.close()


def offload_shard(
    shard: Shard,
    mode: OffloadMode,
    client: AcceleratorClient,
    *,
    second: AcceleratorClient | None = None,
    options: OffloadOptions | None = None,
) -> OffloadHandle:
    """Replace the shard's linear modules by offloading ones; ``client`` must be connected."""
    options = options or OffloadOptions()
    if second is not None and not mode.blinded:
        raise OffloadConfigError("a second accelerator serves only the blinded modes (two-server)")
    for accel in (client, *((second,) if second is not None else ())):
        _check_layout(shard, accel, mode)
    runners: dict[str, GroupRunner] = {}
    pool_weights: dict[str, QuantWeight] = {}
    keys: dict[str, FreivaldsKey] = {}
    for group in shard_groups(shard):
        runner = GroupRunner(group.name, group.widths, mode, client)
        if mode is not OffloadMode.PLAIN:
            quant = quantize_weight(group.stacked_weight())
            runner.scales = Scales(quant.scale, quant.act_bound)
            runner.observer = options.product_observer
            if mode.verified:
                runner.key = keys[group.name] = FreivaldsKey.derive(quant)
            if mode.blinded and second is None:
                pool_weights[group.name] = quant
        for index, member in enumerate(group.members):
            bias = member.linear.bias
            release_weight(member.linear)
            setattr(member.owner, member.attr, OffloadedLinear(runner, index, bias))
        runners[group.name] = runner
    if mode is OffloadMode.PLAIN and shard.embed_tokens is not None:
        dtype = shard.embed_tokens.weight.dtype
        release_weight(shard.embed_tokens)
        shard.embed_tokens = OffloadedEmbedding(client, dtype)  # type: ignore[assignment]

    pool: PadPool | None = None
    pads: PadSource | None = None
    pad_source: str | None = None
    if mode.blinded and second is not None:
        pads = TwoServerPads(second, keys if mode.verified else None, options.pad_observer)
        pad_source = "two-server"
    elif mode.blinded:
        pool = PadPool(
            pool_weights,
            capacity_rows=options.pool_rows,
            chunk_rows=options.chunk_rows,
            observer=options.pad_observer,
        )
        pads = pool
        pad_source = "tee-precomputed"
        if options.background:
            pool.start()
    for runner in runners.values():
        runner.pads = pads
    clients = (client,) if second is None else (client, second)
    statement = OffloadAttestation(mode, tuple(c.fingerprint for c in clients), pad_source)
    if mode.insecure:
        log.warning("offload mode plain: activations and token ids leave the TEE (INSECURE)")
    log.info("shard %s offloaded: %s", shard.layer_range, statement.describe())
    return OffloadHandle(statement, runners, clients, pool, pads)


def _check_layout(shard: Shard, client: AcceleratorClient, mode: OffloadMode) -> None:
    info = client.info
    if info is None:
        raise OffloadConfigError("connect() the accelerator client before offloading")
    if info.arith != mode.arith:
        raise OffloadConfigError(
            f"accelerator {client.endpoint} serves {info.arith} arithmetic; "
            f"mode {mode.value} needs {mode.arith} (start it with --arith {mode.arith})"
        )
    for group in shard_groups(shard):
        want = (sum(group.widths), group.in_features)
        if tuple(info.groups.get(group.name, ())) != want:
            raise OffloadConfigError(
                f"accelerator {client.endpoint} (layers {info.layers}) does not serve "
                f"{group.name} as {want}; the node serves layers {shard.layer_range}"
            )
    if mode is OffloadMode.PLAIN and shard.embed_tokens is not None and EMBED not in info.groups:
        raise OffloadConfigError(f"accelerator {client.endpoint} holds no embedding")


def tee_weight_bytes(shard: Shard) -> int:
    """Bytes of parameters the TEE still holds (the offload's memory saving)."""
    return sum(p.numel() * p.element_size() for p in shard.parameters()) + sum(
        b.numel() * b.element_size() for b in shard.buffers()
    )


__all__ = ["OffloadHandle", "OffloadOptions", "offload_shard"]
