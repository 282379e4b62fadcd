"""A downstream node dying mid-generation: a prompt, clear error; the entry stays healthy."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster


def test_killed_downstream_gives_a_prompt_clear_error(tiny_llama: TinyModel) -> None:
    with LocalCluster(tiny_llama.path, 2, subprocesses=True) as cluster:
        entry = cluster.entry.http_url
        body = {
            "model": "tiny",
            "prompt": "Hello",
            "max_tokens": 250,
            "temperature": 0,
            "stream": True,
        }
        events: list[dict[str, object]] = []
        killed_at: list[float] = []
        killers: list[threading.Thread] = []
        with httpx.stream("POST", entry + "/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    # kill from another thread while the stream is still being read; the
                    # time is taken before the kill, so the stream's end cannot beat it
                    killed_at.append(time.monotonic())
                    killers.append(threading.Thread(target=cluster.nodes[1].kill))
                    killers[-1].start()
        ended_at = time.monotonic()
        for killer in killers:
            killer.join()

        errors = [e["error"] for e in events if "error" in e]
        assert len(errors) == 1, events[-3:]
        error = errors[0]
        assert isinstance(error, dict)
        assert error["type"] == "upstream_error" and error["code"] == "downstream_failed"
        assert "next node unavailable" in str(error["message"])
        assert killed_at and ended_at - killed_at[0] < 10  # prompt, not a hang

        # the entry node itself is fine and answers the next request at once with a clear 502
        assert httpx.get(entry + "/health", timeout=5).json()["status"] == "ok"
        started = time.monotonic()
        again = httpx.post(entry + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert (
            again.status_code == 502 and "next node unavailable" in again.json()["error"]["message"]
        )
        assert time.monotonic() - started < 10
        assert httpx.get(entry + "/health", timeout=5).json()["sessions"]["open"] == 0

        # a replacement on the same address (new key, new quote) is attested afresh and used
        cluster.restart(1)
        deadline = time.monotonic() + 30
        while True:
            back = httpx.post(
                entry + "/v1/completions",
                json={**body, "stream": False, "max_tokens": 5},
                timeout=30,
            )
            if back.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert back.status_code == 200, back.text
        assert back.json()["usage"]["completion_tokens"] >= 1
