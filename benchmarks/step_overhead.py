"""What a decode step costs besides its linears: norms, rotary, attention, casts, dispatch.

Decode reads every weight once per token, so the linears' time is set by memory
bandwidth; everything else in a step (a few dozen small ops per layer, each paying
torch's dispatch) is CPU time that batching does not share out and faster number
formats do not shrink. This benchmark measures that part directly: each format's
unsplit TinyLlama-shaped shard decodes one token against a cache of ``--context``
positions, once as loaded and once with every linear (the LM head included)
swapped for a free one that only allocates its output. The difference is the
linears' time; the free step is the rest. It also counts the torch operators one
step dispatches (a machine-independent figure). Real and free steps alternate.
``--sessions N`` decodes N sessions in one batch (the free part then holds their
attention); ``--attention both`` measures each format with the native decode
attention and with torch's operators in turn.

    python benchmarks/step_overhead.py --threads 1
    python benchmarks/step_overhead.py --formats float32 --reps 30
    python benchmarks/step_overhead.py --formats w8a8 --sessions 8 --attention both

Prints a table; writes ``benchmarks/results/step_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_vs_local import cpu_description, ensure_tinyllama_shaped
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import FORMATS
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.transformer import KVCache, Shard

ROOT = Path(__file__).resolve().parent.parent


class FreeLinear(nn.Module):
    """Stands in for a linear: the right output shape and dtype, no product."""

    def __init__(self, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features = out_features
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*x.shape[:-1], self.out_features), dtype=self.dtype)


def linear_modules(shard: Shard) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every module of ``shard`` that owns a product."""
    found = []
    for parent in shard.modules():
        for name, child in parent.named_children():
            if hasattr(child, "out_features") and not isinstance(child, FreeLinear):
                found.append((parent, name, child))
    return found


def output_dtype(module: nn.Module) -> torch.dtype:
    with torch.no_grad():
        width = getattr(module, "in_features", None)
        assert isinstance(width, int)
        out: torch.Tensor = module(torch.zeros(1, 1, width))
        return out.dtype


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def decode_step(shard: Shard, caches: list[KVCache], context: int) -> None:
    """One batched decode step of every session (each cache one session)."""
    for cache in caches:  # every step sees the same context and rewrites the same slot
        cache.length = context
    token = shard.embed(torch.tensor([[7]]))
    shard.forward_batch([token] * len(caches), caches)


@torch.no_grad()
def measure(shard: Shard, args: argparse.Namespace) -> dict[str, Any]:
    cache = shard.new_cache(args.context + 1)
    shard(shard.embed(torch.arange(args.context)[None] % shard.spec.vocab_size), cache)
    caches = [cache] + [
        KVCache(cache.keys.clone(), cache.values.clone(), cache.length)
        for _ in range(args.sessions - 1)
    ]
    real = linear_modules(shard)
    free = [(p, n, FreeLinear(int(m.out_features), output_dtype(m))) for p, n, m in real]
    counter = OpCounter()
    with counter:
        decode_step(shard, caches, args.context)
    ops = sum(counter.counts.values())
    times: dict[str, list[float]] = {"step": [], "free": []}
    for rep in range(args.reps + 2):  # two warm-up rounds
        for kind, modules in (("step", real), ("free", free)):
            for parent, name, module in modules:
                setattr(parent, name, module)
            started = time.perf_counter()
            decode_step(shard, caches, args.context)
            if rep >= 2:
                times[kind].append(time.perf_counter() - started)
    for parent, name, module in real:
        setattr(parent, name, module)
    step = statistics.median(times["step"]) * 1000
    rest = statistics.median(times["free"]) * 1000
    return {
        "step_ms": step,
        "non_linear_ms": rest,
        "linear_ms": step - rest,
        "non_linear_share": rest / step,
        "ops_per_step": ops,
        "ops_per_layer": ops / len(shard.layers),
        "linears_per_step": len(real),
        "top_ops": dict(counter.counts.most_common(12)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: TinyLlama-shaped random)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    parser.add_argument("--context", type=int, default=128, help="cached positions per step")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=1, help="sessions decoding in one batch")
    parser.add_argument(
        "--attention",
        choices=("native", "torch", "both"),
        default="native",
        help="decode attention: the native kernel, torch's operators, or each in turn",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_overhead.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.formats.split(",") if n]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    model_dir = args.model or ensure_tinyllama_shaped()
    checkpoint = Checkpoint(model_dir)
    layers = LayerRange(0, checkpoint.spec.num_layers)
    results: dict[str, Any] = {}
    attentions = ("native", "torch") if args.attention == "both" else (args.attention,)
    for name in names:
        fmt = FORMATS[name]
        shard = load_shard(checkpoint, layers, fmt.torch_dtype, quantize=fmt.quantize)
        for attention in attentions:
            shard.native_attention = attention == "native"
            label = name if len(attentions) == 1 else f"{name}/{attention}"
            results[label] = measure(shard, args)
        del shard
    print(f"\nmodel {model_dir.name}, decode step of {args.sessions} session(s) at context "
          f"{args.context}, {args.threads} thread(s), median of {args.reps}, "
          f"{args.attention} decode attention; {cpu_description()}")  # fmt: skip
    print(f"{'format':16} {'step ms':>9} {'linears ms':>11} {'rest ms':>9} {'rest share':>11} "
          f"{'ops/step':>9} {'ops/layer':>10}")  # fmt: skip
    for name, row in results.items():
        print(f"{name:16} {row['step_ms']:9.1f} {row['linear_ms']:11.1f} "
              f"{row['non_linear_ms']:9.1f} {row['non_linear_share']:11.1%} "
              f"{row['ops_per_step']:9} {row['ops_per_layer']:10.1f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": model_dir.name,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "cpu": cpu_description(),
                "threads": args.threads,
                "context": args.context,
                "sessions": args.sessions,
                "attention": args.attention,
                "statistic": f"median of {args.reps}, real and free steps alternating",
                "formats": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
