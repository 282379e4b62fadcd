"""What splitting the layers over two processes costs, without any network.

The split's per-token time is its nodes' compute plus the hop between them. This
separates the two: three groups of worker processes hold TinyLlama-shaped bfloat16
layers, and take turns per token, interleaved (bandwidth here moves minute to
minute):

* "one process": layers 1-21 and the head in one process (layer 0 is left out,
  so that no shard holds the embedding and every step takes a hidden state);
* "two processes": layers 1-10 in one, 11-21 and the head in another, a token
  going through both (a pipe carries a one-byte turn, not the hidden state);
* the same pair pinned to one core each (``sched_setaffinity``).

Each step is a decode step on random hidden states (no embedding). Prints medians;
writes ``benchmarks/results/process_split.json``.

    python benchmarks/process_split.py --tokens 60
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GROUPS: dict[str, list[tuple[int | None, int, int]]] = {  # name -> (cpu, start, end) per process
    "one process": [(None, 1, 22)],
    "two processes": [(None, 1, 11), (None, 11, 22)],
    "two processes, pinned": [(0, 1, 11), (1, 11, 22)],
}


def worker(conn: Connection, cpu: int | None, start: int, end: int, dtype: str) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from split_vs_local import ensure_tinyllama_shaped
    from teeshard.model.checkpoint import Checkpoint
    from teeshard.model.layer_range import LayerRange
    from teeshard.model.loader import load_shard

    torch.set_num_threads(1)
    checkpoint = Checkpoint(ensure_tinyllama_shaped())
    shard = load_shard(checkpoint, LayerRange(start, end), getattr(torch, dtype))
    cache = shard.new_cache(1024)
    hidden = torch.randn(1, 1, checkpoint.spec.hidden_size)
    steps: list[float] = []
    conn.send("ready")
    with torch.no_grad():
        while conn.recv():
            started = time.perf_counter()
            shard(hidden, cache)
            steps.append(time.perf_counter() - started)
            conn.send(1)
    conn.send(statistics.median(steps[2:]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "process_split.json"
    )
    args = parser.parse_args()
    context = mp.get_context("spawn")
    pipes: dict[str, list[Connection]] = {}
    processes = []
    for name, specs in GROUPS.items():
        for cpu, start, end in specs:
            ours, theirs = context.Pipe()
            process = context.Process(target=worker, args=(theirs, cpu, start, end, args.dtype))
            process.start()
            processes.append(process)
            pipes.setdefault(name, []).append(ours)
    for conns in pipes.values():
        for conn in conns:
            conn.recv()
    walls: dict[str, list[float]] = {name: [] for name in GROUPS}
    names = list(GROUPS)
    for token in range(args.tokens):
        for name in names if token % 2 == 0 else reversed(names):
            started = time.perf_counter()
            for conn in pipes[name]:
                conn.send(1)
                conn.recv()
            walls[name].append(time.perf_counter() - started)
    result: dict[str, dict[str, Any]] = {}
    for name, conns in pipes.items():
        for conn in conns:
            conn.send(0)
        result[name] = {
            "token_ms": statistics.median(walls[name][2:]) * 1e3,
            "step_ms_per_process": [conn.recv() * 1e3 for conn in conns],
        }
    for process in processes:
        process.join()
    base = result["one process"]["token_ms"]
    print(f"{args.dtype}, {args.tokens} tokens, medians:")
    for name, row in result.items():
        token_ms = row["token_ms"]
        steps = " + ".join(f"{s:.1f}" for s in row["step_ms_per_process"])
        print(f"  {name:22} {token_ms:6.1f} ms per token (steps {steps}); "
              f"one process / this: {base / token_ms:.3f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dtype": args.dtype, "tokens": args.tokens, "groups": result,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
