"""What the last node's sampling tail costs per token, by the controls a request uses.

The tail (``teeshard.node.compute.finish_last``: ``model.sampling.sample`` plus the
logprobs when asked) runs once per generated token on the last node, after the LM
head. This times it on float32 logits of real vocabulary sizes, plain and with
penalties over a history, logit bias, and top logprobs, so its share of a step can
be set beside the step's forward time.

    python benchmarks/sampling_tail.py [--repeats N] [--history N]

Prints a table and writes benchmarks/results/sampling_tail.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from teeshard.model.sampling import SamplingParams, TokenHistory, sample, token_logprobs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sampling_tail.json"
VOCABS = (32_000, 151_936)  # Llama 2 / TinyLlama, Qwen2

CASES: dict[str, SamplingParams] = {
    "greedy": SamplingParams(),
    "sampled (T=0.8, top_p=0.95)": SamplingParams(temperature=0.8, top_p=0.95, seed=1),
    "+ penalties": SamplingParams(
        temperature=0.8,
        top_p=0.95,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.2,
    ),
    "+ logit_bias (100 ids)": SamplingParams(
        temperature=0.8, top_p=0.95, seed=1, logit_bias=tuple((i * 7, -5.0) for i in range(100))
    ),
    "+ top_logprobs=5": SamplingParams(temperature=0.8, top_p=0.95, seed=1, logprobs=5),
}


def time_case(
    params: SamplingParams, vocab: int, history_len: int, repeats: int
) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=generator) * 3  # (vocab,)
    prompt = torch.randint(0, vocab, (history_len,), generator=generator).tolist()
    history = TokenHistory(prompt, prompt[: history_len // 2])
    times = []
    for position in range(repeats):
        started = time.perf_counter()
        token = sample(logits, params, 1, position, history)
        if params.logprobs is not None:
            token_logprobs(logits, token, params.logprobs)
        times.append(time.perf_counter() - started)
    times.sort()
    return {"median_ms": times[len(times) // 2] * 1e3, "p90_ms": times[int(len(times) * 0.9)] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--history", type=int, default=512, help="prompt + output tokens seen")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per token, one session: what one core of the last node does
    rows = []
    print(f"{'vocab':>8}  {'case':<30} {'median ms':>10} {'p90 ms':>8}")
    for vocab in VOCABS:
        for name, params in CASES.items():
            result = time_case(params, vocab, args.history, args.repeats)
            rows.append({"vocab": vocab, "case": name, **result})
            print(f"{vocab:>8}  {name:<30} {result['median_ms']:>10.3f} {result['p90_ms']:>8.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "torch_threads": 1,
                "history_tokens": args.history,
                "repeats": args.repeats,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
