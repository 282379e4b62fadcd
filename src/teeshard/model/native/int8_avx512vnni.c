/* Weight-only int8 product for x86 CPUs with AVX-512 VNNI: each activation row
 * quantized to 16 bits, and integer products whose sums are exact.
 *
 *   y[m, n] = (float)(sum_k xq[m, k] * q[n, k]) * (sx[m] * scale[n])
 *
 * Each row of x is quantized per row and symmetric to 16 bits: amax = max_k |x[m, k]|,
 * inv = 32767 / amax, xq = round_half_even(x * inv) clamped to [-32767, 32767],
 * sx = amax / 32767 (each one IEEE float32 operation; a zero row gives zeros and sx
 * 0), as teeshard.model.quantize.quantize_rows_int16 does. That is a finer grid than
 * bfloat16's 8 significant bits for every element within 1/64 of its row's largest.
 *
 * Why: the other int8 kernels widen every weight to float32 before a float FMA (three
 * instructions per 16 weights), and that, not memory, set their pace: on a Zen 4
 * core, one thread, the int8_avx512.c kernel took 0.63-0.78 ms for one row of the
 * 5632 -> 2048 down projection (15-18 GB/s), 1.8-1.9 ms for eight. Here the weight is
 * never widened, vpdpbusd multiplies its bytes as they are: 0.44-0.46 ms and 0.97-1.0
 * (the whole int8 TinyLlama, one thread: decode 17.4 tok/s against 15.6, prefill
 * 82 against 49).
 *
 * vpdpbusd takes unsigned bytes times signed bytes, so each quantized row goes in
 * offset and split into bytes: u = xq + 32768 in [1, 65535], u = 256 * hi + lo, and
 *
 *   sum_k xq * q = 256 * sum_k hi * q + sum_k lo * q - 32768 * sum_k q,
 *
 * three int32 sums (two per row, one per channel shared by every row of the pass),
 * each exact while 255 * 127 * K < 2^31 (K < 2^16: the kernel refuses wider), and
 * combined in 64 bits, exact too. So every sum is the true integer, converted to
 * float32 once: the same bits as the torch reference
 * (teeshard.model.quantize.int8_a16_reference), whatever a row's batch-mates.
 *
 * The weight comes in the w8a8 kernel's layout, qv[n / 16][k / 4][n % 16][k % 4]
 * (native.block_weight with block (16, 4)): one 64-byte line is 4 inputs of 16
 * channels, the 16 channels' sums stay in the 16 lanes of a register. N a multiple
 * of 16, K of 16. Up to eight rows share each weight load.
 *
 * Threads: OpenMP over blocks of 16 output channels, as many as the caller asks for.
 */
#include <stdlib.h>

#include "kernels.h"

#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define PREFETCH_AHEAD 2048 /* bytes: 32 cache lines, as the other kernels */
#define A16_MAX_ROWS 8

/* x float32 (M, K) -> sx (M,) and, for each block of R rows (eight, or the rest in the
 * last), 8 R bytes per step of 4 inputs: row r's 8 at r * 8, the high bytes of
 * u = xq + 32768 for the 4 inputs, then their low bytes. So a pass reads its rows'
 * bytes as one sequential stream, 8 R of them for every 64-byte line of weight. */
VNNI static void quantize_rows_split(const float *x, int64_t M, int64_t K, uint8_t *lines,
                                     float *sx) {
    const __m512i least = _mm512_set1_epi32(-32767), most = _mm512_set1_epi32(32767);
    const __m512i offset = _mm512_set1_epi32(32768), low_byte = _mm512_set1_epi32(0xff);
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m512 top = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16)
            top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        float amax = _mm512_reduce_max_ps(top); /* a maximum: the order cannot matter */
        float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        sx[m] = amax > 0.0f ? amax / 32767.0f : 0.0f;
        const __m512 by = _mm512_set1_ps(inv);
        int64_t first = m - m % A16_MAX_ROWS, stride = 8 * (M - first < 8 ? M - first : 8);
        uint8_t *out = lines + first * 2 * K + (m - first) * 8;
        for (int64_t k = 0; k < K; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), by));
            q = _mm512_min_epi32(_mm512_max_epi32(q, least), most); /* half even (MXCSR) */
            __m512i u = _mm512_add_epi32(q, offset);                /* [1, 65535] */
            __m128i high = _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8));
            __m128i low = _mm512_cvtepi32_epi8(_mm512_and_si512(u, low_byte));
            __m128i steps01 = _mm_unpacklo_epi32(high, low), steps23 = _mm_unpackhi_epi32(high, low);
            uint8_t *step = out + (k / 4) * stride;
            _mm_storel_epi64((__m128i *)step, steps01);
            _mm_storeh_pd((double *)(step + stride), _mm_castsi128_pd(steps01));
            _mm_storel_epi64((__m128i *)(step + 2 * stride), steps23);
            _mm_storeh_pd((double *)(step + 3 * stride), _mm_castsi128_pd(steps23));
        }
    }
}

