"""Throughput of teeshard's number formats, unsplit and split over real node servers.

For each format (float32, bfloat16, int8 weight-only) on the TinyLlama-shaped
random model: prefill of 128 tokens and greedy decode of 64, with teeshard's
blocks unsplit in this process ("local") and over a 2-node split of
``teeshard node`` processes on loopback (RA-TLS, simulated attestation against a
policy naming the format's manifests, receipts), driven through the entry's API
with a token-id prompt and ``ignore_eos`` ("split"). Formats are interleaved
within each repetition (memory bandwidth here swings minute to minute), local
and split adjacent in time; only one format's weights are in memory at a time.
Medians over repetitions. Prints a table; writes ``benchmarks/results/throughput.json``.

    python benchmarks/throughput.py                      # 2 reps, prefill 128, decode 64
    python benchmarks/throughput.py --reps 1 --formats bfloat16,int8

The ``concurrency`` section of issue 13 (batching across sessions) is not measured
here yet: the JSON says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_vs_local import (
    Timing,
    ensure_tinyllama_shaped,
    node_rss_mb,
    prompt_ids,
    run_local_shard,
    run_split,
    start_nodes,
)
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import FORMATS, NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.plan import format_bytes, plan_checkpoint
from teeshard.model.transformer import Shard

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {  # issue 13, ratios within one run
    "bfloat16_decode_vs_float32": 2.0,
    "bfloat16_prefill_vs_float32": 3.0,
    "int8_decode_vs_float32": 3.5,
    "split_vs_local_decode_each_format": 0.95,
}


@torch.no_grad()
def run_local(shard: Shard, prompt: list[int], decode_tokens: int) -> Timing:
    """Unsplit teeshard blocks in this process, warmed up as the split is (one 1-token step)."""
    shard(shard.embed(torch.tensor([prompt[:1]])), shard.new_cache(2))
    return run_local_shard(shard, prompt, decode_tokens)


def measure_split(
    model_dir: Path,
    nodes: int,
    fmt: NumberFormat,
    prompt: list[int],
    decode_tokens: int,
    threads: int | None,
) -> tuple[Timing, list[float], float]:
    started = time.perf_counter()
    options = ["--threads", str(threads)] if threads else []
    processes, launches = start_nodes(model_dir, nodes, "float32", fmt, options)
    startup = time.perf_counter() - started
    try:
        timing = run_split(f"http://127.0.0.1:{launches[0].port}/v1/completions", prompt,
                           decode_tokens)  # fmt: skip
        rss = node_rss_mb(launches)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
    return timing, rss, startup


def measure_local(
    checkpoint: Checkpoint, fmt: NumberFormat, prompt: list[int], decode_tokens: int
) -> tuple[Timing, float]:
    started = time.perf_counter()
    shard = load_shard(
        checkpoint, LayerRange(0, checkpoint.spec.num_layers), fmt.torch_dtype,
        quantize=fmt.quantize,
    )  # fmt: skip
    load_s = time.perf_counter() - started
    try:
        return run_local(shard, prompt, decode_tokens), load_s
    finally:
        del shard
        gc.collect()


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
    runs: dict[str, dict[str, list[Any]]],
) -> dict[str, Any]:
    prompt_len, decode_tokens = args.prompt_tokens, args.decode_tokens
    plans = plan_checkpoint(checkpoint, args.nodes)
    formats: dict[str, Any] = {}
    reference = runs["float32"]["local"][0].tokens if "float32" in runs else None
    for name, run in runs.items():
        local, split = run["local"], run["split"]
        row: dict[str, Any] = {}
        for where, timings in (("local", local), ("split", split)):
            row[f"{where}_prefill_tok_s"] = prompt_len / statistics.median(
                t.prefill_s for t in timings
            )
            row[f"{where}_decode_tok_s"] = (decode_tokens - 1) / statistics.median(
                t.decode_s for t in timings
            )
        row["split_vs_local_prefill"] = row["split_prefill_tok_s"] / row["local_prefill_tok_s"]
        row["split_vs_local_decode"] = row["split_decode_tok_s"] / row["local_decode_tok_s"]
        row["greedy_split_equals_local"] = all(
            t.tokens == local[0].tokens for t in [*local, *split]
        )
        if reference is not None:
            row["greedy_vs_float32"] = agreement(local[0].tokens, reference)
        fmt = FORMATS[name]
        row["node_weights_mb"] = [format_bytes(checkpoint, p.layers, fmt) / 2**20 for p in plans]
        row["node_rss_mb"] = [max(r[i] for r in run["rss"]) for i in range(args.nodes)]
        row["node_startup_s"] = statistics.median(run["startup"])
        row["local_load_s"] = statistics.median(run["load"])
        row["per_rep"] = [
            {"local_decode_tok_s": (decode_tokens - 1) / lo.decode_s,
             "split_decode_tok_s": (decode_tokens - 1) / sp.decode_s}
            for lo, sp in zip(local, split, strict=True)
        ]  # fmt: skip
        formats[name] = row
    return formats


def ratios_and_targets(formats: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    ratios: dict[str, float] = {}
    if "float32" in formats:
        base = formats["float32"]
        for name in ("bfloat16", "int8"):
            if name in formats:
                for what in ("decode", "prefill"):
                    for where in ("local", "split"):
                        key = f"{name}_{what}_vs_float32_{where}"
                        ratios[key] = (
                            formats[name][f"{where}_{what}_tok_s"] / base[f"{where}_{what}_tok_s"]
                        )
    targets: dict[str, Any] = {}
    for key, target in TARGETS.items():
        if key == "split_vs_local_decode_each_format":
            measured = {n: f["split_vs_local_decode"] for n, f in formats.items()}
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
              f"{'split decode':>13} {'split/local dec':>16} {'weights MB/node':>16}")  # fmt: skip
    print(header)
    for name, row in formats.items():
        weights = "/".join(f"{w:.0f}" for w in row["node_weights_mb"])
        print(f"{name:10} {row['local_prefill_tok_s']:14.1f} {row['local_decode_tok_s']:13.2f} "
              f"{row['split_prefill_tok_s']:14.1f} {row['split_decode_tok_s']:13.2f} "
              f"{row['split_vs_local_decode']:16.3f} {weights:>16}")  # fmt: skip
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    for key, result in targets.items():
        print(f"target {key} >= {result['target']}: {'met' if result['met'] else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: TinyLlama-shaped random)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in every node (default: torch's choice, all cores); "
        "on an oversubscribed machine 1 avoids OpenMP barrier stalls",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.formats.split(",")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")

    model_dir = args.model or ensure_tinyllama_shaped()
    checkpoint = Checkpoint(model_dir)
    prompt = prompt_ids(checkpoint.spec.vocab_size, args.prompt_tokens)
    print(f"model {model_dir.name}: {checkpoint.spec.num_layers} layers; formats {names}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores",
          flush=True)  # fmt: skip
    runs: dict[str, dict[str, list[Any]]] = {
        n: {"local": [], "split": [], "rss": [], "startup": [], "load": []} for n in names
    }
    load_before = os.getloadavg()
    started = time.perf_counter()
    for rep in range(args.reps):
        for name in names:
            fmt, run = FORMATS[name], runs[name]
            # alternate which goes first, so a drift in bandwidth hits both alike
            order = ("split", "local") if (rep + names.index(name)) % 2 == 0 else ("local", "split")
            for where in order:
                if where == "split":
                    timing, rss, startup = measure_split(
                        model_dir, args.nodes, fmt, prompt, args.decode_tokens, args.threads
                    )
                    run["split"].append(timing)
                    run["rss"].append(rss)
                    run["startup"].append(startup)
                else:
                    timing, load_s = measure_local(checkpoint, fmt, prompt, args.decode_tokens)
                    run["local"].append(timing)
                    run["load"].append(load_s)
            lo, sp = run["local"][-1], run["split"][-1]
            print(f"rep {rep + 1}/{args.reps} {name:9}: local prefill {lo.prefill_s:.2f}s decode "
                  f"{lo.decode_s:.2f}s | split prefill {sp.prefill_s:.2f}s decode {sp.decode_s:.2f}s "
                  f"({time.perf_counter() - started:.0f}s elapsed)", flush=True)  # fmt: skip

    formats = summarise(args, checkpoint, runs)
    ratios, targets = ratios_and_targets(formats)
    result = {
        "model": model_dir.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nodes": args.nodes,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "reps": args.reps,
        "statistic": "median over repetitions",
        "torch": torch.__version__,
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
        "concurrency": {
            "measured": False,
            "note": "not measured: batching, queueing and pipelining (issue 13 items 1-3) are "
            "not built yet; this run measures one session at a time",
        },
    }
    print_table(formats, ratios, targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
