/* kernels/cpu/pairs_avx512bf16.c — the avx512bf16 path: vdpbf16ps on the
 * pairs layout (pairs.h), for CPUs with AVX512_BF16 and no AMX (AMD Zen 4
 * and 5, Intel Cooper Lake). Compiled with AVX-512 F/BW/VL/BF16 enabled;
 * only called when cpuid and xgetbv say so (isa.c).
 *
 * Micro-kernel: MR tokens x one 16-column line per step, one zmm
 * accumulator per (token, column line); per pair of k, one 64-byte weight
 * line (two for gate/up) and one broadcast 32-bit pair of activations per
 * token. Each accumulator sums its pairs in k order, so a token's result
 * does not depend on the tokens beside it.
 */
#include <immintrin.h>
#include <stdbool.h>

#include "kernels/cpu/pairs.h"
#include "kernels/cpu/simd512.h"

#define MR	   12
#define TILE_ELEMS (MOE_PAIRS_K * MOE_PAIRS_N)

static inline __attribute__((always_inline)) __m512bh pair(const uint16_t *x, uint32_t c)
{
	uint32_t v;

	__builtin_memcpy(&v, x + c, 4);
	return (__m512bh)_mm512_set1_epi32((int)v);
}

static inline __attribute__((always_inline)) __m512bh line(const uint16_t *w)
{
	return (__m512bh)_mm512_loadu_si512(w);
}

/* acc[0][t] (and acc[1][t] when two) = sum over k of x_t · (w0 | w1); the
 * lines of w0/w1 at step s are s * bstep + r * 32 elements in. */
static inline __attribute__((always_inline)) void dot(const uint16_t *x, size_t ldx, const int mr,
						      const uint16_t *w0, const uint16_t *w1,
						      size_t bstep, uint32_t steps, const bool two,
						      float out[2][MR][16])
{
	__m512 a0[MR], a1[MR];

#pragma GCC unroll 12
	for (int t = 0; t < MR; t++)
		if (t < mr)
			a0[t] = a1[t] = _mm512_setzero_ps();
	for (uint32_t s = 0; s < steps; s++) {
		for (uint32_t r = 0; r < MOE_PAIRS_K / 2; r++) {
			uint32_t c = s * MOE_PAIRS_K + 2 * r;
			__m512bh l0 = line(w0 + s * bstep + r * 32), l1;

			if (two)
				l1 = line(w1 + s * bstep + r * 32);
#pragma GCC unroll 12
			for (int t = 0; t < MR; t++) {
				if (t >= mr)
					break;
				__m512bh xv = pair(x + t * ldx, c);

				a0[t] = _mm512_dpbf16_ps(a0[t], xv, l0);
				if (two)
					a1[t] = _mm512_dpbf16_ps(a1[t], xv, l1);
			}
		}
	}
#pragma GCC unroll 12
	for (int t = 0; t < MR; t++) {
		if (t >= mr)
			break;
		_mm512_storeu_ps(out[0][t], a0[t]);
		if (two)
			_mm512_storeu_ps(out[1][t], a1[t]);
	}
}

typedef void (*dot_fn)(const uint16_t *, size_t, const uint16_t *, const uint16_t *, size_t,
		       uint32_t, float[2][MR][16]);

#define DOT(N)                                                                             \
	static void dot1_##N(const uint16_t *x, size_t ldx, const uint16_t *w0,               \
			     const uint16_t *w1, size_t bs, uint32_t st, float o[2][MR][16])  \
	{                                                                                  \
		dot(x, ldx, N, w0, w1, bs, st, false, o);                                  \
	}                                                                                  \
	static void dot2_##N(const uint16_t *x, size_t ldx, const uint16_t *w0,               \
			     const uint16_t *w1, size_t bs, uint32_t st, float o[2][MR][16])  \
	{                                                                                  \
		dot(x, ldx, N, w0, w1, bs, st, true, o);                                   \
	}
DOT(1) DOT(2) DOT(3) DOT(4) DOT(5) DOT(6) DOT(7) DOT(8) DOT(9) DOT(10) DOT(11) DOT(12)

static const dot_fn dot1[MR + 1] = {NULL,     dot1_1,  dot1_2, dot1_3, dot1_4,
				    dot1_5,   dot1_6,  dot1_7, dot1_8, dot1_9,
				    dot1_10,  dot1_11, dot1_12};
static const dot_fn dot2[MR + 1] = {NULL,     dot2_1,  dot2_2, dot2_3, dot2_4,
				    dot2_5,   dot2_6,  dot2_7, dot2_8, dot2_9,
				    dot2_10,  dot2_11, dot2_12};

static void bf16_gate_up(const uint16_t *x, size_t ldx, uint32_t m, const void *blocks, uint32_t k,
			 uint32_t n_inter, uint16_t *h, size_t ldh)
{
	uint32_t steps = moe_pairs_kp(k) / MOE_PAIRS_K;
	size_t bel = (size_t)steps * 2 * TILE_ELEMS;
	float out[2][MR][16] __attribute__((aligned(64)));

	for (uint32_t b = 0; b * MOE_PAIRS_N < n_inter; b++) {
		const uint16_t *g = (const uint16_t *)blocks + b * bel;

		for (uint32_t t0 = 0; t0 < m; t0 += MR) {
			uint32_t mr = m - t0 < MR ? m - t0 : MR;

			dot2[mr](x + (size_t)t0 * ldx, ldx, g, g + TILE_ELEMS, 2 * TILE_ELEMS, steps,
				 out);
			for (uint32_t t = 0; t < mr; t++)
				_mm256_storeu_si256(
					(__m256i *)(h + (t0 + t) * ldh + b * MOE_PAIRS_N),
					moe_to_bf16_512(moe_silu_mul512(_mm512_load_ps(out[0][t]),
									_mm512_load_ps(out[1][t]))));
		}
	}
}

static void bf16_rows(const uint16_t *x, size_t ldx, uint32_t m, const void *panels, uint32_t k,
		      uint32_t n_rows, float *y, size_t ldy, const float *scale)
{
	uint32_t steps = moe_pairs_kp(k) / MOE_PAIRS_K;
	size_t pel = (size_t)steps * TILE_ELEMS;
	uint32_t np = (n_rows + MOE_PAIRS_N - 1) / MOE_PAIRS_N;
	float out[2][MR][16] __attribute__((aligned(64)));
	bool stream = m >= MOE_STREAM_ROWS;

	for (uint32_t p = 0; p < np; p += 2) {
		const uint16_t *w = (const uint16_t *)panels + p * pel;
		bool two = p + 1 < np;

		for (uint32_t t0 = 0; t0 < m; t0 += MR) {
			uint32_t mr = m - t0 < MR ? m - t0 : MR;

			(two ? dot2 : dot1)[mr](x + (size_t)t0 * ldx, ldx, w, w + pel, TILE_ELEMS,
						steps, out);
			for (uint32_t q = 0; q < (two ? 2u : 1u); q++)
				for (uint32_t t = 0; t < mr; t++)
					moe_store_rows512(y + (t0 + t) * ldy, (p + q) * MOE_PAIRS_N,
							  n_rows, out[q][t],
							  scale ? scale + t0 + t : NULL, stream);
		}
	}
	moe_stream_done(stream);
}

const struct moe_pairs_kernels moe_pairs_kernels_avx512bf16 = {
	.isa = MOE_ISA_AVX512BF16,
	.gate_up = bf16_gate_up,
	.rows = bf16_rows,
};
