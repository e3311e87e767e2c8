/* kernels/cuda/common.cuh — element loads and stores by dtype, shared by
 * the kernels (device code only). dt: 0 f32, 1 bf16, 2 f16 (moe_dtype). */
#ifndef MOE_CUDA_COMMON_CUH
#define MOE_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define MOE_DT_F32_  0
#define MOE_DT_BF16_ 1
#define MOE_DT_F16_  2

static __device__ __forceinline__ float moe_ld(const void *p, size_t i, int dt)
{
	if (dt == MOE_DT_BF16_)
		return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
	if (dt == MOE_DT_F16_)
		return __half2float(((const __half *)p)[i]);
	return ((const float *)p)[i];
}

static __device__ __forceinline__ void moe_st(void *p, size_t i, int dt, float v)
{
	if (dt == MOE_DT_BF16_)
		((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
	else if (dt == MOE_DT_F16_)
		((__half *)p)[i] = __float2half_rn(v);
	else
		((float *)p)[i] = v;
}

/* v rounded to dtype dt and widened back (dt < 0 or f32: unchanged). */
static __device__ __forceinline__ float moe_round(float v, int dt)
{
	if (dt == MOE_DT_BF16_)
		return __bfloat162float(__float2bfloat16_rn(v));
	if (dt == MOE_DT_F16_)
		return __half2float(__float2half_rn(v));
	return v;
}

static __host__ __device__ __forceinline__ size_t moe_dt_bytes(int dt)
{
	return dt == MOE_DT_F32_ ? 4 : 2;
}

/* Index of the segment holding token t (segs ascending by tok0, segs[0].tok0 == 0). */
template <typename Seg>
static __device__ __forceinline__ uint32_t moe_seg_of(const Seg *segs, uint32_t n_segs, uint32_t t)
{
	uint32_t lo = 0, hi = n_segs;

	while (hi - lo > 1) {
		uint32_t mid = (lo + hi) / 2;

		if (segs[mid].tok0 <= t)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

#endif
