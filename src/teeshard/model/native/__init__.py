"""teeshard's own CPU kernels, in C, built when first needed and called through ctypes.

Four products, each in a kernel per instruction set, fastest first where the CPU
runs it; each kernel reads its weight in a blocked layout, laid out once at load
(:mod:`teeshard.model.native.layout`: :func:`lay_out_weight`; :func:`weight_block` says
which) onto 2 MiB pages where Linux gives them (:mod:`teeshard.model.native.huge_pages`).

* :func:`int8_matmul`: the weight-only int8 product: ``int8_avx512vnni.c`` (AVX-512
  VNNI: each input row quantized to 16 bits, exact integer sums, ``vpdpbusd``), else
  ``int8_avx512.c`` (AVX-512) or ``int8_avx2.c`` (AVX2 and FMA), which multiply
  float32 activations. The int8 format uses it where it is faster than torch's own
  kernel on the machine
  (:func:`teeshard.model.quantize.choose_int8_kernel`; ``benchmarks/linear_rows.py``).
* :func:`bf16_matmul`: bfloat16 weights: ``bf16_avx512.c`` (AVX-512 BF16,
  activations rounded to bfloat16, ``vdpbf16ps``; it serves the bfloat16 format
  where the CPU has it) and ``bf16_avx2.c`` (float32 activations, for CPUs without
  BF16 instructions, where oneDNN has no bfloat16 path).
* :func:`w8a8_matmul`: int8 weights times activations it quantizes to int8 per row,
  exact int32 sums, for the w8a8 format: ``w8a8_avx512.c`` (AVX-512 VNNI) and
  ``w8a8_avx2.c``, which give the same bits.
* :func:`f32_matmul`: float32 weights and activations, for the float32 format where
  the CPU has AVX-512 (``f32_avx512.c``; elsewhere oneDNN's packed product serves).

And one more kernel, ``attention.c``: the decoding sessions' attention of a batch in
one call (:mod:`teeshard.model.native.attention`).

Built from the sources in this package with the machine's C compiler (``$CC`` or
``cc``) into a fresh private directory, once per process (the sources compile side
by side, 1.5 s on two cores; no torch headers; a shard's loader triggers it), which is removed once the library is loaded: nothing is loaded from a cache
another process could have written, so inside a TEE the kernel is exactly the
measured source. No compiler, another architecture or a CPU without AVX2/FMA: no
native kernel, and callers keep torch's (:func:`unavailable_reason` says why).
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
from subprocess import PIPE

import torch

from teeshard.model.native.layout import FOUR_BY_SIXTEEN as FOUR_BY_SIXTEEN
from teeshard.model.native.layout import Block as Block
from teeshard.model.native.layout import block_weight as block_weight
from teeshard.model.native.layout import lay_out_weight as lay_out_weight
from teeshard.model.native.layout import stored_weight as stored_weight
from teeshard.model.native.layout import unblock_weight as unblock_weight
from teeshard.model.native.layout import weight_block as weight_block

log = logging.getLogger(__name__)

_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "int8_avx2.c",
        "int8_avx512.c",
        "int8_avx512vnni.c",
        "bf16_avx2.c",
        "bf16_avx512.c",
        "w8a8_avx2.c",
        "w8a8_avx512.c",
        "f32_avx512.c",
        "attention.c",
        "block_ops.c",
    )
)
# AVX-512 code is enabled per function (target attributes), never for the whole library
_FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC")
_NEEDED_CPU_FLAGS = ("avx2", "fma")  # for any kernel: the library is built with them
# instruction set -> the CPU flags it needs besides those
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
_ISA_CPU_FLAGS = {
    "avx512": _AVX512,
    "avx512vnni": (*_AVX512, "avx512_vnni"),
    "avx512bf16": (*_AVX512, "avx512_bf16"),
    "avx512f": _AVX512,
    "avx2": (),
}
# instruction set -> (its output channels, its input width) must be multiples of these
INT8_ISAS = {"avx512vnni": (16, 16), "avx512": (4, 16), "avx2": (4, 16)}  # in order of preference
W8A8_ISAS = {"avx512vnni": (16, 16), "avx2": (4, 16)}  # the same bits; fastest first
BF16_ISAS = {"avx512bf16": (16, 16), "avx2": (4, 16)}  # fastest first
F32_ISAS = {"avx512f": (16, 16)}
_ISA_MULTIPLES = {**INT8_ISAS, **W8A8_ISAS, **BF16_ISAS, **F32_ISAS}  # "avx2": the same in each


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
        target = Path(build_dir) / "teeshard_kernels.so"
        try:
            objects = _compile_all(compiler, Path(build_dir))
            link = [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(target)]
            subprocess.run(link, check=True, capture_output=True, timeout=120)
            library = ctypes.CDLL(str(target))  # mapped now: the file may go
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            return (
                None,
                f"building the native kernels failed: {error} "
                f"{detail.decode(errors='replace')[:300]}",
            )
    # x, int8 weight, scale, y; M, N, K; threads
    for symbol in (
        *(f"teeshard_int8_matmul_{isa}" for isa in INT8_ISAS),
        *(f"teeshard_w8a8_matmul_{isa}" for isa in W8A8_ISAS),
    ):
        function = getattr(library, symbol)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    for symbol in (
        *(f"teeshard_bf16_matmul_{isa}" for isa in BF16_ISAS),
        *(f"teeshard_f32_matmul_{isa}" for isa in F32_ISAS),
    ):  # x, weight, y
        function = getattr(library, symbol)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    log.info(
        "native kernels built with %s (%s)",
        Path(compiler).name,
        "/".join(_runnable(_ISA_MULTIPLES)),
    )
    return library, ""


def _runnable(isas: dict[str, tuple[int, int]]) -> tuple[str, ...]:
    """Those of ``isas`` this CPU can run, in their order (none without AVX2/FMA)."""
    flags = cpu_info()[1]
    if not set(_NEEDED_CPU_FLAGS) <= flags:
        return ()
    return tuple(isa for isa in isas if set(_ISA_CPU_FLAGS[isa]) <= flags)


def _compile_all(compiler: str, build_dir: Path) -> list[Path]:
    """Every source compiled to an object in ``build_dir``, all at once (each takes
    about half a second: 1.5 s side by side on two cores, about 4 s one after another)."""
    running = []
    try:
        for source in _SOURCES:
            obj = build_dir / f"{source.stem}.o"
            command = [compiler, *_FLAGS, "-c", str(source), "-o", str(obj)]
            running.append((subprocess.Popen(command, stdout=PIPE, stderr=PIPE), command, obj))
        for process, command, _ in running:
            _, stderr = process.communicate(timeout=120)
            if process.returncode != 0:
                raise subprocess.CalledProcessError(process.returncode, command, stderr=stderr)
    finally:  # a failure or a timeout leaves no compiler running
        for process, _, _ in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [obj for _, _, obj in running]


@functools.cache
def int8_isas() -> tuple[str, ...]:
    """The int8 kernels this CPU can run, best first (empty without AVX2/FMA)."""
    return _runnable(INT8_ISAS)


@functools.cache
def w8a8_isas() -> tuple[str, ...]:
    """The w8a8 kernels this CPU can run, fastest first (empty without AVX2/FMA)."""
    return _runnable(W8A8_ISAS)


@functools.cache
def bf16_isas() -> tuple[str, ...]:
    """The bfloat16 kernels this CPU can run, fastest first (empty without AVX2/FMA)."""
    return _runnable(BF16_ISAS)


@functools.cache
def f32_isas() -> tuple[str, ...]:
    """The float32 kernels this CPU can run (empty without AVX-512)."""
    return _runnable(F32_ISAS)


def _fits(isa: str, channels: int, width: int) -> bool:
    channel_multiple, width_multiple = _ISA_MULTIPLES[isa]
    return channels % channel_multiple == 0 and width % width_multiple == 0


# kernel -> the input width it must stay below, for a product whose kernels have one
# (their int32 sums are exact only below it); the others take any width
Widest = dict[str, int]
W8A8_MAX_WIDTH = 1 << 17  # the w8a8 kernels' int32 sums are exact below this input width
INT8_A16_MAX_WIDTH = 1 << 16  # int8_avx512vnni.c's likewise
_W8A8_WIDEST: Widest = dict.fromkeys(W8A8_ISAS, W8A8_MAX_WIDTH)
_INT8_WIDEST: Widest = {"avx512vnni": INT8_A16_MAX_WIDTH}


def _fitting(
    isas: tuple[str, ...], channels: int, width: int, widest: Widest | None = None
) -> list[str]:
    """Those of ``isas`` (this CPU's, fastest first) that take a (``channels``,
    ``width``) weight, in their order (``widest``: the product's width limits)."""
    limits = widest or {}
    return [
        isa for isa in isas if _fits(isa, channels, width) and width < limits.get(isa, width + 1)
    ]


def _fastest_fitting(
    isas: tuple[str, ...], channels: int, width: int, widest: Widest | None = None
) -> str | None:
    """The first of ``isas`` that takes a (``channels``, ``width``) weight, where the
    native library built here; None otherwise."""
    if not available():
        return None
    return next(iter(_fitting(isas, channels, width, widest)), None)


def int8_isa(channels: int, width: int) -> str | None:
    """The best int8 kernel here for a (``channels``, ``width``) weight, if any."""
    return _fastest_fitting(int8_isas(), channels, width, _INT8_WIDEST)


def available() -> bool:
    return _build()[0] is not None


def unavailable_reason() -> str:
    """Why there is no native kernel here; empty where there is one."""
    return _build()[1]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, isa: str) -> torch.Tensor:
    """``x`` float32 (M, K) @ (``q`` int8 (N, K) * ``scale`` bfloat16 (N,))^T -> float32 (M, N).

    ``isa`` names the kernel (one of :func:`int8_isas`; ``avx512vnni`` quantizes each
    row of ``x`` to 16 bits first, as :func:`teeshard.model.quantize.int8_a16_reference`
    defines), and ``q`` comes in the layout it reads (:func:`lay_out_weight`). Every
    tensor contiguous on the CPU; N and K multiples of what the kernel takes
    (``INT8_ISAS``), K below ``INT8_A16_MAX_WIDTH`` for ``avx512vnni``. Releases the
    GIL while it runs.
    """
    _checked_int8("int8_matmul", x, q, scale)
    return bind_int8(q, scale, isa=isa)(x)


