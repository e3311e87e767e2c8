/* kernels/cpu/convert.h — bulk dtype conversion. */
#ifndef MOE_CPU_CONVERT_H
#define MOE_CPU_CONVERT_H

#include <stdbool.h>

#include "kernels/dtype.h"

/* dst[i] = (float)src[i] */
void moe_cpu_to_f32(enum moe_dtype dt, const void *src, float *dst, size_t n);
/* dst[i] = (dt)src[i], round to nearest even */
void moe_cpu_from_f32(enum moe_dtype dt, const float *src, void *dst, size_t n);
/* x[i] = round_to(dt, x[i]): the value a tensor of dtype dt would hold */
void moe_cpu_round(enum moe_dtype dt, float *x, size_t n);
/* Whether every x[i] survives a round trip through dt (bit for bit) */
bool moe_cpu_representable(enum moe_dtype dt, const float *x, size_t n);

#endif
