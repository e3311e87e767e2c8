#include "kernels/cpu/convert.h"

void moe_cpu_to_f32(enum moe_dtype dt, const void *src, float *dst, size_t n)
{
	const uint16_t *h = src;

	switch (dt) {
	case MOE_DT_F32:
		memcpy(dst, src, n * sizeof(float));
		break;
	case MOE_DT_BF16:
		for (size_t i = 0; i < n; i++)
			dst[i] = moe_bf16_to_f32(h[i]);
		break;
	case MOE_DT_F16:
		for (size_t i = 0; i < n; i++)
			dst[i] = moe_f16_to_f32(h[i]);
		break;
	}
}

void moe_cpu_from_f32(enum moe_dtype dt, const float *src, void *dst, size_t n)
{
	uint16_t *h = dst;

	switch (dt) {
	case MOE_DT_F32:
		memcpy(dst, src, n * sizeof(float));
		break;
	case MOE_DT_BF16:
		for (size_t i = 0; i < n; i++)
			h[i] = moe_f32_to_bf16(src[i]);
		break;
	case MOE_DT_F16:
		for (size_t i = 0; i < n; i++)
			h[i] = moe_f32_to_f16(src[i]);
		break;
	}
}

/* moe_round_to(BF16, .) without a branch, so that the compiler vectorizes
 * it (the CPU backend rounds every h to bf16 at bf16 precision: 2 % of a
 * prefill-bound load as a scalar loop): round to nearest even on the bits,
 * NaN kept quiet (the bits moe_f32_to_bf16 gives, widened). */
static void round_bf16(float *x, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint32_t u, r, q;

		memcpy(&u, &x[i], sizeof(u));
		r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
		q = (u | 0x400000u) & 0xffff0000u;
		u = (u & 0x7fffffffu) > 0x7f800000u ? q : r;
		memcpy(&x[i], &u, sizeof(u));
	}
}

void moe_cpu_round(enum moe_dtype dt, float *x, size_t n)
{
	if (dt == MOE_DT_F32)
		return;
	if (dt == MOE_DT_BF16) {
		round_bf16(x, n);
		return;
	}
	for (size_t i = 0; i < n; i++)
		x[i] = moe_round_to(dt, x[i]);
}

bool moe_cpu_representable(enum moe_dtype dt, const float *x, size_t n)
{
	float tmp[256];

	for (size_t i = 0; i < n; i += 256) {
		size_t k = n - i < 256 ? n - i : 256;

		memcpy(tmp, x + i, k * sizeof(float));
		moe_cpu_round(dt, tmp, k);
		if (memcmp(tmp, x + i, k * sizeof(float)))
			return false;
	}
	return true;
}
