"""Split inference over real node servers versus the unsplit Hugging Face model.

One run, side by side, on the same machine: the unsplit ``transformers`` model in
this process, and a 2-node split (two ``teeshard node`` processes on loopback,
driven through the entry node's pipeline socket). Prefill of 128 tokens, then
greedy decode of 64 tokens; repetitions alternate local and split runs so that
machine noise hits both alike. Prints a table and writes JSON.

    python benchmarks/split_vs_local.py                  # TinyLlama-shaped random model
    python benchmarks/split_vs_local.py --model DIR      # any local checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from teeshard.cli.up import LaunchSpec, plan_launch
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.native import cpu_info
from teeshard.model.plan import plan_checkpoint
from teeshard.model.random_checkpoint import (
    random_llama_weights,
    train_tokenizer,
    write_checkpoint,
    write_tokenizer,
)
from teeshard.model.transformer import Shard
from teeshard.node.metrics import series_total
from teeshard.paths import data_dir
from teeshard.procutil import die_with_parent, free_port_block, wait_healthy
from teeshard.server.local_pipeline import write_local_policy

ROOT = Path(__file__).resolve().parent.parent

# extra environment for the node processes (experiments: OMP_WAIT_POLICY=PASSIVE, ...)
NODE_ENV: dict[str, str] = dict(
    item.split("=", 1)
    for item in os.environ.get("TEESHARD_BENCH_NODE_ENV", "").split()
    if "=" in item
)

TINYLLAMA_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass
class Timing:
    prefill_s: float
    decode_s: float
    tokens: list[int]
    # per node of the route, its compute (batched forwards, from /metrics) in the decode
    # steps: the long request's less the 1-token one's; empty when not asked for
    decode_compute_s: tuple[float, ...] = ()


def ensure_tinyllama_shaped() -> Path:
    target = data_dir() / "bench" / "tinyllama-shaped-random-f32-v1"
    if (target / "config.json").is_file():
        return target
    print(f"writing a TinyLlama-shaped random float32 checkpoint to {target} (once)", flush=True)
    tmp = target.with_suffix(".partial")
    write_checkpoint(
        tmp, TINYLLAMA_SHAPE, random_llama_weights(TINYLLAMA_SHAPE, seed=1), shard_bytes=2 << 30
    )
    write_tokenizer(
        train_tokenizer(), tmp
    )  # the entry node needs one; its size does not matter here
    tmp.rename(target)
    return target


_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """The CPU's name and the instruction sets the number formats' kernels depend on:
    results from machines with different ones are not comparable."""
    name, flags = cpu_info()
    present = [f for f in _CPU_FLAGS if f in flags] or ["none of " + ", ".join(_CPU_FLAGS)]
    return f"{name} ({os.cpu_count()} cores; {' '.join(present)})"


def prompt_ids(vocab: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


# -- local: the unsplit Hugging Face model ---------------------------------------------


def load_local(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def run_local(model: Any, prompt: list[int], decode_tokens: int) -> Timing:
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt])
    started = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = int(out.logits[0, -1].argmax())
    prefill = time.perf_counter() - started
    tokens = [token]
    started = time.perf_counter()
    for _ in range(decode_tokens - 1):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    return Timing(prefill, time.perf_counter() - started, tokens)


@torch.no_grad()
def run_local_shard(shard: Shard, prompt: list[int], decode_tokens: int) -> Timing:
    """teeshard's own blocks, all layers in this process: the split minus the network."""
    cache = shard.new_cache(len(prompt) + decode_tokens)
    started = time.perf_counter()
    token = int(shard(shard.embed(torch.tensor([prompt])), cache).argmax())
    prefill = time.perf_counter() - started
    tokens = [token]
    started = time.perf_counter()
    for _ in range(decode_tokens - 1):
        token = int(shard(shard.embed(torch.tensor([[token]])), cache).argmax())
        tokens.append(token)
    return Timing(prefill, time.perf_counter() - started, tokens)


# -- split: real node processes on loopback --------------------------------------------


