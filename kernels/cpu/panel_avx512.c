/* kernels/cpu/panel_avx512.c — AVX-512 (F, BW, VL + F16C) path. Compiled
 * with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; only called when cpuid
 * and xgetbv say the CPU and the OS support it.
 *
 * Micro-kernel: 12 tokens x 16 panel columns = 12 zmm accumulators; per k,
 * one 32-byte load of bf16/f16 weights widened to a zmm, 12 broadcasts and
 * 12 FMAs. With 1-7 tokens (decode) that would leave fewer independent FMA
 * chains than latency x throughput (4 x 2): the kernel then works on 2 or
 * 4 panels at once (4-16 chains), each output still one sum in k order,
 * the same operations as the 12-token tile, so results do not depend on m
 * (a 1-token call on a small layer: 54 -> 28 µs, bench/RESULTS.md). fp32 FMA rather than vdpbf16ps: the dot-product instruction needs
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

/* Named accumulators so that all 12 stay in registers. */
#define ACC(t) __m512 c##t = _mm512_setzero_ps();
#define STEP(t)                                                                            \
	if (mr > t)                                                                        \
		c##t = _mm512_fmadd_ps(_mm512_set1_ps(x[t * ldx + c]), w, c##t);
#define STORE(t)                                                                           \
	if (mr > t)                                                                        \
		_mm512_storeu_ps(out[t], c##t);

static inline __attribute__((always_inline)) void tile(const float *x, size_t ldx, const void *p,
						       enum moe_dtype dt, uint32_t k, const int mr,
						       float out[MR][MOE_PANEL])
{
	ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5) ACC(6) ACC(7) ACC(8) ACC(9) ACC(10) ACC(11)

	for (uint32_t c = 0; c < k; c++) {
		__m512 w = load_w(dt, p, c);

		STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
		STEP(6) STEP(7) STEP(8) STEP(9) STEP(10) STEP(11)
	}
	STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
	STORE(6) STORE(7) STORE(8) STORE(9) STORE(10) STORE(11)
}

typedef void (*tile_fn)(const float *, size_t, const void *, uint32_t, float[MR][MOE_PANEL]);

/* The small-batch tiles: mr tokens x np panels (ps bytes apart). */
#define NPMAX 4
#define MMAX  7
static inline __attribute__((always_inline)) void multi(const float *x, size_t ldx, const void *p,
							 size_t ps, enum moe_dtype dt, uint32_t k,
							 const int mr, const int np,
							 float out[NPMAX][MR][MOE_PANEL])
{
	__m512 acc[NPMAX][MMAX];

#pragma GCC unroll 4
	for (int j = 0; j < NPMAX; j++)
#pragma GCC unroll 7
		for (int t = 0; t < MMAX; t++)
			acc[j][t] = _mm512_setzero_ps();
	for (uint32_t c = 0; c < k; c++) {
		__m512 w[NPMAX];

#pragma GCC unroll 4
		for (int j = 0; j < NPMAX; j++)
			w[j] = j < np ? load_w(dt, (const char *)p + j * ps, c) : _mm512_setzero_ps();
#pragma GCC unroll 7
		for (int t = 0; t < MMAX; t++) {
			if (t >= mr)
				break;
			__m512 xb = _mm512_set1_ps(x[t * ldx + c]);

#pragma GCC unroll 4
			for (int j = 0; j < NPMAX; j++)
				if (j < np)
					acc[j][t] = _mm512_fmadd_ps(xb, w[j], acc[j][t]);
		}
	}
#pragma GCC unroll 4
	for (int j = 0; j < NPMAX; j++)
#pragma GCC unroll 7
		for (int t = 0; t < MMAX; t++)
			if (j < np && t < mr)
				_mm512_storeu_ps(out[j][t], acc[j][t]);
}

typedef void (*multi_fn)(const float *, size_t, const void *, size_t, uint32_t,
			 float[NPMAX][MR][MOE_PANEL]);

#define MULTI(DT, NAME, M, N)                                                              \
	static void multi_##NAME##_##M(const float *x, size_t ldx, const void *p, size_t ps,  \
				       uint32_t k, float out[NPMAX][MR][MOE_PANEL])        \
	{                                                                                  \
		multi(x, ldx, p, ps, DT, k, M, N, out);                                    \
	}
#define MULTIS(DT, NAME)                                                                   \
	MULTI(DT, NAME, 1, 4) MULTI(DT, NAME, 2, 4) MULTI(DT, NAME, 3, 4)                  \
	MULTI(DT, NAME, 4, 2) MULTI(DT, NAME, 5, 2) MULTI(DT, NAME, 6, 2) MULTI(DT, NAME, 7, 2)
