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
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.demo import (
    data_dir,
    random_llama_weights,
    train_tokenizer,
    write_checkpoint,
    write_tokenizer,
)
from teeshard.model.plan import plan_checkpoint
from teeshard.procutil import die_with_parent
from teeshard.transport.pipeline_client import PipelineClient

ROOT = Path(__file__).resolve().parent.parent

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


# -- split: real node processes on loopback --------------------------------------------


def start_nodes(
    model_dir: Path, nodes: int, wire_dtype: str
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    plans = plan_checkpoint(Checkpoint(model_dir), nodes)
    ports = [free_port() for _ in plans]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        _start_chain(model_dir, plans, ports, wire_dtype, processes)
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return processes, ports


def _start_chain(
    model_dir: Path,
    plans: list[Any],
    ports: list[int],
    wire_dtype: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    nodes = len(plans)
    for index in reversed(range(nodes)):
        argv = [sys.executable, "-m", "teeshard.cli", "--log-level", "WARNING", "node",
                "--model", str(model_dir), "--layers", str(plans[index].layers),
                "--port", str(ports[index]), "--wire-dtype", wire_dtype]  # fmt: skip
        if index + 1 < nodes:
            argv += ["--next", f"ws://127.0.0.1:{ports[index + 1]}"]
        if index == 0:
            argv.append("--entry")
        processes.append(subprocess.Popen(argv, preexec_fn=die_with_parent))
        _wait_healthy(ports[index], processes[-1])  # one at a time: loads do not fight for memory


def _wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"node on port {port} exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def node_rss_mb(ports: list[int]) -> list[float]:
    return [
        httpx.get(f"http://127.0.0.1:{p}/health").json()["memory"]["rss_bytes"] / 2**20
        for p in ports
    ]


async def run_split(ws_url: str, prompt: list[int], decode_tokens: int) -> Timing:
    client = PipelineClient(ws_url)
    session = await client.open(max_len=len(prompt) + decode_tokens, return_logits=False)
    await client.step(session, [prompt[0]])  # connect and warm the path outside the timing
    await client.close(session)
    session = await client.open(max_len=len(prompt) + decode_tokens, return_logits=False)
    started = time.perf_counter()
    token, _ = await client.step(session, prompt)
    prefill = time.perf_counter() - started
    tokens = [token]
    started = time.perf_counter()
    for _ in range(decode_tokens - 1):
        token, _ = await client.step(session, [token])
        tokens.append(token)
    decode = time.perf_counter() - started
    await client.close(session)
    await client.aclose()
    return Timing(prefill, decode, tokens)


# -- report ----------------------------------------------------------------------------


def rates(timings: list[Timing], prompt_len: int, decode_tokens: int) -> dict[str, float]:
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
    parser.add_argument(
        "--model", type=Path, help="checkpoint directory (default: TinyLlama-shaped random)"
    )
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

    print(f"model {model_dir.name}: {checkpoint.spec.num_layers} layers; {args.nodes} nodes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)  # fmt: skip
    processes, ports = start_nodes(model_dir, args.nodes, args.wire_dtype)
    try:
        rss_after_load = node_rss_mb(ports)
        local_model = load_local(model_dir)
        local, split = [], []
        ws_url = f"ws://127.0.0.1:{ports[0]}/pipeline"
        for rep in range(args.reps):
            local.append(run_local(local_model, prompt, args.decode_tokens))
            split.append(asyncio.run(run_split(ws_url, prompt, args.decode_tokens)))
            print(f"rep {rep + 1}/{args.reps}: local prefill {local[-1].prefill_s:.2f}s decode "
                  f"{local[-1].decode_s:.2f}s | split prefill {split[-1].prefill_s:.2f}s decode "
                  f"{split[-1].decode_s:.2f}s", flush=True)  # fmt: skip
        rss_after_run = node_rss_mb(ports)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()

    same_tokens = all(s.tokens == local[0].tokens for s in split)
    result: dict[str, Any] = {
        "model": model_dir.name,
        "nodes": args.nodes,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "reps": args.reps,
        "wire_dtype": args.wire_dtype,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "local": rates(local, args.prompt_tokens, args.decode_tokens),
        "split": rates(split, args.prompt_tokens, args.decode_tokens),
        "node_share_mb": shares_mb,
        "node_rss_mb": rss_after_load,
        "node_rss_after_run_mb": rss_after_run,
        "node_rss_limit_mb": [1.25 * s + 500 for s in shares_mb],
        "greedy_tokens_identical": same_tokens,
    }
    result["prefill_ratio"] = result["split"]["prefill_tok_s"] / result["local"]["prefill_tok_s"]
    result["decode_ratio"] = result["split"]["decode_tok_s"] / result["local"]["decode_tok_s"]
    result["memory_within_limit"] = all(
        r <= lim for r, lim in zip(rss_after_load, result["node_rss_limit_mb"], strict=True)
    )

    print()
    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name in ("local", "split"):
        print(
            f"{name:10} {result[name]['prefill_tok_s']:14.1f} {result[name]['decode_tok_s']:13.2f}"
        )
    print(f"{'ratio':10} {result['prefill_ratio']:14.3f} {result['decode_ratio']:13.3f}")
    for index, (rss, limit) in enumerate(
        zip(rss_after_load, result["node_rss_limit_mb"], strict=True)
    ):
        print(
            f"node {index}: rss {rss:.0f} MB after load (limit {limit:.0f} MB = 1.25 x {shares_mb[index]:.0f} + 500)"
        )
    print(f"greedy tokens identical: {same_tokens}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