def start_nodes(
    model_dir: Path,
    nodes: int,
    wire_dtype: str,
    number_format: NumberFormat | None = None,
    extra_options: list[str] | None = None,
) -> tuple[list[subprocess.Popen[bytes]], list[LaunchSpec]]:
    """Start the chain as ``teeshard up`` would: simulated attestation, RA-TLS, receipts."""
    fmt = number_format or NumberFormat()
    checkpoint = Checkpoint(model_dir)
    launches = plan_launch(checkpoint, nodes, free_port_block(nodes))
    policy = write_local_policy(
        Path(tempfile.mkdtemp(prefix="teeshard-bench-")) / "policy.toml",
        checkpoint, [s.layers for s in launches], fmt.dtype, "bench", fmt.quantize,
    )  # fmt: skip
    options = ["--wire-dtype", wire_dtype, "--tee", "simulated", "--policy", str(policy),
               "--model-name", "bench", "--dtype", fmt.dtype]  # fmt: skip
    if fmt.quantize is not None:
        options += ["--quantize", fmt.quantize]
    options += extra_options or []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for spec in reversed(launches):  # one at a time: loads do not fight for memory
            argv = spec.argv(model_dir, "127.0.0.1", options)
            argv.insert(argv.index("node"), "--log-level=WARNING")
            env = {**os.environ, **NODE_ENV}
            processes.append(subprocess.Popen(argv, env=env, preexec_fn=die_with_parent))
            wait_healthy(spec.health_url("127.0.0.1"), processes[-1])
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return processes, launches


def node_rss_mb(launches: list[LaunchSpec]) -> list[float]:
    # a memory figure only: reading it needs no trust in the node (verify=False)
    health = [httpx.get(s.health_url("127.0.0.1"), verify=False).json() for s in launches]
    return [h["memory"]["rss_bytes"] / 2**20 for h in health]


def run_split(
    api_url: str,
    prompt: list[int],
    decode_tokens: int,
    nodes: int = 2,
    launches: list[LaunchSpec] | None = None,
) -> Timing:
    """Through the entry's API, unstreamed (a random model's tokens are mostly empty text, so
    a stream carries no event per token): a 1-token request times the prefill, and a
    ``decode_tokens`` request minus it times the other ``decode_tokens - 1`` steps; session
    open, close and receipts cost both requests alike and cancel. With the route's
    ``launches``, each node's compute in those decode steps is read from its /metrics."""
    body = {"model": "bench", "prompt": prompt, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=600) as client:

        def timed(tokens: list[int], max_tokens: int) -> tuple[float, dict[str, Any]]:
            started = time.perf_counter()
            response = client.post(
                api_url, json={**body, "prompt": tokens, "max_tokens": max_tokens}
            )
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            return elapsed, response.json()

        def compute_s() -> list[float]:  # each node's time in batched forwards so far
            step_s = "teeshard_step_seconds_total"
            return [node_metrics(s, step_s)[step_s] for s in launches or []]

        timed(prompt[:1], 1)  # warm up, as the local run does
        marks = [compute_s()]
        prefill, _ = timed(prompt, 1)
        marks.append(compute_s())
        total, answer = timed(prompt, decode_tokens)
        marks.append(compute_s())
    tokens = list(answer["teeshard"]["completion_token_ids"])
    # a receipt from every node of the route
    assert len(tokens) == decode_tokens and len(answer["receipts"]) >= nodes, answer.get("usage")
    compute = tuple((c - b) - (b - a) for a, b, c in zip(*marks, strict=True))
    return Timing(prefill, total - prefill, tokens, compute)


def node_metrics(spec: LaunchSpec, *names: str) -> dict[str, float]:
    """Counters from a node's /metrics, read once (loopback: no admin token needed; a
    figure only, so the node's certificate is not checked: verify=False)."""
    url = spec.health_url("127.0.0.1").replace("/health", "/metrics")
    text = httpx.get(url, verify=False).text
    return {name: series_total(text, name) for name in names}


# -- report ----------------------------------------------------------------------------


