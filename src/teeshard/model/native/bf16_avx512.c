/* bfloat16-weight product for x86 CPUs with AVX-512 BF16 (AMD Zen 4, Intel Cooper
 * Lake and later): the bfloat16 format's block linears and LM head.
 *
 *   y[m, n] = sum_k bf16(x[m, k]) * w[n, k]
 *
 * x float32 (M, K) row-major, rounded to bfloat16 here (round to nearest even, as
 * torch's x.to(torch.bfloat16) and oneDNN's bfloat16 product take it); y float32
 * (M, N), the float32 sums (no rounding to bfloat16). The weight w bfloat16 (N, K),
 * as bit patterns, comes blocked in this kernel's layout, in elements:
 * wv[n / 16][k / 2][n % 16][k % 2] (native.block_weight with block (16, 2)): one
 * 64-byte line holds 2 inputs of 16 channels, which is what one vdpbf16ps takes
 * against a row's 2 activations (one 32-bit word, broadcast by the instruction's
 * own load), leaving 16 channels' float32 sums in one register. N a multiple of 16
 * and K of 16.
 *
 * Why: oneDNN's packed bfloat16 product read one core's weight stream at 13-15
 * GB/s at one row on an AMD EPYC Zen 4, no faster than its float32 product, so
 * bfloat16 decoded at 1.8-2.0x float32 for half the bytes. This kernel streams 32
 * channels (two sequential lines a step, a software prefetch 2 KiB ahead) at
 * 16-17 GB/s there (benchmarks/linear_rows.py), and with up to eight rows per
 * weight load it keeps pace with oneDNN at prefill (128 rows, a scratch A/B).
 *
 * Batch-invariant by construction: a row's sums are the same sequence of vdpbf16ps
 * (k = 0, 2, 4, ... in order, per channel lane) whatever its batch-mates; no
 * horizontal sums. (vdpbf16ps flushes subnormal inputs and outputs to zero, as
 * oneDNN's bfloat16 path on this hardware does.)
 *
 * Threads: OpenMP over pairs of 16-channel blocks, as many as the caller asks for.
 */
#include <stdlib.h>

#include "kernels.h"

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#define PREFETCH_AHEAD 2048 /* bytes: 32 cache lines, as the other kernels */
#define BF16_MAX_ROWS 8 /* EVERY_ROW_IN_BLOCKS_OF_EIGHT */
#define BF16_MAX_BLOCKS 2 /* 16-channel blocks per pass: two weight streams */

AVX512BF16 static void round_to_bf16(const float *x, int64_t count, uint16_t *out) {
    for (int64_t i = 0; i < count; i += 16) {
        __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)rounded);
    }
}

/* rows m .. m + R - 1 against channels n .. n + 16 C - 1; R, C constant after inlining */
AVX512BF16 static inline __attribute__((always_inline)) void bf16_rows(
    int R, int C, const uint16_t *xb, const uint16_t *wv, float *y, int64_t m, int64_t n,
    int64_t N, int64_t K) {
    __m512 acc[BF16_MAX_BLOCKS][BF16_MAX_ROWS];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++)
            acc[c][r] = _mm512_setzero_ps();
    const uint16_t *blocks = wv + n * K; /* block c of the pass: 16 K elements from here */
    const uint16_t *xm = xb + m * K;
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh w[BF16_MAX_BLOCKS];
        for (int c = 0; c < C; c++) {
            const uint16_t *line = blocks + c * 16 * K + 16 * k;
            _mm_prefetch((const char *)line + PREFETCH_AHEAD, _MM_HINT_T0);
            w[c] = (__m512bh)_mm512_loadu_si512((const void *)line);
        }
        for (int r = 0; r < R; r++) {
            int32_t two; /* the row's inputs k, k + 1 */
            memcpy(&two, xm + r * K + k, sizeof two);
            __m512bh a = (__m512bh)_mm512_set1_epi32(two);
            for (int c = 0; c < C; c++)
                acc[c][r] = _mm512_dpbf16_ps(acc[c][r], w[c], a);
        }
    }
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++)
            _mm512_storeu_ps(y + (m + r) * N + n + 16 * c, acc[c][r]);
}

/* rows m .. m + R - 1 against the pass's channels (EVERY_PASS_AND_ROW's n and C) */
#define BF16_PASS(R, m) bf16_rows(R, C, xb, wv, y, m, n, N, K)

AVX512BF16 int teeshard_bf16_matmul_avx512bf16(const float *x, const uint16_t *wv, float *y,
                                               int64_t M, int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 16 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    if (M == 0)
        return 0;
    uint16_t *xb = malloc((size_t)(M * K) * sizeof(uint16_t));
    if (xb == NULL)
        return -2;
    round_to_bf16(x, M * K, xb);
    EVERY_PASS_AND_ROW(M, N, BF16_PASS);
    free(xb);
    return 0;
}
