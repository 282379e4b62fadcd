"""Grammar-constrained decoding libraries, measured on teeshard's test tokenizer.

For each candidate that imports (``llguidance``, ``xgrammar``, ``outlines-core``):
the time to wrap the tokenizer, to compile a JSON schema, and to compute the
allowed-token mask at each position of a random walk through the grammar (a token
drawn uniformly from the allowed ones, seeded, until the grammar accepts or 64
steps). The tokenizer is the byte-level BPE the tests build (512 tokens) and the
demo's (1,024 tokens).

    python benchmarks/grammar_libraries.py [--walks N] [--path DIR ...]

``--path`` puts a directory first on ``sys.path`` (a candidate installed with
``pip install --target DIR`` for the measurement only). Prints a table and writes
benchmarks/results/grammar_libraries.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
MAX_STEPS = 64


def tokenizer(vocab: int, work: Path) -> Any:
    from transformers import AutoTokenizer

    from teeshard.model.random_checkpoint import train_tokenizer, write_tokenizer

    out = work / f"tok{vocab}"
    out.mkdir()
    write_tokenizer(train_tokenizer(vocab_size=vocab), out)
    return AutoTokenizer.from_pretrained(str(out))


def allowed_from_bits(bits: bytes, n: int) -> list[int]:
    return [i for i in range(n) if bits[i >> 3] >> (i & 7) & 1]


def walk_llguidance(hf: Any, walks: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf

    started = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf)
    wrap = time.perf_counter() - started
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compiles, masks = [], []
    for seed in range(walks):
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        compiles.append(time.perf_counter() - started)
        rng = random.Random(seed)
        for _ in range(MAX_STEPS):
            started = time.perf_counter()
            bits = matcher.compute_bitmask()
            masks.append(time.perf_counter() - started)
            allowed = allowed_from_bits(bits, tok.vocab_size)
            token = rng.choice(allowed)
            matcher.consume_token(token)
            if matcher.is_stopped() or token == hf.eos_token_id:
                break
        assert not matcher.is_error(), matcher.get_error()
    return {"version": version("llguidance")} | _stats(wrap, compiles, masks)


def walk_xgrammar(hf: Any, walks: int) -> dict[str, Any]:
    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    wrap = time.perf_counter() - started
    compiles, masks = [], []
    for seed in range(walks):
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        matcher = xgrammar.GrammarMatcher(compiled)
        compiles.append(time.perf_counter() - started)
        bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
        rng = random.Random(seed)
        for _ in range(MAX_STEPS):
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(time.perf_counter() - started)
            bits = bitmask[0].numpy().view("uint8").tobytes()
            allowed = allowed_from_bits(bits, info.vocab_size)
            token = rng.choice(allowed)
            matcher.accept_token(token)
            if matcher.is_terminated():
                break
    return {"version": version("xgrammar")} | _stats(wrap, compiles, masks)


def walk_outlines_core(hf: Any, walks: int) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    started = time.perf_counter()
    eos = hf.eos_token_id
    table: dict[bytes, list[int]] = {}
    for i in range(len(hf)):
        if i in hf.all_special_ids:
            continue
        table.setdefault(hf.convert_tokens_to_string([hf.convert_ids_to_tokens(i)]).encode(), [])
        table[hf.convert_tokens_to_string([hf.convert_ids_to_tokens(i)]).encode()].append(i)
    vocab = Vocabulary(eos, table)
    wrap = time.perf_counter() - started
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    compiles, masks = [], []
    for seed in range(walks):
        started = time.perf_counter()
        guide = Guide(Index(regex, vocab))
        compiles.append(time.perf_counter() - started)
        rng = random.Random(seed)
        for _ in range(MAX_STEPS):
            started = time.perf_counter()
            allowed = list(guide.get_tokens())
            masks.append(time.perf_counter() - started)
            token = rng.choice(allowed)
            if token == eos:
                break
            guide.advance(token)
            if guide.is_finished():
                break
    return {"version": version("outlines-core")} | _stats(wrap, compiles, masks)


def _stats(wrap: float, compiles: list[float], masks: list[float]) -> dict[str, Any]:
    masks.sort()
    return {
        "tokenizer_wrap_ms": wrap * 1e3,
        "compile_ms_median": statistics.median(compiles) * 1e3,
        "mask_us_median": statistics.median(masks) * 1e6,
        "mask_us_p99": masks[int(len(masks) * 0.99)] * 1e6,
        "masks": len(masks),
    }


CANDIDATES: dict[str, Callable[[Any, int], dict[str, Any]]] = {
    "llguidance": walk_llguidance,
    "xgrammar": walk_xgrammar,
    "outlines-core": walk_outlines_core,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--path", action="append", default=[])
    args = parser.parse_args()
    sys.path[:0] = args.path
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in (512, 1024):
            hf = tokenizer(vocab, Path(tmp))
            for name, walk in CANDIDATES.items():
                try:
                    row = walk(hf, args.walks)
                except ImportError as exc:
                    row = {"error": f"not installed: {exc}"}
                except Exception as exc:  # a candidate that fails on this tokenizer
                    row = {"error": f"failed: {type(exc).__name__}: {exc}"[:200]}
                rows.append({"library": name, "vocab": len(hf), **row})
    print(
        f"{'library':<14} {'vocab':>5} {'wrap ms':>8} {'compile ms':>10} {'mask us':>8} {'p99 us':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['library']:<14} {r['vocab']:>5} {r['error']}")
            continue
        print(
            f"{r['library']:<14} {r['vocab']:>5} {r['tokenizer_wrap_ms']:>8.1f} "
            f"{r['compile_ms_median']:>10.2f} {r['mask_us_median']:>8.1f} {r['mask_us_p99']:>8.1f}"
        )
    out = Path(__file__).parent / "results" / "grammar_libraries.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
