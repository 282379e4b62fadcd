/* What teeshard's kernels share. */
#ifndef TEESHARD_KERNELS_H
#define TEESHARD_KERNELS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* a bfloat16 bit pattern as the float32 it stands for (exact) */
static inline float widen_bf16(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* the 8 lanes of an AVX2 register summed, in a fixed order */
static inline float sum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* e^x for x <= 88 (Cephes' polynomial; relative error about 2e-7; below -87, e^-87) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                               _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i exponent = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

/* the w8a8 recipe's row scale (each kernel computes amax its own way; a maximum is exact):
 * returns sx = amax / 127 and sets *inv = 127 / amax, both 0 for a zero row; one IEEE
 * float32 division each, as teeshard.model.quantize.quantize_rows_int8 makes them */
static inline float w8a8_row_scale(float amax, float *inv) {
    *inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    return amax > 0.0f ? amax / 127.0f : 0.0f;
}

/* ROWS(R, m) for rows m .. m + R - 1 of an M-row product: blocks of eight rows, then
 * the rest in one call, R a constant in every call (so that a kernel's row loop
 * inlines with its accumulators in registers) */
#define EVERY_ROW_IN_BLOCKS_OF_EIGHT(M, ROWS)                                          \
    do {                                                                             \
        int64_t row_ = 0;                                                            \
        for (; row_ + 8 <= (M); row_ += 8)                                           \
            ROWS(8, row_);                                                           \
        switch ((M) - row_) {                                                        \
        case 7: ROWS(7, row_); break;                                                \
        case 6: ROWS(6, row_); break;                                                \
        case 5: ROWS(5, row_); break;                                                \
        case 4: ROWS(4, row_); break;                                                \
        case 3: ROWS(3, row_); break;                                                \
        case 2: ROWS(2, row_); break;                                                \
        case 1: ROWS(1, row_); break;                                                \
        default: break;                                                              \
        }                                                                            \
    } while (0)

/* PASS(R, m) for every row of an M-row product and every pass over 32 of its N output
 * channels (16 in the last where N is not a multiple of 32), the passes shared among
 * `threads` OpenMP threads. Inside PASS, `n` is the pass's first channel and `C` its
 * 16-channel blocks (2, or 1), a constant in each branch. */
#define EVERY_PASS_AND_ROW(M, N, PASS)                                                 \
    do {                                                                             \
        int64_t passes_ = ((N) + 31) / 32;                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (int64_t pass_ = 0; pass_ < passes_; pass_++) {                          \
            int64_t n = 32 * pass_;                                                  \
            if (n + 32 <= (N)) {                                                     \
                const int C = 2;                                                     \
                EVERY_ROW_IN_BLOCKS_OF_EIGHT(M, PASS);                               \
            } else {                                                                 \
                const int C = 1;                                                     \
                EVERY_ROW_IN_BLOCKS_OF_EIGHT(M, PASS);                               \
            }                                                                        \
        }                                                                            \
    } while (0)

#endif
