/* kernels/cpu/panel_avx512.c — AVX-512 (F, BW, VL + F16C) path. Compiled
 * with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; only called when cpuid
 * and xgetbv say the CPU and the OS support it.
 *
 * Micro-kernel: 12 tokens x 16 panel columns = 12 zmm accumulators; per k,
 * one 32-byte load of bf16/f16 weights widened to a zmm, 12 broadcasts and
 * 12 FMAs. fp32 FMA rather than vdpbf16ps: the dot-product instruction needs
 * the activations in bf16 too, which would round the SwiGLU output before
 * the down projection; this path keeps the fp32 semantics of the others. */
#include <immintrin.h>

#include "kernels/cpu/panel.h"

#define MR 12

static inline __attribute__((always_inline)) __m512 load_w(enum moe_dtype dt, const void *p,
							    size_t c)
{
	if (dt == MOE_DT_F32)
		return _mm512_loadu_ps((const float *)p + c * MOE_PANEL);

	__m256i a = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + c * MOE_PANEL));

	if (dt == MOE_DT_BF16)
		return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
	return _mm512_cvtph_ps(a);
}

static inline __attribute__((always_inline)) void tile(const float *x, size_t ldx, const void *p,
						       enum moe_dtype dt, uint32_t k, const int mr,
						       float out[MR][MOE_PANEL])
{
	__m512 acc[MR];

	for (int t = 0; t < mr; t++)
		acc[t] = _mm512_setzero_ps();
	for (uint32_t c = 0; c < k; c++) {
		__m512 w = load_w(dt, p, c);

		for (int t = 0; t < mr; t++)
			acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(x[t * ldx + c]), w, acc[t]);
	}
	for (int t = 0; t < mr; t++)
		_mm512_storeu_ps(out[t], acc[t]);
}

typedef void (*tile_fn)(const float *, size_t, const void *, uint32_t, float[MR][MOE_PANEL]);

#define TILE(DT, N, NAME)                                                                  \
	static void tile_##NAME##_##N(const float *x, size_t ldx, const void *p, uint32_t k, \
				      float out[MR][MOE_PANEL])                            \
	{                                                                                  \
		tile(x, ldx, p, DT, k, N, out);                                            \
	}
#define TILES(DT, NAME)                                                                    \
	TILE(DT, 1, NAME) TILE(DT, 2, NAME) TILE(DT, 3, NAME) TILE(DT, 4, NAME)            \
	TILE(DT, 5, NAME) TILE(DT, 6, NAME) TILE(DT, 7, NAME) TILE(DT, 8, NAME)            \
	TILE(DT, 9, NAME) TILE(DT, 10, NAME) TILE(DT, 11, NAME) TILE(DT, 12, NAME)
TILES(MOE_DT_F32, f32)
TILES(MOE_DT_BF16, bf16)
TILES(MOE_DT_F16, f16)

#define ROW(NAME)                                                                          \
	{                                                                                  \
		NULL, tile_##NAME##_1, tile_##NAME##_2, tile_##NAME##_3, tile_##NAME##_4,  \
			tile_##NAME##_5, tile_##NAME##_6, tile_##NAME##_7, tile_##NAME##_8, \
			tile_##NAME##_9, tile_##NAME##_10, tile_##NAME##_11,               \
			tile_##NAME##_12                                                   \
	}
static const tile_fn tiles[3][MR + 1] = {
	[MOE_DT_F32] = ROW(f32),
	[MOE_DT_BF16] = ROW(bf16),
	[MOE_DT_F16] = ROW(f16),
};

static void avx512_gate_up(const float *x, size_t ldx, uint32_t m, const void *panel,
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

static void avx512_rows(const float *x, size_t ldx, uint32_t m, const void *panel,
			enum moe_dtype dt, uint32_t k, float *y, size_t ldy, uint32_t nvalid,
			const float *scale)
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

const struct moe_cpu_kernels moe_cpu_kernels_avx512 = {
	.isa = MOE_ISA_AVX512,
	.gate_up = avx512_gate_up,
	.rows = avx512_rows,
};
