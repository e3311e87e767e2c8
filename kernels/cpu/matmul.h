/* kernels/cpu/matmul.h — y = x · Wᵀ with fp32 activations and weights in
 * their checkpoint dtype (nn.Linear layout: W is [n, k], row-major).
 *
 * This is the portable reference path; the SIMD paths of the CPU-speed work
 * slot in behind the same signature. */
#ifndef MOE_CPU_MATMUL_H
#define MOE_CPU_MATMUL_H

#include "kernels/dtype.h"

/* Rows of W widened per block: scratch must hold MOE_MATMUL_WBLOCK * k floats. */
#define MOE_MATMUL_WBLOCK 4

/* y[i*ldy + j] = sum_t x[i*ldx + t] * W[j*k + t]   for i < m, j < n
 * (accumulated in fp32). Overwrites y. */
void moe_cpu_matmul_nt(const float *x, size_t ldx, uint32_t m, uint32_t k, const void *w,
		       enum moe_dtype wdt, uint32_t n, float *y, size_t ldy, float *scratch);

/* One fp32 dot product of length k, the summation order used by matmul. */
float moe_cpu_dot(const float *a, const float *b, uint32_t k);

#endif
