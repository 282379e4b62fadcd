"""teeshard's own CPU kernels, in C, built when first needed and called through ctypes.

One kernel so far, :func:`int8_matmul` (``int8_matmul.c``): the weight-only int8
product with float32 activations, for x86 CPUs with AVX2 and FMA. The int8 format
uses it where it is faster than torch's own kernel on the machine
(:func:`teeshard.model.quantize.choose_int8_kernel`; ``benchmarks/linear_rows.py``).

Built from the source in this package with the machine's C compiler (``$CC`` or
``cc``) into a fresh private directory, once per process (well under a second; no
torch headers), which is removed once the library is loaded: nothing is loaded
from a cache another process could have written, so inside a TEE the kernel is
exactly the measured source. No compiler, another architecture or a CPU without
AVX2/FMA: no native kernel, and callers keep torch's (:func:`unavailable_reason`
says why).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_matmul.c")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_NEEDED_CPU_FLAGS = ("avx2", "fma")


class NativeKernelError(RuntimeError):
    """The kernel refused its arguments."""


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and instruction-set flags, from ``/proc/cpuinfo`` (Linux)."""
    name, flags = "unknown CPU", frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    except OSError:
        pass
    return name, flags


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and the reason there is none."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"no native kernel for {platform.machine()}"
    missing = [f for f in _NEEDED_CPU_FLAGS if f not in cpu_info()[1]]
    if missing:
        return None, f"CPU lacks {', '.join(missing)}"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (set CC)"
    with tempfile.TemporaryDirectory(prefix="teeshard-kernels-") as build_dir:
        target = Path(build_dir) / "int8_matmul.so"
        command = [compiler, *_FLAGS, str(_SOURCE), "-o", str(target)]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            library = ctypes.CDLL(str(target))  # mapped now: the file may go
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            return (
                None,
                f"building {_SOURCE.name} failed: {error} {detail.decode(errors='replace')[:300]}",
            )
    function = library.teeshard_int8_matmul
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    log.info("native int8 kernel built with %s", Path(compiler).name)
    return library, ""


def available() -> bool:
    return _build()[0] is not None


def unavailable_reason() -> str:
    """Why there is no native kernel here; empty where there is one."""
    return _build()[1]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` float32 (M, K) @ (``q`` int8 (N, K) * ``scale`` bfloat16 (N,))^T -> float32 (M, N).

    Every tensor contiguous on the CPU; K a multiple of 8. Releases the GIL while it runs.
    """
    library = _build()[0]
    if library is None:
        raise NativeKernelError(f"no native int8 kernel: {unavailable_reason()}")
    if x.dim() != 2 or q.dim() != 2:
        raise NativeKernelError("int8_matmul takes 2-D x and q")
    rows, width = x.shape
    channels = q.shape[0]
    checks = (
        x.dtype == torch.float32 and q.dtype == torch.int8 and scale.dtype == torch.bfloat16,
        q.shape[1] == width and scale.shape == (channels,) and width % 8 == 0,
        x.is_contiguous() and q.is_contiguous() and scale.is_contiguous(),
        x.device.type == q.device.type == scale.device.type == "cpu",
    )
    if not all(checks):
        raise NativeKernelError(
            f"int8_matmul: x {x.dtype} {tuple(x.shape)}, q {q.dtype} {tuple(q.shape)}, "
            f"scale {scale.dtype} {tuple(scale.shape)}: expected float32 (M, K), int8 (N, K), "
            "bfloat16 (N,), contiguous CPU tensors, K a multiple of 8"
        )
    out = torch.empty(rows, channels, dtype=torch.float32)
    status = library.teeshard_int8_matmul(
        x.data_ptr(), q.data_ptr(), scale.data_ptr(), out.data_ptr(),
        rows, channels, width, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise NativeKernelError(f"int8_matmul refused its arguments ({status})")
    return out
