/* bench/cuda_limits.h — the GPU limits a CUDA benchmark is held against,
 * measured in the same run on the same device: device-to-device copy
 * bandwidth (what a memory-bound decode step can reach) and the throughput of
 * a cuBLAS bf16 GEMM with fp32 accumulation (what a compute-bound prefill
 * step can reach). Usable from C11 and C++; built only with the CUDA toolkit
 * (link cudart and cublas).
 *
 * Both functions select `device` for the calling thread while they run and
 * restore the previously current device before returning. They allocate
 * their own buffers and stream and free everything on every path. Timing:
 * a warm-up, then the median of repeated runs measured with CUDA events. */
#ifndef MOE_BENCH_CUDA_LIMITS_H
#define MOE_BENCH_CUDA_LIMITS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device-to-device cudaMemcpyAsync of `bytes` between two buffers. *gbps is
 * the bytes read plus the bytes written per second: 2 * bytes / time, in
 * units of 1e9 B/s. Returns 0, or -1 with a message in err (errlen bytes,
 * always terminated when errlen > 0; err may be NULL when errlen is 0). */
int moe_cuda_copy_bw(int device, size_t bytes, double *gbps, char *err, size_t errlen);

/* C[m x n] = A[m x k] * B[k x n] with cublasGemmEx: bf16 A, B and C,
 * CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT, A transposed ("TN", the layout of
 * y = x W^T with W stored [out, in] row-major). *tflops is 2*m*n*k / time in
 * units of 1e12 FLOP/s. Returns 0, or -1 with a message as above. */
int moe_cuda_gemm_tflops(int device, int m, int n, int k, double *tflops, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
