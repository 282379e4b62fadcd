"""Failover over real node processes: recovery time, throughput with and without a
failure, and the success rate of requests while nodes are killed at random.

Starts ``teeshard up --nodes N --replicas 2`` on the demo model (simulated
attestation), then:

1. a streamed greedy completion with no failure (tokens per second);
2. the same with the route's last node killed (SIGKILL) after ``--kill-after``
   tokens: the time from the kill to the next token the client receives, tokens
   per second over the whole answer, and whether the text equals run 1;
3. a chaos loop for ``--chaos-seconds``: ``--workers`` clients send greedy requests
   while a non-entry node is killed every ``--kill-every`` seconds (``teeshard up``
   restarts it); the share of requests that succeed and equal the reference.

Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/failover.py
    python benchmarks/failover.py --nodes 3 --tokens 64 --chaos-seconds 30
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from teeshard.procutil import free_port_block

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    tokens: int
    seconds: float
    text: str
    token_times: list[float]  # monotonic time each delta arrived

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def stream(entry: str, model: str, tokens: int, on_token: Any = None) -> Run:
    body = {"model": model, "prompt": "Hello", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    parts: list[str] = []
    times: list[float] = []
    started = time.monotonic()
    completion = 0
    with httpx.stream("POST", entry + "/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                completion = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    parts.append(choice["text"])
                    times.append(time.monotonic())
                    if on_token is not None:
                        on_token(len(times))
    return Run(completion, time.monotonic() - started, "".join(parts), times)


def node_processes(up: subprocess.Popen[str]) -> dict[int, psutil.Process]:
    """The nodes ``teeshard up`` runs now, by port."""
    out = {}
    for child in psutil.Process(up.pid).children():
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if "--port" in argv:
            out[int(argv[argv.index("--port") + 1])] = child
    return out


def route_ports(entry: str) -> list[int]:
    routes = httpx.get(entry + "/v1/network", timeout=10).json()["routes"]
    return [int(url.rsplit(":", 1)[1]) for url in routes[0]] if routes else []


def wait_usable(entry: str, want: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            nodes = httpx.get(entry + "/v1/network", timeout=10).json()["nodes"]
            if sum(1 for n in nodes if n["usable"]) >= want:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"fewer than {want} usable nodes after {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=16)
    parser.add_argument("--chaos-seconds", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ban-seconds", type=float, default=3.0)
    args = parser.parse_args()

    replicas = 2
    count = 1 + (args.nodes - 1) * replicas
    port = free_port_block(count)
    up = subprocess.Popen(
        [sys.executable, "-m", "teeshard.cli", "up", "--nodes", str(args.nodes),
         "--replicas", str(replicas), "--port", str(port), "--threads", "1",
         "--ban-seconds", str(args.ban_seconds), "--probe-interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert up.stdout is not None
        entry = up.stdout.readline().strip()
        model = httpx.get(entry + "/v1/models", timeout=10).json()["data"][0]["id"]
        wait_usable(entry, count - 1)
        stream(entry, model, 4)  # warm up every link
        stream(entry, model, args.tokens)
        reference = stream(entry, model, args.tokens)

        killed_at: list[float] = []

        def kill_last(received: int) -> None:
            if received == args.kill_after and not killed_at:
                victim = route_ports(entry)[-1]
                node_processes(up)[victim].send_signal(signal.SIGKILL)
                killed_at.append(time.monotonic())

        failovers = httpx.get(entry + "/v1/network", timeout=10).json()["counters"]["failovers"]
        failed = stream(entry, model, args.tokens, kill_last)
        # deltas already on their way when the node died arrive at once: the recovery
        # is the longest stall between two deltas after the kill
        times = [killed_at[0], *(t for t in failed.token_times if t > killed_at[0])]
        recovery = max(b - a for a, b in itertools.pairwise(times))
        normal = sorted(b - a for a, b in itertools.pairwise(reference.token_times))
        failed_over = (
            httpx.get(entry + "/v1/network", timeout=10).json()["counters"]["failovers"] - failovers
        )
        wait_usable(entry, count - 2)

        chaos = chaos_loop(entry, model, up, reference.text, args)
        result = {
            "nodes": args.nodes,
            "replicas": replicas,
            "tokens": args.tokens,
            "no_failure": {**asdict(reference), "tokens_per_s": reference.tokens_per_s},
            "with_failure": {
                **asdict(failed),
                "tokens_per_s": failed.tokens_per_s,
                "recovery_s": recovery,
                "median_token_gap_s": normal[len(normal) // 2],
                "failovers": failed_over,
                "identical": failed.text == reference.text,
            },
            "chaos": chaos,
        }
        for run in ("no_failure", "with_failure"):
            del result[run]["token_times"]  # type: ignore[attr-defined]
            del result[run]["text"]  # type: ignore[attr-defined]
        print_table(result)
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "failover.json"
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return 0
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()


def chaos_loop(
    entry: str, model: str, up: subprocess.Popen[str], reference: str, args: argparse.Namespace
) -> dict[str, Any]:
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            try:
                run = stream(entry, model, args.tokens)
                outcome = "ok" if run.text == reference else "different"
            except (RuntimeError, httpx.HTTPError) as exc:
                outcome = f"error: {str(exc)[:80]}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    kills = 0
    deadline = time.monotonic() + args.chaos_seconds
    entry_port = int(entry.rsplit(":", 1)[1])
    while time.monotonic() < deadline:
        time.sleep(args.kill_every)
        # two replicas survive one failure per range: kill only once all are back
        wait_usable(entry, len(node_processes(up)) - 1)
        others = {p: proc for p, proc in node_processes(up).items() if p != entry_port}
        if others:
            random.choice(list(others.values())).send_signal(signal.SIGKILL)
            kills += 1
    stop.set()
    for thread in threads:
        thread.join()
    ok = outcomes.count("ok")
    errors = sorted({o for o in outcomes if o.startswith("error")})
    return {
        "seconds": args.chaos_seconds,
        "kills": kills,
        "requests": len(outcomes),
        "identical": ok,
        "different": outcomes.count("different"),
        "success_rate": ok / len(outcomes) if outcomes else 0.0,
        "errors": errors[:5],
    }


def print_table(result: dict[str, Any]) -> None:
    a, b, c = result["no_failure"], result["with_failure"], result["chaos"]
    rows = [
        ("tokens/s, no failure", f"{a['tokens_per_s']:.1f}"),
        ("tokens/s, one node killed", f"{b['tokens_per_s']:.1f}"),
        ("recovery (kill -> next token)", f"{b['recovery_s'] * 1000:.0f} ms"),
        ("median gap between tokens", f"{b['median_token_gap_s'] * 1000:.0f} ms"),
        ("failovers in that answer", str(b["failovers"])),
        ("output identical after failover", str(b["identical"])),
        (f"chaos: requests in {c['seconds']:.0f}s, {c['kills']} kills", str(c["requests"])),
        ("chaos: success (identical output)", f"{c['success_rate'] * 100:.1f}%"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"failover, {result['nodes']} ranges x {result['replicas']} replicas, "
          f"{result['tokens']} tokens")  # fmt: skip
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for error in c["errors"]:
        print(f"  chaos error: {error}")


if __name__ == "__main__":
    sys.exit(main())
