/* kernels/cpu/panel_scalar.c — the portable path: plain C over the same
 * packed panels, one fp32 sum per output in k order. */
#include "kernels/cpu/panel.h"

static inline float wval(enum moe_dtype dt, const void *p, size_t i)
{
	if (dt == MOE_DT_F32)
		return ((const float *)p)[i];
	if (dt == MOE_DT_BF16)
		return moe_bf16_to_f32(((const uint16_t *)p)[i]);
	return moe_f16_to_f32(((const uint16_t *)p)[i]);
}

/* acc[16] = sum_k x[k] * panel[k][0..15] */
static void panel_dot(const float *x, const void *panel, enum moe_dtype dt, uint32_t k,
		      float acc[MOE_PANEL])
{
	for (int j = 0; j < MOE_PANEL; j++)
		acc[j] = 0;
	for (uint32_t c = 0; c < k; c++) {
		float xv = x[c];

		for (int j = 0; j < MOE_PANEL; j++)
			acc[j] += xv * wval(dt, panel, (size_t)c * MOE_PANEL + j);
	}
}

static void scalar_gate_up(const float *x, size_t ldx, uint32_t m, const void *panel,
			   enum moe_dtype dt, uint32_t k, float *h, size_t ldh, uint32_t nvalid)
{
	float acc[MOE_PANEL];

	for (uint32_t t = 0; t < m; t++) {
		panel_dot(x + t * ldx, panel, dt, k, acc);
		for (uint32_t j = 0; j < nvalid; j++)
			h[t * ldh + j] = moe_silu_mul(acc[j], acc[8 + j]);
	}
}

static void scalar_rows(const float *x, size_t ldx, uint32_t m, const void *panel,
			enum moe_dtype dt, uint32_t k, float *y, size_t ldy, uint32_t nvalid,
			const float *scale)
{
	float acc[MOE_PANEL];

	for (uint32_t t = 0; t < m; t++) {
		float s = scale ? scale[t] : 1.0f;

		panel_dot(x + t * ldx, panel, dt, k, acc);
		for (uint32_t j = 0; j < nvalid; j++)
			y[t * ldy + j] = scale ? s * acc[j] : acc[j];
	}
}

const struct moe_cpu_kernels moe_cpu_kernels_scalar = {
	.isa = MOE_ISA_SCALAR,
	.gate_up = scalar_gate_up,
	.rows = scalar_rows,
};
