/* kernels/cpu/simd512.h — AVX-512 helpers shared by the bf16 paths (only
 * included by files compiled with AVX-512 F and AVX512_BF16 enabled).
 *
 * moe_exp512: e^x for 16 floats, Cody-Waite range reduction x = n ln2 + r
 * and a degree-6 polynomial on |r| <= ln2/2, scaled by 2^n with scalef
 * (overflow gives +inf, underflow 0): within 2 ulp of expf over the fp32
 * range, so the SwiGLU it feeds differs from the scalar one's by rounding.
 */
#ifndef MOE_CPU_SIMD512_H
#define MOE_CPU_SIMD512_H

#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>

#include "kernels/cpu/exp_poly.h"

static inline __attribute__((always_inline)) __m512 moe_exp512(__m512 x)
{
	const __m512 log2e = _mm512_set1_ps(MOE_EXP_LOG2E);
	const __m512 ln2_hi = _mm512_set1_ps(MOE_EXP_LN2_HI), ln2_lo = _mm512_set1_ps(MOE_EXP_LN2_LO);
	__m512 n, r, p;

	x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-104.0f));
	n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
	r = _mm512_fnmadd_ps(n, ln2_hi, x);
	r = _mm512_fnmadd_ps(n, ln2_lo, r);
	p = MOE_EXP_HORNER(_mm512_fmadd_ps, _mm512_set1_ps, r);
	p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
	return _mm512_scalef_ps(p, n);
}

/* silu(g) * u = g / (1 + e^-g) * u */
static inline __attribute__((always_inline)) __m512 moe_silu_mul512(__m512 g, __m512 u)
{
	__m512 e = moe_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));

	return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

/* 16 floats to bf16, round to nearest even (vcvtneps2bf16) */
static inline __attribute__((always_inline)) __m256i moe_to_bf16_512(__m512 v)
{
	return (__m256i)_mm512_cvtneps_pbh(v);
}

/* The first n_rows - j0 (at most 16) of 16 sums, times scale (or 1), to y
 * at column j0: the store of a row kernel (pairs.h). stream: a whole
 * aligned line goes around the caches (a large call's rows are read back
 * only by combine, after the pass: written through the caches they cost a
 * read for ownership each and evict the weights and activations the tiles
 * reuse; measured 32.5 -> 25 ms for the down pass at 1024 tokens). The
 * caller ends a streaming call with moe_stream_done(). */
static inline __attribute__((always_inline)) void moe_store_rows512(float *y, uint32_t j0,
								     uint32_t n_rows,
								     const float *sums,
								     const float *scale, bool stream)
{
	uint32_t nv = n_rows - j0 < 16 ? n_rows - j0 : 16;
	__m512 v = _mm512_load_ps(sums);

	if (scale)
		v = _mm512_mul_ps(v, _mm512_set1_ps(*scale));
	if (stream && nv == 16 && !((uintptr_t)(y + j0) & 63))
		_mm512_stream_ps(y + j0, v);
	else
		_mm512_mask_storeu_ps(y + j0, (__mmask16)((1u << nv) - 1), v);
}

/* Rows kernels stream their stores from this many rows a call. */
#define MOE_STREAM_ROWS 64

/* Streaming stores are weakly ordered: fenced before the task that made
 * them reports done (the pool's release then publishes them). */
static inline void moe_stream_done(bool stream)
{
	if (stream)
		_mm_sfence();
}

#endif
