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
#include "avx2_rows.h"

static inline __m256 widen8_bf16(const uint16_t *p) {  /* 8 bfloat16 -> 8 float32, exact */
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

#define UNSCALED(c) 1.0f /* exact: the sum as it is */
AVX2_ROWS_BY_FOUR_CHANNELS(bf16_rows1, 1, uint16_t, widen8_bf16, UNSCALED)
AVX2_ROWS_BY_FOUR_CHANNELS(bf16_rows2, 2, uint16_t, widen8_bf16, UNSCALED)

int teeshard_bf16_matmul_avx2(const float *x, const uint16_t *wb, float *y, int64_t M,
                              int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 4 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    AVX2_FOUR_CHANNEL_BLOCKS(bf16_rows1, bf16_rows2, x, wb, NULL, y, M, N, K, threads);
    return 0;
}
