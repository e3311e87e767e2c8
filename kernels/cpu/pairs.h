/* kernels/cpu/pairs.h — bf16 expert weights packed in pairs along K, the
 * layout AMX's tdpbf16ps and AVX512_BF16's vdpbf16ps both read, and the
 * kernels of the two bf16 paths (amx, avx512bf16).
 *
 * Layout (once, at load). K is padded with zeros to kp = a multiple of 32.
 * A weight matrix W [n, k] (nn.Linear layout) is cut into panels of 16 rows;
 * panel p holds kp/32 steps of 1 KiB, and step s is the B tile of
 * tdpbf16ps: 16 lines of 64 bytes, line r holding for the 16 rows j of the
 * panel the pair W[16p+j][32s+2r], W[16p+j][32s+2r+1]. A line is also one
 * zmm operand of vdpbf16ps (16 fp32 lanes, one pair each).
 *
 * Gate and up are packed together: block b (inter rows 16b..16b+15) holds,
 * per step, the gate tile then the up tile (2 KiB), so one pass over the
 * input computes both, the SwiGLU runs on the accumulators and only h is
 * stored. h = silu(x·gate) * (x·up) is rounded to bf16 (round to nearest
 * even), as a bf16 model in transformers rounds it before down_proj.
 *
 * Activations are bf16, rows of ld elements (ld a multiple of 32, the
 * columns between k and ld zero). The AMX kernels read 16-row tiles: the
 * buffers must have MOE_PAIRS_SLACK_ROWS readable rows past the last one
 * (their values only reach outputs nobody stores).
 *
 * Exactness: each output element is a sum over k in an order fixed by the
 * kernel (per instruction, then step after step), never mixed with another
 * token's, so a token's result does not depend on its batch. The two paths
 * sum in different orders: their results differ by rounding, not more.
 */
#ifndef MOE_CPU_PAIRS_H
#define MOE_CPU_PAIRS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cpu/isa.h"

#define MOE_PAIRS_K		 32 /* K per step (one tile) */
#define MOE_PAIRS_N		 16 /* output columns per panel */
#define MOE_PAIRS_SLACK_ROWS 32

static inline uint32_t moe_pairs_kp(uint32_t k)
{
	return (k + MOE_PAIRS_K - 1) / MOE_PAIRS_K * MOE_PAIRS_K;
}

/* Bytes of one packed row panel / gate-up block for inner dimension k. */
static inline size_t moe_pairs_panel_bytes(uint32_t k)
{
	return (size_t)moe_pairs_kp(k) * MOE_PAIRS_N * 2;
}

size_t moe_pairs_rows_bytes(uint32_t n, uint32_t k);
/* dst <- W [n, k] (bf16) in panels of 16 rows */
void moe_pairs_pack_rows(const uint16_t *w, uint32_t n, uint32_t k, void *dst);

size_t moe_pairs_gate_up_bytes(uint32_t inter, uint32_t k);
/* dst <- gate [inter, k] and up [inter, k] (bf16), blocks of 16 + 16 rows */
void moe_pairs_pack_gate_up(const uint16_t *gate, const uint16_t *up, uint32_t inter, uint32_t k,
			    void *dst);

struct moe_pairs_kernels {
	enum moe_cpu_isa isa;
	/* h[t*ldh + i] = bf16(silu(x_t·gate_i) * (x_t·up_i)) for t < m and i
	 * below n_inter rounded up to 16 (the columns past n_inter are zero),
	 * from the ceil(n_inter / 16) consecutive blocks at `blocks`. */
	void (*gate_up)(const uint16_t *x, size_t ldx, uint32_t m, const void *blocks, uint32_t k,
			uint32_t n_inter, uint16_t *h, size_t ldh);
	/* y[t*ldy + j] = (scale ? scale[t] : 1) * x_t·W_j for j < n_rows, t < m,
	 * from the ceil(n_rows / 16) consecutive panels at `panels`. */
	void (*rows)(const uint16_t *x, size_t ldx, uint32_t m, const void *panels, uint32_t k,
		     uint32_t n_rows, float *y, size_t ldy, const float *scale);
};

extern const struct moe_pairs_kernels moe_pairs_kernels_avx512bf16;
extern const struct moe_pairs_kernels moe_pairs_kernels_amx;

/* The kernels of a bf16 path (NULL for the others). */
const struct moe_pairs_kernels *moe_pairs_kernels_for(enum moe_cpu_isa isa);

#endif
