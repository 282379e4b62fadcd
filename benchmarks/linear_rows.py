"""How one linear's time grows with the rows of a batch, per kernel, on this CPU.

Why batching pays (decode reads every weight for one row) depends on the kernel:
torch's default float32 product (MKL) slows down with rows, oneDNN's packed
product does not. TinyLlama's LM head (2048 -> 32000), its fused gate/up
(2048 -> 11264) and down (5632 -> 2048) shapes, 1, 8 and 16 rows, in float32,
bfloat16, int8 and w8a8 (torch's and teeshard's kernels, each where this CPU runs
it), kernels interleaved within each repetition; medians. The table names the CPU: kernels differ by instruction set.
Prints a table; writes ``benchmarks/results/linear_rows.json``.

    python benchmarks/linear_rows.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_vs_local import cpu_description
from teeshard.model import native
from teeshard.model.formats import onednn_bf16_available
from teeshard.model.quantize import quantize_int8

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"lm_head": (32000, 2048), "mlp_gate_up": (11264, 2048), "mlp_down": (2048, 5632)}


def kernels(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every kernel this machine can run for ``weight``: where a CPU lacks what one
    needs (oneDNN's bfloat16 path, AVX2 for teeshard's int8 kernel), it is left out."""
    packed32 = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    bf16 = weight.to(torch.bfloat16)
    q, scale = quantize_int8(weight)
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "float32 MKL (F.linear)": lambda x: F.linear(x, weight),
        "float32 oneDNN packed": lambda x: torch.ops.mkldnn._linear_pointwise(
            x, packed32, None, "none", [], ""
        ),
    }
    if native.f32_isa(*weight.shape) is not None:
        laid32 = native.lay_out_weight(weight, "avx512f")
        found["float32 teeshard native (AVX-512F)"] = lambda x: native.f32_matmul(x, laid32)
    if onednn_bf16_available():
        packed16 = torch.ops.mkldnn._reorder_linear_weight(bf16, None)
        found["bfloat16 oneDNN packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), packed16, None, "none", [], ""
        )
    else:
        found["bfloat16 generic (F.linear)"] = lambda x: F.linear(x.to(torch.bfloat16), bf16)
    for isa in native.bf16_isas() if native.bf16_fits(*bf16.shape) else ():
        laid16 = native.lay_out_weight(bf16, isa)
        found[f"bfloat16 teeshard native ({isa_label(isa)})"] = lambda x, isa=isa, laid=laid16: (
            native.bf16_matmul(x, laid, isa=isa)
        )
    found["int8 torch (_weight_int8pack_mm)"] = lambda x: torch.ops.aten._weight_int8pack_mm(
        x.to(torch.bfloat16), q, scale
    )
    for isa in native.int8_isas() if native.available() else ():
        laid = native.lay_out_weight(q, isa)
        found[f"int8 teeshard native ({isa_label(isa)})"] = lambda x, isa=isa, laid=laid: (
            native.int8_matmul(x, laid, scale, isa=isa)
        )
    n, k = q.shape
    for isa in native.w8a8_isas() if native.w8a8_fits(n, k) else ():
        laid = native.lay_out_weight(q, isa)
        found[f"w8a8 teeshard native ({isa_label(isa)})"] = lambda x, isa=isa, laid=laid: (
            native.w8a8_matmul(x, laid, scale, isa=isa)
        )
    return found


def isa_label(isa: str) -> str:
    """``avx512vnni`` -> ``AVX-512 VNNI``."""
    names = {
        "avx512": "AVX-512",
        "avx512f": "AVX-512F",
        "avx512vnni": "AVX-512 VNNI",
        "avx512bf16": "AVX-512 BF16",
    }
    return names.get(isa, isa.upper())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "linear_rows.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_description())
    rows = [int(r) for r in args.rows.split(",")]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for shape_name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features) * 0.02
        fns = kernels(weight)
        times: dict[tuple[str, int], list[float]] = {(k, r): [] for k in fns for r in rows}
        inputs = {r: torch.randn(r, in_features) for r in rows}
        with torch.no_grad():
            for fn in fns.values():  # warm up
                fn(inputs[rows[0]])
            for _ in range(args.reps):
                for name, fn in fns.items():
                    for r in rows:
                        started = time.perf_counter()
                        fn(inputs[r])
                        times[(name, r)].append(time.perf_counter() - started)
        results[shape_name] = {
            name: {str(r): statistics.median(times[(name, r)]) * 1000 for r in rows} for name in fns
        }
        print(f"\n{shape_name} ({in_features} -> {out_features}), ms, {args.threads} thread(s)")
        width = max(len(name) for name in fns) + 2
        print(f"{'kernel':{width}}" + "".join(f"{f'{r} rows':>10}" for r in rows))
        for name, by_rows in results[shape_name].items():
            print(f"{name:{width}}" + "".join(f"{by_rows[str(r)]:10.2f}" for r in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "cpu": cpu_description(),
                "threads": args.threads,
                "statistic": f"median of {args.reps}, kernels interleaved",
                "ms": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
