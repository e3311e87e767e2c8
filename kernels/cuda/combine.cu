/* kernels/cuda/combine.cu — un-permute and weighted sum, fp32, in k order
 * like the CPU engine: out[t] = Σ_k w[t,k] · ys[pos[t,k]] (+ g[t] · shared[t]),
 * cast once to the dtype of the request the token belongs to. */
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

__global__ void combine_kernel(const void *ys, int ydt, const uint32_t *pos, const float *w, uint32_t K,
			       uint32_t H, const float *shy, const float *gsc,
			       const moe_cuda_seg *segs, uint32_t n_segs, char *raw)
{
	const uint32_t t = blockIdx.x;
	const moe_cuda_seg sg = segs[moe_seg_of(segs, n_segs, t)];
	char *row = raw + sg.boff + (size_t)(t - sg.tok0) * H * moe_dt_bytes((int)sg.dt);
	const uint32_t *p = pos + (size_t)t * K;
	const float *wt = w + (size_t)t * K;
	const float g = gsc ? gsc[t] : 1.0f;

	for (uint32_t j = threadIdx.x; j < H; j += blockDim.x) {
		float acc = wt[0] * moe_ld(ys, (size_t)p[0] * H + j, ydt);

		for (uint32_t k = 1; k < K; k++)
			acc += wt[k] * moe_ld(ys, (size_t)p[k] * H + j, ydt);
		if (shy)
			acc += g * shy[(size_t)t * H + j];
		moe_st(row, j, (int)sg.dt, acc);
	}
}

extern "C" int moe_cuda_combine(moe_cuda_stream s, const void *ys, int ydt, const uint32_t *pos,
				const float *w, uint32_t n, uint32_t K, uint32_t H,
				const float *shy, const float *gsc,
				const struct moe_cuda_seg *segs, uint32_t n_segs, void *raw)
{
	if (!n)
		return 0;
	combine_kernel<<<n, 256, 0, s>>>(ys, ydt, pos, w, K, H, shy, gsc, segs, n_segs, (char *)raw);
	return (int)cudaGetLastError();
}
