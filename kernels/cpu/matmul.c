#include "kernels/cpu/matmul.h"
#include "kernels/cpu/convert.h"

/* Eight independent partial sums: lets the compiler vectorise without
 * reassociating, and keeps rounding error growth at O(k/8). */
float moe_cpu_dot(const float *a, const float *b, uint32_t k)
{
	float acc[8] = {0};
	uint32_t t = 0;

	for (; t + 8 <= k; t += 8)
		for (int l = 0; l < 8; l++)
			acc[l] += a[t + l] * b[t + l];
	for (; t < k; t++)
		acc[t & 7] += a[t] * b[t];
	return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void moe_cpu_matmul_nt(const float *x, size_t ldx, uint32_t m, uint32_t k, const void *w,
		       enum moe_dtype wdt, uint32_t n, float *y, size_t ldy, float *scratch)
{
	size_t esz = moe_dtype_size(wdt);

	/* Stream W once: widen a block of rows, then use it for every x row. */
	for (uint32_t j0 = 0; j0 < n; j0 += MOE_MATMUL_WBLOCK) {
		uint32_t nb = n - j0 < MOE_MATMUL_WBLOCK ? n - j0 : MOE_MATMUL_WBLOCK;

		moe_cpu_to_f32(wdt, (const char *)w + (size_t)j0 * k * esz, scratch,
			       (size_t)nb * k);
		for (uint32_t i = 0; i < m; i++) {
			const float *xi = x + (size_t)i * ldx;

			for (uint32_t b = 0; b < nb; b++)
				y[(size_t)i * ldy + j0 + b] =
					moe_cpu_dot(xi, scratch + (size_t)b * k, k);
		}
	}
}
