"""From a node's settings to an offloaded shard: pinned clients, handshake, transformation."""

from __future__ import annotations

from teeshard.model.transformer import Shard
from teeshard.offload.apply import OffloadHandle, OffloadOptions, offload_shard
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.errors import OffloadConfigError
from teeshard.offload.keys import parse_public_key
from teeshard.offload.modes import OffloadMode


def connect_offload(
    shard: Shard,
    mode: str,
    endpoint: str,
    key: str,
    *,
    second_endpoint: str | None = None,
    second_key: str | None = None,
    pool_rows: int = 16,
    timeout_s: float = 60.0,
) -> OffloadHandle:
    """Connect to the accelerator(s) at pinned keys and offload ``shard``'s linear layers."""
    parsed = OffloadMode.parse(mode)
    if (second_endpoint is None) != (second_key is None):
        raise OffloadConfigError("the second accelerator needs both its endpoint and its key")
    clients: list[AcceleratorClient] = []
    try:
        for url, pinned in ((endpoint, key), (second_endpoint, second_key)):
            if url is None or pinned is None:
                continue
            client = AcceleratorClient(url, parse_public_key(pinned), timeout_s=timeout_s)
            clients.append(client)
            client.connect()
        second = clients[1] if len(clients) > 1 else None
        return offload_shard(
            shard, parsed, clients[0], second=second, options=OffloadOptions(pool_rows=pool_rows)
        )
    except BaseException:
        for client in clients:
            client.close()
        raise
