/* kernels/cuda/convert.cu — request rows (per segment dtype) to the model
 * dtype: the hidden states entering the block, rounded as inside a model of
 * that dtype (the CPU engine's moe_cpu_to_f32 + moe_cpu_round). */
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

__global__ void convert_in_kernel(const char *raw, const moe_cuda_seg *segs, uint32_t n_segs,
				  uint32_t H, int mdt, void *x)
{
	uint32_t t = blockIdx.x;
	const moe_cuda_seg sg = segs[moe_seg_of(segs, n_segs, t)];
	const char *row = raw + sg.boff + (size_t)(t - sg.tok0) * H * moe_dt_bytes((int)sg.dt);

	for (uint32_t j = threadIdx.x; j < H; j += blockDim.x)
		moe_st(x, (size_t)t * H + j, mdt, moe_ld(row, j, (int)sg.dt));
}

extern "C" int moe_cuda_convert_in(moe_cuda_stream s, const void *raw,
				   const struct moe_cuda_seg *segs, uint32_t n_segs, uint32_t n,
				   uint32_t H, int mdt, void *x)
{
	if (!n)
		return 0;
	convert_in_kernel<<<n, 256, 0, s>>>((const char *)raw, segs, n_segs, H, mdt, x);
	return (int)cudaGetLastError();
}
