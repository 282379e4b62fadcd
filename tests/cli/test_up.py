"""``teeshard up`` on the demo model: serves sense, then Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil

from teeshard.procutil import free_port_block
from tests.demo_sense import sense
from tests.signals import answer_ctrl_c


def test_up_serves_the_demo_and_ctrl_c_stops_everything(tmp_path: object) -> None:
    port = free_port_block(3)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teeshard.cli",
            "up",
            "--nodes",
            "3",
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        text=True,
        preexec_fn=answer_ctrl_c,
    )
    try:
        assert process.stdout is not None
        entry = process.stdout.readline().strip()  # the only stdout line: the entry URL
        assert entry == f"http://127.0.0.1:{port}"
        children = psutil.Process(process.pid).children()
        assert len(children) == 3
        models = httpx.get(entry + "/v1/models").json()
        assert models["data"][0]["id"].startswith("teeshard-demo-llama")
        reply = httpx.post(
            entry + "/v1/chat/completions",
            json={
                "model": models["data"][0]["id"],
                "messages": [{"role": "user", "content": "Hello! What is a TEE?"}],
                "max_tokens": 40,
                "temperature": 0,  # greedy: the same answer every time
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]["content"]
        assert sense(answer).readable(), answer  # the trained demo, split 3 ways, makes sense
        # the other nodes serve only TLS with their attested certificates
        urls = [entry] + [f"https://127.0.0.1:{port + i}" for i in (1, 2)]
        healths = [httpx.get(u + "/health", verify=False).json() for u in urls]
        assert sorted(h["layers"][0] for h in healths) == [0, 2, 4]  # 6 layers as 2 + 2 + 2
        assert all(h["attestation"]["provider"] == "simulated" for h in healths)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130)
        deadline = time.monotonic() + 10
        while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
            assert time.monotonic() < deadline, "a node outlived teeshard up"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()


def test_up_with_replicas_restarts_a_killed_node_and_keeps_serving() -> None:
    port = free_port_block(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "teeshard.cli", "up", "--nodes", "2", "--replicas", "2",
         "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, preexec_fn=answer_ctrl_c,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        entry = process.stdout.readline().strip()
        assert entry == f"http://127.0.0.1:{port}"
        children = {c.pid: c for c in psutil.Process(process.pid).children()}
        assert len(children) == 3  # the entry and two replicas of the second range
        model = httpx.get(entry + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hi", "max_tokens": 3, "temperature": 0}

        def usable() -> int:
            nodes = httpx.get(entry + "/v1/network", timeout=10).json()["nodes"]
            return sum(1 for n in nodes if n["usable"])

        deadline = time.monotonic() + 30
        while usable() < 2:
            assert time.monotonic() < deadline, "the entry never attested both replicas"
            time.sleep(0.2)
        replica = next(
            c
            for c in children.values()
            if f"{port + 1}" in c.cmdline() and "--entry" not in c.cmdline()
        )
        replica.kill()
        # the other replica serves meanwhile
        reply = httpx.post(entry + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        # and the killed one comes back: a new process on its port, attested again
        deadline = time.monotonic() + 60
        while True:
            now = {c.pid for c in psutil.Process(process.pid).children()}
            if len(now) == 3 and replica.pid not in now and usable() == 2:
                break
            assert time.monotonic() < deadline, "the killed replica was not restarted"
            time.sleep(0.3)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
