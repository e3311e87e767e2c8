/* kernels/cpu/panel.h — expert weights packed into 16-wide panels, and the
 * micro-kernels that stream them.
 *
 * Packing (once, at load): a weight matrix W [N, K] (nn.Linear layout) is
 * cut into panels of 16 rows; panel p holds, for k = 0..K-1, the 16 values
 * W[16p + 0..15][k] next to each other (zero rows pad the last panel). A
 * kernel then reads one panel as one contiguous stream and computes
 * C[m, 16] = X[m, K] · panelᵀ with the 16 outputs of a token in vector
 * registers: every weight byte is read once per block of tokens, which is
 * both the decode path (one token block: a GEMV that streams each expert
 * once for all its tokens) and the prefill path (many token blocks over the
 * same panels, which stay in cache). Weights keep their checkpoint dtype
 * (bf16/f16/f32) and are widened in registers.
 *
 * Gate and up are packed together: panel p holds gate rows 8p..8p+7 in
 * columns 0..7 and up rows 8p..8p+7 in columns 8..15, so one pass over the
 * input computes both and the SwiGLU happens before anything is stored.
 *
 * Every output element is one fp32 sum over k in order, so a token's result
 * does not depend on the other tokens of its block.
 */
#ifndef MOE_CPU_PANEL_H
#define MOE_CPU_PANEL_H

#include <math.h>

#include "kernels/cpu/isa.h"
#include "kernels/dtype.h"

#define MOE_PANEL 16

size_t moe_pack_rows_bytes(uint32_t n, uint32_t k, enum moe_dtype dt);
/* dst <- W [n, k] in panels of 16 rows */
void moe_pack_rows(const void *w, uint32_t n, uint32_t k, enum moe_dtype dt, void *dst);

size_t moe_pack_gate_up_bytes(uint32_t inter, uint32_t k, enum moe_dtype dt);
/* dst <- gate [inter, k] and up [inter, k] interleaved 8 + 8 per panel */
void moe_pack_gate_up(const void *gate, const void *up, uint32_t inter, uint32_t k,
		      enum moe_dtype dt, void *dst);

struct moe_cpu_kernels {
	enum moe_cpu_isa isa;
	/* h[t*ldh + i] = silu(x·gate_i) * (x·up_i) for i < n_inter, t < m, from
	 * the ceil(n_inter / 8) consecutive gate/up panels at `panels`. */
	void (*gate_up)(const float *x, size_t ldx, uint32_t m, const void *panels,
			enum moe_dtype dt, uint32_t k, uint32_t n_inter, float *h, size_t ldh);
	/* y[t*ldy + j] = (scale ? scale[t] : 1) * x_t·W_j for j < n_rows, t < m,
	 * from the ceil(n_rows / 16) consecutive row panels at `panels`. */
	void (*rows)(const float *x, size_t ldx, uint32_t m, const void *panels, enum moe_dtype dt,
		     uint32_t k, uint32_t n_rows, float *y, size_t ldy, const float *scale);
};

/* The fp32-activation kernels of a path (the path must be supported by
 * the CPU); the bf16 paths (amx, avx512bf16) give the avx512 ones. */
const struct moe_cpu_kernels *moe_cpu_kernels_for(enum moe_cpu_isa isa);

extern const struct moe_cpu_kernels moe_cpu_kernels_scalar;
extern const struct moe_cpu_kernels moe_cpu_kernels_avx2;
extern const struct moe_cpu_kernels moe_cpu_kernels_avx512;

/* The SwiGLU epilogue of the scalar and avx512 paths (libm's expf); avx2
 * runs its own on 8 sums at once (panel_avx2.c). */
static inline float moe_silu_mul(float g, float u)
{
	return g / (1.0f + expf(-g)) * u;
}

#endif
