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

/* the w8a8 recipe's row scale (each kernel computes amax its own way; a maximum is exact):
 * returns sx = amax / 127 and sets *inv = 127 / amax, both 0 for a zero row; one IEEE
 * float32 division each, as teeshard.model.quantize.quantize_rows_int8 makes them */
static inline float w8a8_row_scale(float amax, float *inv) {
    *inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    return amax > 0.0f ? amax / 127.0f : 0.0f;
}

#endif
