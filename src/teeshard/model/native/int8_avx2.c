/* Weight-only int8 product for x86 CPUs with AVX2 and FMA: teeshard's own kernel
 * (int8_avx512.c is the same product sixteen lanes wide, for CPUs with AVX-512).
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
 *
 * x float32 (M, K) row-major, q int8 (N, K) row-major (a linear's weight as stored),
 * scale bfloat16 (N,) as its bit patterns (the recipe's scales, exactly; widened to
 * float32 here), y float32 (M, N). K must be a multiple of 8.
 *
 * Decode reads every weight once per step, so the kernel streams q once: four weight
 * rows at a time are widened to float32 in registers and multiplied into one or two
 * activation rows (eight accumulators), and the next pair of rows reuses them from
 * L1. The activations stay float32 (torch's _weight_int8pack_mm rounds them to
 * bfloat16 first).
 *
 * Batch-invariant by construction: each y[m, n] is the same sequence of float32 FMAs
 * (lane j of one accumulator takes k = j, j + 8, ... in order, then a fixed
 * horizontal sum), whatever M is and whichever rows share a batch, so a session's
 * result does not depend on its batch-mates.
 *
 * Threads: OpenMP over blocks of output channels, as many as the caller asks for;
 * loaded into a process where torch already holds libgomp.so.1, it shares torch's
 * OpenMP runtime and thread pool.
 */
#include "kernels.h"

static inline float sum_lanes(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 widen8(const int8_t *p) {  /* 8 int8 weights -> 8 float32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* rows m, m + 1 (two of them, or only m) against weight rows n .. n + 3 */
static void four_channels(const float *x, const int8_t *q, const uint16_t *scale, float *y,
                          int64_t m, int two_rows, int64_t n, int64_t N, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const int8_t *q0 = q + n * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
    const float *x0 = x + m * K, *x1 = x0 + K;
    if (two_rows) {
        for (int64_t k = 0; k < K; k += 8) {
            __m256 w0 = widen8(q0 + k), w1 = widen8(q1 + k);
            __m256 w2 = widen8(q2 + k), w3 = widen8(q3 + k);
            __m256 v = _mm256_loadu_ps(x0 + k);
            a0 = _mm256_fmadd_ps(v, w0, a0);
            a1 = _mm256_fmadd_ps(v, w1, a1);
            a2 = _mm256_fmadd_ps(v, w2, a2);
            a3 = _mm256_fmadd_ps(v, w3, a3);
            v = _mm256_loadu_ps(x1 + k);
            b0 = _mm256_fmadd_ps(v, w0, b0);
            b1 = _mm256_fmadd_ps(v, w1, b1);
            b2 = _mm256_fmadd_ps(v, w2, b2);
            b3 = _mm256_fmadd_ps(v, w3, b3);
        }
        float *row = y + (m + 1) * N + n;
        row[0] = sum_lanes(b0) * widen_bf16(scale[n]);
        row[1] = sum_lanes(b1) * widen_bf16(scale[n + 1]);
        row[2] = sum_lanes(b2) * widen_bf16(scale[n + 2]);
        row[3] = sum_lanes(b3) * widen_bf16(scale[n + 3]);
    } else {
        for (int64_t k = 0; k < K; k += 8) {
            __m256 v = _mm256_loadu_ps(x0 + k);
            a0 = _mm256_fmadd_ps(v, widen8(q0 + k), a0);
            a1 = _mm256_fmadd_ps(v, widen8(q1 + k), a1);
            a2 = _mm256_fmadd_ps(v, widen8(q2 + k), a2);
            a3 = _mm256_fmadd_ps(v, widen8(q3 + k), a3);
        }
    }
    float *row = y + m * N + n;
    row[0] = sum_lanes(a0) * widen_bf16(scale[n]);
    row[1] = sum_lanes(a1) * widen_bf16(scale[n + 1]);
    row[2] = sum_lanes(a2) * widen_bf16(scale[n + 2]);
    row[3] = sum_lanes(a3) * widen_bf16(scale[n + 3]);
}

/* the last N % 4 channels, one at a time, with the same per-channel arithmetic */
static void one_channel(const float *x, const int8_t *q, const uint16_t *scale, float *y,
                        int64_t m, int64_t n, int64_t N, int64_t K) {
    __m256 a = _mm256_setzero_ps();
    const int8_t *qn = q + n * K;
    const float *xm = x + m * K;
    for (int64_t k = 0; k < K; k += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), widen8(qn + k), a);
    y[m * N + n] = sum_lanes(a) * widen_bf16(scale[n]);
}

int teeshard_int8_matmul_avx2(const float *x, const int8_t *q, const uint16_t *scale, float *y,
                              int64_t M, int64_t N, int64_t K, int threads) {
    if (K % 8 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t m = 0; m < M; m += 2)
            four_channels(x, q, scale, y, m, m + 1 < M, 4 * b, N, K);
    for (int64_t n = 4 * blocks; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            one_channel(x, q, scale, y, m, n, N, K);
    return 0;
}
