/* int8 weights times int8 activations (W8A8) for x86 CPUs with AVX2: teeshard's kernel
 * for the w8a8 format.
 *
 *   y[m, n] = (float)(sum_k xq[m, k] * q[n, k]) * (sx[m] * scale[n])
 *
 * x float32 (M, K) row-major; each row is quantized here, per row and symmetric:
 *   amax = max_k |x[m, k]|, inv = 127 / amax, xq = round_half_even(x * inv) clamped
 *   to [-127, 127], sx = amax / 127 (a zero row: xq = 0, sx = 0),
 * every step one IEEE float32 operation, so torch computes the same values (the
 * reference path in teeshard.model.quantize does, bit for bit). Rows holding NaN or
 * infinity have no defined result (a node refuses such hidden states before any
 * product runs). The weight q int8
 * (N, K) comes blocked, qb[n / 4][k / 16][n % 4][k % 16] (native.block_weight), as
 * the other kernels read it; scale bfloat16 (N,) as bit patterns. N a multiple of 4,
 * K of 16.
 *
 * The sum is exact in int32 (|xq * q| <= 127 * 127 and K < 2^17), so its order does
 * not matter: the result is batch-invariant and the same on every machine, whatever
 * kernel computes it. Per 16 inputs of four channels (one 64-byte line) and per row:
 * vpsignb moves the activation's sign onto the weight, vpmaddubsw multiplies |xq|
 * (unsigned) by it into 16-bit pairs (at most 2 * 127 * 127 = 32258: no saturation),
 * vpmaddwd widens the pairs into 32-bit sums. That is 32 products per multiply
 * instruction against the float kernels' 8, and no widening of the weights, so the
 * cost of a batch grows far slower with its rows. Up to four rows share each weight
 * load.
 *
 * Threads: OpenMP over blocks of output channels, as many as the caller asks for.
 */
#include <stdlib.h>

#include "avx2_rows.h"

#define W8A8_MAX_ROWS 4

static void quantize_rows(const float *x, int64_t M, int64_t K, uint8_t *xa, int8_t *xs,
                          float *sx) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m256 top = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8)
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(row + k)));
        float lanes[8], amax = 0.0f;
        _mm256_storeu_ps(lanes, top);
        for (int j = 0; j < 8; j++)
            amax = lanes[j] > amax ? lanes[j] : amax;
        float inv;
        sx[m] = w8a8_row_scale(amax, &inv);
        const __m256 by = _mm256_set1_ps(inv);
        for (int64_t k = 0; k < K; k += 8) {
            __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), by));
            q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi); /* round half even (MXCSR) */
            int32_t values[8];
            _mm256_storeu_si256((__m256i *)values, q);
            for (int j = 0; j < 8; j++) {
                xs[m * K + k + j] = (int8_t)values[j];
                xa[m * K + k + j] = (uint8_t)(values[j] < 0 ? -values[j] : values[j]);
            }
        }
    }
}

static inline int32_t sum4(__m128i v) { /* the 4 lanes (exact: integers) */
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(v);
}

/* rows m .. m + R - 1 against channels n .. n + 3; R constant after inlining */
static inline __attribute__((always_inline)) void w8a8_rows(
    int R, const uint8_t *xa, const int8_t *xs, const float *sx, const int8_t *qb,
    const uint16_t *scale, float *y, int64_t m, int64_t n, int64_t N, int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[W8A8_MAX_ROWS][2];
    for (int r = 0; r < R; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int8_t *block = qb + n * K;
    for (int64_t k = 0; k < K; k += 16) {
        const int8_t *step = block + 4 * k; /* channels n, n + 1 | n + 2, n + 3 */
        _mm_prefetch((const char *)step + PREFETCH_AHEAD, _MM_HINT_T0);
        __m256i w01 = _mm256_loadu_si256((const __m256i *)step);
        __m256i w23 = _mm256_loadu_si256((const __m256i *)(step + 32));
        for (int r = 0; r < R; r++) {
            __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xa + (m + r) * K + k)));
            __m256i s = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xs + (m + r) * K + k)));
            __m256i p01 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(w01, s));
            __m256i p23 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(w23, s));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p01, ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p23, ones));
        }
    }
    for (int r = 0; r < R; r++) {
        int32_t sums[4] = {
            sum4(_mm256_castsi256_si128(acc[r][0])), sum4(_mm256_extracti128_si256(acc[r][0], 1)),
            sum4(_mm256_castsi256_si128(acc[r][1])), sum4(_mm256_extracti128_si256(acc[r][1], 1)),
        };
        for (int c = 0; c < 4; c++)
            y[(m + r) * N + n + c] = (float)sums[c] * (sx[m + r] * widen_bf16(scale[n + c]));
    }
}

int teeshard_w8a8_matmul_avx2(const float *x, const int8_t *qb, const uint16_t *scale, float *y,
                              int64_t M, int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 4 != 0 || M < 0 || N < 0 || K >= (1 << 17) || threads < 1)
        return -1;
    if (M == 0)
        return 0;
    uint8_t *xa = malloc((size_t)(M * K * 2) + (size_t)M * sizeof(float));
    if (xa == NULL)
        return -2;
    int8_t *xs = (int8_t *)(xa + M * K);
    float *sx = (float *)(xa + 2 * M * K); /* 2 * M * K is a multiple of 32: aligned */
    quantize_rows(x, M, K, xa, xs, sx);
    int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            w8a8_rows(4, xa, xs, sx, qb, scale, y, m, 4 * b, N, K);
        switch (M - m) {
        case 3: w8a8_rows(3, xa, xs, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 2: w8a8_rows(2, xa, xs, sx, qb, scale, y, m, 4 * b, N, K); break;
        case 1: w8a8_rows(1, xa, xs, sx, qb, scale, y, m, 4 * b, N, K); break;
        default: break;
        }
    }
    free(xa);
    return 0;
}
