"""Exact arithmetic in the prime field GF(p), p = 2^61 - 1, on float64 matmul hardware.

Why this field and these numbers:

* p = 2^61 - 1 is a Mersenne prime: multiplying by a power of two modulo p is a
  rotation of 61 bits, so combining limbs needs no 128-bit products, and a
  field element fits an int64 with room to add two of them.
* Matrix products run in float64, which is exact for integers below 2^53 and is
  what GPUs (and CPU BLAS) multiply fastest among exact-enough types. A field
  element (61 bits) is split into three 21-bit limbs; a weight is a signed
  integer below 2^19 in magnitude (:data:`WEIGHT_BITS`; 20 bits with the sign). One
  limb-times-weight product is below 2^40, so a dot product over at most
  :func:`chunk_size` terms (8192 for weights, 2048 for 21-bit right-hand sides)
  stays below 2^53: every partial sum, in any summation order, is an exact
  integer. Longer dot products are cut into chunks, each reduced modulo p in
  int64 before the next is added.

Everything here is pure: tensors in, tensors out, on whatever device they live.
"""

from __future__ import annotations

import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

P = (1 << 61) - 1  # the field's modulus, a Mersenne prime
HALF = P // 2  # lifted integers lie in [-HALF, HALF]
LIMB_BITS = 21
LIMBS = 3  # 3 x 21 = 63 bits >= 61
LIMB_MASK = (1 << LIMB_BITS) - 1
WEIGHT_BITS = 19  # magnitude bits of a quantized weight: |w| <= 2^19 - 1 (20 bits signed)
WEIGHT_MAX = (1 << WEIGHT_BITS) - 1
EXACT = 1 << 53  # float64 represents every integer of smaller magnitude exactly


def chunk_size(rhs_bits: int) -> int:
    """Most terms per float64 dot product of a 21-bit limb and integers below 2^rhs_bits."""
    bound = LIMB_MASK * ((1 << rhs_bits) - 1)
    return max(1, (EXACT - 1) // bound)


def reduce(values: torch.Tensor) -> torch.Tensor:
    """int64 values (any sign, |v| < 2^62) to their residues in [0, p)."""
    return torch.remainder(values, P)


def to_field(values: torch.Tensor) -> torch.Tensor:
    """Signed integers (int64) to field elements: negative v becomes p + v."""
    return reduce(values.to(torch.int64))


def lift(residues: torch.Tensor) -> torch.Tensor:
    """Field elements to the signed integers in [-HALF, HALF] they stand for."""
    return torch.where(residues > HALF, residues - P, residues)


def mul_pow2(residues: torch.Tensor, shift: int) -> torch.Tensor:
    """``residues * 2^shift mod p`` for residues in [0, p): a 61-bit rotation."""
    shift %= 61
    if shift == 0:
        return residues
    low = (residues & ((1 << (61 - shift)) - 1)) << shift  # below 2^61
    high = residues >> (61 - shift)  # below 2^shift
    total = low + high
    return torch.where(total >= P, total - P, total)


def limbs(residues: torch.Tensor) -> torch.Tensor:
    """(M, K) field elements to (LIMBS * M, K) float64 limbs, lowest limb first."""
    parts = [((residues >> (LIMB_BITS * i)) & LIMB_MASK) for i in range(LIMBS)]
    return torch.cat(parts, dim=0).to(torch.float64)


def matmul(a: torch.Tensor, w: torch.Tensor, w_bits: int = WEIGHT_BITS) -> torch.Tensor:
    """Exact ``a @ w mod p``.

    ``a``: (M, K) int64 field elements. ``w``: (K, N) integer-valued float tensor
    (float32 holds |w| < 2^24 exactly; it is widened chunk by chunk), every entry
    of magnitude below ``2^w_bits`` (either sign).
    Returns (M, N) int64 residues in [0, p).
    """
    rows, inner = a.shape
    if w.shape[0] != inner:
        raise ValueError(f"matmul: a is {tuple(a.shape)}, w is {tuple(w.shape)}")
    split = limbs(a)  # (3M, K)
    step = chunk_size(w_bits)
    acc = torch.zeros(LIMBS * rows, w.shape[1], dtype=torch.int64, device=a.device)
    for start in range(0, inner, step):
        part = split[:, start : start + step] @ w[start : start + step].to(torch.float64)
        acc = reduce(acc + part.to(torch.int64))  # |part| < 2^53, acc < 2^61: no overflow
    out = acc[:rows]
    for i in range(1, LIMBS):
        out = reduce(out + mul_pow2(acc[i * rows : (i + 1) * rows], LIMB_BITS * i))
    return out


def matmul_field(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b mod p`` where both sides are arbitrary field elements (b narrow)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for i in range(LIMBS):
        limb = ((b >> (LIMB_BITS * i)) & LIMB_MASK).to(torch.float64)  # unsigned 21 bits
        out = reduce(out + mul_pow2(matmul(a, limb, LIMB_BITS), LIMB_BITS * i))
    return out


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return reduce(a + b)


def sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return reduce(a - b)


def random_elements(shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform field elements from a cryptographic generator (ChaCha20, fresh key).

    One-time pads must come from a CSPRNG: torch's own generators are predictable.
    A 64-bit word is masked to 61 bits; the single value that is not a residue
    (2^61 - 1 itself) is redrawn.
    """
    count = 1
    for dim in shape:
        count *= dim
    words = _keystream_words(count)
    words &= P
    while True:
        bad = words == P
        if not bool(bad.any()):
            break
        words[bad] = _keystream_words(int(bad.sum())) & P
    return words.view(shape).to(device)


def random_small(shape: tuple[int, ...], bits: int) -> torch.Tensor:
    """Uniform integers in [0, 2^bits) from the same CSPRNG, as int64."""
    count = 1
    for dim in shape:
        count *= dim
    return (_keystream_words(count) & ((1 << bits) - 1)).view(shape)


def _keystream_words(count: int) -> torch.Tensor:
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
    stream = cipher.encryptor().update(bytes(8 * count))
    return (
        torch.frombuffer(bytearray(stream), dtype=torch.int64).clone()
        if count
        else (torch.empty(0, dtype=torch.int64))
    )
