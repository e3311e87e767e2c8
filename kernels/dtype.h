/* kernels/dtype.h — element types of weights and activations, and scalar
 * conversions (round-to-nearest-even, NaN kept NaN).
 *
 * The engine computes in fp32; weights stay in the checkpoint's dtype and are
 * widened as they are read. */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

enum moe_dtype {
	MOE_DT_F32 = 0,
	MOE_DT_BF16 = 1,
	MOE_DT_F16 = 2,
};

static inline size_t moe_dtype_size(enum moe_dtype dt)
{
	return dt == MOE_DT_F32 ? 4 : 2;
}

static inline const char *moe_dtype_name(enum moe_dtype dt)
{
	return dt == MOE_DT_F32 ? "f32" : dt == MOE_DT_BF16 ? "bf16" : "f16";
}

static inline float moe_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static inline uint32_t moe_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

static inline float moe_bf16_to_f32(uint16_t h)
{
	return moe_bits_f32((uint32_t)h << 16);
}

/* Round to nearest even; a NaN stays a (quiet) NaN. Written as a select,
 * not a branch, so that loops over it vectorize (moe_cpu_round). */
static inline uint16_t moe_f32_to_bf16(float f)
{
	uint32_t u = moe_f32_bits(f);
	uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16, nan = (u >> 16) | 0x40;

	return (uint16_t)((u & 0x7fffffff) > 0x7f800000 ? nan : rounded);
}

static inline float moe_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;

	if (exp == 0x1f) /* inf / NaN */
		return moe_bits_f32(sign | 0x7f800000 | (man << 13));
	if (exp == 0) {
		/* zero or subnormal: man * 2^-24 */
		float v = (float)man * (1.0f / 16777216.0f);
		return sign ? -v : v;
	}
	return moe_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t moe_f32_to_f16(float f)
{
	uint32_t u = moe_f32_bits(f);
	uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
	uint32_t a = u & 0x7fffffff;

	if (a > 0x7f800000) /* NaN */
		return sign | 0x7e00;
	if (a >= 0x477ff000) /* rounds to >= 65520: inf */
		return sign | 0x7c00;
	if (a < 0x38800000) {
		/* below the smallest normal (2^-14): subnormal or zero. Adding
		 * 0.5 as float does the RNE at the 2^-24 position. */
		float v = moe_bits_f32(a) + 0.5f;
		return sign | (uint16_t)(moe_f32_bits(v) - 0x3f000000u);
	}
	/* normal: rebias exponent, round mantissa to 10 bits (RNE) */
	a += ((uint32_t)(15 - 127) << 23) + 0xfff + ((a >> 13) & 1);
	return sign | (uint16_t)(a >> 13);
}

/* Value of x after a round trip through dt (what the model would hold). */
static inline float moe_round_to(enum moe_dtype dt, float x)
{
	if (dt == MOE_DT_BF16)
		return moe_bf16_to_f32(moe_f32_to_bf16(x));
	if (dt == MOE_DT_F16)
		return moe_f16_to_f32(moe_f32_to_f16(x));
	return x;
}

#endif
