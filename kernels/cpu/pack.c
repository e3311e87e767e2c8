#include <string.h>

#include "kernels/cpu/panel.h"

/* dst[c * MOE_PANEL + col] = src[c] for c < k, in elements of esz bytes */
static void scatter_col(char *dst, const char *src, uint32_t k, size_t esz, uint32_t col)
{
	if (esz == 2) {
		uint16_t *d = (uint16_t *)dst + col;
		const uint16_t *s = (const uint16_t *)src;

		for (uint32_t c = 0; c < k; c++)
			d[(size_t)c * MOE_PANEL] = s[c];
	} else {
		uint32_t *d = (uint32_t *)dst + col;
		const uint32_t *s = (const uint32_t *)src;

		for (uint32_t c = 0; c < k; c++)
			d[(size_t)c * MOE_PANEL] = s[c];
	}
}

size_t moe_pack_rows_bytes(uint32_t n, uint32_t k, enum moe_dtype dt)
{
	return (size_t)((n + MOE_PANEL - 1) / MOE_PANEL) * k * MOE_PANEL * moe_dtype_size(dt);
}

void moe_pack_rows(const void *w, uint32_t n, uint32_t k, enum moe_dtype dt, void *dst)
{
	size_t esz = moe_dtype_size(dt);
	char *d = dst;

	memset(dst, 0, moe_pack_rows_bytes(n, k, dt));
	for (uint32_t r = 0; r < n; r++) {
		char *panel = d + (size_t)(r / MOE_PANEL) * k * MOE_PANEL * esz;
		const char *src = (const char *)w + (size_t)r * k * esz;

		scatter_col(panel, src, k, esz, r % MOE_PANEL);
	}
}

size_t moe_pack_gate_up_bytes(uint32_t inter, uint32_t k, enum moe_dtype dt)
{
	return (size_t)((inter + 7) / 8) * k * MOE_PANEL * moe_dtype_size(dt);
}

void moe_pack_gate_up(const void *gate, const void *up, uint32_t inter, uint32_t k,
		      enum moe_dtype dt, void *dst)
{
	size_t esz = moe_dtype_size(dt);
	char *d = dst;

	memset(dst, 0, moe_pack_gate_up_bytes(inter, k, dt));
	for (uint32_t r = 0; r < inter; r++) {
		char *panel = d + (size_t)(r / 8) * k * MOE_PANEL * esz;
		const char *g = (const char *)gate + (size_t)r * k * esz;
		const char *u = (const char *)up + (size_t)r * k * esz;

		scatter_col(panel, g, k, esz, r % 8);
		scatter_col(panel, u, k, esz, 8 + r % 8);
	}
}

const struct moe_cpu_kernels *moe_cpu_kernels_for(enum moe_cpu_isa isa)
{
	switch (isa) {
	case MOE_ISA_AMX:	 /* their f32/f16 models and the router run */
	case MOE_ISA_AVX512BF16: /* the avx512 kernels */
	case MOE_ISA_AVX512:
		return &moe_cpu_kernels_avx512;
	case MOE_ISA_AVX2:
		return &moe_cpu_kernels_avx2;
	default:
		return &moe_cpu_kernels_scalar;
	}
}
