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

#endif
