/* Weight-only int8 product for x86 CPUs with AVX-512 (F, BW, DQ, VL): int8_avx2.c's
 * product sixteen lanes wide, on the weight in a blocked layout.
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
 *
 * x float32 (M, K) row-major, scale bfloat16 (N,) as bit patterns, y float32 (M, N);
 * the weight q int8 (N, K) comes *blocked*: qb[n / 4][k / 16][n % 4][k % 16], so the
 * four channels one pass computes lie in one sequential stream, one 64-byte cache
 * line per step of 16 inputs (native.block_weight makes it). N must be a
 * multiple of 4 and K of 16.
 *
 * Why: decode reads every weight once, and one core's loads keep the memory bus
 * busy only if they run ahead sequentially. On the row-major weight the four
 * channels are four streams K bytes apart and the AVX-512 kernel read 8 GB/s from
 * memory on an Intel Xeon with AMX; blocked, with a software prefetch a few lines
 * ahead, 12 GB/s (the whole int8 TinyLlama, one thread: 120 ms -> 78 ms).
 *
 * Twice the lanes per instruction and four times the registers of AVX2, so one pass
 * over four channels serves up to four activation rows (sixteen accumulators): a
 * weight is widened to float32 once per four rows instead of once per two.
 *
 * Batch-invariant by construction, as the AVX2 kernel: lane j of y[m, n]'s
 * accumulator takes k = j, j + 16, ... in order, then a fixed horizontal sum,
 * whatever M is and however the rows are blocked. (Its sums differ from the AVX2
 * kernel's in the last bits; a node uses one kernel per layer.)
 */
#include "kernels.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define PREFETCH_AHEAD 2048 /* bytes: 32 cache lines, measured best of 512-4096 */

AVX512 static inline __m512 widen16(const int8_t *p) {  /* 16 int8 weights -> float32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

AVX512 static inline float sum16(__m512 v) {  /* the 16 lanes, in a fixed order */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* activation rows m .. m + R - 1 against channels n .. n + 3 (block n / 4); R a
 * constant 1..4 so that the compiler keeps the 4R accumulators in registers */
#define ROWS_BY_FOUR_CHANNELS(R)                                                        \
    AVX512 static void rows##R(const float *x, const int8_t *qb, const uint16_t *scale, \
                               float *y, int64_t m, int64_t n, int64_t N, int64_t K) {  \
        __m512 acc[R][4];                                                               \
        for (int r = 0; r < R; r++)                                                     \
            for (int c = 0; c < 4; c++)                                                 \
                acc[r][c] = _mm512_setzero_ps();                                        \
        const int8_t *block = qb + n * K; /* four channels' K * 4 bytes, blocked */     \
        const float *xm = x + m * K;                                                    \
        for (int64_t k = 0; k < K; k += 16) {                                           \
            const int8_t *line = block + 4 * k;                                         \
            _mm_prefetch((const char *)(line + PREFETCH_AHEAD), _MM_HINT_T0);           \
            __m512 w0 = widen16(line), w1 = widen16(line + 16);                         \
            __m512 w2 = widen16(line + 32), w3 = widen16(line + 48);                    \
            for (int r = 0; r < R; r++) {                                               \
                __m512 v = _mm512_loadu_ps(xm + r * K + k);                             \
                acc[r][0] = _mm512_fmadd_ps(v, w0, acc[r][0]);                          \
                acc[r][1] = _mm512_fmadd_ps(v, w1, acc[r][1]);                          \
                acc[r][2] = _mm512_fmadd_ps(v, w2, acc[r][2]);                          \
                acc[r][3] = _mm512_fmadd_ps(v, w3, acc[r][3]);                          \
            }                                                                           \
        }                                                                               \
        for (int r = 0; r < R; r++)                                                     \
            for (int c = 0; c < 4; c++)                                                 \
                y[(m + r) * N + n + c] = sum16(acc[r][c]) * widen_bf16(scale[n + c]);  \
    }
ROWS_BY_FOUR_CHANNELS(1)
ROWS_BY_FOUR_CHANNELS(2)
ROWS_BY_FOUR_CHANNELS(3)
ROWS_BY_FOUR_CHANNELS(4)

int teeshard_int8_matmul_avx512(const float *x, const int8_t *qb, const uint16_t *scale,
                                float *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 4 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            rows4(x, qb, scale, y, m, 4 * b, N, K);
        switch (M - m) {
        case 3: rows3(x, qb, scale, y, m, 4 * b, N, K); break;
        case 2: rows2(x, qb, scale, y, m, 4 * b, N, K); break;
        case 1: rows1(x, qb, scale, y, m, 4 * b, N, K); break;
        }
    }
    return 0;
}
