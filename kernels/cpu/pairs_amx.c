/* kernels/cpu/pairs_amx.c — the amx path: tdpbf16ps on the pairs layout
 * (pairs.h). Compiled with AMX-TILE/AMX-BF16 and AVX-512 (F, BW, VL, BF16)
 * enabled; only called once cpuid, xgetbv and Linux's arch_prctl said yes
 * (isa.c).
 *
 * Tiles: all eight are 16 rows x 64 bytes (palette 1), configured once per
 * thread on its first call (LDTILECFG is per thread; the configuration is
 * saved and restored with the thread's state). tmm0-3 accumulate, tmm4-5
 * hold two 16-token slices of the activations, tmm6-7 two weight tiles: a
 * 2 x 2 block (32 tokens x 2 x 16 columns) does 4 tdpbf16ps per 4 tile
 * loads. For gate/up the two weight tiles are the gate and up halves of one
 * block, so the SwiGLU pairs line up in the accumulators. A call runs its
 * blocks per 32 tokens, the weights reused from L2 by the next 32 tokens.
 * The callers pad activation rows by 64 bytes: rows 4 KiB apart put a
 * tile's 16 rows in one L1 set (measured 3x slower). Software prefetch of
 * the next weights measured slower (the hardware streamers follow them).
 *
 * Small batches (decode) use the same tiles with the rows past the batch
 * unused: the weights are read once per call either way, which is what
 * decode is bound by, and every batch size runs the same instructions in
 * the same order per token (batch invariance).
 */
#include <immintrin.h>
#include <stdbool.h>

#include "kernels/cpu/pairs.h"
#include "kernels/cpu/simd512.h"

struct tilecfg {
	uint8_t palette, start_row;
	uint8_t reserved[14];
	uint16_t colsb[16];
	uint8_t rows[16];
};

static __thread bool tiles_configured;

static inline void tiles_on(void)
{
	struct tilecfg c = {.palette = 1};

	if (__builtin_expect(tiles_configured, 1))
		return;
	for (int i = 0; i < 8; i++) {
		c.colsb[i] = 64;
		c.rows[i] = 16;
	}
	_tile_loadconfig(&c);
	tiles_configured = true;
}

#define TILE_ELEMS (MOE_PAIRS_K * MOE_PAIRS_N) /* bf16 elements of a weight tile */
/* K steps per slab: up to 64 steps (K = 2048) a block's accumulators stay
 * in tiles from the first step to the last; longer K runs in slabs, the
 * accumulators of up to MAX_BLOCKS blocks parked in L1 between slabs.
 * (Slabs of 8 and 16 steps, to keep the activations in L1 across blocks,
 * measured 5-10 % slower at K = 2048: parking costs more than it saves.) */
#define KS	   64
#define MAX_BLOCKS 8 /* accumulator sets kept per call: 8 x 4 KiB */

/* One slab of steps [s0, s1) of a 2x2 (or smaller) block: C0 = A0 B0,
 * C1 = A1 B0, C2 = A0 B1, C3 = A1 B1; two_a / two_b say whether A1 / B1
 * exist. The accumulators start at zero (first slab) or from c, and go back
 * to c. */
static inline __attribute__((always_inline)) void slab(const uint16_t *x, size_t ldx,
							 const uint16_t *b0, const uint16_t *b1,
							 size_t bstep, uint32_t s0, uint32_t s1,
							 bool two_a, bool two_b, bool first,
							 float c[4][16][16])
{
	size_t xs = ldx * 2;
	const uint16_t *x1 = x + 16 * ldx;

	if (first) {
		_tile_zero(0);
		_tile_zero(1);
		_tile_zero(2);
		_tile_zero(3);
	} else {
		_tile_loadd(0, c[0], 64);
		if (two_a)
			_tile_loadd(1, c[1], 64);
		if (two_b)
			_tile_loadd(2, c[2], 64);
		if (two_a && two_b)
			_tile_loadd(3, c[3], 64);
	}
	for (uint32_t s = s0; s < s1; s++) {
		_tile_loadd(6, b0 + s * bstep, 64);
		_tile_loadd(4, x + s * MOE_PAIRS_K, xs);
		_tile_dpbf16ps(0, 4, 6);
		if (two_a) {
			_tile_loadd(5, x1 + s * MOE_PAIRS_K, xs);
			_tile_dpbf16ps(1, 5, 6);
		}
		if (two_b) {
			_tile_loadd(7, b1 + s * bstep, 64);
			_tile_dpbf16ps(2, 4, 7);
			if (two_a)
				_tile_dpbf16ps(3, 5, 7);
		}
	}
	_tile_stored(0, c[0], 64);
	if (two_a)
		_tile_stored(1, c[1], 64);
	if (two_b)
		_tile_stored(2, c[2], 64);
	if (two_a && two_b)
		_tile_stored(3, c[3], 64);
}

/* The four shapes, so that each loop is straight-line tile code. */
static void slab_any(const uint16_t *x, size_t ldx, const uint16_t *b0, const uint16_t *b1,
		     size_t bstep, uint32_t s0, uint32_t s1, bool two_a, bool two_b, bool first,
		     float c[4][16][16])
{
	if (two_a && two_b)
		slab(x, ldx, b0, b1, bstep, s0, s1, true, true, first, c);
	else if (two_a)
		slab(x, ldx, b0, b1, bstep, s0, s1, true, false, first, c);
	else if (two_b)
		slab(x, ldx, b0, b1, bstep, s0, s1, false, true, first, c);
	else
		slab(x, ldx, b0, b1, bstep, s0, s1, false, false, first, c);
}

