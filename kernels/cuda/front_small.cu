/* kernels/cuda/front_small.cu — the front of a decode-sized batch in two
 * kernels instead of five, for the small path (backend_cuda.c):
 *
 *   moe_cuda_front_small    request rows -> x [n, H] in the model dtype and
 *                           the router logits [n, ld] fp32, one kernel: a
 *                           block per (token, 8 router rows), a warp per
 *                           row (replaces convert_in + a cuBLAS GEMM whose
 *                           N is 1..64 tokens)
 *   moe_cuda_permute_small  count, offsets, the active experts, and the
 *                           stable (token, k) order by expert, in one block
 *                           (replaces count + scatter; the expert kernels
 *                           then read x through src instead of a gathered
 *                           copy)
 *
 * Same results as the general front: x is rounded exactly as convert_in
 * rounds it, the logits are fp32 sums over the same products (another
 * summation order than cuBLAS, as the CPU engine has too), and the order of
 * the rows is the permute's. Limits: H * 4 bytes of shared memory (H <=
 * 12288), E <= 256 experts, n * K <= 1024 pairs; moe_cuda_front_small_ok()
 * says whether a model qualifies.
 */
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

#define FR_WARPS 8 /* router rows per block: one per warp */
#define PS	 256 /* permute_small's threads: one expert each */
#define PS_PAIRS 1024

static __device__ __forceinline__ float fs_warp_sum(float v)
{
#pragma unroll
	for (int o = 16; o; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

template <int DT>
__global__ void __launch_bounds__(FR_WARPS * 32)
	front_small_kernel(const char *raw, const moe_cuda_seg *segs, uint32_t n_segs, uint32_t H,
			   const void *router, uint32_t ld, void *x, float *logits)
{
	extern __shared__ float xf[]; /* the token's row, rounded to DT, widened */
	const uint32_t t = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
	const moe_cuda_seg sg = segs[moe_seg_of(segs, n_segs, t)];
	const char *row = raw + sg.boff + (size_t)(t - sg.tok0) * H * moe_dt_bytes((int)sg.dt);
	const uint32_t e = blockIdx.x * FR_WARPS + warp;

	for (uint32_t j = threadIdx.x; j < H; j += blockDim.x) {
		float v = moe_round(moe_ld(row, j, (int)sg.dt), DT);

		xf[j] = v;
		if (blockIdx.x == 0)
			moe_st(x, (size_t)t * H + j, DT, v);
	}
	__syncthreads();
	if (e < ld) {
		float acc = 0.0f;

#pragma unroll 8
		for (uint32_t j = lane; j < H; j += 32)
			acc += moe_ld(router, (size_t)e * H + j, DT) * xf[j];
		acc = fs_warp_sum(acc);
		if (lane == 0)
			logits[(size_t)t * ld + e] = acc;
	}
}

extern "C" int moe_cuda_front_small_ok(uint32_t H, uint32_t E)
{
	return (size_t)H * 4 <= (48u << 10) && E <= PS;
}

extern "C" int moe_cuda_front_small(moe_cuda_stream s, const void *raw,
				    const struct moe_cuda_seg *segs, uint32_t n_segs, uint32_t n,
				    uint32_t H, int mdt, const void *router, uint32_t ld, void *x,
				    float *logits)
{
	dim3 g((ld + FR_WARPS - 1) / FR_WARPS, n);
	size_t sh = (size_t)H * 4;

	if (!n)
		return 0;
	if (sh > (48u << 10) || n > 65535)
		return (int)cudaErrorInvalidValue;
	switch (mdt) {
	case MOE_DT_BF16_:
		front_small_kernel<MOE_DT_BF16_><<<g, FR_WARPS * 32, sh, s>>>(
			(const char *)raw, segs, n_segs, H, router, ld, x, logits);
		break;
	case MOE_DT_F16_:
		front_small_kernel<MOE_DT_F16_><<<g, FR_WARPS * 32, sh, s>>>(
			(const char *)raw, segs, n_segs, H, router, ld, x, logits);
		break;
	default:
		front_small_kernel<MOE_DT_F32_><<<g, FR_WARPS * 32, sh, s>>>(
			(const char *)raw, segs, n_segs, H, router, ld, x, logits);
	}
	return (int)cudaGetLastError();
}

__global__ void __launch_bounds__(PS)
	permute_small_kernel(const uint32_t *ids, uint32_t nk, uint32_t K, uint32_t E,
			     uint32_t *count, uint32_t *off, uint32_t *pos, uint32_t *src,
			     uint32_t *act)
{
	typedef cub::BlockScan<uint32_t, PS> scan_t;
	__shared__ typename scan_t::TempStorage tmp;
	__shared__ uint32_t cnt[PS], first[PS], sid[PS_PAIRS];
	const uint32_t tid = threadIdx.x;
	uint32_t c, o, busy, n_busy;

	cnt[tid] = 0;
	for (uint32_t i = tid; i < nk; i += PS)
		sid[i] = ids[i];
	__syncthreads();
	for (uint32_t i = tid; i < nk; i += PS)
		atomicAdd(&cnt[sid[i]], 1u);
	__syncthreads();
	c = tid < E ? cnt[tid] : 0;
	scan_t(tmp).ExclusiveSum(c, o);
	__syncthreads(); /* tmp is reused */
	scan_t(tmp).ExclusiveSum(c ? 1u : 0u, busy, n_busy);
	first[tid] = o;
	if (tid < E) {
		count[tid] = c;
		off[tid] = o;
		if (c)
			act[busy] = tid; /* the experts with rows, in order */
	}
	if (tid == 0) {
		off[E] = nk;
		act[E] = n_busy;
	}
	__syncthreads();
	/* stable: a pair's row is its expert's first plus the pairs before it
	 * with the same expert (nk is small: a quadratic scan of shared memory) */
	for (uint32_t i = tid; i < nk; i += PS) {
		const uint32_t x = sid[i];
		uint32_t r = 0;

		for (uint32_t j = 0; j < i; j++)
			r += sid[j] == x;
		pos[i] = first[x] + r;
		src[first[x] + r] = i / K;
	}
}

extern "C" int moe_cuda_permute_small(moe_cuda_stream s, const uint32_t *ids, uint32_t n,
				      uint32_t K, uint32_t E, uint32_t *count, uint32_t *off,
				      uint32_t *pos, uint32_t *src, uint32_t *act)
{
	if (!n)
		return 0;
	if (E > PS || (size_t)n * K > PS_PAIRS)
		return (int)cudaErrorInvalidValue;
	permute_small_kernel<<<1, PS, 0, s>>>(ids, n * K, K, E, count, off, pos, src, act);
	return (int)cudaGetLastError();
}
