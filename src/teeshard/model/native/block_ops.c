/* A block's small float32 operators, each one call instead of a chain of torch's
 * (AVX2; one thread: a row is a few thousand floats, less work than a fork and join).
 *
 * A decode step does a few dozen of these per layer on one row, and each torch
 * operator pays its dispatch, several microseconds on caches that the layer's weight
 * stream has just flushed. Three chains are most of them:
 *
 *   RMS norm   y = weight * (x * (1 / sqrt(mean(x^2) + eps)))     8 operators in torch
 *   rotary     y = x * cos + rotate_half(x) * sin                  9 with the slicing
 *   SwiGLU     y = silu(gate) * up                                 3 with the split
 *
 * Each computes what transformer.py's torch code computes, in the same float32
 * operations: rotary bit for bit (the same two products and one sum per element,
 * no fused multiply-add: the library is built with -ffp-contract=off), the norm
 * but for its sum of squares, added here in another order, and SwiGLU but for its
 * exponential (both within a rounding or two of torch's). A row's result never
 * depends on the other rows.
 */
#include <math.h>

#include "kernels.h"

/* rows of x (row r at x + r * x_row, width floats) -> y (rows, width) contiguous */
int teeshard_rms_norm(const float *x, int64_t x_row, const float *weight, float eps,
                      float *y, int64_t rows, int64_t width) {
    if (rows < 0 || width <= 0 || x_row < width)
        return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *in = x + r * x_row;
        float *out = y + r * width;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        int64_t k = 0;
        for (; k + 32 <= width; k += 32)
            for (int a = 0; a < 4; a++) {
                __m256 v = _mm256_loadu_ps(in + k + 8 * a);
                acc[a] = _mm256_add_ps(acc[a], _mm256_mul_ps(v, v));
            }
        for (; k + 8 <= width; k += 8) {
            __m256 v = _mm256_loadu_ps(in + k);
            acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(v, v));
        }
        float squares = sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                           _mm256_add_ps(acc[2], acc[3])));
        for (; k < width; k++)
            squares += in[k] * in[k];
        float inv = 1.0f / sqrtf(squares / (float)width + eps); /* torch's rsqrt: 1 / sqrt */
        const __m256 by = _mm256_set1_ps(inv);
        k = 0;
        for (; k + 8 <= width; k += 8) {
            __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(in + k), by);
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(weight + k), scaled));
        }
        for (; k < width; k++)
            out[k] = weight[k] * (in[k] * inv);
    }
    return 0;
}

/* heads of head_dim floats each, row r of x at x + r * x_row (heads contiguous);
 * cos and sin (rows, head_dim) contiguous; y (rows, heads, head_dim) contiguous.
 * head_dim even. */
int teeshard_rope(const float *x, int64_t x_row, const float *cos, const float *sin,
                  float *y, int64_t rows, int64_t heads, int64_t head_dim) {
    if (rows < 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 || x_row < heads * head_dim)
        return -1;
    const int64_t half = head_dim / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *in = x + r * x_row + h * head_dim;
            float *out = y + (r * heads + h) * head_dim;
            int64_t i = 0;
            if (half % 8 == 0)
                for (; i < half; i += 8) {
                    __m256 first = _mm256_loadu_ps(in + i), second = _mm256_loadu_ps(in + half + i);
                    __m256 low = _mm256_add_ps(_mm256_mul_ps(first, _mm256_loadu_ps(c + i)),
                                               _mm256_mul_ps(_mm256_xor_ps(second, sign),
                                                             _mm256_loadu_ps(s + i)));
                    __m256 high = _mm256_add_ps(
                        _mm256_mul_ps(second, _mm256_loadu_ps(c + half + i)),
                        _mm256_mul_ps(first, _mm256_loadu_ps(s + half + i)));
                    _mm256_storeu_ps(out + i, low);
                    _mm256_storeu_ps(out + half + i, high);
                }
            for (; i < half; i++) {
                out[i] = in[i] * c[i] + (-in[half + i]) * s[i];
                out[half + i] = in[half + i] * c[half + i] + in[i] * s[half + i];
            }
        }
    }
    return 0;
}

/* SwiGLU's gate: rows of gate_up (rows, 2 * width) contiguous, the gate's width
 * floats then the up projection's -> y (rows, width) = silu(gate) * up, where
 * silu(g) = g / (1 + e^-g) as torch computes it (e^-g here by exp8, within about
 * 2e-7 of torch's, so the result within a rounding or two) */
int teeshard_silu_mul(const float *gate_up, float *y, int64_t rows, int64_t width) {
    if (rows < 0 || width <= 0)
        return -1;
    const __m256 one = _mm256_set1_ps(1.0f), top = _mm256_set1_ps(88.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        float *out = y + r * width;
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 e = exp8(_mm256_min_ps(_mm256_xor_ps(g, sign), top)); /* e^-g */
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
        for (; i < width; i++) {
            float g = gate[i];
            out[i] = g / (1.0f + expf(-g)) * up[i];
        }
    }
    return 0;
}
