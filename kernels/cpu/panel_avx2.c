/* kernels/cpu/panel_avx2.c — AVX2 + FMA (+ F16C) path. Compiled with
 * -mavx2 -mfma -mf16c; only called when cpuid says the CPU has them.
 *
 * Micro-kernel: up to 6 tokens x 16 panel columns (12 ymm accumulators).
 * Per k it loads a panel's 16 weights once (widened from bf16 by a shift,
 * from f16 by vcvtph2ps), broadcasts each token's x[k], and issues 2 FMAs
 * per token. With 1-3 tokens (decode) that would leave 2-6 dependent FMA
 * chains, fewer than latency x throughput (4 x 2): the kernel then works on
 * 2 or 4 panels at once, which gives 8-12 independent chains while each
 * output is still one sum in k order (so results do not depend on m). */
#include <immintrin.h>

#include "kernels/cpu/panel.h"

#define MR 6
#define NPMAX 4

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

/* Named accumulators c<panel><token><half> (not an array) so the compiler
 * keeps them all in registers. */
#define ACC(j, t) __m256 c##j##t##0 = _mm256_setzero_ps(), c##j##t##1 = _mm256_setzero_ps();
#define ACCS(j) ACC(j, 0) ACC(j, 1) ACC(j, 2) ACC(j, 3) ACC(j, 4) ACC(j, 5)
#define LOADW(j)                                                                           \
	__m256 w##j##0, w##j##1;                                                           \
	if (np > j)                                                                        \
		load_w(dt, (const char *)p + j * pstride, c, &w##j##0, &w##j##1);
#define FMAJ(j, t)                                                                         \
	if (np > j) {                                                                      \
		c##j##t##0 = _mm256_fmadd_ps(xb, w##j##0, c##j##t##0);                     \
		c##j##t##1 = _mm256_fmadd_ps(xb, w##j##1, c##j##t##1);                     \
	}
#define TOK(t)                                                                             \
	if (mr > t) {                                                                      \
		__m256 xb = _mm256_broadcast_ss(x + t * ldx + c);                          \
		FMAJ(0, t) FMAJ(1, t) FMAJ(2, t) FMAJ(3, t)                                \
	}
#define STORE(j, t)                                                                        \
	if (np > j && mr > t) {                                                            \
		_mm256_storeu_ps(out[j][t], c##j##t##0);                                   \
		_mm256_storeu_ps(out[j][t] + 8, c##j##t##1);                               \
	}
#define STORES(j) STORE(j, 0) STORE(j, 1) STORE(j, 2) STORE(j, 3) STORE(j, 4) STORE(j, 5)

/* out[j][t][0..15] = sum_k x[t*ldx + k] * panel_j[k][0..15], j < np, t < mr;
 * panel j starts pstride bytes after panel j-1. */
static inline __attribute__((always_inline)) void tile(const float *x, size_t ldx, const void *p,
						       size_t pstride, enum moe_dtype dt,
						       uint32_t k, const int mr, const int np,
						       float out[NPMAX][MR][MOE_PANEL])
{
	ACCS(0) ACCS(1) ACCS(2) ACCS(3)

	for (uint32_t c = 0; c < k; c++) {
		LOADW(0) LOADW(1) LOADW(2) LOADW(3)
		TOK(0) TOK(1) TOK(2) TOK(3) TOK(4) TOK(5)
	}
	STORES(0) STORES(1) STORES(2) STORES(3)
}

typedef void (*tile_fn)(const float *, size_t, const void *, size_t, uint32_t,
			float[NPMAX][MR][MOE_PANEL]);

#define TILE(DT, NAME, M, N)                                                               \
	static void tile_##NAME##_##M##_##N(const float *x, size_t ldx, const void *p,     \
					    size_t ps, uint32_t k,                         \
					    float out[NPMAX][MR][MOE_PANEL])               \
	{                                                                                  \
		tile(x, ldx, p, ps, DT, k, M, N, out);                                     \
	}
#define TILES(DT, NAME)                                                                    \
	TILE(DT, NAME, 1, 1) TILE(DT, NAME, 2, 1) TILE(DT, NAME, 3, 1) TILE(DT, NAME, 4, 1) \
	TILE(DT, NAME, 5, 1) TILE(DT, NAME, 6, 1) TILE(DT, NAME, 1, 4) TILE(DT, NAME, 2, 2) \
	TILE(DT, NAME, 3, 2)
TILES(MOE_DT_F32, f32)
TILES(MOE_DT_BF16, bf16)
TILES(MOE_DT_F16, f16)

/* tiles[dt][mr] = {one-panel kernel, multi-panel kernel or NULL} */
#define ROW(NAME)                                                                          \
	{                                                                                  \
		{NULL, NULL}, {tile_##NAME##_1_1, tile_##NAME##_1_4},                      \
			{tile_##NAME##_2_1, tile_##NAME##_2_2},                            \
			{tile_##NAME##_3_1, tile_##NAME##_3_2}, {tile_##NAME##_4_1, NULL}, \
			{tile_##NAME##_5_1, NULL}, {tile_##NAME##_6_1, NULL},              \
	}
static const tile_fn tiles[3][MR + 1][2] = {
	[MOE_DT_F32] = ROW(f32),
	[MOE_DT_BF16] = ROW(bf16),
	[MOE_DT_F16] = ROW(f16),
};
static const int multi_np[MR + 1] = {0, 4, 2, 2, 1, 1, 1};

/* Runs the tiles over n_panels panels and m tokens; emit(j, t, sums) gets
 * each token's 16 sums of panel j. */
#define FOR_TILES(EMIT)                                                                    \
	do {                                                                               \
		float out[NPMAX][MR][MOE_PANEL];                                           \
		size_t ps = (size_t)k * MOE_PANEL * moe_dtype_size(dt);                    \
		for (uint32_t t0 = 0; t0 < m; t0 += MR) {                                  \
			uint32_t mr = m - t0 < MR ? m - t0 : MR;                           \
			for (uint32_t j0 = 0; j0 < n_panels;) {                            \
				int np = multi_np[mr];                                     \
				tile_fn f = tiles[dt][mr][1];                              \
				if (np == 1 || n_panels - j0 < (uint32_t)np) {             \
					np = 1;                                            \
					f = tiles[dt][mr][0];                              \
				}                                                          \
				f(x + t0 * ldx, ldx, (const char *)panels + j0 * ps, ps, k, \
				  out);                                                    \
				for (int j = 0; j < np; j++)                               \
					for (uint32_t t = 0; t < mr; t++)                  \
						EMIT(j0 + j, t0 + t, out[j][t]);           \
				j0 += (uint32_t)np;                                        \
			}                                                                  \
		}                                                                          \
	} while (0)

static void avx2_gate_up(const float *x, size_t ldx, uint32_t m, const void *panels,
			 enum moe_dtype dt, uint32_t k, uint32_t n_inter, float *h, size_t ldh)
{
	uint32_t n_panels = (n_inter + 7) / 8;

#define EMIT_GU(p, t, s)                                                                   \
	do {                                                                               \
		uint32_t nv = n_inter - (p) * 8 < 8 ? n_inter - (p) * 8 : 8;               \
		for (uint32_t i = 0; i < nv; i++)                                          \
			h[(t) * ldh + (p) * 8 + i] = moe_silu_mul((s)[i], (s)[8 + i]);     \
	} while (0)
	FOR_TILES(EMIT_GU);
}

static void avx2_rows(const float *x, size_t ldx, uint32_t m, const void *panels, enum moe_dtype dt,
		      uint32_t k, uint32_t n_rows, float *y, size_t ldy, const float *scale)
{
	uint32_t n_panels = (n_rows + MOE_PANEL - 1) / MOE_PANEL;

#define EMIT_ROWS(p, t, s)                                                                 \
	do {                                                                               \
		uint32_t nv = n_rows - (p) * MOE_PANEL < MOE_PANEL ? n_rows - (p) * MOE_PANEL \
								   : MOE_PANEL;           \
		float sc = scale ? scale[t] : 1.0f;                                        \
		for (uint32_t i = 0; i < nv; i++)                                          \
			y[(t) * ldy + (p) * MOE_PANEL + i] = scale ? sc * (s)[i] : (s)[i];  \
	} while (0)
	FOR_TILES(EMIT_ROWS);
}

const struct moe_cpu_kernels moe_cpu_kernels_avx2 = {
	.isa = MOE_ISA_AVX2,
	.gate_up = avx2_gate_up,
	.rows = avx2_rows,
};
