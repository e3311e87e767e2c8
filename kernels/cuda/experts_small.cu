/* kernels/cuda/experts_small.cu — the expert FFNs of a small batch without
 * the host: grouped kernels that read each expert's row count and first row
 * on the device, so a decode step needs no mid-batch sync (and could be
 * captured in a CUDA graph). cuBLAS takes GEMM sizes on the host; this path
 * exists for the sizes where that sync and one launch per expert cost more
 * than the math.
 *
 * Shape: the work is weight-streaming (a few tokens per expert), so each
 * warp owns RPW output rows of one expert and streams those weight rows
 * once, 16 bytes per lane per step, against up to MAXT tokens held in
 * registers; tokens beyond MAXT take another pass. Blocks go only to the
 * experts that have rows (the permute's act list; the grid is min(E, n*K)
 * experts high, the surplus exits at once).
 *
 *   gate_up: h[row, i] = silu(W_g[i]·x[row]) * (W_u[i]·x[row])   (SwiGLU fused:
 *            the gate and up sums never leave registers)
 *   down:    y[row, r] = W_d[r]·h[row]                            (fp32)
 *
 * Needs 16-byte aligned rows: H and I multiples of 8 (bf16/f16) or 4 (f32);
 * moe_cuda_small_ok() says whether a model qualifies.
 */
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

#define WARPS 4
#define MAXT  16 /* tokens per pass at most; fewer when the batch is smaller
		  * (MT: 1, 4 or 16), so decode kernels hold fewer registers
		  * and keep more loads in flight */
#define RPW_GU 2 /* gate/up row pairs per warp */
#define RPW_D  4 /* down rows per warp */

/* 16 bytes of dtype DT widened to fp32. */
template <int DT> struct vec16;

template <> struct vec16<MOE_DT_BF16_> {
	enum { N = 8 };
	static __device__ __forceinline__ void load(const void *p, float *f)
	{
		uint4 v = __ldg((const uint4 *)p);
		const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;

#pragma unroll
		for (int i = 0; i < 4; i++) {
			float2 t = __bfloat1622float2(h[i]);

			f[2 * i] = t.x;
			f[2 * i + 1] = t.y;
		}
	}
};

template <> struct vec16<MOE_DT_F16_> {
	enum { N = 8 };
	static __device__ __forceinline__ void load(const void *p, float *f)
	{
		uint4 v = __ldg((const uint4 *)p);
		const __half2 *h = (const __half2 *)&v;

#pragma unroll
		for (int i = 0; i < 4; i++) {
			float2 t = __half22float2(h[i]);

			f[2 * i] = t.x;
			f[2 * i + 1] = t.y;
		}
	}
};

template <> struct vec16<MOE_DT_F32_> {
	enum { N = 4 };
	static __device__ __forceinline__ void load(const void *p, float *f)
	{
		float4 v = __ldg((const float4 *)p);

		f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
	}
};