def rates(timings: list[Timing], prompt_len: int, decode_tokens: int) -> dict[str, float]:
    """Median rates over the repetitions."""
    prefill = statistics.median(t.prefill_s for t in timings)
    decode = statistics.median(t.decode_s for t in timings)
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_tok_s": prompt_len / prefill,
        "decode_tok_s": (decode_tokens - 1) / decode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: TinyLlama-shaped random)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--wire-dtype", default="float32", choices=("float32", "float16", "bfloat16")
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "split_vs_local.json"
    )
    args = parser.parse_args()

    model_dir = args.model or ensure_tinyllama_shaped()
    checkpoint = Checkpoint(model_dir)
    prompt = prompt_ids(checkpoint.spec.vocab_size, args.prompt_tokens)
    shares_mb = [p.param_bytes / 2**20 for p in plan_checkpoint(checkpoint, args.nodes)]
    print(
        f"model {model_dir.name}: {checkpoint.spec.num_layers} layers; {args.nodes} nodes; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores",
        flush=True,
    )
    processes, launches = start_nodes(model_dir, args.nodes, args.wire_dtype)
    try:
        rss_after_load = node_rss_mb(launches)
        local_model = load_local(model_dir)
        own_model = load_shard(checkpoint, LayerRange(0, checkpoint.spec.num_layers))
        local, own, split = [], [], []
        api_url = f"http://127.0.0.1:{launches[0].port}/v1/completions"
        for rep in range(args.reps):
            local.append(run_local(local_model, prompt, args.decode_tokens))
            own.append(run_local_shard(own_model, prompt, args.decode_tokens))
            split.append(run_split(api_url, prompt, args.decode_tokens))
            print(
                f"rep {rep + 1}/{args.reps}: local prefill {local[-1].prefill_s:.2f}s decode "
                f"{local[-1].decode_s:.2f}s | split prefill {split[-1].prefill_s:.2f}s decode "
                f"{split[-1].decode_s:.2f}s",
                flush=True,
            )
        rss_after_run = node_rss_mb(launches)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()

    result = report(args, model_dir, local, own, split, shares_mb, rss_after_load, rss_after_run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


def report(
    args: argparse.Namespace,
    model_dir: Path,
    local: list[Timing],
    own: list[Timing],
    split: list[Timing],
    shares_mb: list[float],
    rss_after_load: list[float],
    rss_after_run: list[float],
) -> dict[str, Any]:
    rows = {
        "local": rates(local, args.prompt_tokens, args.decode_tokens),
        "local_teeshard": rates(own, args.prompt_tokens, args.decode_tokens),
        "split": rates(split, args.prompt_tokens, args.decode_tokens),
    }
    limits = [1.25 * s + 500 for s in shares_mb]
    result: dict[str, Any] = {
        "model": model_dir.name,
        "nodes": args.nodes,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "reps": args.reps,
        "wire_dtype": args.wire_dtype,
        "transport": "RA-TLS both ways (wss, pinned attested certificates, simulated attestation)",
        # every split request ends with every stage's signed receipt; the close is in both
        # timed requests (1 token and decode_tokens) and so cancels out of the decode rate
        "receipts": "signed on every split request",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        **rows,
        "prefill_ratio": rows["split"]["prefill_tok_s"] / rows["local"]["prefill_tok_s"],
        "decode_ratio": rows["split"]["decode_tok_s"] / rows["local"]["decode_tok_s"],
        "node_share_mb": shares_mb,
        "node_rss_mb": rss_after_load,
        "node_rss_after_run_mb": rss_after_run,
        "node_rss_limit_mb": limits,
        "memory_within_limit": all(r <= lim for r, lim in zip(rss_after_run, limits, strict=True)),
        "greedy_tokens_identical": all(s.tokens == local[0].tokens for s in [*split, *own]),
        # the cost of splitting alone: the split against teeshard's own blocks unsplit
        "split_vs_own_decode_ratio": rows["split"]["decode_tok_s"]
        / rows["local_teeshard"]["decode_tok_s"],
    }
    print()
    print(f"{'':26} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode ratio':>13}")
    labels = {"local": "local (HF, unsplit)", "local_teeshard": "local (teeshard, unsplit)",
              "split": "split, RA-TLS + receipts"}  # fmt: skip
    for name, label in labels.items():
        row = rows[name]
        ratio = row["decode_tok_s"] / rows["local"]["decode_tok_s"]
        print(f"{label:26} {row['prefill_tok_s']:14.1f} {row['decode_tok_s']:13.2f} {ratio:13.3f}")
    print(f"prefill ratio {result['prefill_ratio']:.3f}, decode ratio {result['decode_ratio']:.3f}")
    for index, (rss, after, limit) in enumerate(
        zip(rss_after_load, rss_after_run, limits, strict=True)
    ):
        print(f"node {index}: rss {rss:.0f} MB after load, {after:.0f} MB after the run "
              f"(limit {limit:.0f} MB = 1.25 x {shares_mb[index]:.0f} + 500)")  # fmt: skip
    print(f"greedy tokens identical: {result['greedy_tokens_identical']}")
    return result


if __name__ == "__main__":
    sys.exit(main())