/* Blocks of one call, MAX_BLOCKS at a time: per 32 tokens, per slab of K,
 * every block. Block q's weights: w0(q), w1(q) (w1 NULL: one weight tile
 * per step). */
struct blocks {
	const uint16_t *w0[MAX_BLOCKS], *w1[MAX_BLOCKS];
	uint32_t n;
	size_t bstep;
};

static void run_blocks(const uint16_t *x, size_t ldx, uint32_t t0, uint32_t mt, uint32_t steps,
		       const struct blocks *bl, float c[MAX_BLOCKS][4][16][16])
{
	for (uint32_t s0 = 0; s0 < steps; s0 += KS) {
		uint32_t s1 = s0 + KS < steps ? s0 + KS : steps;

		for (uint32_t q = 0; q < bl->n; q++)
			slab_any(x + (size_t)t0 * ldx, ldx, bl->w0[q], bl->w1[q] ? bl->w1[q] : bl->w0[q],
				 bl->bstep, s0, s1, mt > 16, bl->w1[q] != NULL, s0 == 0, c[q]);
	}
}

static void amx_gate_up(const uint16_t *x, size_t ldx, uint32_t m, const void *blocks, uint32_t k,
			uint32_t n_inter, uint16_t *h, size_t ldh)
{
	uint32_t steps = moe_pairs_kp(k) / MOE_PAIRS_K;
	uint32_t nb = (n_inter + MOE_PAIRS_N - 1) / MOE_PAIRS_N;
	size_t bel = (size_t)steps * 2 * TILE_ELEMS; /* elements of a gate+up block */
	float c[MAX_BLOCKS][4][16][16] __attribute__((aligned(64)));

	tiles_on();
	for (uint32_t b0 = 0; b0 < nb; b0 += MAX_BLOCKS) {
		struct blocks bl = {.n = nb - b0 < MAX_BLOCKS ? nb - b0 : MAX_BLOCKS,
				    .bstep = 2 * TILE_ELEMS};

		for (uint32_t q = 0; q < bl.n; q++) {
			bl.w0[q] = (const uint16_t *)blocks + (b0 + q) * bel; /* gate */
			bl.w1[q] = bl.w0[q] + TILE_ELEMS;		      /* up */
		}
		for (uint32_t t0 = 0; t0 < m; t0 += 32) {
			uint32_t mt = m - t0 < 32 ? m - t0 : 32;

			run_blocks(x, ldx, t0, mt, steps, &bl, c);
			/* gate: c[q][0], c[q][1]; up: c[q][2], c[q][3] */
			for (uint32_t q = 0; q < bl.n; q++)
				for (uint32_t t = 0; t < mt; t++) {
					__m512 gv = _mm512_load_ps(c[q][t / 16][t % 16]);
					__m512 uv = _mm512_load_ps(c[q][2 + t / 16][t % 16]);

					_mm256_storeu_si256(
						(__m256i *)(h + (t0 + t) * ldh +
							    (b0 + q) * MOE_PAIRS_N),
						moe_to_bf16_512(moe_silu_mul512(gv, uv)));
				}
		}
	}
}

static void amx_rows(const uint16_t *x, size_t ldx, uint32_t m, const void *panels, uint32_t k,
		     uint32_t n_rows, float *y, size_t ldy, const float *scale)
{
	uint32_t steps = moe_pairs_kp(k) / MOE_PAIRS_K;
	size_t pel = (size_t)steps * TILE_ELEMS; /* elements of a panel */
	uint32_t np = (n_rows + MOE_PAIRS_N - 1) / MOE_PAIRS_N;
	float c[MAX_BLOCKS][4][16][16] __attribute__((aligned(64)));
	bool stream = m >= MOE_STREAM_ROWS;

	tiles_on();
	/* a block is a pair of panels */
	for (uint32_t p0 = 0; p0 < np; p0 += 2 * MAX_BLOCKS) {
		struct blocks bl = {.bstep = TILE_ELEMS};

		for (uint32_t p = p0; p < np && p < p0 + 2 * MAX_BLOCKS; p += 2) {
			bl.w0[bl.n] = (const uint16_t *)panels + p * pel;
			bl.w1[bl.n] = p + 1 < np ? bl.w0[bl.n] + pel : NULL;
			bl.n++;
		}
		for (uint32_t t0 = 0; t0 < m; t0 += 32) {
			uint32_t mt = m - t0 < 32 ? m - t0 : 32;

			run_blocks(x, ldx, t0, mt, steps, &bl, c);
			/* panel q of the call: block q / 2, weight tile q % 2 */
			for (uint32_t q = 0; q < 2 * bl.n && (p0 + q) * MOE_PAIRS_N < n_rows; q++)
				for (uint32_t t = 0; t < mt; t++)
					moe_store_rows512(y + (t0 + t) * ldy, (p0 + q) * MOE_PAIRS_N,
							  n_rows, c[q / 2][2 * (q % 2) + t / 16][t % 16],
							  scale ? scale + t0 + t : NULL, stream);
		}
	}
	moe_stream_done(stream);
}

const struct moe_pairs_kernels moe_pairs_kernels_amx = {
	.isa = MOE_ISA_AMX,
	.gate_up = amx_gate_up,
	.rows = amx_rows,
};
