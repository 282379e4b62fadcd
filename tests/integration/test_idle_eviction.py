from __future__ import annotations

import asyncio

from teeshard.node import SessionLimits, UnknownSessionError
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster


async def test_idle_sessions_are_evicted_on_every_node(tiny_llama: TinyModel) -> None:
    limits = SessionLimits(idle_timeout_s=0.4)
    with LocalCluster(tiny_llama.path, 2, limits=limits) as cluster:
        client = cluster.entry_stage()
        session = await client.open_session(max_len=16)
        await client.step(session, [5, 6, 7])
        await asyncio.sleep(1.5)
        for node in cluster.nodes:
            health = node.get("/health").json()
            assert health["sessions"]["open"] == 0 and health["sessions"]["evicted_total"] == 1
        try:
            await client.step(session, [8])
            raise AssertionError("an evicted session must not step")
        except UnknownSessionError as exc:
            assert exc.status == 404 and exc.code == "unknown_session"