static __device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
	for (int o = 16; o; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

/* Which expert this block works for: its weights, rows and first row.
 * blockIdx.y indexes the experts that have rows (act, from the permute);
 * the grid has min(E, n*K) of them, the surplus exits at once.
 * Wt == NULL: one matrix W0 over fixed_n rows from row 0 (shared expert). */
static __device__ __forceinline__ bool block_expert(const void *const *Wt, const void *W0,
						    const uint32_t *count, const uint32_t *off,
						    const uint32_t *act, uint32_t n_experts,
						    uint32_t fixed_n, const char **W,
						    uint32_t *cnt, uint32_t *base)
{
	uint32_t x;

	if (!Wt) {
		*W = (const char *)W0, *cnt = fixed_n, *base = 0;
		return fixed_n != 0;
	}
	if (blockIdx.y >= act[n_experts])
		return false;
	x = act[blockIdx.y];
	*cnt = count[x];
	*base = off[x];
	*W = (const char *)Wt[x];
	return *cnt != 0;
}

template <int DT, int MT>
__global__ void __launch_bounds__(WARPS * 32)
	gate_up_small(const void *const *Wt, const void *W0, const uint32_t *count,
		      const uint32_t *off, const uint32_t *act, uint32_t n_experts, uint32_t fixed_n,
		      const void *xs, const uint32_t *src, uint32_t H, uint32_t I, void *h)
{
	typedef vec16<DT> V;
	constexpr int UNROLL = MT <= 4 && DT != MOE_DT_F32_ ? 2 : 1;
	const size_t es = DT == MOE_DT_F32_ ? 4 : 2;
	const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, nv = H / V::N;
	const uint32_t row0 = (blockIdx.x * WARPS + warp) * RPW_GU;
	const char *W;
	uint32_t cnt, base;

	if (!block_expert(Wt, W0, count, off, act, n_experts, fixed_n, &W, &cnt, &base) ||
	    row0 >= I)
		return;
	for (uint32_t t0 = 0; t0 < cnt; t0 += MT) {
		const uint32_t nt = cnt - t0 < MT ? cnt - t0 : MT;
		float ag[RPW_GU][MT], au[RPW_GU][MT];

#pragma unroll
		for (int r = 0; r < RPW_GU; r++)
#pragma unroll
			for (int j = 0; j < MT; j++)
				ag[r][j] = au[r][j] = 0.0f;
		/* two steps' weight loads in flight where registers allow */
#pragma unroll(UNROLL)
		for (uint32_t v = lane; v < nv; v += 32) {
			float g[RPW_GU][V::N], u[RPW_GU][V::N];

#pragma unroll
			for (int r = 0; r < RPW_GU; r++) {
				const uint32_t row = row0 + r < I ? row0 + r : I - 1;

				V::load(W + ((size_t)row * H + (size_t)v * V::N) * es, g[r]);
				V::load(W + ((size_t)(I + row) * H + (size_t)v * V::N) * es, u[r]);
			}
#pragma unroll
			for (int j = 0; j < MT; j++) {
				float xv[V::N];
				uint32_t xr;

				if (j >= (int)nt)
					break;
				xr = src ? src[base + t0 + j] : base + t0 + j;
				V::load((const char *)xs + ((size_t)xr * H + (size_t)v * V::N) * es, xv);
#pragma unroll
				for (int r = 0; r < RPW_GU; r++)
#pragma unroll
					for (int q = 0; q < V::N; q++) {
						ag[r][j] += g[r][q] * xv[q];
						au[r][j] += u[r][q] * xv[q];
					}
			}
		}
#pragma unroll
		for (int j = 0; j < MT; j++) {
			if (j >= (int)nt)
				break;
#pragma unroll
			for (int r = 0; r < RPW_GU; r++) {
				float a = warp_sum(ag[r][j]), b = warp_sum(au[r][j]);

				if (lane == 0 && row0 + r < I)
					moe_st(h, (size_t)(base + t0 + j) * I + row0 + r, DT,
					       a / (1.0f + expf(-a)) * b);
			}
		}
	}
}

template <int DT, int MT>
__global__ void __launch_bounds__(WARPS * 32)
	down_small(const void *const *Wt, const void *W0, const uint32_t *count, const uint32_t *off,
		   const uint32_t *act, uint32_t n_experts, uint32_t fixed_n, const void *h,
		   uint32_t H, uint32_t I, float *y)
{
	typedef vec16<DT> V;
	constexpr int UNROLL = MT <= 4 && DT != MOE_DT_F32_ ? 2 : 1;
	const size_t es = DT == MOE_DT_F32_ ? 4 : 2;
	const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, nv = I / V::N;
	const uint32_t row0 = (blockIdx.x * WARPS + warp) * RPW_D;
	const char *W;
	uint32_t cnt, base;

	if (!block_expert(Wt, W0, count, off, act, n_experts, fixed_n, &W, &cnt, &base) ||
	    row0 >= H)
		return;
	W += (size_t)2 * I * H * es; /* W_down follows W_gate and W_up */
	for (uint32_t t0 = 0; t0 < cnt; t0 += MT) {
		const uint32_t nt = cnt - t0 < MT ? cnt - t0 : MT;
		float acc[RPW_D][MT];

#pragma unroll
		for (int r = 0; r < RPW_D; r++)
#pragma unroll
			for (int j = 0; j < MT; j++)
				acc[r][j] = 0.0f;
		/* two steps' weight loads in flight where registers allow */
#pragma unroll(UNROLL)
		for (uint32_t v = lane; v < nv; v += 32) {
			float w[RPW_D][V::N];

#pragma unroll
			for (int r = 0; r < RPW_D; r++) {
				const uint32_t row = row0 + r < H ? row0 + r : H - 1;

				V::load(W + ((size_t)row * I + (size_t)v * V::N) * es, w[r]);
			}
#pragma unroll
			for (int j = 0; j < MT; j++) {
				float hv[V::N];

				if (j >= (int)nt)
					break;
				V::load((const char *)h +
						((size_t)(base + t0 + j) * I + (size_t)v * V::N) * es,
					hv);
#pragma unroll
				for (int r = 0; r < RPW_D; r++)
#pragma unroll
					for (int q = 0; q < V::N; q++)
						acc[r][j] += w[r][q] * hv[q];
			}
		}
#pragma unroll
		for (int j = 0; j < MT; j++) {
			if (j >= (int)nt)
				break;
#pragma unroll
			for (int r = 0; r < RPW_D; r++) {
				float a = warp_sum(acc[r][j]);

				if (lane == 0 && row0 + r < H)
					y[(size_t)(base + t0 + j) * H + row0 + r] = a;
			}
		}
	}
}

extern "C" int moe_cuda_small_ok(int mdt, uint32_t H, uint32_t I)
{
	uint32_t n = mdt == MOE_DT_F32_ ? 4 : 8;

	return H % n == 0 && I % n == 0 && H >= n && I >= n;
}

template <int MT>
static void launch_small(moe_cuda_stream s, int mdt, dim3 g1, dim3 g2, const void *const *Wt,
			 const void *W0, const uint32_t *count, const uint32_t *off,
			 const uint32_t *act, uint32_t n_experts, uint32_t fixed_n, const void *xs,
			 const uint32_t *src, uint32_t H, uint32_t I, void *h, float *y)
{
	/* a launch error stays pending for the cudaGetLastError() after both */
	switch (mdt) {
	case MOE_DT_BF16_:
		gate_up_small<MOE_DT_BF16_, MT><<<g1, WARPS * 32, 0, s>>>(
			Wt, W0, count, off, act, n_experts, fixed_n, xs, src, H, I, h);
		down_small<MOE_DT_BF16_, MT><<<g2, WARPS * 32, 0, s>>>(
			Wt, W0, count, off, act, n_experts, fixed_n, h, H, I, y);
		break;
	case MOE_DT_F16_:
		gate_up_small<MOE_DT_F16_, MT><<<g1, WARPS * 32, 0, s>>>(
			Wt, W0, count, off, act, n_experts, fixed_n, xs, src, H, I, h);
		down_small<MOE_DT_F16_, MT><<<g2, WARPS * 32, 0, s>>>(
			Wt, W0, count, off, act, n_experts, fixed_n, h, H, I, y);
		break;
	default:
		gate_up_small<MOE_DT_F32_, MT><<<g1, WARPS * 32, 0, s>>>(
			Wt, W0, count, off, act, n_experts, fixed_n, xs, src, H, I, h);
		down_small<MOE_DT_F32_, MT><<<g2, WARPS * 32, 0, s>>>(
			Wt, W0, count, off, act, n_experts, fixed_n, h, H, I, y);
	}
}

extern "C" int moe_cuda_experts_small(moe_cuda_stream s, int mdt, const void *const *Wt,
				      const void *W0, const uint32_t *count, const uint32_t *off,
				      const uint32_t *act, uint32_t n_experts, uint32_t max_active,
				      uint32_t max_tokens, uint32_t fixed_n, const void *xs,
				      const uint32_t *src, uint32_t H, uint32_t I, void *h, float *y)
{
	uint32_t ny = !Wt ? 1 : max_active < n_experts ? max_active : n_experts;
	dim3 g1((I + WARPS * RPW_GU - 1) / (WARPS * RPW_GU), ny ? ny : 1);
	dim3 g2((H + WARPS * RPW_D - 1) / (WARPS * RPW_D), ny ? ny : 1);
	const uint32_t maxt = Wt ? max_tokens : fixed_n;

	if (!moe_cuda_small_ok(mdt, H, I) || g1.y > 65535)
		return (int)cudaErrorInvalidValue;
	if (!Wt && !fixed_n)
		return 0;
	/* No expert gets more rows than the batch has tokens. Past one token,
	 * 4 per pass while the experts average at most 4 rows: an expert with
	 * more takes another pass over weights it has just read (from L2),
	 * while the 16-token kernel (125 registers on sm_90, a quarter of the
	 * warps) would keep too few loads in flight for every expert. */
	if (maxt <= 1)
		launch_small<1>(s, mdt, g1, g2, Wt, W0, count, off, act, n_experts, fixed_n, xs,
				   src, H, I, h, y);
	else if (maxt <= 4 || (Wt && max_active <= 4 * (uint64_t)n_experts))
		launch_small<4>(s, mdt, g1, g2, Wt, W0, count, off, act, n_experts, fixed_n, xs,
				   src, H, I, h, y);
	else
		launch_small<MAXT>(s, mdt, g1, g2, Wt, W0, count, off, act, n_experts, fixed_n, xs,
				   src, H, I, h, y);
	return (int)cudaGetLastError();
}
