#include "kernels/cuda/device.h"

#include <cuda_runtime.h>
#include <stdio.h>

extern "C" int moe_cuda_device_count(char *err, size_t errlen)
{
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e != cudaSuccess) {
		snprintf(err, errlen, "%s", cudaGetErrorString(e));
		cudaGetLastError(); /* not sticky: clear it */
		return -1;
	}
	return n;
}

extern "C" int moe_cuda_device_info(int i, char *name, size_t namelen, size_t *total_mem)
{
	cudaDeviceProp p;

	if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
		cudaGetLastError();
		return -1;
	}
	snprintf(name, namelen, "%s", p.name);
	*total_mem = p.totalGlobalMem;
	return 0;
}