/* 256 * h + l - 32768 * w for 8 int32 lanes each, in int64, rounded once to float32 */
VNNI static inline __m256 exact_sum8(__m256i h, __m256i l, __m256i w) {
    __m512i sum = _mm512_slli_epi64(_mm512_cvtepi32_epi64(h), 8);
    sum = _mm512_add_epi64(sum, _mm512_cvtepi32_epi64(l));
    sum = _mm512_sub_epi64(sum, _mm512_slli_epi64(_mm512_cvtepi32_epi64(w), 15));
    return _mm512_cvtepi64_ps(sum); /* round to nearest even (MXCSR) */
}

/* rows m .. m + R - 1 (m a multiple of 8) against channels n .. n + 15; R constant
 * after inlining */
VNNI static inline __attribute__((always_inline)) void a16_rows(
    int R, const uint8_t *lines, const float *sx, const int8_t *qv, const uint16_t *scale,
    float *y, int64_t m, int64_t n, int64_t N, int64_t K) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc_hi[A16_MAX_ROWS], acc_lo[A16_MAX_ROWS], weight_sums = _mm512_setzero_si512();
    for (int r = 0; r < R; r++)
        acc_hi[r] = acc_lo[r] = _mm512_setzero_si512();
    const int8_t *block = qv + n * K;
    const uint8_t *rows = lines + m * 2 * K; /* this block's bytes: 2 K a row */
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t *line = block + 16 * k; /* inputs k .. k + 3 of channels n .. n + 15 */
        const uint8_t *step = rows + 2 * R * k; /* the rows' bytes for those inputs */
        _mm_prefetch((const char *)line + PREFETCH_AHEAD, _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512((const void *)line);
        weight_sums = _mm512_dpbusd_epi32(weight_sums, ones, w);
        for (int r = 0; r < R; r++) {
            int32_t four_hi, four_lo; /* the row's 4 bytes each, broadcast */
            memcpy(&four_hi, step + 8 * r, sizeof four_hi);
            memcpy(&four_lo, step + 8 * r + 4, sizeof four_lo);
            acc_hi[r] = _mm512_dpbusd_epi32(acc_hi[r], _mm512_set1_epi32(four_hi), w);
            acc_lo[r] = _mm512_dpbusd_epi32(acc_lo[r], _mm512_set1_epi32(four_lo), w);
        }
    }
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(scale + n)));
    const __m512 scales = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); /* exact */
    const __m256i w_low = _mm512_castsi512_si256(weight_sums);
    const __m256i w_high = _mm512_extracti64x4_epi64(weight_sums, 1);
    for (int r = 0; r < R; r++) {
        __m256 low = exact_sum8(_mm512_castsi512_si256(acc_hi[r]),
                                _mm512_castsi512_si256(acc_lo[r]), w_low);
        __m256 high = exact_sum8(_mm512_extracti64x4_epi64(acc_hi[r], 1),
                                 _mm512_extracti64x4_epi64(acc_lo[r], 1), w_high);
        __m512 sums = _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
        __m512 row_scales = _mm512_mul_ps(_mm512_set1_ps(sx[m + r]), scales);
        _mm512_storeu_ps(y + (m + r) * N + n, _mm512_mul_ps(sums, row_scales));
    }
}

VNNI int teeshard_int8_matmul_avx512vnni(const float *x, const int8_t *qv,
                                         const uint16_t *scale, float *y, int64_t M,
                                         int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 16 != 0 || M < 0 || N < 0 || K >= (1 << 16) || threads < 1)
        return -1;
    if (M == 0)
        return 0;
    uint8_t *lines = malloc((size_t)(2 * M * K) + (size_t)M * sizeof(float));
    if (lines == NULL)
        return -2;
    float *sx = (float *)(lines + 2 * M * K); /* 2 M K is a multiple of 32: aligned */
    quantize_rows_split(x, M, K, lines, sx);
    int64_t blocks = N / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
#define A16_ROWS(R, m) a16_rows(R, lines, sx, qv, scale, y, m, 16 * b, N, K)
        EVERY_ROW_IN_BLOCKS_OF_EIGHT(M, A16_ROWS);
#undef A16_ROWS
    }
    free(lines);
    return 0;
}
