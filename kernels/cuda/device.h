/* kernels/cuda/device.h — what CUDA sees on this host. Built only with the
 * CUDA toolkit (MOE_HAVE_CUDA); the CUDA backend's kernels join it. */
#ifndef MOE_CUDA_DEVICE_H
#define MOE_CUDA_DEVICE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices (>= 0), or -1 with a reason in err (no driver,
 * no device node, ...). */
int moe_cuda_device_count(char *err, size_t errlen);
/* Name and memory of device i; 0 or -1. */
int moe_cuda_device_info(int i, char *name, size_t namelen, size_t *total_mem);

#ifdef __cplusplus
}
#endif

#endif
