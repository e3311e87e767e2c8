/* kernels/cuda/fault.cu — test hook only (MOED_TEST_CUDA_FAULT): a real
 * illegal-address fault, to prove that moed does not survive a sticky
 * error in place. */
#include "kernels/cuda/moe_cuda.h"

#include <cuda_runtime.h>

__global__ void fault_kernel(float *p)
{
	p[threadIdx.x] = 1.0f;
}

extern "C" int moe_cuda_inject_fault(moe_cuda_stream s)
{
	/* the first page: mapped by no allocation, host or device (a low
	 * address also faults where the GPU can reach host memory via HMM) */
	fault_kernel<<<1, 32, 0, s>>>((float *)(uintptr_t)0x100);
	return (int)cudaGetLastError();
}
