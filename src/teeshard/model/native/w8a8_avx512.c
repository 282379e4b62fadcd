/* int8 weights times int8 activations (W8A8) for x86 CPUs with AVX-512 VNNI: the same
 * product as w8a8_avx2.c, bit for bit, with one multiply-accumulate instruction
 * (vpdpbusd) doing 64 byte products and their sums into 32 bits.
 *
 *   y[m, n] = (float)(sum_k xq[m, k] * q[n, k]) * (sx[m] * scale[n])
 *
 * Each row of x is quantized exactly as w8a8_avx2.c quantizes it (per row, symmetric,
 * amax / 127, round half to even; every step one IEEE float32 operation), and the
 * weight comes in the same blocked layout, qb[n / 4][k / 16][n % 4][k % 16]: one
 * 64-byte line holds 16 inputs of four channels, which is one zmm register.
 *
 * vpdpbusd multiplies unsigned bytes by signed bytes, and AVX-512 has no vpsignb to
 * move the activation's sign onto the weight as the AVX2 kernel does. So the
 * activations go in offset: u = xq + 128 in [1, 255], and
 *
 *   sum_k xq * q = sum_k u * q - 128 * sum_k q,
 *
 * where sum_k q (per channel) comes from one more vpdpbusd per line against bytes of
 * 1, shared by every row of the pass. A channel's sum is spread over four 32-bit
 * lanes of K / 4 products each, so no lane passes 255 * 127 * K / 4 < 2^31 (K < 2^17)
 * and every sum is exact: the same integers as the AVX2 kernel and the torch
 * reference, and so the same float32 outputs, whatever a row's batch-mates.
 *
 * Per line and per row: one broadcast of 16 activation bytes to the four 128-bit
 * lanes and one vpdpbusd; up to eight rows share each weight load. The four 32-bit
 * lanes of a channel are summed once per row at the end.
 *
 * Threads: OpenMP over blocks of output channels, as many as the caller asks for.
 */
#include <stdlib.h>

#include "kernels.h"

#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define PREFETCH_AHEAD 2048 /* bytes: 32 cache lines, as the other kernels */
#define VNNI_MAX_ROWS 8

/* x float32 (M, K) -> u = xq + 128 as bytes (M, K), and sx (M,): w8a8_avx2.c's values */
VNNI static void quantize_rows_offset(const float *x, int64_t M, int64_t K, uint8_t *u,
                                      float *sx) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m128i offset = _mm_set1_epi8((char)0x80);
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m512 top = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16)
            top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        float amax = _mm512_reduce_max_ps(top); /* a maximum: the order cannot matter */
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        sx[m] = amax > 0.0f ? amax / 127.0f : 0.0f;
        const __m512 by = _mm512_set1_ps(inv);
        for (int64_t k = 0; k < K; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), by));
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi); /* round half even (MXCSR) */
            __m128i bytes = _mm512_cvtepi32_epi8(q);            /* exact: |q| <= 127 */
            _mm_storeu_si128((__m128i *)(u + m * K + k), _mm_xor_si128(bytes, offset));
        }
    }
}

/* rows m .. m + R - 1 against channels n .. n + 3; R constant after inlining */
VNNI static inline __attribute__((always_inline)) void vnni_rows(
    int R, const uint8_t *u, const float *sx, const int8_t *qb, const uint16_t *scale,
    float *y, int64_t m, int64_t n, int64_t N, int64_t K) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc[VNNI_MAX_ROWS], weight_sums = _mm512_setzero_si512();
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_si512();
    const int8_t *block = qb + n * K;
    const uint8_t *um = u + m * K;
    for (int64_t k = 0; k < K; k += 16) {
        const int8_t *line = block + 4 * k; /* 16 inputs of channels n .. n + 3 */
        _mm_prefetch((const char *)line + PREFETCH_AHEAD, _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512((const void *)line);
        weight_sums = _mm512_dpbusd_epi32(weight_sums, ones, w);
        for (int r = 0; r < R; r++) {
            __m512i a = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(um + r * K + k)));
            acc[r] = _mm512_dpbusd_epi32(acc[r], a, w);
        }
    }
    const __m512i correction = _mm512_slli_epi32(weight_sums, 7); /* 128 * sum_k q */
    for (int r = 0; r < R; r++) {
        int32_t lanes[16];
        _mm512_storeu_si512((void *)lanes, _mm512_sub_epi32(acc[r], correction));
        for (int c = 0; c < 4; c++) {
            int32_t sum = lanes[4 * c] + lanes[4 * c + 1] + lanes[4 * c + 2] + lanes[4 * c + 3];
            y[(m + r) * N + n + c] = (float)sum * (sx[m + r] * widen_bf16(scale[n + c]));
        }
    }
}

VNNI int teeshard_w8a8_matmul_avx512vnni(const float *x, const int8_t *qb,
                                         const uint16_t *scale, float *y, int64_t M,
                                         int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 4 != 0 || M < 0 || N < 0 || K >= (1 << 17) || threads < 1)
        return -1;
    if (M == 0)
        return 0;
    uint8_t *u = malloc((size_t)(M * K) + (size_t)M * sizeof(float) + 16);
    if (u == NULL)
        return -2;
    float *sx = (float *)(u + M * K); /* M * K is a multiple of 16: aligned */
    quantize_rows_offset(x, M, K, u, sx);
    int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m = 0;
        for (; m + VNNI_MAX_ROWS <= M; m += VNNI_MAX_ROWS)
            vnni_rows(VNNI_MAX_ROWS, u, sx, qb, scale, y, m, 4 * b, N, K);
        switch (M - m) {
        case 7: vnni_rows(7, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 6: vnni_rows(6, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 5: vnni_rows(5, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 4: vnni_rows(4, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 3: vnni_rows(3, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 2: vnni_rows(2, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 1: vnni_rows(1, u, sx, qb, scale, y, m, 4 * b, N, K); break;
        default: break;
        }
    }
    free(u);
    return 0;
}
