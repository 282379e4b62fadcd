/* Weight-only int8 product for x86 CPUs with AVX2 and FMA: teeshard's own kernel
 * (int8_avx512.c is the same product sixteen lanes wide, for CPUs with AVX-512).
 *
 *   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
 *
 * x float32 (M, K) row-major, scale bfloat16 (N,) as its bit patterns (the recipe's
 * scales, exactly; widened to float32 here), y float32 (M, N). The weight q int8
 * (N, K) comes *blocked*, in the layout the AVX-512 kernel reads:
 * qb[n / 4][k / 16][n % 4][k % 16] (native.block_weight makes it), so the four
 * channels one pass computes lie in one sequential stream, one 64-byte cache line
 * per step of 16 inputs. N must be a multiple of 4 and K of 16.
 *
 * Why blocked: decode reads every weight once, and one core keeps the memory bus
 * busy only if its loads run ahead sequentially. On the row-major weight the four
 * channels were four streams K bytes apart; blocked, with a software prefetch 2 KiB
 * ahead, one AMD EPYC (Zen 3) core took a TinyLlama gate/up product (2048 -> 11264)
 * from 2.06 to 1.24 ms at one row and the LM head (2048 -> 32000) from 5.8 to 3.5 ms
 * (prefetch distances of 1, 2 and 4 KiB measured; 2 and 4 tie).
 *
 * A step of 16 inputs is two steps of 8 lanes: each line's four 8-byte halves are
 * widened to float32 in registers and multiplied into one or two activation rows
 * (eight accumulators). The activations stay float32 (torch's _weight_int8pack_mm
 * rounds them to bfloat16 first).
 *
 * Batch-invariant by construction: each y[m, n] is the same sequence of float32 FMAs
 * (lane j of one accumulator takes k = j, j + 8, ... in order, then a fixed
 * horizontal sum), whatever M is and whichever rows share a batch, so a session's
 * result does not depend on its batch-mates. (The same sums, bit for bit, as this
 * kernel gave on the row-major weight before it read the blocked one.)
 *
 * Threads: OpenMP over blocks of output channels, as many as the caller asks for;
 * loaded into a process where torch already holds libgomp.so.1, it shares torch's
 * OpenMP runtime and thread pool.
 */
#include "avx2_rows.h"

static inline __m256 widen8(const int8_t *p) {  /* 8 int8 weights -> 8 float32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

#define CHANNEL_SCALE(c) widen_bf16(scale[n + (c)])
AVX2_ROWS_BY_FOUR_CHANNELS(int8_rows1, 1, int8_t, widen8, CHANNEL_SCALE)
AVX2_ROWS_BY_FOUR_CHANNELS(int8_rows2, 2, int8_t, widen8, CHANNEL_SCALE)

int teeshard_int8_matmul_avx2(const float *x, const int8_t *qb, const uint16_t *scale, float *y,
                              int64_t M, int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 4 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    AVX2_FOUR_CHANNEL_BLOCKS(int8_rows1, int8_rows2, x, qb, scale, y, M, N, K, threads);
    return 0;
}
