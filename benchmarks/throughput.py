"""Throughput of teeshard's number formats, unsplit and split over real node servers.

For each format (float32, bfloat16, int8 weight-only) on the TinyLlama-shaped
random model: prefill of 128 tokens and greedy decode of 64, with teeshard's
blocks unsplit in this process ("local") and over a 2-node split of
``teeshard node`` processes on loopback (RA-TLS, simulated attestation against a
policy naming the format's manifests, receipts), driven through the entry's API
with a token-id prompt and ``ignore_eos`` ("split"), and on one such node serving
every layer ("one node").

Memory bandwidth here swings from minute to minute, so nothing is compared across
minutes. Two phases, each interleaved:

1. **formats**: every format's unsplit shard is loaded at once and the formats take
   turns, one prefill + decode each per repetition, in rotating order. The format
   ratios (bfloat16 / float32 and int8 / float32) come from here.
2. **split vs unsplit**: for each format in turn (the smallest first), a 2-node
   split and a one-node server of the whole model start, and three runs take turns
   (each going first in turn), ``--split-reps`` times: the split, the one node (the
   same serving stack unsplit: the split/unsplit target is measured against it) and
   the blocks in this process (no server at all). A ratio is the median over
   repetitions of the runs next to each other in time. Decode over the API is the
   ``decode_tokens`` request's time less the 1-token request's (the prefill), so it
   carries the noise of both; more repetitions narrow it. Each node's
   ``teeshard_step_seconds_total`` is read around both requests, so a decode step's
   time splits into each node's compute and everything outside it (hand-offs between
   threads and nodes, the API, the generation loop).

Medians over repetitions. Prints a table; writes ``benchmarks/results/throughput.json``.

Then, with one 2-node split kept running in ``--concurrency-format`` (bfloat16 by
default), C sessions at once for each C in ``--levels`` (1, 4, 8, 16): aggregate
decode tokens per second and per-session time per output token. Each level runs
a round of C concurrent 1-token requests (open, prefill, close: the fixed part)
and then a round of C concurrent ``--concurrency-decode``-token requests; a
session's TPOT is its second-round latency minus the first round's median, over
the other tokens, and the aggregate rate is every session's decoded tokens over
the second round's wall time less that fixed part. Levels are interleaved over
repetitions in alternating order.

    python benchmarks/throughput.py                      # 2 reps, prefill 128, decode 64
    python benchmarks/throughput.py --reps 1 --formats bfloat16,int8
    python benchmarks/throughput.py --formats "" --levels 1,8    # concurrency only
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_vs_local import (
    Timing,
    cpu_description,
    ensure_tinyllama_shaped,
    node_metrics,
    node_rss_mb,
    prompt_ids,
    run_local_shard,
    run_split,
    start_nodes,
)
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import FORMATS
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.plan import format_bytes, plan_checkpoint
from teeshard.model.transformer import Shard

ROOT = Path(__file__).resolve().parent.parent
BATCHES, ROWS = "teeshard_batches_total", "teeshard_batched_rows_total"
TARGETS = {  # issue 13, ratios within one run
    "bfloat16_decode_vs_float32": 2.0,
    "bfloat16_prefill_vs_float32": 3.0,
    "int8_decode_vs_float32": 3.5,
    "split_vs_one_node_decode_each_format": 0.95,
}


@torch.no_grad()
def run_local(shard: Shard, prompt: list[int], decode_tokens: int) -> Timing:
    """Unsplit teeshard blocks in this process, warmed up as the split is (one 1-token step)."""
    shard(shard.embed(torch.tensor([prompt[:1]])), shard.new_cache(2))
    return run_local_shard(shard, prompt, decode_tokens)


def measure_concurrency(
    model_dir: Path,
    args: argparse.Namespace,
    prompt: list[int],
) -> dict[str, Any]:
    """C sessions at once over one running split, for each C in ``args.levels``."""
    fmt = FORMATS[args.concurrency_format]
    top = max(args.levels)
    options = ["--threads", str(args.threads)] if args.threads else []
    options += ["--max-sessions", str(max(16, top))]
    options += ["--pipeline-groups", str(args.pipeline_groups)]
    processes, launches = start_nodes(model_dir, args.nodes, "float32", fmt, options)
    url = f"http://127.0.0.1:{launches[0].port}/v1/completions"
    decode = args.concurrency_decode
    samples: dict[int, list[dict[str, Any]]] = {c: [] for c in args.levels}
    try:
        asyncio.run(_concurrent_round(url, prompt, 1, 2))  # warm up
        for rep in range(args.reps):
            levels = args.levels if rep % 2 == 0 else list(reversed(args.levels))
            for count in levels:
                fixed = asyncio.run(_concurrent_round(url, prompt, 1, count))
                before = [node_metrics(spec, BATCHES, ROWS) for spec in launches]
                full = asyncio.run(_concurrent_round(url, prompt, decode, count))
                after = [node_metrics(spec, BATCHES, ROWS) for spec in launches]
                full["mean_batch_rows"] = [
                    (a[ROWS] - b[ROWS]) / max(1.0, a[BATCHES] - b[BATCHES])
                    for a, b in zip(after, before, strict=True)
                ]
                samples[count].append({"fixed": fixed, "full": full})
                fixed_s = statistics.median(fixed["latencies"])
                rate = count * (decode - 1) / max(full["wall_s"] - fixed_s, 1e-9)
                print(f"rep {rep + 1}/{args.reps} {count:3} sessions: aggregate decode "
                      f"{rate:.1f} tok/s", flush=True)  # fmt: skip
        burst = asyncio.run(_burst(url, prompt, args.burst, max_sessions=max(16, top)))
        print(f"burst of {args.burst}: {burst['statuses']} in {burst['wall_s']:.1f}s", flush=True)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
    section: dict[str, Any] = {"burst": burst}
    for count, reps in samples.items():
        rates, tpots = [], []
        for sample in reps:
            fixed_s = statistics.median(sample["fixed"]["latencies"])
            rates.append(count * (decode - 1) / max(sample["full"]["wall_s"] - fixed_s, 1e-9))
            tpots += [
                max(latency - fixed_s, 0.0) / (decode - 1) * 1000
                for latency in sample["full"]["latencies"]
            ]
        tpots.sort()
        section[str(count)] = {
            "aggregate_decode_tok_s": statistics.median(rates),
            "p50_tpot_ms": _percentile(tpots, 50),
            "p95_tpot_ms": _percentile(tpots, 95),
            "per_rep_aggregate_decode_tok_s": rates,
            # token positions per batched forward on each node during the decode round
            "mean_batch_rows_per_node": [
                statistics.median(r["full"]["mean_batch_rows"][i] for r in reps)
                for i in range(len(launches))
            ],
        }
    return section


async def _concurrent_round(
    url: str, prompt: list[int], max_tokens: int, count: int
) -> dict[str, Any]:
    """``count`` requests at once, each a different prompt (one token changed)."""
    limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:

        async def one(index: int) -> float:
            tokens = [*prompt[:-1], (prompt[-1] + index) % 1000 + 1]
            body = {"model": "bench", "prompt": tokens, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            started = time.perf_counter()
            response = await client.post(url, json=body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] == max_tokens
            return elapsed

        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(count)))
        return {"latencies": list(latencies), "wall_s": time.perf_counter() - started}


async def _burst(url: str, prompt: list[int], count: int, max_sessions: int) -> dict[str, Any]:
    """``count`` requests at once against nodes that admit ``max_sessions``: the rest
    wait in the entry's queue. Every status is counted; all should be 200."""
    limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:

        async def one(index: int) -> int:
            tokens = [*prompt[:-1], (prompt[-1] + index) % 1000 + 1]
            body = {"model": "bench", "prompt": tokens, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            return (await client.post(url, json=body)).status_code

        started = time.perf_counter()
        statuses = await asyncio.gather(*(one(i) for i in range(count)))
    counted: dict[str, int] = {}
    for status in statuses:
        counted[str(status)] = counted.get(str(status), 0) + 1
    return {
        "requests": count,
        "max_sessions_per_node": max_sessions,
        "max_tokens": 8,
        "statuses": counted,
        "all_200": counted == {"200": count},
        "wall_s": time.perf_counter() - started,
    }


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    rank = (len(values) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def load_locals(checkpoint: Checkpoint, names: list[str]) -> dict[str, tuple[Shard, float]]:
    """Every format's unsplit shard, and the seconds each took to load."""
    shards = {}
    for name in names:
        fmt = FORMATS[name]
        started = time.perf_counter()
        shard = load_shard(
            checkpoint, LayerRange(0, checkpoint.spec.num_layers), fmt.torch_dtype,
            quantize=fmt.quantize,
        )  # fmt: skip
        shards[name] = (shard, time.perf_counter() - started)
    return shards


def measure_formats(
    args: argparse.Namespace,
    model_dir: Path,
    checkpoint: Checkpoint,
    names: list[str],
    prompt: list[int],
) -> dict[str, dict[str, Any]]:
    """Both phases (see the module docstring); timings per format."""
    runs: dict[str, dict[str, Any]] = {
        n: {"local": [], "split": [], "one_node": [], "beside_split": []} for n in names
    }
    unsplit = load_locals(checkpoint, names)
    for name in names:
        runs[name]["load_s"] = unsplit[name][1]
    started = time.perf_counter()
    for rep in range(args.reps):  # phase 1: the formats take turns, unsplit
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            timing = run_local(unsplit[name][0], prompt, args.decode_tokens)
            runs[name]["local"].append(timing)
            print(f"formats rep {rep + 1}/{args.reps} {name:9}: prefill {timing.prefill_s:.2f}s "
                  f"decode {timing.decode_s:.2f}s ({time.perf_counter() - started:.0f}s elapsed)",
                  flush=True)  # fmt: skip
    # phase 2: the split, one node and the in-process blocks take turns, a format at a
    # time, the largest last (each format's in-process shard is freed after its turn)
    everything = LayerRange(0, checkpoint.spec.num_layers)
    for name in sorted(names, key=lambda n: format_bytes(checkpoint, everything, FORMATS[n])):
        fmt, run = FORMATS[name], runs[name]
        options = ["--threads", str(args.threads)] if args.threads else []
        launched = time.perf_counter()
        processes, launches = start_nodes(model_dir, args.nodes, "float32", fmt, options)
        run["startup_s"] = time.perf_counter() - launched
        single, single_launch = start_nodes(model_dir, 1, "float32", fmt, options)
        urls = {
            "split": f"http://127.0.0.1:{launches[0].port}/v1/completions",
            "one_node": f"http://127.0.0.1:{single_launch[0].port}/v1/completions",
        }
        routes = {"split": launches, "one_node": single_launch}
        kinds = ["split", "one_node", "beside_split"]
        try:
            for rep in range(args.split_reps):
                turn = rep % len(kinds)
                for kind in kinds[turn:] + kinds[:turn]:  # each goes first in turn
                    if kind == "beside_split":
                        run[kind].append(run_local(unsplit[name][0], prompt, args.decode_tokens))
                    else:
                        route = routes[kind]
                        run[kind].append(
                            run_split(urls[kind], prompt, args.decode_tokens, len(route), route)
                        )
                sp, one, lo = run["split"][-1], run["one_node"][-1], run["beside_split"][-1]
                print(f"split rep {rep + 1}/{args.split_reps} {name:9}: decode split "
                      f"{sp.decode_s:.2f}s one node {one.decode_s:.2f}s in-process "
                      f"{lo.decode_s:.2f}s ({time.perf_counter() - started:.0f}s elapsed)",
                      flush=True)  # fmt: skip
            run["rss_mb"] = node_rss_mb(launches)
        finally:
            for process in [*processes, *single]:
                process.terminate()
            for process in [*processes, *single]:
                process.wait()
        del unsplit[name]
        gc.collect()
    return runs


def agreement(tokens: list[int], reference: list[int]) -> dict[str, float | int]:
    """Free-running greedy agreement: identical prefix length and position-wise fraction."""
    prefix = next(
        (i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens)
    )
    same = sum(a == b for a, b in zip(tokens, reference, strict=True))
    return {"identical_prefix": prefix, "positionwise_fraction": same / len(reference)}


def summarise(
    args: argparse.Namespace,
    checkpoint: Checkpoint,
    runs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    prompt_len, decode_tokens = args.prompt_tokens, args.decode_tokens
    plans = plan_checkpoint(checkpoint, args.nodes)
    formats: dict[str, Any] = {}
    reference = runs["float32"]["local"][0].tokens if "float32" in runs else None
    for name, run in runs.items():
        local, split, beside = run["local"], run["split"], run["beside_split"]
        row: dict[str, Any] = {}
        for where, timings in (("local", local), ("split", split)):
            row[f"{where}_prefill_tok_s"] = prompt_len / statistics.median(
                t.prefill_s for t in timings
            )
            row[f"{where}_decode_tok_s"] = (decode_tokens - 1) / statistics.median(
                t.decode_s for t in timings
            )
        # each repetition of phase 2: the split against the unsplit runs next to it in time
        for base, runs_beside in (("one_node", run["one_node"]), ("local", beside)):
            pairs = list(zip(runs_beside, split, strict=True))
            for what in ("prefill", "decode"):
                row[f"split_vs_{base}_{what}"] = statistics.median(
                    getattr(lo, f"{what}_s") / getattr(sp, f"{what}_s") for lo, sp in pairs
                )
        one_node = run["one_node"]
        row["one_node_prefill_tok_s"] = prompt_len / statistics.median(
            t.prefill_s for t in one_node
        )
        row["one_node_decode_tok_s"] = (decode_tokens - 1) / statistics.median(
            t.decode_s for t in one_node
        )
        for where, timings in (("split", split), ("one_node", one_node)):
            row.update(step_time_parts(where, timings, decode_tokens))
        row["greedy_split_equals_local"] = all(
            t.tokens == local[0].tokens for t in [*local, *split, *one_node, *beside]
        )
        if reference is not None:
            row["greedy_vs_float32"] = agreement(local[0].tokens, reference)
        fmt = FORMATS[name]
        row["node_weights_mb"] = [format_bytes(checkpoint, p.layers, fmt) / 2**20 for p in plans]
        row["node_rss_mb"] = run["rss_mb"]
        row["node_startup_s"] = run["startup_s"]
        row["local_load_s"] = run["load_s"]
        row["per_rep"] = {
            "local_decode_tok_s": [(decode_tokens - 1) / t.decode_s for t in local],
            "split_decode_tok_s": [(decode_tokens - 1) / t.decode_s for t in split],
            "one_node_decode_tok_s": [(decode_tokens - 1) / t.decode_s for t in one_node],
            "unsplit_beside_split_decode_tok_s": [(decode_tokens - 1) / t.decode_s for t in beside],
        }
        formats[name] = row
    return formats


def step_time_parts(where: str, timings: list[Timing], decode_tokens: int) -> dict[str, Any]:
    """Where a decode step's time goes, in milliseconds a token (medians over repetitions):
    each node's compute (batched forwards, sampling included), and everything outside
    it (the hand-offs between threads and nodes, the API, the generation loop)."""
    steps = decode_tokens - 1
    if not timings or not timings[0].decode_compute_s:
        return {}
    per_node = [[t.decode_compute_s[i] * 1000 / steps for t in timings]
                for i in range(len(timings[0].decode_compute_s))]  # fmt: skip
    total = [sum(t.decode_compute_s) * 1000 / steps for t in timings]
    outside = [t.decode_s * 1000 / steps - c for t, c in zip(timings, total, strict=True)]
    return {
        f"{where}_compute_ms_per_token": [statistics.median(n) for n in per_node],
        f"{where}_compute_total_ms_per_token": statistics.median(total),
        f"{where}_outside_compute_ms_per_token": statistics.median(outside),
    }


def ratios_and_targets(formats: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    ratios: dict[str, float] = {}
    if "float32" in formats:
        base = formats["float32"]
        for name in ("bfloat16", "int8", "w8a8"):
            if name in formats:
                for what in ("decode", "prefill"):
                    for where in ("local", "split"):
                        key = f"{name}_{what}_vs_float32_{where}"
                        ratios[key] = (
                            formats[name][f"{where}_{what}_tok_s"] / base[f"{where}_{what}_tok_s"]
                        )
    targets: dict[str, Any] = {}
    for key, target in TARGETS.items():
        if key == "split_vs_one_node_decode_each_format":
            if not formats:
                continue
            measured = {n: f["split_vs_one_node_decode"] for n, f in formats.items()}
            targets[key] = {"target": target, "measured": measured,
                            "met": all(v >= target for v in measured.values())}  # fmt: skip
            continue
        local_key = key.replace("vs_float32", "vs_float32_local")
        if local_key in ratios:
            value = ratios[local_key]
            targets[key] = {"target": target, "measured": value, "met": value >= target}
    return ratios, targets


def print_table(formats: dict[str, Any], ratios: dict[str, float], targets: dict[str, Any]) -> None:
    print()
    header = (f"{'format':10} {'local prefill':>14} {'local decode':>13} {'split prefill':>14} "
              f"{'split decode':>13} {'1-node decode':>14} {'split/1-node':>13} "
              f"{'split/local':>12} {'weights MB/node':>16}")  # fmt: skip
    print(header)
    for name, row in formats.items():
        weights = "/".join(f"{w:.0f}" for w in row["node_weights_mb"])
        print(f"{name:10} {row['local_prefill_tok_s']:14.1f} {row['local_decode_tok_s']:13.2f} "
              f"{row['split_prefill_tok_s']:14.1f} {row['split_decode_tok_s']:13.2f} "
              f"{row['one_node_decode_tok_s']:14.2f} {row['split_vs_one_node_decode']:13.3f} "
              f"{row['split_vs_local_decode']:12.3f} {weights:>16}")  # fmt: skip
    print(f"\n{'decode ms/token':10} {'split: compute per node':>24} {'outside':>8} "
          f"{'one node: compute':>18} {'outside':>8}")  # fmt: skip
    for name, row in formats.items():
        if "split_compute_ms_per_token" not in row:
            continue
        nodes = " + ".join(f"{c:.1f}" for c in row["split_compute_ms_per_token"])
        print(f"{name:10} {nodes:>24} {row['split_outside_compute_ms_per_token']:8.1f} "
              f"{row['one_node_compute_total_ms_per_token']:18.1f} "
              f"{row['one_node_outside_compute_ms_per_token']:8.1f}")  # fmt: skip
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    for key, result in targets.items():
        print(f"target {key} >= {result['target']}: {'met' if result['met'] else 'NOT met'}")


def print_concurrency(section: dict[str, Any], fmt: str) -> None:
    print(f"\nconcurrent sessions ({fmt}, 2-node split):")
    print(f"{'sessions':>8} {'aggregate decode tok/s':>23} {'p50 TPOT ms':>12} "
          f"{'p95 TPOT ms':>12} {'rows per batch (nodes)':>24}")  # fmt: skip
    for count, row in section.items():
        rows = " / ".join(f"{r:.1f}" for r in row["mean_batch_rows_per_node"])
        print(f"{count:>8} {row['aggregate_decode_tok_s']:23.1f} {row['p50_tpot_ms']:12.1f} "
              f"{row['p95_tpot_ms']:12.1f} {rows:>24}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: TinyLlama-shaped random)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--split-reps", type=int, default=4,
        help="phase 2: turns of split / one node / in-process per format",
    )  # fmt: skip
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in every node (default: torch's choice, all cores); "
        "on an oversubscribed machine 1 avoids OpenMP barrier stalls",
    )
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent sessions; '' skips")
    parser.add_argument("--concurrency-format", default="bfloat16", choices=list(FORMATS))
    parser.add_argument("--concurrency-prompt-tokens", type=int, default=16)
    parser.add_argument(
        "--pipeline-groups", type=int, default=None,
        help="every node's setting (default: --nodes, as `teeshard up` sets it)",
    )  # fmt: skip
    parser.add_argument("--burst", type=int, default=64, help="requests sent at once at the end")
    parser.add_argument("--concurrency-decode", type=int, default=32)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.formats.split(",") if n]
    args.levels = [int(c) for c in args.levels.split(",") if c]
    args.pipeline_groups = args.pipeline_groups or args.nodes
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")

    model_dir = args.model or ensure_tinyllama_shaped()
    checkpoint = Checkpoint(model_dir)
    prompt = prompt_ids(checkpoint.spec.vocab_size, args.prompt_tokens)
    print(f"model {model_dir.name}: {checkpoint.spec.num_layers} layers; formats {names}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_description()}",
          flush=True)  # fmt: skip
    load_before = os.getloadavg()
    runs = measure_formats(args, model_dir, checkpoint, names, prompt) if names else {}
    formats = summarise(args, checkpoint, runs) if names else {}
    ratios, targets = ratios_and_targets(formats)
    concurrency: dict[str, Any] = {}
    burst: dict[str, Any] = {}
    if args.levels:
        short = prompt_ids(checkpoint.spec.vocab_size, args.concurrency_prompt_tokens)
        concurrency = measure_concurrency(model_dir, args, short)
        burst = concurrency.pop("burst")
        targets["burst_all_200"] = {
            "target": f"{args.burst} of {args.burst} answered 200",
            "measured": burst["statuses"],
            "met": burst["all_200"],
        }
        if "1" in concurrency and "8" in concurrency:
            scale = (
                concurrency["8"]["aggregate_decode_tok_s"]
                / concurrency["1"]["aggregate_decode_tok_s"]
            )
            ratios["aggregate_decode_8_vs_1"] = scale
            targets["aggregate_decode_8_sessions_vs_1"] = {
                "target": 5.0, "measured": scale, "met": scale >= 5.0,
            }  # fmt: skip
    result = {
        "model": model_dir.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nodes": args.nodes,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "reps": args.reps,
        "split_reps": args.split_reps,
        "statistic": "median over repetitions",
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # the machine is shared: 1/5/15-minute load averages before and after the run
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wire_dtype": "float32",
        "transport": "RA-TLS (wss, pinned attested certificate, simulated attestation), receipts",
        "formats": formats,
        "ratios": ratios,
        "targets": targets,
        "concurrency": concurrency,
        "burst": burst,
        "concurrency_setup": {
            "format": args.concurrency_format,
            "prompt_tokens": args.concurrency_prompt_tokens,
            "pipeline_groups": args.pipeline_groups,
            "decode_tokens": args.concurrency_decode,
            "method": "round of C 1-token requests (fixed part), then C decode requests; "
            "TPOT = (latency - median fixed) / (decode - 1)",
        },
    }
    if formats:
        print_table(formats, ratios, targets)
    if concurrency:
        print_concurrency(concurrency, args.concurrency_format)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