def w8a8_isa(channels: int, width: int) -> str | None:
    """The fastest w8a8 kernel here for a (``channels``, ``width``) weight, if any."""
    return _fastest_fitting(w8a8_isas(), channels, width, _W8A8_WIDEST)


def w8a8_fits(channels: int, width: int) -> bool:
    """Whether :func:`w8a8_matmul` takes a (``channels``, ``width``) weight here."""
    return w8a8_isa(channels, width) is not None


def w8a8_matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, isa: str | None = None
) -> torch.Tensor:
    """``x`` float32 (M, K), each row quantized to int8 in the kernel, @ (``q`` int8
    (N, K) * ``scale`` bfloat16 (N,))^T -> float32 (M, N), as ``w8a8_avx2.c`` defines
    it (:func:`teeshard.model.quantize.w8a8_reference` computes the same bits).

    ``isa`` names the kernel (one of :func:`w8a8_isas`; None: the fastest that fits),
    and ``q`` comes in the layout that kernel reads (:func:`lay_out_weight`);
    contiguous CPU tensors, N and K multiples of what the kernel takes (``W8A8_ISAS``).
    Releases the GIL while it runs."""
    _checked_int8("w8a8_matmul", x, q, scale)
    return bind_w8a8(q, scale, isa=isa)(x)


