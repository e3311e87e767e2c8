/* kernels/cuda/combine.cu — un-permute and weighted sum, fp32, in k order
 * like the CPU engine: out[t] = Σ_k w[t,k] · ys[pos[t,k]] (+ g[t] · shared[t]),
 * cast once to the dtype of the request the token belongs to.
 *
 * A token's K rows and weights are read once into shared memory, and its H
 * outputs are split over up to CB_SPLIT blocks: with one block per token
 * the loop re-read pos and w for every element (they may alias the output
 * as far as the compiler knows) and a decode batch ran on one or a few SMs
 * (28 µs for one OLMoE token under ncu, more than its down GEMM). */
#include "kernels/cpu/route.h" /* MOE_MAX_TOPK */
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

#define CB_THREADS 256
#define CB_SPLIT   8 /* blocks per token at most */

__global__ void __launch_bounds__(CB_THREADS)
	combine_kernel(const void *__restrict__ ys, int ydt, const uint32_t *__restrict__ pos,
		       const float *__restrict__ w, uint32_t K, uint32_t H,
		       const float *__restrict__ shy, const float *__restrict__ gsc,
		       const moe_cuda_seg *__restrict__ segs, uint32_t n_segs, char *__restrict__ raw)
{
	__shared__ uint32_t sp[MOE_MAX_TOPK];
	__shared__ float sw[MOE_MAX_TOPK];
	const uint32_t t = blockIdx.x;
	const moe_cuda_seg sg = segs[moe_seg_of(segs, n_segs, t)];
	char *row = raw + sg.boff + (size_t)(t - sg.tok0) * H * moe_dt_bytes((int)sg.dt);
	const float g = gsc ? gsc[t] : 1.0f;

	for (uint32_t k = threadIdx.x; k < K; k += blockDim.x) {
		sp[k] = pos[(size_t)t * K + k];
		sw[k] = w[(size_t)t * K + k];
	}
	__syncthreads();
	for (uint32_t j = blockIdx.y * blockDim.x + threadIdx.x; j < H;
	     j += gridDim.y * blockDim.x) {
		float acc = sw[0] * moe_ld(ys, (size_t)sp[0] * H + j, ydt);

#pragma unroll 4
		for (uint32_t k = 1; k < K; k++)
			acc += sw[k] * moe_ld(ys, (size_t)sp[k] * H + j, ydt);
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
	uint32_t by = (H + CB_THREADS - 1) / CB_THREADS;

	if (!n)
		return 0;
	if (K == 0 || K > MOE_MAX_TOPK)
		return (int)cudaErrorInvalidValue;
	if (by > CB_SPLIT)
		by = CB_SPLIT;
	combine_kernel<<<dim3(n, by), CB_THREADS, 0, s>>>(ys, ydt, pos, w, K, H, shy, gsc, segs,
							   n_segs, (char *)raw);
	return (int)cudaGetLastError();
}
