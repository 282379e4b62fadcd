/* bfloat16-weight product for x86 CPUs with AVX2 and FMA but no BF16 instructions.
 *
 *   y[m, n] = sum_k x[m, k] * w[n, k]
 *
 * x float32 (M, K) row-major, y float32 (M, N); the weight w bfloat16 (N, K), as bit
 * patterns, comes *blocked* like the int8 kernels' weight, in elements:
 * wb[n / 4][k / 16][n % 4][k % 16] (native.block_weight makes it), so the four
 * channels one pass computes lie in one sequential stream, 128 bytes (two cache
 * lines) per step of 16 inputs. N must be a multiple of 4 and K of 16.
 *
 * Why: without AVX-512 BF16 (AMD Zen 3, older Xeons, many laptops) oneDNN has no
 * bfloat16 path and torch's generic bfloat16 product costs about one product per
 * row of a batch, decoding at about float32's speed although it reads half the
 * bytes. A bfloat16 value is the top half of a float32, so widening is exact and
 * cheap (zero-extend, shift left 16): this kernel streams the weight once per step
 * like the int8 kernel, with float32 FMAs, a software prefetch 2 KiB ahead, and one
 * or two activation rows per pass over four channels (eight accumulators).
 *
 * Batch-invariant by construction, as the int8 kernels: lane j of y[m, n]'s
 * accumulator takes k = j, j + 8, ... in order, then a fixed horizontal sum,
 * whatever M is and whichever rows share a batch.
 */
#include "kernels.h"

#define PREFETCH_AHEAD 2048 /* bytes */

static inline float sum_lanes(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 widen8_bf16(const uint16_t *p) {  /* 8 bfloat16 -> 8 float32, exact */
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* activation rows m .. m + R - 1 against channels n .. n + 3 (block n / 4) */
#define ROWS_BY_FOUR_CHANNELS(R)                                                        \
    static void bf16_rows##R(const float *x, const uint16_t *wb, float *y, int64_t m,   \
                             int64_t n, int64_t N, int64_t K) {                         \
        __m256 acc[R][4];                                                               \
        for (int r = 0; r < R; r++)                                                     \
            for (int c = 0; c < 4; c++)                                                 \
                acc[r][c] = _mm256_setzero_ps();                                        \
        const uint16_t *block = wb + n * K; /* four channels' K * 4 values, blocked */  \
        const float *xm = x + m * K;                                                    \
        for (int64_t k = 0; k < K; k += 16) {                                           \
            const uint16_t *step = block + 4 * k; /* 64 values, 128 bytes */            \
            _mm_prefetch((const char *)step + PREFETCH_AHEAD, _MM_HINT_T0);             \
            _mm_prefetch((const char *)step + PREFETCH_AHEAD + 64, _MM_HINT_T0);        \
            for (int half = 0; half < 16; half += 8) {                                  \
                __m256 w0 = widen8_bf16(step + half), w1 = widen8_bf16(step + 16 + half); \
                __m256 w2 = widen8_bf16(step + 32 + half);                              \
                __m256 w3 = widen8_bf16(step + 48 + half);                              \
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
                y[(m + r) * N + n + c] = sum_lanes(acc[r][c]);                          \
    }
ROWS_BY_FOUR_CHANNELS(1)
ROWS_BY_FOUR_CHANNELS(2)

int teeshard_bf16_matmul_avx2(const float *x, const uint16_t *wb, float *y, int64_t M,
                              int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 4 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2)
            bf16_rows2(x, wb, y, m, 4 * b, N, K);
        if (m < M)
            bf16_rows1(x, wb, y, m, 4 * b, N, K);
    }
    return 0;
}
