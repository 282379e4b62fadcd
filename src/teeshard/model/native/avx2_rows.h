/* What the AVX2 kernels (int8_avx2.c, bf16_avx2.c) share: one pass of up to two
 * activation rows over four channels of a blocked weight. */
#ifndef TEESHARD_AVX2_ROWS_H
#define TEESHARD_AVX2_ROWS_H

#include "kernels.h"

#define PREFETCH_AHEAD 2048 /* bytes: 32 cache lines, measured (1, 2, 4 KiB tie) */

/* NAME(x, wb, scale, y, m, n, N, K): activation rows m .. m + R - 1 against channels
 * n .. n + 3 (block n / 4) of the blocked weight wb[n / 4][k / 16][n % 4][k % 16] of
 * WTYPE, whose 8 values at p WIDEN8(p) turns into float32; each output is its sum
 * times SCALE(c) for channel n + c. R is a constant (1 or 2) so that the compiler
 * keeps the 4R accumulators in registers. Lane j of an accumulator takes
 * k = j, j + 8, ... in order, then a fixed horizontal sum: the same sequence of
 * FMAs for a row whatever the other rows are (batch invariance). */
#define AVX2_ROWS_BY_FOUR_CHANNELS(NAME, R, WTYPE, WIDEN8, SCALE)                       \
    static void NAME(const float *x, const WTYPE *wb, const uint16_t *scale, float *y,  \
                     int64_t m, int64_t n, int64_t N, int64_t K) {                      \
        (void)scale;                                                                    \
        __m256 acc[R][4];                                                               \
        for (int r = 0; r < R; r++)                                                     \
            for (int c = 0; c < 4; c++)                                                 \
                acc[r][c] = _mm256_setzero_ps();                                        \
        const WTYPE *block = wb + n * K; /* four channels' K * 4 values, blocked */     \
        const float *xm = x + m * K;                                                    \
        for (int64_t k = 0; k < K; k += 16) {                                           \
            const WTYPE *step = block + 4 * k; /* 64 values: one line per byte of each */ \
            for (int line = 0; line < (int)sizeof(WTYPE); line++)                       \
                _mm_prefetch((const char *)step + PREFETCH_AHEAD + 64 * line, _MM_HINT_T0); \
            for (int half = 0; half < 16; half += 8) {                                  \
                __m256 w0 = WIDEN8(step + half), w1 = WIDEN8(step + 16 + half);         \
                __m256 w2 = WIDEN8(step + 32 + half), w3 = WIDEN8(step + 48 + half);    \
                for (int r = 0; r < R; r++) {                                           \
                    __m256 v = _mm256_loadu_ps(xm + r * K + k + half);                  \
                    acc[r][0] = _mm256_fmadd_ps(v, w0, acc[r][0]);                      \
                    acc[r][1] = _mm256_fmadd_ps(v, w1, acc[r][1]);                      \
                    acc[r][2] = _mm256_fmadd_ps(v, w2, acc[r][2]);                      \
                    acc[r][3] = _mm256_fmadd_ps(v, w3, acc[r][3]);                      \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        for (int r = 0; r < R; r++)                                                     \
            for (int c = 0; c < 4; c++)                                                 \
                y[(m + r) * N + n + c] = sum8(acc[r][c]) * SCALE(c);                    \
    }

/* every pass of a product: blocks of four channels over OpenMP, rows two at a time */
#define AVX2_FOUR_CHANNEL_BLOCKS(ROWS1, ROWS2, x, wb, scale, y, M, N, K, threads)       \
    do {                                                                                \
        int64_t blocks = (N) / 4;                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")               \
        for (int64_t b = 0; b < blocks; b++) {                                          \
            int64_t m = 0;                                                              \
            for (; m + 2 <= (M); m += 2)                                                \
                ROWS2(x, wb, scale, y, m, 4 * b, N, K);                                 \
            if (m < (M))                                                                \
                ROWS1(x, wb, scale, y, m, 4 * b, N, K);                                 \
        }                                                                               \
    } while (0)

#endif
