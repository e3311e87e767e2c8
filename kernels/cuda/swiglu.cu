/* kernels/cuda/swiglu.cu — the activation between the two expert GEMMs:
 * the gate/up GEMM writes [rows, 2I] fp32 (gate | up, as the slot stores
 * W_gate over W_up), this reads it once and writes h = silu(g) * u in the
 * model dtype, the input type of the down GEMM (transformers rounds it to
 * the model dtype at the same point). */
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

__global__ void swiglu_kernel(const void *gu, int gdt, uint32_t I, int mdt, void *h)
{
	const size_t r = blockIdx.y, g0 = r * 2 * I;

	for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < I; i += gridDim.x * blockDim.x) {
		float a = moe_ld(gu, g0 + i, gdt), u = moe_ld(gu, g0 + I + i, gdt);

		moe_st(h, r * I + i, mdt, a / (1.0f + expf(-a)) * u);
	}
}

extern "C" int moe_cuda_swiglu(moe_cuda_stream s, const void *gu, int gdt, uint32_t rows,
			       uint32_t I, int mdt, void *h)
{
	uint32_t bx = (I + 255) / 256;

	if (!rows)
		return 0;
	if (bx > 64)
		bx = 64;
	if (rows > 65535) {
		/* grid.y limit: run in slices */
		for (uint32_t r0 = 0; r0 < rows; r0 += 65535) {
			uint32_t nr = rows - r0 < 65535 ? rows - r0 : 65535;
			cudaError_t e;

			swiglu_kernel<<<dim3(bx, nr), 256, 0, s>>>(
				(const char *)gu + (size_t)r0 * 2 * I * moe_dt_bytes(gdt), gdt, I,
				mdt, (char *)h + (size_t)r0 * I * moe_dt_bytes(mdt));
			e = cudaGetLastError();
			if (e != cudaSuccess)
				return (int)e;
		}
		return 0;
	}
	swiglu_kernel<<<dim3(bx, rows), 256, 0, s>>>(gu, gdt, I, mdt, h);
	return (int)cudaGetLastError();
}
