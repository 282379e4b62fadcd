/* float32 product for x86 CPUs with AVX-512: the float32 format's block linears and LM
 * head.
 *
 *   y[m, n] = sum_k x[m, k] * w[n, k]
 *
 * x float32 (M, K) row-major; y float32 (M, N). The weight w float32 (N, K) comes
 * blocked in this kernel's layout: wv[n / 16][k][n % 16] (native.block_weight with
 * block (16, 1)): one 64-byte line holds input k of 16 channels, which is what one
 * vfmadd231ps takes against a row's activation k (broadcast), leaving 16 channels'
 * sums in one register. N a multiple of 16 and K of 16.
 *
 * Why: oneDNN's packed float32 product read one core's weight stream at 10-13 GB/s
 * at one row on an AMD EPYC Zen 4 (TinyLlama's shapes), and MKL's product is slower
 * at more rows. This kernel streams 32 channels a pass (two sequential lines a step,
 * a software prefetch ahead), as the bfloat16 kernel does, at 20-27 GB/s there, and
 * with up to eight rows per weight load it reuses each line from the cache at
 * prefill (benchmarks/linear_rows.py).
 *
 * Batch-invariant by construction: a row's sums are the same sequence of FMAs (k = 0,
 * 1, 2, ... in order, per channel lane) whatever its batch-mates; no horizontal sums.
 *
 * Threads: OpenMP over pairs of 16-channel blocks, as many as the caller asks for.
 */
#include "kernels.h"

#define AVX512F32 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define PREFETCH_AHEAD 2048 /* bytes: 32 cache lines, as the other kernels */
#define F32_MAX_ROWS 8 /* EVERY_ROW_IN_BLOCKS_OF_EIGHT */
#define F32_MAX_BLOCKS 2 /* 16-channel blocks per pass: two weight streams */

/* rows m .. m + R - 1 against channels n .. n + 16 C - 1; R, C constant after inlining */
AVX512F32 static inline __attribute__((always_inline)) void f32_rows(
    int R, int C, const float *x, const float *wv, float *y, int64_t m, int64_t n, int64_t N,
    int64_t K) {
    __m512 acc[F32_MAX_BLOCKS][F32_MAX_ROWS];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++)
            acc[c][r] = _mm512_setzero_ps();
    const float *blocks = wv + n * K; /* block c of the pass: 16 K elements from here */
    const float *xm = x + m * K;
    for (int64_t k = 0; k < K; k++) {
        __m512 w[F32_MAX_BLOCKS];
        for (int c = 0; c < C; c++) {
            const float *line = blocks + c * 16 * K + 16 * k;
            _mm_prefetch((const char *)line + PREFETCH_AHEAD, _MM_HINT_T0);
            w[c] = _mm512_loadu_ps(line);
        }
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_set1_ps(xm[r * K + k]);
            for (int c = 0; c < C; c++)
                acc[c][r] = _mm512_fmadd_ps(w[c], a, acc[c][r]);
        }
    }
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++)
            _mm512_storeu_ps(y + (m + r) * N + n + 16 * c, acc[c][r]);
}

/* rows m .. m + R - 1 against the pass's channels (EVERY_PASS_AND_ROW's n and C) */
#define F32_PASS(R, m) f32_rows(R, C, x, wv, y, m, n, N, K)

AVX512F32 int teeshard_f32_matmul_avx512f(const float *x, const float *wv, float *y, int64_t M,
                                         int64_t N, int64_t K, int threads) {
    if (K % 16 != 0 || N % 16 != 0 || M < 0 || N < 0 || threads < 1)
        return -1;
    if (M == 0)
        return 0;
    EVERY_PASS_AND_ROW(M, N, F32_PASS);
    return 0;
}