MULTIS(MOE_DT_F32, f32)
MULTIS(MOE_DT_BF16, bf16)
MULTIS(MOE_DT_F16, f16)
#define MROW(NAME)                                                                         \
	{                                                                                  \
		NULL, multi_##NAME##_1, multi_##NAME##_2, multi_##NAME##_3,                \
			multi_##NAME##_4, multi_##NAME##_5, multi_##NAME##_6,              \
			multi_##NAME##_7                                                   \
	}
static const multi_fn multis[3][MMAX + 1] = {
	[MOE_DT_F32] = MROW(f32),
	[MOE_DT_BF16] = MROW(bf16),
	[MOE_DT_F16] = MROW(f16),
};
static const int multi_np[MMAX + 1] = {0, 4, 4, 4, 2, 2, 2, 2};

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

/* Every panel of n_panels for every token of m: emit(ctx, panel, token,
 * its 16 sums). Tiles of 12 tokens x 1 panel, or for the last 1-7 tokens
 * the multi-panel tiles while np panels remain. */
static inline __attribute__((always_inline)) void
for_tiles(const float *x, size_t ldx, uint32_t m, const void *panels, enum moe_dtype dt,
	  uint32_t k, uint32_t n_panels, void (*emit)(void *, uint32_t, uint32_t, const float *),
	  void *ctx)
{
	size_t ps = (size_t)k * MOE_PANEL * moe_dtype_size(dt);
	float out[MR][MOE_PANEL], mo[NPMAX][MR][MOE_PANEL];

	for (uint32_t t0 = 0; t0 < m; t0 += MR) {
		uint32_t mr = m - t0 < MR ? m - t0 : MR, p = 0;

		if (mr <= MMAX)
			for (int np = multi_np[mr]; p + (uint32_t)np <= n_panels; p += (uint32_t)np) {
				multis[dt][mr](x + t0 * ldx, ldx, (const char *)panels + p * ps, ps, k,
					       mo);
				for (int j = 0; j < np; j++)
					for (uint32_t t = 0; t < mr; t++)
						emit(ctx, p + (uint32_t)j, t0 + t, mo[j][t]);
			}
		for (; p < n_panels; p++) {
			tiles[dt][mr](x + t0 * ldx, ldx, (const char *)panels + p * ps, k, out);
			for (uint32_t t = 0; t < mr; t++)
				emit(ctx, p, t0 + t, out[t]);
		}
	}
}

struct gu_ctx {
	float *h;
	size_t ldh;
	uint32_t n_inter;
};

static inline void emit_gate_up(void *arg, uint32_t p, uint32_t t, const float *s)
{
	struct gu_ctx *g = arg;
	uint32_t nv = g->n_inter - p * 8 < 8 ? g->n_inter - p * 8 : 8;

	for (uint32_t j = 0; j < nv; j++)
		g->h[t * g->ldh + p * 8 + j] = moe_silu_mul(s[j], s[8 + j]);
}

static void avx512_gate_up(const float *x, size_t ldx, uint32_t m, const void *panels,
			   enum moe_dtype dt, uint32_t k, uint32_t n_inter, float *h, size_t ldh)
{
	struct gu_ctx g = {h, ldh, n_inter};

	for_tiles(x, ldx, m, panels, dt, k, (n_inter + 7) / 8, emit_gate_up, &g);
}

struct rows_ctx {
	float *y;
	size_t ldy;
	uint32_t n_rows;
	const float *scale;
};

static inline void emit_rows(void *arg, uint32_t p, uint32_t t, const float *s)
{
	struct rows_ctx *r = arg;
	uint32_t nv = r->n_rows - p * MOE_PANEL < MOE_PANEL ? r->n_rows - p * MOE_PANEL : MOE_PANEL;
	float sc = r->scale ? r->scale[t] : 1.0f;

	for (uint32_t j = 0; j < nv; j++)
		r->y[t * r->ldy + p * MOE_PANEL + j] = r->scale ? sc * s[j] : s[j];
}

static void avx512_rows(const float *x, size_t ldx, uint32_t m, const void *panels,
			enum moe_dtype dt, uint32_t k, uint32_t n_rows, float *y, size_t ldy,
			const float *scale)
{
	struct rows_ctx r = {y, ldy, n_rows, scale};

	for_tiles(x, ldx, m, panels, dt, k, (n_rows + MOE_PANEL - 1) / MOE_PANEL, emit_rows, &r);
}

const struct moe_cpu_kernels moe_cpu_kernels_avx512 = {
	.isa = MOE_ISA_AVX512,
	.gate_up = avx512_gate_up,
	.rows = avx512_rows,
};
