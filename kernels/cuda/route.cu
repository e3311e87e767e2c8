/* kernels/cuda/route.cu — router scoring and top-k for every family, one
 * warp per token (kernels/cpu/route.c is the reference: same steps, same
 * tie rule — the lower expert index wins — and -inf for the experts of
 * dropped groups).
 *
 *   logits (rounded to the model dtype outside DeepSeek)
 *   -> softmax | sigmoid                               s[E]
 *   -> selection value s + correction bias             sel[E]
 *   -> group score (max, or sum of the top 2), keep topk_group groups
 *   -> K rounds of a warp-wide argmax over sel
 *   -> weights s[id], renormalised in k order (+eps), times the scaling
 *
 * The scores of a token live in shared memory: (2E + G) floats and E + G
 * flag bytes per warp. */
#include <math.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_cuda.h"

#define FULL 0xffffffffu
#define NONE 0xffffffffu

/* Is (v1, i1) a better pick than (v2, i2)? NONE loses; equal (or
 * unordered) values go to the lower index. */
static __device__ __forceinline__ bool better(float v1, uint32_t i1, float v2, uint32_t i2)
{
	if (i2 == NONE)
		return i1 != NONE;
	if (i1 == NONE)
		return false;
	if (v1 > v2)
		return true;
	if (v2 > v1)
		return false;
	return i1 < i2;
}

/* Lowest-index maximum of v[i], i < n, !taken[i]; the same on every lane. */
static __device__ uint32_t warp_argmax(const float *v, const uint8_t *taken, uint32_t n,
				       uint32_t lane)
{
	float bv = 0.0f;
	uint32_t bi = NONE;

	for (uint32_t i = lane; i < n; i += 32)
		if (!taken[i] && better(v[i], i, bv, bi)) {
			bv = v[i];
			bi = i;
		}
	for (int o = 16; o; o >>= 1) {
		float ov = __shfl_xor_sync(FULL, bv, o);
		uint32_t oi = __shfl_xor_sync(FULL, bi, o);

		if (better(ov, oi, bv, bi)) {
			bv = ov;
			bi = oi;
		}
	}
	return __shfl_sync(FULL, bi, 0);
}

static __device__ __forceinline__ float warp_max(float v)
{
	for (int o = 16; o; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
	return v;
}

static __device__ __forceinline__ float warp_sum(float v)
{
	for (int o = 16; o; o >>= 1)
		v += __shfl_xor_sync(FULL, v, o);
	return v;
}

__global__ void route_kernel(moe_cuda_route_params p, const float *logits, const float *bias,
			     uint32_t n, uint32_t *ids, float *w, float *gsc)
{
	extern __shared__ float sm[];
	const uint32_t nw = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
	const uint32_t t = blockIdx.x * nw + warp, E = p.n_experts, K = p.top_k;
	const uint32_t G = p.group ? p.n_group : 0;
	float *s = sm + (size_t)warp * (2 * E + G), *sel = s + E, *gs = sel + E;
	uint8_t *tk = (uint8_t *)(sm + (size_t)nw * (2 * E + G)) + (size_t)warp * (E + G);
	uint8_t *gk = tk + E;
	const float *l = logits + (size_t)t * p.ld;

	if (t >= n)
		return; /* the whole warp: no block-wide barrier below */
	if (p.score == 1) {
		for (uint32_t i = lane; i < E; i += 32)
			s[i] = 1.0f / (1.0f + expf(-moe_round(l[i], p.round_dt)));
	} else {
		float mx = -INFINITY, sum = 0.0f;

		for (uint32_t i = lane; i < E; i += 32) {
			s[i] = moe_round(l[i], p.round_dt);
			mx = fmaxf(mx, s[i]);
		}
		mx = warp_max(mx);
		for (uint32_t i = lane; i < E; i += 32) {
			s[i] = expf(s[i] - mx);
			sum += s[i];
		}
		sum = warp_sum(sum);
		for (uint32_t i = lane; i < E; i += 32)
			s[i] /= sum;
	}
	for (uint32_t i = lane; i < E; i += 32) {
		sel[i] = bias ? s[i] + bias[i] : s[i];
		tk[i] = 0;
	}
	__syncwarp();
	if (G) {
		const uint32_t per = E / G;

		for (uint32_t g = lane; g < G; g += 32) {
			const float *v = sel + (size_t)g * per;
			float a = v[0], b = -INFINITY;

			for (uint32_t i = 1; i < per; i++) {
				if (v[i] > a) {
					b = a;
					a = v[i];
				} else if (v[i] > b) {
					b = v[i];
				}
			}
			gs[g] = p.group == 1 ? a : a + (per > 1 ? b : 0.0f);
			gk[g] = 0;
		}
		__syncwarp();
		for (uint32_t k = 0; k < p.topk_group; k++) {
			uint32_t g = warp_argmax(gs, gk, G, lane);

			if (lane == 0)
				gk[g] = 1; /* kept */
			__syncwarp();
		}
		for (uint32_t i = lane; i < E; i += 32)
			if (!gk[i / per])
				sel[i] = -INFINITY;
		__syncwarp();
	}
	{
		uint32_t *id = ids + (size_t)t * K;
		float *wt = w + (size_t)t * K, sum = 0.0f;

		for (uint32_t k = 0; k < K; k++) {
			uint32_t x = warp_argmax(sel, tk, E, lane);

			if (lane == 0) {
				tk[x] = 1;
				id[k] = x;
				wt[k] = s[x];
				sum += s[x];
			}
			__syncwarp();
		}
		if (lane == 0) {
			for (uint32_t k = 0; k < K; k++) {
				float v = wt[k];

				if (p.renormalize)
					v /= sum + p.renorm_eps;
				wt[k] = v * p.scale;
			}
			if (p.shared_gate)
				gsc[t] = 1.0f / (1.0f + expf(-l[E]));
		}
	}
}

extern "C" int moe_cuda_route(moe_cuda_stream s, const struct moe_cuda_route_params *p,
			      const float *logits, const float *bias, uint32_t n, uint32_t *ids,
			      float *w, float *gsc)
{
	const uint32_t E = p->n_experts, G = p->group ? p->n_group : 0;
	const size_t per_warp = (2 * (size_t)E + G) * sizeof(float) + E + G;
	uint32_t nw = (uint32_t)((48u << 10) / per_warp);

	if (!n)
		return 0;
	if (nw > 4)
		nw = 4;
	if (nw < 1)
		return (int)cudaErrorInvalidValue; /* E > ~3500: refused at load */
	route_kernel<<<(n + nw - 1) / nw, nw * 32, nw * per_warp, s>>>(*p, logits, bias, n, ids, w,
								      gsc);
	return (int)cudaGetLastError();
}
