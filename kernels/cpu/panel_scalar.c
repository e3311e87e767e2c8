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

static void scalar_gate_up(const float *x, size_t ldx, uint32_t m, const void *panels,
			   enum moe_dtype dt, uint32_t k, uint32_t n_inter, float *h, size_t ldh)
{
	size_t pbytes = (size_t)k * MOE_PANEL * moe_dtype_size(dt);
	float acc[MOE_PANEL];

	for (uint32_t p = 0; p * 8 < n_inter; p++) {
		uint32_t nv = n_inter - p * 8 < 8 ? n_inter - p * 8 : 8;

		for (uint32_t t = 0; t < m; t++) {
			panel_dot(x + t * ldx, (const char *)panels + p * pbytes, dt, k, acc);
			for (uint32_t j = 0; j < nv; j++)
				h[t * ldh + p * 8 + j] = moe_silu_mul(acc[j], acc[8 + j]);
		}
	}
}

static void scalar_rows(const float *x, size_t ldx, uint32_t m, const void *panels,
			enum moe_dtype dt, uint32_t k, uint32_t n_rows, float *y, size_t ldy,
			const float *scale)
{
	size_t pbytes = (size_t)k * MOE_PANEL * moe_dtype_size(dt);
	float acc[MOE_PANEL];

	for (uint32_t p = 0; p * MOE_PANEL < n_rows; p++) {
		uint32_t nv = n_rows - p * MOE_PANEL < MOE_PANEL ? n_rows - p * MOE_PANEL : MOE_PANEL;

		for (uint32_t t = 0; t < m; t++) {
			panel_dot(x + t * ldx, (const char *)panels + p * pbytes, dt, k, acc);
			for (uint32_t j = 0; j < nv; j++)
				y[t * ldy + p * MOE_PANEL + j] = scale ? scale[t] * acc[j] : acc[j];
		}
	}
}

const struct moe_cpu_kernels moe_cpu_kernels_scalar = {
	.isa = MOE_ISA_SCALAR,
	.gate_up = scalar_gate_up,
	.rows = scalar_rows,
};
