/* kernels/cpu/pack_pairs.c — packing bf16 weights in pairs along K (the
 * layout is described in pairs.h). Runs once per expert, at load. */
#include <string.h>

#include "kernels/cpu/pairs.h"

/* dst (one 16-row panel: kp/32 steps of 16 lines x 16 pairs) <- row j of
 * the panel, src[0..k-1]; step_elems: distance between two steps. */
static void scatter_row(uint16_t *dst, const uint16_t *src, uint32_t k, uint32_t j,
			size_t step_elems)
{
	for (uint32_t c = 0; c < k; c++) {
		uint32_t s = c / MOE_PAIRS_K, r = (c % MOE_PAIRS_K) / 2;

		dst[s * step_elems + (size_t)r * 2 * MOE_PAIRS_N + j * 2 + c % 2] = src[c];
	}
}

size_t moe_pairs_rows_bytes(uint32_t n, uint32_t k)
{
	return (size_t)((n + MOE_PAIRS_N - 1) / MOE_PAIRS_N) * moe_pairs_panel_bytes(k);
}

void moe_pairs_pack_rows(const uint16_t *w, uint32_t n, uint32_t k, void *dst)
{
	size_t panel = moe_pairs_panel_bytes(k) / 2;
	uint16_t *d = dst;

	memset(dst, 0, moe_pairs_rows_bytes(n, k));
	for (uint32_t i = 0; i < n; i++)
		scatter_row(d + (i / MOE_PAIRS_N) * panel, w + (size_t)i * k, k, i % MOE_PAIRS_N,
			    MOE_PAIRS_K * MOE_PAIRS_N);
}

size_t moe_pairs_gate_up_bytes(uint32_t inter, uint32_t k)
{
	return 2 * moe_pairs_rows_bytes(inter, k);
}

void moe_pairs_pack_gate_up(const uint16_t *gate, const uint16_t *up, uint32_t inter, uint32_t k,
			    void *dst)
{
	size_t tile = MOE_PAIRS_K * MOE_PAIRS_N;		/* elements of a step's tile */
	size_t block = 2 * (moe_pairs_panel_bytes(k) / 2); /* elements of a gate+up block */
	uint16_t *d = dst;

	memset(dst, 0, moe_pairs_gate_up_bytes(inter, k));
	for (uint32_t i = 0; i < inter; i++) {
		uint16_t *b = d + (i / MOE_PAIRS_N) * block;

		scatter_row(b, gate + (size_t)i * k, k, i % MOE_PAIRS_N, 2 * tile);
		scatter_row(b + tile, up + (size_t)i * k, k, i % MOE_PAIRS_N, 2 * tile);
	}
}

const struct moe_pairs_kernels *moe_pairs_kernels_for(enum moe_cpu_isa isa)
{
	switch (isa) {
	case MOE_ISA_AMX:
		return &moe_pairs_kernels_amx;
	case MOE_ISA_AVX512BF16:
		return &moe_pairs_kernels_avx512bf16;
	default:
		return NULL;
	}
}
