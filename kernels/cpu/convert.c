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

void moe_cpu_round(enum moe_dtype dt, float *x, size_t n)
{
	if (dt == MOE_DT_F32)
		return;
	if (dt == MOE_DT_BF16) { /* (its own loop: this one vectorizes) */
		for (size_t i = 0; i < n; i++)
			x[i] = moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
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
