/* Decode attention for a batch of sessions in one call: each session's single new
 * query against its own KV cache, for one layer (AVX2 and FMA).
 *
 * For session i (row rows[i] of the packed batch, position starts[i] in its own
 * sequence) and each key/value head g it writes the new key and value into the
 * session's cache at that position, then for each of the G = H / Hkv query heads
 * that share g:
 *
 *   s_j = (q . k_j) * scale         over the cached positions j in [first, end)
 *   p_j = exp(s_j - max s) / sum    (float32)
 *   out = sum_j p_j v_j             stored in the cache's dtype
 *
 * where end = starts[i] + 1 and first = end - window for a sliding window that the
 * sequence has passed (else 0): what one_query_attention in transformer.py computes
 * with a dozen torch operators per session and layer, whose dispatch, not their
 * arithmetic, was most of a batched decode step's cost outside its products. All
 * arithmetic is float32; keys and values in bfloat16 are widened exactly.
 *
 * Tensors: q (N, H, D) rows q + n * q_row, likewise k and v (N, Hkv, D) with their
 * row strides, all in the cache dtype (heads and dims contiguous); out (N, H, D)
 * contiguous. A session's cache slab for this layer is (Hkv, S_i, D) contiguous,
 * at k_bases[i] + layer * Hkv * S_i * D elements (likewise v_bases), S_i = lengths[i].
 * D a multiple of 8, at most 256.
 *
 * Batch-invariant: a session's result is the same sequence of operations whatever
 * the other sessions are. Threads: OpenMP over (session, key/value head) pairs.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define MAX_HEAD_DIM 256

static inline __m256 load8(const void *base, int64_t index, int bf16) {
    if (!bf16)
        return _mm256_loadu_ps((const float *)base + index);
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + index)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline uint16_t round_bf16(float value) { /* round to nearest even (finite values) */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static void copy_row(void *dst, const void *src, int64_t D, int bf16) {
    memcpy(dst, src, (size_t)D * (bf16 ? 2 : 4));
}

/* one query head: scores over n keys from `keys` (n, D), then the weighted values */
static void one_head(const void *q, const void *keys, const void *values, int64_t n,
                     int64_t D, float scale, int bf16, float *scores, void *out) {
    __m256 query[MAX_HEAD_DIM / 8];
    for (int64_t d = 0; d < D; d += 8)
        query[d / 8] = load8(q, d, bf16);
    float top = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        __m256 dot = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8)
            dot = _mm256_fmadd_ps(query[d / 8], load8(keys, j * D + d, bf16), dot);
        scores[j] = sum8(dot) * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    int64_t padded = (n + 7) & ~(int64_t)7;
    for (int64_t j = n; j < padded; j++)
        scores[j] = top; /* computed, then dropped below */
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + j, e);
    }
    for (int64_t j = n; j < padded; j++)
        scores[j] = 0.0f;
    for (int64_t j = 0; j < padded; j += 8)
        total = _mm256_add_ps(total, _mm256_loadu_ps(scores + j));
    float inverse = 1.0f / sum8(total);
    __m256 acc[MAX_HEAD_DIM / 8];
    for (int64_t d = 0; d < D; d += 8)
        acc[d / 8] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m256 p = _mm256_set1_ps(scores[j] * inverse);
        for (int64_t d = 0; d < D; d += 8)
            acc[d / 8] = _mm256_fmadd_ps(p, load8(values, j * D + d, bf16), acc[d / 8]);
    }
    for (int64_t d = 0; d < D; d += 8) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[d / 8]);
        for (int l = 0; l < 8; l++) {
            if (bf16)
                ((uint16_t *)out)[d + l] = round_bf16(lanes[l]);
            else
                ((float *)out)[d + l] = lanes[l];
        }
    }
}

int teeshard_decode_attention(int64_t sessions, const int64_t *rows, const int64_t *starts,
                              const int64_t *lengths, const int64_t *k_bases,
                              const int64_t *v_bases, int64_t layer, const void *q,
                              int64_t q_row, const void *k, int64_t k_row, const void *v,
                              int64_t v_row, void *out, int64_t H, int64_t Hkv, int64_t D,
                              int64_t window, int bf16, int threads) {
    if (sessions < 0 || H <= 0 || Hkv <= 0 || H % Hkv != 0 || D % 8 != 0 || D <= 0 ||
        D > MAX_HEAD_DIM || window < 0 || threads < 1)
        return -1;
    for (int64_t i = 0; i < sessions; i++)
        if (starts[i] < 0 || starts[i] >= lengths[i])
            return -3;
    const size_t item = bf16 ? 2 : 4;
    const int64_t group = H / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    int status = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t task = 0; task < sessions * Hkv; task++) {
        int64_t i = task / Hkv, g = task % Hkv, row = rows[i], length = lengths[i];
        int64_t end = starts[i] + 1;
        int64_t first = window > 0 && end > window ? end - window : 0;
        char *slab_k = (char *)(intptr_t)k_bases[i] + (size_t)((layer * Hkv + g) * length * D) * item;
        char *slab_v = (char *)(intptr_t)v_bases[i] + (size_t)((layer * Hkv + g) * length * D) * item;
        copy_row(slab_k + (size_t)(starts[i] * D) * item,
                 (const char *)k + (size_t)(row * k_row + g * D) * item, D, bf16);
        copy_row(slab_v + (size_t)(starts[i] * D) * item,
                 (const char *)v + (size_t)(row * v_row + g * D) * item, D, bf16);
        int64_t n = end - first;
        float *scores = malloc((size_t)(n + 8) * sizeof(float));
        if (scores == NULL) {
#pragma omp atomic write
            status = -2;
            continue;
        }
        for (int64_t h = g * group; h < (g + 1) * group; h++)
            one_head((const char *)q + (size_t)(row * q_row + h * D) * item,
                     slab_k + (size_t)(first * D) * item, slab_v + (size_t)(first * D) * item,
                     n, D, scale, bf16, scores, (char *)out + (size_t)((row * H + h) * D) * item);
        free(scores);
    }
    return status;
}
