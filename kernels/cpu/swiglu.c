#include "kernels/cpu/swiglu.h"

#include <math.h>

void moe_cpu_swiglu(const float *g, const float *u, float *h, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
