/* kernels/cpu/swiglu.h — the expert activation: h = silu(gate) ⊙ up. */
#ifndef MOE_CPU_SWIGLU_H
#define MOE_CPU_SWIGLU_H

#include <stddef.h>

/* h[i] = g[i] * sigmoid(g[i]) * u[i]; h may alias g or u. */
void moe_cpu_swiglu(const float *g, const float *u, float *h, size_t n);

#endif