def _chosen(
    name: str,
    isa: str | None,
    isas: tuple[str, ...],
    channels: int,
    width: int,
    widest: Widest | None = None,
) -> str:
    """``isa``, or the first of ``isas`` (this CPU's, fastest first) that takes a
    (``channels``, ``width``) weight where ``isa`` is None; NativeKernelError if none."""
    fit = _fitting(isas, channels, width, widest)
    chosen = next(iter(fit), None) if isa is None else (isa if isa in fit else None)
    if chosen is None:
        kernel = f"{isa} kernel" if isa else "kernel"
        raise NativeKernelError(
            f"{name}: no {kernel} for a {channels}x{width} weight here "
            f"(this CPU runs {', '.join(isas) or 'none'})"
        )
    return chosen


def bf16_isa(channels: int, width: int) -> str | None:
    """The fastest bfloat16 kernel here for a (``channels``, ``width``) weight, if any."""
    return _fastest_fitting(bf16_isas(), channels, width)


def bf16_fits(channels: int, width: int) -> bool:
    """Whether :func:`bf16_matmul` takes a (``channels``, ``width``) weight here."""
    return bf16_isa(channels, width) is not None


def bf16_matmul(x: torch.Tensor, w: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """``x`` float32 (M, K) @ ``w`` bfloat16 (N, K)^T -> float32 (M, N).

    ``isa`` names the kernel (one of :func:`bf16_isas`; None: the fastest that fits),
    and ``w`` comes in the layout it reads (:func:`lay_out_weight`). ``avx2`` takes
    ``x`` as it is; ``avx512bf16`` rounds it to bfloat16 first (``bf16_avx512.c``).
    Contiguous CPU tensors, N and K multiples of what the kernel takes
    (``BF16_ISAS``). Releases the GIL while it runs."""
    _checked("bf16_matmul", x, w, torch.bfloat16)
    return bind_bf16(w, isa=isa)(x)


def f32_isa(channels: int, width: int) -> str | None:
    """The float32 kernel here for a (``channels``, ``width``) weight, if any."""
    return _fastest_fitting(f32_isas(), channels, width)


def f32_matmul(x: torch.Tensor, w: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """``x`` float32 (M, K) @ ``w`` float32 (N, K)^T -> float32 (M, N) (``f32_avx512.c``).

    ``isa`` names the kernel (one of :func:`f32_isas`; None: the one that fits), and
    ``w`` comes in the layout it reads (:func:`lay_out_weight`). Contiguous CPU
    tensors, N and K multiples of 16. Releases the GIL while it runs."""
    _checked("f32_matmul", x, w, torch.float32)
    return bind_f32(w, isa=isa)(x)


class BoundProduct:
    """One layer's native product with its weight bound once: the kernel's function and
    the weight's (and scale's) addresses, checked when bound, so that a call checks
    only its input. A decode step makes about a hundred products, and the unbound
    functions' checks cost about as much as a small product (``bind`` below).

    It holds the weight tensors, so the addresses stay valid while it lives; a layer
    that lays its weight out anew binds anew."""

    def __init__(self, name: str, symbol: str, weights: tuple[torch.Tensor, ...]) -> None:
        library = _build()[0]
        assert library is not None  # the binders checked
        self.name = name
        self.channels, self.width = int(weights[0].shape[0]), int(weights[0].shape[1])
        self._function = getattr(library, symbol)
        self._weights = weights
        self._pointers = tuple(w.data_ptr() for w in weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float32 (M, K) contiguous on the CPU -> float32 (M, N). Releases the GIL."""
        if (
            x.dtype != torch.float32
            or x.dim() != 2
            or x.shape[1] != self.width
            or not x.is_contiguous()
            or x.device.type != "cpu"
        ):
            raise NativeKernelError(
                f"{self.name}: x {x.dtype} {tuple(x.shape)}: expected float32 "
                f"(M, {self.width}), a contiguous CPU tensor"
            )
        rows = x.shape[0]
        out = torch.empty(rows, self.channels, dtype=torch.float32)
        status = self._function(
            x.data_ptr(), *self._pointers, out.data_ptr(),
            rows, self.channels, self.width, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise NativeKernelError(f"{self.name} refused its arguments ({status})")
        return out


def bind_int8(q: torch.Tensor, scale: torch.Tensor, *, isa: str) -> BoundProduct:
    """:func:`int8_matmul` with ``q`` and ``scale`` bound (checked here, once)."""
    _, channels, width = _checked_int8("int8_matmul", _no_rows(q), q, scale)
    _chosen("int8_matmul", isa, int8_isas(), channels, width, _INT8_WIDEST)
    return BoundProduct("int8_matmul", f"teeshard_int8_matmul_{isa}", (q, scale))


def bind_w8a8(q: torch.Tensor, scale: torch.Tensor, *, isa: str | None = None) -> BoundProduct:
    """:func:`w8a8_matmul` with ``q`` and ``scale`` bound (checked here, once)."""
    _, channels, width = _checked_int8("w8a8_matmul", _no_rows(q), q, scale)
    chosen = _chosen("w8a8_matmul", isa, w8a8_isas(), channels, width, _W8A8_WIDEST)
    return BoundProduct("w8a8_matmul", f"teeshard_w8a8_matmul_{chosen}", (q, scale))


def bind_bf16(w: torch.Tensor, *, isa: str | None = None) -> BoundProduct:
    """:func:`bf16_matmul` with ``w`` bound (checked here, once)."""
    _, channels, width = _checked("bf16_matmul", _no_rows(w), w, torch.bfloat16)
    chosen = _chosen("bf16_matmul", isa, bf16_isas(), channels, width)
    return BoundProduct("bf16_matmul", f"teeshard_bf16_matmul_{chosen}", (w,))


def bind_f32(w: torch.Tensor, *, isa: str | None = None) -> BoundProduct:
    """:func:`f32_matmul` with ``w`` bound (checked here, once)."""
    _, channels, width = _checked("f32_matmul", _no_rows(w), w, torch.float32)
    chosen = _chosen("f32_matmul", isa, f32_isas(), channels, width)
    return BoundProduct("f32_matmul", f"teeshard_f32_matmul_{chosen}", (w,))


def _no_rows(weight: torch.Tensor) -> torch.Tensor:
    """An empty input for ``weight``, to check the weight with the unbound checks."""
    return torch.empty(0, weight.shape[-1] if weight.dim() == 2 else 0)


def _checked_int8(
    name: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> tuple[int, int, int]:
    """:func:`_checked` for an int8 weight ``q`` (N, K) and its bfloat16 ``scale`` (N,)."""
    scale_fits = (
        scale.dtype == torch.bfloat16
        and scale.shape == q.shape[:1]
        and scale.is_contiguous()
        and scale.device.type == "cpu"
    )
    return _checked(
        name, x, q, torch.int8, scale_fits,
        f", scale {scale.dtype} {tuple(scale.shape)}", ", bfloat16 scale (N,)",
    )  # fmt: skip


def _checked(
    name: str,
    x: torch.Tensor,
    w: torch.Tensor,
    w_dtype: torch.dtype,
    others_fit: bool = True,
    others: str = "",
    others_expected: str = "",
) -> tuple[int, int, int]:
    """(rows, channels, width) of ``x`` float32 (M, K) against a weight ``w`` of
    ``w_dtype`` (N, K), both contiguous CPU tensors (``others_fit``: the caller's
    checks of its other tensors, described by ``others``), or NativeKernelError."""
    if _build()[0] is None:
        raise NativeKernelError(f"no native kernel for {name}: {unavailable_reason()}")
    if x.dim() != 2 or w.dim() != 2:
        raise NativeKernelError(f"{name} takes 2-D x and weight")
    checks = (
        x.dtype == torch.float32 and w.dtype == w_dtype and w.shape[1] == x.shape[1],
        x.is_contiguous() and w.is_contiguous(),
        x.device.type == w.device.type == "cpu",
        others_fit,
    )
    if not all(checks):
        raise NativeKernelError(
            f"{name}: x {x.dtype} {tuple(x.shape)}, weight {w.dtype} {tuple(w.shape)}{others}: "
            f"expected float32 (M, K), {str(w_dtype).removeprefix('torch.')} (N, K)"
            f"{others_expected}, contiguous CPU tensors"
        )
    return int(x.shape[0]), int(w.shape[0]), int(x.shape[1])
