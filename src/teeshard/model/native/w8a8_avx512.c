/* int8 weights times int8 activations (W8A8) for x86 CPUs with AVX-512 VNNI: the same
 * product as w8a8_avx2.c, bit for bit, with one multiply-accumulate instruction
 * (vpdpbusd) doing 64 byte products and their sums into 32 bits.
 *
 *   y[m, n] = (float)(sum_k xq[m, k] * q[n, k]) * (sx[m] * scale[n])
 *
 * Each row of x is quantized exactly as w8a8_avx2.c quantizes it (per row, symmetric,
 * amax / 127, round half to even; every step one IEEE float32 operation). The weight
 * q int8 (N, K) comes in this kernel's own blocked layout,
 * qv[n / 16][k / 4][n % 16][k % 4] (native.block_weight with block (16, 4)): one
 * 64-byte line holds 4 inputs of 16 channels, so one vpdpbusd takes a line and a
 * row's 4 activation bytes broadcast from memory, and leaves 16 channels' sums in
 * the 16 lanes of one register: no shuffles in the loop and no horizontal sums.
 * (With the other kernels' layout, 16 inputs of 4 channels a line, each row needed
 * a 128-bit broadcast per line and a horizontal sum per channel; this one is 1.4-1.6x
 * faster at 8 and 16 rows and no slower at one.) N a multiple of 16, K of 16.
 *
 * vpdpbusd multiplies unsigned bytes by signed bytes, and AVX-512 has no vpsignb to
 * move the activation's sign onto the weight as the AVX2 kernel does. So the
 * activations go in offset: u = xq + 128 in [1, 255], and
 *
 *   sum_k xq * q = sum_k u * q - 128 * sum_k q,
 *
 * where sum_k q (per channel) comes from one more vpdpbusd per line against bytes of
 * 1, shared by every row of the pass. The offset sum can pass 2^31 (255 * 127 * K
 * for K near 2^17); vpdpbusd (not its saturating twin vpdpbusds) and the subtraction
 * wrap modulo 2^32, and the true sum, at most 127 * 127 * K < 2^31 in magnitude
 * (K < 2^17), is the only int32 congruent to the wrapped difference: every sum is
 * exact, the same integers as the AVX2 kernel and the torch reference, and so the
 * same float32 outputs, whatever a row's batch-mates.
 *
 * Up to eight rows share each weight load.
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
        float inv;
        sx[m] = w8a8_row_scale(amax, &inv);
        const __m512 by = _mm512_set1_ps(inv);
        for (int64_t k = 0; k < K; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), by));
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi); /* round half even (MXCSR) */
            __m128i bytes = _mm512_cvtepi32_epi8(q);            /* exact: |q| <= 127 */
            _mm_storeu_si128((__m128i *)(u + m * K + k), _mm_xor_si128(bytes, offset));
        }
    }
}

/* rows m .. m + R - 1 against channels n .. n + 15; R constant after inlining */
VNNI static inline __attribute__((always_inline)) void vnni_rows(
    int R, const uint8_t *u, const float *sx, const int8_t *qv, const uint16_t *scale,
    float *y, int64_t m, int64_t n, int64_t N, int64_t K) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc[VNNI_MAX_ROWS], weight_sums = _mm512_setzero_si512();
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_si512();
    const int8_t *block = qv + n * K;
    const uint8_t *um = u + m * K;
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t *line = block + 16 * k; /* inputs k .. k + 3 of channels n .. n + 15 */
        _mm_prefetch((const char *)line + PREFETCH_AHEAD, _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512((const void *)line);
        weight_sums = _mm512_dpbusd_epi32(weight_sums, ones, w);
        for (int r = 0; r < R; r++) {
            int32_t four; /* the row's 4 bytes, broadcast by the instruction's load */
            memcpy(&four, um + r * K + k, sizeof four);
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(four), w);
        }
    }
    const __m512i correction = _mm512_slli_epi32(weight_sums, 7); /* 128 * sum_k q */
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(scale + n)));
    const __m512 scales = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); /* exact */
    for (int r = 0; r < R; r++) {
        __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], correction));
        __m512 row_scales = _mm512_mul_ps(_mm512_set1_ps(sx[m + r]), scales);
        _mm512_storeu_ps(y + (m + r) * N + n, _mm512_mul_ps(sums, row_scales));
    }
}

VNNI int teeshard_w8a8_matmul_avx512vnni(const float *x, const int8_t *qv,
                                         const uint16_t *scale, float *y, int64_t M,
                                         int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 16 != 0 || M < 0 || N < 0 || K >= (1 << 17) || threads < 1)
        return -1;
    if (M == 0)
        return 0;
    uint8_t *u = malloc((size_t)(M * K) + (size_t)M * sizeof(float) + 16);
    if (u == NULL)
        return -2;
    float *sx = (float *)(u + M * K); /* M * K is a multiple of 16: aligned */
    quantize_rows_offset(x, M, K, u, sx);
    int64_t blocks = N / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
#define VNNI_ROWS(R, m) vnni_rows(R, u, sx, qv, scale, y, m, 16 * b, N, K)
        EVERY_ROW_IN_BLOCKS_OF_EIGHT(M, VNNI_ROWS);
#undef VNNI_ROWS
    }
    free(u);
    return 0;
}
