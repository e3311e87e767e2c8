/* kernels/cpu/panel_avx2.c — AVX2 + FMA (+ F16C) path. Compiled with
 * -mavx2 -mfma -mf16c; only called when cpuid says the CPU has them.
 *
 * Micro-kernel: 6 tokens x 16 panel columns = 12 ymm accumulators. Per k it
 * loads the 16 weights of the panel once (widened from bf16 by a shift, from
 * f16 by vcvtph2ps), broadcasts each token's x[k], and issues 12 FMAs. */
#include <immintrin.h>

#include "kernels/cpu/panel.h"

#define MR 6

static inline __attribute__((always_inline)) void load_w(enum moe_dtype dt, const void *p,
							  size_t c, __m256 *w0, __m256 *w1)
{
	if (dt == MOE_DT_F32) {
		*w0 = _mm256_loadu_ps((const float *)p + c * MOE_PANEL);
		*w1 = _mm256_loadu_ps((const float *)p + c * MOE_PANEL + 8);
		return;
	}
	const __m128i *q = (const __m128i *)((const uint16_t *)p + c * MOE_PANEL);
	__m128i a = _mm_loadu_si128(q), b = _mm_loadu_si128(q + 1);

	if (dt == MOE_DT_BF16) {
		*w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
		*w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
	} else {
		*w0 = _mm256_cvtph_ps(a);
		*w1 = _mm256_cvtph_ps(b);
	}
}

/* out[t][0..15] = sum_k x[t*ldx + k] * panel[k][0..15], t < mr */
static inline __attribute__((always_inline)) void tile(const float *x, size_t ldx, const void *p,
						       enum moe_dtype dt, uint32_t k, const int mr,
						       float out[MR][MOE_PANEL])
{
	__m256 acc[MR][2];

	for (int t = 0; t < mr; t++)
		acc[t][0] = acc[t][1] = _mm256_setzero_ps();
	for (uint32_t c = 0; c < k; c++) {
		__m256 w0, w1;

		load_w(dt, p, c, &w0, &w1);
		for (int t = 0; t < mr; t++) {
			__m256 xb = _mm256_broadcast_ss(x + t * ldx + c);

			acc[t][0] = _mm256_fmadd_ps(xb, w0, acc[t][0]);
			acc[t][1] = _mm256_fmadd_ps(xb, w1, acc[t][1]);
		}
	}
	for (int t = 0; t < mr; t++) {
		_mm256_storeu_ps(out[t], acc[t][0]);
		_mm256_storeu_ps(out[t] + 8, acc[t][1]);
	}
}

typedef void (*tile_fn)(const float *, size_t, const void *, uint32_t, float[MR][MOE_PANEL]);

#define TILE(DT, N, NAME)                                                                  \
	static void tile_##NAME##_##N(const float *x, size_t ldx, const void *p, uint32_t k, \
				      float out[MR][MOE_PANEL])                            \
	{                                                                                  \
		tile(x, ldx, p, DT, k, N, out);                                            \
	}
#define TILES(DT, NAME)                                                                    \
	TILE(DT, 1, NAME)                                                                  \
	TILE(DT, 2, NAME)                                                                  \
	TILE(DT, 3, NAME) TILE(DT, 4, NAME) TILE(DT, 5, NAME) TILE(DT, 6, NAME)
TILES(MOE_DT_F32, f32)
TILES(MOE_DT_BF16, bf16)
TILES(MOE_DT_F16, f16)

static const tile_fn tiles[3][MR + 1] = {
	[MOE_DT_F32] = {NULL, tile_f32_1, tile_f32_2, tile_f32_3, tile_f32_4, tile_f32_5,
			tile_f32_6},
	[MOE_DT_BF16] = {NULL, tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4, tile_bf16_5,
			 tile_bf16_6},
	[MOE_DT_F16] = {NULL, tile_f16_1, tile_f16_2, tile_f16_3, tile_f16_4, tile_f16_5,
			tile_f16_6},
};

static void avx2_gate_up(const float *x, size_t ldx, uint32_t m, const void *panel,
			 enum moe_dtype dt, uint32_t k, float *h, size_t ldh, uint32_t nvalid)
{
	float out[MR][MOE_PANEL];

	for (uint32_t t0 = 0; t0 < m; t0 += MR) {
		uint32_t mr = m - t0 < MR ? m - t0 : MR;

		tiles[dt][mr](x + t0 * ldx, ldx, panel, k, out);
		for (uint32_t t = 0; t < mr; t++)
			for (uint32_t j = 0; j < nvalid; j++)
				h[(t0 + t) * ldh + j] = moe_silu_mul(out[t][j], out[t][8 + j]);
	}
}

static void avx2_rows(const float *x, size_t ldx, uint32_t m, const void *panel, enum moe_dtype dt,
		      uint32_t k, float *y, size_t ldy, uint32_t nvalid, const float *scale)
{
	float out[MR][MOE_PANEL];

	for (uint32_t t0 = 0; t0 < m; t0 += MR) {
		uint32_t mr = m - t0 < MR ? m - t0 : MR;

		tiles[dt][mr](x + t0 * ldx, ldx, panel, k, out);
		for (uint32_t t = 0; t < mr; t++) {
			float s = scale ? scale[t0 + t] : 1.0f;

			for (uint32_t j = 0; j < nvalid; j++)
				y[(t0 + t) * ldy + j] = scale ? s * out[t][j] : out[t][j];
		}
	}
}

const struct moe_cpu_kernels moe_cpu_kernels_avx2 = {
	.isa = MOE_ISA_AVX2,
	.gate_up = avx2_gate_up,
	.rows = avx2_rows,
};
