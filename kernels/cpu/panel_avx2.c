/* kernels/cpu/panel_avx2.c — AVX2 + FMA (+ F16C) path. Compiled with
 * -mavx2 -mfma -mf16c; only called when cpuid says the CPU has them.
 *
 * Micro-kernel: up to 6 tokens x 16 panel columns (12 ymm accumulators).
 * Per k it loads a panel's 16 weights once, broadcasts each token's x[k],
 * and issues 2 FMAs per token. With 1-3 tokens (decode) that would leave
 * 2-6 dependent FMA chains, fewer than latency x throughput (4 x 2): the
 * kernel then works on 2 or 4 panels at once, which gives 8-12 independent
 * chains while each output is still one sum in k order (so results do not
 * depend on m).
 *
 * SwiGLU: a token's 8 gate and 8 up sums of a panel are one ymm each, so
 * silu(g) * u runs as one vector with a polynomial e^x (exp_poly.h, within
 * 2 ulp of expf, as the bf16 paths' simd512.h) where 8 calls to expf took
 * 6 % of a prefill-bound load (the demo, perf). Elementwise, so a token's
 * h still does not depend on its batch.
 *
 * Widening: f16 by vcvtph2ps; bf16 as one 32-byte load whose 32-bit lanes
 * each hold two weights, split by a shift (the even columns) and a mask
 * (the odd ones): 1 load and 2 vector ops a step where zero-extending each
 * half took 2 loads and 4 (bench/RESULTS.md: with 1-4 tokens the kernel
 * ran 1.2-2x faster on data in cache). The accumulators then hold the even
 * and the odd columns; STORE puts them back in order. Each sum is the same
 * sequence of FMAs either way, so the results are bit for bit the same.
 *
 * 3 tokens x 2 panels needs 12 accumulators + 4 weights + 1 broadcast = 17
 * ymm registers, one more than AVX2 has: the spilled accumulator's store
 * and reload in every step made it the slowest tile (7.5 cycles a panel
 * step). It goes panel by panel instead, each panel's 2 weight registers
 * dead before the next panel's load, and broadcasts each x[k] again for
 * the second panel (15 registers; vbroadcastss from memory is a load, and
 * the volatile asm keeps the compiler from merging the two broadcasts
 * back into 3 live registers). */
#include <immintrin.h>

#include "kernels/cpu/exp_poly.h"
#include "kernels/cpu/panel.h"

#define MR 6
#define NPMAX 4

/* e^x for 8 floats (exp_poly.h), x clamped to [-86, 88.7]: 2^n is built
 * in the exponent bits as 2^(n-1) * 2, both normal for n in [-124, 128].
 * (Below -86, 1 + e^x is 1 in fp32 as it is for the true value, which is
 * all the SwiGLU asks of it.) */
static inline __attribute__((always_inline)) __m256 exp256(__m256 x)
{
	__m256 n, r, p, scale;

	x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.7f)), _mm256_set1_ps(-86.0f));
	n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(MOE_EXP_LOG2E)),
			    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(MOE_EXP_LN2_HI), x);
	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(MOE_EXP_LN2_LO), r);
	p = MOE_EXP_HORNER(_mm256_fmadd_ps, _mm256_set1_ps, r);
	p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
	scale = _mm256_castsi256_ps(_mm256_slli_epi32(
		_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23));
	return _mm256_mul_ps(_mm256_mul_ps(p, scale), _mm256_set1_ps(2.0f));
}

/* h[0..nv) = silu(g) * u = g / (1 + e^-g) * u for a token's 8 gate sums
 * s[0..8) and up sums s[8..16) */
static inline __attribute__((always_inline)) void silu_mul8(const float *s, float *h, uint32_t nv)
{
	__m256 g = _mm256_loadu_ps(s), u = _mm256_loadu_ps(s + 8);
	__m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
	__m256 v = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);

	if (nv == 8) {
		_mm256_storeu_ps(h, v);
	} else {
		__m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);

		_mm256_maskstore_ps(h, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nv), lane), v);
	}
}

static inline __attribute__((always_inline)) void load_w(enum moe_dtype dt, const void *p,
							  size_t c, __m256 *w0, __m256 *w1)
{
	if (dt == MOE_DT_F32) {
		*w0 = _mm256_loadu_ps((const float *)p + c * MOE_PANEL);
		*w1 = _mm256_loadu_ps((const float *)p + c * MOE_PANEL + 8);
		return;
	}
	const uint16_t *q = (const uint16_t *)p + c * MOE_PANEL;

	if (dt == MOE_DT_BF16) { /* w0: columns 0, 2, .., 14; w1: 1, 3, .., 15 */
		__m256i v = _mm256_loadu_si256((const __m256i *)q);

		*w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
		*w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
	} else {
		*w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
		*w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q + 1));
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
/* bf16: (even, odd) columns back to (0..7, 8..15) */
#define STORE(j, t)                                                                        \
	if (np > j && mr > t) {                                                            \
		if (dt == MOE_DT_BF16) {                                                   \
			__m256 lo = _mm256_unpacklo_ps(c##j##t##0, c##j##t##1);            \
			__m256 hi = _mm256_unpackhi_ps(c##j##t##0, c##j##t##1);            \
			c##j##t##0 = _mm256_permute2f128_ps(lo, hi, 0x20);                 \
			c##j##t##1 = _mm256_permute2f128_ps(lo, hi, 0x31);                 \
		}                                                                          \
		_mm256_storeu_ps(out[j][t], c##j##t##0);                                   \
		_mm256_storeu_ps(out[j][t] + 8, c##j##t##1);                               \
	}
#define STORES(j) STORE(j, 0) STORE(j, 1) STORE(j, 2) STORE(j, 3) STORE(j, 4) STORE(j, 5)

/* The 3 x 2 tile, one panel at a time (see the top of the file). */
#define TOKJ(j, t)                                                                         \
	{                                                                                  \
		__m256 xb;                                                                 \
		__asm__ volatile("vbroadcastss {%1, %0|%0, %1}" : "=x"(xb)                 \
				 : "m"(x[t * ldx + c]));                                   \
		c##j##t##0 = _mm256_fmadd_ps(xb, w##j##0, c##j##t##0);                     \
		c##j##t##1 = _mm256_fmadd_ps(xb, w##j##1, c##j##t##1);                     \
	}
#define PANEL_BY_PANEL(j)                                                                  \
	{                                                                                  \
		__m256 w##j##0, w##j##1;                                                   \
		load_w(dt, (const char *)p + j * pstride, c, &w##j##0, &w##j##1);          \
		TOKJ(j, 0) TOKJ(j, 1) TOKJ(j, 2)                                           \
	}

/* out[j][t][0..15] = sum_k x[t*ldx + k] * panel_j[k][0..15], j < np, t < mr;
 * panel j starts pstride bytes after panel j-1. */
static inline __attribute__((always_inline)) void tile(const float *x, size_t ldx, const void *p,
						       size_t pstride, enum moe_dtype dt,
						       uint32_t k, const int mr, const int np,
						       float out[NPMAX][MR][MOE_PANEL])
{
	ACCS(0) ACCS(1) ACCS(2) ACCS(3)

	for (uint32_t c = 0; c < k; c++) {
		if (mr == 3 && np == 2) {
			PANEL_BY_PANEL(0) PANEL_BY_PANEL(1)
			continue;
		}
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
	silu_mul8(s, h + (t) * ldh + (p) * 8, n_inter - (p) * 8 < 8 ? n_inter - (p) * 8 : 8)
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
