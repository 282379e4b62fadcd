"""TSQP offload versus TEE-only, on the TinyLlama-shaped model: prefill 128, decode 64.

One run, one host. The "TEE" is this process (CPU); the accelerator is a real
separate ``teeshard accel`` process reached over CURVE-encrypted ZeroMQ on
loopback, on the CPU here (``--device cuda`` where a GPU is present). For each
mode: prefill and decode rates of the online path, bytes moved per token, the
logits' maximum error against TEE-only, and for blinded modes the TEE's pad
precomputation, measured apart (the pool is filled before the timed run, the
worker is off during it) and also counted into a "with precomputation" rate.

    python benchmarks/offload.py                          # CPU accelerator, every mode
    python benchmarks/offload.py --device cuda            # GPU accelerator
    python benchmarks/offload.py --modes tee,blinded+verified --decode-tokens 16

Writes benchmarks/results/offload.json (rows keyed "MODE@DEVICE") and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.transformer import Shard
from teeshard.offload.apply import OffloadOptions, offload_shard, tee_weight_bytes
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.launch import accel_command, start_accelerator
from teeshard.offload.modes import OffloadMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_vs_local import ensure_tinyllama_shaped, prompt_ids

ROOT = Path(__file__).resolve().parent.parent
MODES = ("tee", "plain", "blinded", "verified", "blinded+verified")


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    tokens: list[int]
    logits: torch.Tensor  # (decode_tokens, vocab): every step's logits
    prefill_bytes: int = 0
    decode_bytes: int = 0


@torch.no_grad()
def generate(shard: Shard, prompt: list[int], decode_tokens: int, traffic: Any = None) -> Run:
    cache = shard.new_cache(len(prompt) + decode_tokens + 1)

    def moved() -> int:
        return 0 if traffic is None else traffic.bytes_sent + traffic.bytes_received

    start_bytes = moved()
    started = time.perf_counter()
    logits = shard(shard.embed(torch.tensor([prompt])), cache)
    prefill = time.perf_counter() - started
    prefill_bytes = moved() - start_bytes
    seen, tokens = [logits[0]], [int(logits[0].argmax())]
    started = time.perf_counter()
    for _ in range(decode_tokens - 1):
        logits = shard(shard.embed(torch.tensor([[tokens[-1]]])), cache)
        seen.append(logits[0])
        tokens.append(int(logits[0].argmax()))
    decode = time.perf_counter() - started
    return Run(
        prefill,
        decode,
        tokens,
        torch.stack(seen),
        prefill_bytes,
        moved() - start_bytes - prefill_bytes,
    )


def run_mode(
    mode_name: str,
    model_dir: Path,
    prompt: list[int],
    args: argparse.Namespace,
    reference: Run | None,
) -> tuple[dict[str, Any], Run]:
    checkpoint = Checkpoint(model_dir)
    layers = LayerRange(0, checkpoint.spec.num_layers)
    shard = load_shard(checkpoint, layers)
    row: dict[str, Any] = {
        "mode": mode_name,
        "device": "cpu (TEE-only)" if mode_name == "tee" else args.device,
    }
    if mode_name == "tee":
        run = generate(shard, prompt, args.decode_tokens)
        row["tee_weight_mb"] = tee_weight_bytes(shard) / 2**20
        return finish(row, run, prompt, args, reference, None), run
    mode = OffloadMode.parse(mode_name)
    accel = start_accelerator(
        accel_command(
            model_dir, layers, mode.arith, device=args.device, threads=args.accel_threads
        ),
        timeout=1800,
    )
    try:
        client = AcceleratorClient(accel.endpoint, accel.public_key, timeout_s=1800)
        client.connect(timeout_s=60)
        tokens_needed = len(prompt) + args.decode_tokens
        # the LM head sees one row per forward; every other group every position
        rows = {g: tokens_needed for g in handle_groups(shard)}
        rows["lm_head"] = args.decode_tokens
        options = OffloadOptions(pool_rows=rows, chunk_rows=64, background=False)
        handle = offload_shard(shard, mode, client, options=options)
        gc.collect()
        row["tee_weight_mb"] = tee_weight_bytes(shard) / 2**20
        precompute_s = 0.0
        if handle.pool is not None:
            precompute_s = handle.pool.fill()  # idle-time precomputation, outside the timing
            row["pad_pool_mb"] = pad_pool_mb(handle.pool, tokens_needed)
        run = generate(shard, prompt, args.decode_tokens, client.traffic)
        stats = handle.pad_stats
        if stats is not None:
            row["precompute_s"] = precompute_s
            row["precompute_s_per_token"] = precompute_s / tokens_needed
            row["pad_rows_on_demand"] = stats.rows_on_demand
        handle.close()
    finally:
        accel.stop()
    return finish(row, run, prompt, args, reference, row.get("precompute_s_per_token")), run


def handle_groups(shard: Shard) -> list[str]:
    from teeshard.offload.groups import shard_groups

    return [g.name for g in shard_groups(shard)]


def pad_pool_mb(pool: Any, rows: int) -> float:
    del rows
    return (
        sum(
            (w.in_features + w.out_features) * 8 * pool.capacity(name)
            for name, w in pool.weights.items()
        )
        / 2**20
    )


def finish(
    row: dict[str, Any],
    run: Run,
    prompt: list[int],
    args: argparse.Namespace,
    reference: Run | None,
    precompute_per_token: float | None,
) -> dict[str, Any]:
    n_prefill, n_decode = len(prompt), args.decode_tokens - 1
    row.update(
        prefill_s=run.prefill_s,
        decode_s=run.decode_s,
        prefill_tok_s=n_prefill / run.prefill_s,
        decode_tok_s=n_decode / run.decode_s,
        decode_ms_per_token=1000 * run.decode_s / n_decode,
        bytes_per_token_prefill=run.prefill_bytes / n_prefill,
        bytes_per_token_decode=run.decode_bytes / n_decode,
    )
    if precompute_per_token is not None:
        row["prefill_tok_s_with_precompute"] = n_prefill / (
            run.prefill_s + precompute_per_token * n_prefill
        )
        row["decode_tok_s_with_precompute"] = n_decode / (
            run.decode_s + precompute_per_token * n_decode
        )
    if reference is not None:
        row["greedy_tokens_identical"] = run.tokens == reference.tokens
        row["logits_max_abs_error"] = float((run.logits - reference.logits).abs().max())
    print(json.dumps({k: v for k, v in row.items()}), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: TinyLlama-shaped random)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cpu", help="accelerator device: cpu, cuda, ...")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--accel-threads", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "offload.json"
    )
    args = parser.parse_args()

    model_dir = args.model or ensure_tinyllama_shaped()
    checkpoint = Checkpoint(model_dir)
    prompt = prompt_ids(checkpoint.spec.vocab_size, args.prompt_tokens)
    print(
        f"model {model_dir.name}: {checkpoint.spec.num_layers} layers; accelerator on {args.device}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores",
        flush=True,
    )
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows: dict[str, Any] = dict(previous.get("rows", {}))
    reference: Run | None = None
    for mode_name in args.modes.split(","):
        row, run = run_mode(mode_name, model_dir, prompt, args, reference)
        if mode_name == "tee":
            reference = run
            rows["tee@cpu"] = row
        else:
            rows[f"{mode_name}@{args.device}"] = row
        gc.collect()
    if not any(k.endswith("@cuda") or "cuda:" in k for k in rows):
        for mode_name in MODES[1:]:
            rows[f"{mode_name}@cuda"] = {
                "mode": mode_name,
                "device": "cuda",
                "status": "pending: no GPU on this host",
            }
    result = {
        "model": model_dir.name,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "transport": "ZeroMQ + msgpack, CURVE-encrypted to a pinned key, loopback",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "field": "GF(2^61-1), 3 x 21-bit limbs in float64, 20-bit weights",
        "rows": rows,
    }
    tee = rows.get("tee@cpu")
    for name, row in rows.items():
        if tee and "prefill_s" in row and name != "tee@cpu":
            row["prefill_speedup_vs_tee"] = tee["prefill_s"] / row["prefill_s"]
            row["decode_latency_speedup_vs_tee"] = (
                tee["decode_ms_per_token"] / row["decode_ms_per_token"]
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


def print_table(rows: dict[str, Any]) -> None:
    print()
    print(f"{'mode@device':26} {'prefill tok/s':>13} {'decode tok/s':>12} {'+precompute p/d':>17} "
          f"{'KB/token p/d':>15} {'logit err':>10} {'same':>5}")  # fmt: skip
    for name, row in rows.items():
        if "prefill_tok_s" not in row:
            print(f"{name:26} {row.get('status', '')}")
            continue
        pre = (
            f"{row['prefill_tok_s_with_precompute']:.2f}/{row['decode_tok_s_with_precompute']:.2f}"
            if "prefill_tok_s_with_precompute" in row else "-"
        )  # fmt: skip
        kb = f"{row['bytes_per_token_prefill'] / 1024:.0f}/{row['bytes_per_token_decode'] / 1024:.0f}"
        err = f"{row['logits_max_abs_error']:.1e}" if "logits_max_abs_error" in row else "-"
        same = str(row.get("greedy_tokens_identical", "-"))
        print(f"{name:26} {row['prefill_tok_s']:13.2f} {row['decode_tok_s']:12.2f} {pre:>17} "
              f"{kb:>15} {err:>10} {same:>5}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
