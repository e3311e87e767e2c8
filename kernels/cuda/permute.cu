/* kernels/cuda/permute.cu — the dispatch of one batch on the device: the
 * (token, k) pairs sorted by expert, stable (the CPU engine's order), and
 * the rows gathered into expert order for the grouped GEMMs.
 *
 * One block per expert scans the ids: first to count, then (knowing the
 * counts of the experts before it) to rank its pairs with a block-wide
 * prefix sum. 2·E·n·K reads of 4 bytes, from L2: a few µs at 4096 tokens,
 * and deterministic, unlike an atomic scatter. */
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/moe_cuda.h"

#define PB 256

__global__ void count_kernel(const uint32_t *ids, uint32_t nk, uint32_t *count)
{
	const uint32_t x = blockIdx.x;
	uint32_t total = 0;

	for (uint32_t base = 0; base < nk; base += PB) {
		uint32_t i = base + threadIdx.x;

		total += (uint32_t)__syncthreads_count(i < nk && ids[i] == x);
	}
	if (threadIdx.x == 0)
		count[x] = total;
}

__global__ void scatter_kernel(const uint32_t *ids, uint32_t nk, uint32_t K, uint32_t E,
			       const uint32_t *count, uint32_t *off, uint32_t *pos, uint32_t *src,
			       uint32_t *act)
{
	typedef cub::BlockReduce<uint32_t, PB> reduce_t;
	typedef cub::BlockScan<uint32_t, PB> scan_t;
	__shared__ union {
		typename reduce_t::TempStorage r;
		typename scan_t::TempStorage s;
	} tmp;
	__shared__ uint32_t first;
	const uint32_t x = blockIdx.x;
	uint32_t part = 0, busy = 0, run;

	for (uint32_t y = threadIdx.x; y < x; y += PB) {
		part += count[y];
		busy += count[y] != 0;
	}
	part = reduce_t(tmp.r).Sum(part);
	__syncthreads(); /* tmp is reused */
	busy = reduce_t(tmp.r).Sum(busy);
	if (threadIdx.x == 0) {
		first = part;
		off[x] = part;
		/* the experts with rows, in order: the small kernels' blocks */
		if (count[x])
			act[busy] = x;
		if (x == E - 1) {
			off[E] = part + count[x];
			act[E] = busy + (count[x] != 0);
		}
	}
	__syncthreads();
	run = first;
	for (uint32_t base = 0; base < nk; base += PB) {
		uint32_t i = base + threadIdx.x, f = i < nk && ids[i] == x, rank, total;

		scan_t(tmp.s).ExclusiveSum(f, rank, total);
		if (f) {
			pos[i] = run + rank;
			src[run + rank] = i / K;
		}
		run += total;
		__syncthreads(); /* tmp is reused */
	}
}

extern "C" int moe_cuda_permute(moe_cuda_stream s, const uint32_t *ids, uint32_t n, uint32_t K,
				uint32_t E, uint32_t *count, uint32_t *off, uint32_t *pos,
				uint32_t *src, uint32_t *act)
{
	cudaError_t e;

	if (!n)
		return 0;
	count_kernel<<<E, PB, 0, s>>>(ids, n * K, count);
	e = cudaGetLastError();
	if (e != cudaSuccess)
		return (int)e;
	scatter_kernel<<<E, PB, 0, s>>>(ids, n * K, K, E, count, off, pos, src, act);
	return (int)cudaGetLastError();
}

template <typename T>
__global__ void gather_kernel(const T *x, const uint32_t *src, size_t row_elems, T *xs)
{
	const T *in = x + (size_t)src[blockIdx.x] * row_elems;
	T *out = xs + (size_t)blockIdx.x * row_elems;

	for (size_t j = threadIdx.x; j < row_elems; j += blockDim.x)
		out[j] = in[j];
}

extern "C" int moe_cuda_gather(moe_cuda_stream s, const void *x, const uint32_t *src,
			       uint32_t rows, size_t row_bytes, void *xs)
{
	if (!rows)
		return 0;
	if (row_bytes % 16 == 0)
		gather_kernel<<<rows, 128, 0, s>>>((const uint4 *)x, src, row_bytes / 16, (uint4 *)xs);
	else if (row_bytes % 4 == 0)
		gather_kernel<<<rows, 128, 0, s>>>((const uint32_t *)x, src, row_bytes / 4,
						   (uint32_t *)xs);
	else
		gather_kernel<<<rows, 128, 0, s>>>((const uint16_t *)x, src, row_bytes / 2,
						   (uint16_t *)xs);
	return (int)cudaGetLastError();
}
