"""Concurrent sessions never mix their caches or their random streams."""

from __future__ import annotations

import asyncio

import httpx

from tests.cluster import LocalCluster

PROMPTS = [
    "Hello there",
    "The river ran past the old mill",
    "1, 2, 3",
    "Trusted execution",
    "Good software",
]


async def complete(client: httpx.AsyncClient, prompt: str, **extra: object) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, **extra}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


async def test_interleaved_requests_equal_their_solo_runs(cluster: LocalCluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.entry.http_url, timeout=60) as client:
        solo = [await complete(client, p) for p in PROMPTS]
        solo_sampled = [
            await complete(client, p, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)
        ]
        together = await asyncio.gather(
            *(complete(client, p) for p in PROMPTS),
            *(complete(client, p, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)),
        )
    assert list(together[: len(PROMPTS)]) == solo
    assert list(together[len(PROMPTS) :]) == solo_sampled
    assert len(set(solo)) > 1  # the prompts really lead to different outputs


async def test_streams_interleave_step_by_step(cluster: LocalCluster) -> None:
    """Two streams read alternately, so their pipeline steps really interleave."""
    async with httpx.AsyncClient(base_url=cluster.entry.http_url, timeout=60) as client:
        solo = [await complete(client, p) for p in PROMPTS[:2]]
        bodies = [
            {"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0, "stream": True}
            for p in PROMPTS[:2]
        ]
        async with (
            client.stream("POST", "/v1/completions", json=bodies[0]) as a,
            client.stream("POST", "/v1/completions", json=bodies[1]) as b,
        ):
            texts = await asyncio.gather(_collect(a), _collect(b))
    assert texts == solo


async def _collect(response: httpx.Response) -> str:
    import json

    text = []
    async for line in response.aiter_lines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            text.extend(c["text"] for c in event["choices"])
    return "".join(text)
