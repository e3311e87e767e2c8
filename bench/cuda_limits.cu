/* bench/cuda_limits.cu — see cuda_limits.h. */
#include "bench/cuda_limits.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define WARMUP 3
#define REPS   20

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt,
                                                      ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -1;
}

/* Everything one measurement holds; released by release() on every path. */
struct run {
	int prev_device; /* -1: none to restore */
	cudaStream_t stream;
	cudaEvent_t ev[2 * REPS];
	void *buf[3];
	cublasHandle_t blas;
};

static void run_init(struct run *r)
{
	r->prev_device = -1;
	r->stream = NULL;
	for (int i = 0; i < 2 * REPS; i++)
		r->ev[i] = NULL;
	for (int i = 0; i < 3; i++)
		r->buf[i] = NULL;
	r->blas = NULL;
}

/* Best effort: a failure while releasing cannot be reported better than the
 * result (or the error) already is. */
static void run_release(struct run *r)
{
	if (r->stream)
		(void)cudaStreamSynchronize(r->stream);
	if (r->blas)
		(void)cublasDestroy(r->blas);
	for (int i = 0; i < 2 * REPS; i++)
		if (r->ev[i])
			(void)cudaEventDestroy(r->ev[i]);
	for (int i = 0; i < 3; i++)
		if (r->buf[i])
			(void)cudaFree(r->buf[i]);
	if (r->stream)
		(void)cudaStreamDestroy(r->stream);
	if (r->prev_device >= 0)
		(void)cudaSetDevice(r->prev_device);
	(void)cudaGetLastError(); /* leave no non-sticky error behind for the caller */
}

static int cuda_fail(char *err, size_t errlen, const char *what, cudaError_t e)
{
	(void)cudaGetLastError();
	return fail(err, errlen, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

static int blas_fail(char *err, size_t errlen, const char *what, cublasStatus_t s)
{
	return fail(err, errlen, "%s: %s", what, cublasGetStatusString(s));
}

#define CK(call)                                                                                   \
	do {                                                                                       \
		cudaError_t e_ = (call);                                                           \
		if (e_ != cudaSuccess) {                                                           \
			ret = cuda_fail(err, errlen, #call, e_);                                   \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

#define CKB(call)                                                                                  \
	do {                                                                                       \
		cublasStatus_t s_ = (call);                                                        \
		if (s_ != CUBLAS_STATUS_SUCCESS) {                                                 \
			ret = blas_fail(err, errlen, #call, s_);                                   \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

/* Select the device and create the stream and the events. */
static int run_start(struct run *r, int device, char *err, size_t errlen)
{
	int n = 0, cur = 0, ret = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e != cudaSuccess)
		return cuda_fail(err, errlen, "cudaGetDeviceCount", e);
	if (device < 0 || device >= n)
		return fail(err, errlen, "CUDA device %d does not exist (%d device%s)", device, n,
		            n == 1 ? "" : "s");
	e = cudaGetDevice(&cur);
	if (e != cudaSuccess)
		return cuda_fail(err, errlen, "cudaGetDevice", e);
	if (cur != device) {
		CK(cudaSetDevice(device));
		r->prev_device = cur;
	}
	CK(cudaStreamCreateWithFlags(&r->stream, cudaStreamNonBlocking));
	for (int i = 0; i < 2 * REPS; i++)
		CK(cudaEventCreate(&r->ev[i]));
out:
	return ret;
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return (x > y) - (x < y);
}

/* Median of the REPS event pairs (start 2i, stop 2i+1) in milliseconds;
 * the stream must have been synchronized. */
static int median_ms(struct run *r, double *ms, char *err, size_t errlen)
{
	float t[REPS];
	int ret = 0;

	for (int i = 0; i < REPS; i++)
		CK(cudaEventElapsedTime(&t[i], r->ev[2 * i], r->ev[2 * i + 1]));
	qsort(t, REPS, sizeof(t[0]), cmp_float);
	*ms = REPS % 2 ? t[REPS / 2] : 0.5 * ((double)t[REPS / 2 - 1] + (double)t[REPS / 2]);
	if (!(*ms > 0))
		ret = fail(err, errlen, "median time %.6f ms is not positive", *ms);
out:
	return ret;
}

extern "C" int moe_cuda_copy_bw(int device, size_t bytes, double *gbps, char *err, size_t errlen)
{
	struct run r;
	double ms = 0;
	int ret = 0;

	if (err && errlen)
		err[0] = '\0';
	if (!gbps)
		return fail(err, errlen, "moe_cuda_copy_bw: gbps is NULL");
	*gbps = 0;
	if (bytes == 0)
		return fail(err, errlen, "moe_cuda_copy_bw: bytes must be positive");
	run_init(&r);
	ret = run_start(&r, device, err, errlen);
	if (ret)
		goto out;
	CK(cudaMalloc(&r.buf[0], bytes));
	CK(cudaMalloc(&r.buf[1], bytes));
	/* touch both buffers so that no first-use cost lands in a timed copy */
	CK(cudaMemsetAsync(r.buf[0], 0x5a, bytes, r.stream));
	CK(cudaMemsetAsync(r.buf[1], 0xa5, bytes, r.stream));
	for (int i = 0; i < WARMUP; i++)
		CK(cudaMemcpyAsync(r.buf[1], r.buf[0], bytes, cudaMemcpyDeviceToDevice, r.stream));
	CK(cudaStreamSynchronize(r.stream));
	for (int i = 0; i < REPS; i++) {
		CK(cudaEventRecord(r.ev[2 * i], r.stream));
		CK(cudaMemcpyAsync(r.buf[1], r.buf[0], bytes, cudaMemcpyDeviceToDevice, r.stream));
		CK(cudaEventRecord(r.ev[2 * i + 1], r.stream));
	}
	CK(cudaStreamSynchronize(r.stream));
	ret = median_ms(&r, &ms, err, errlen);
	if (!ret)
		*gbps = 2.0 * (double)bytes / (ms * 1e-3) / 1e9;
out:
	run_release(&r);
	return ret;
}

/* Deterministic values in (-0.5, 0.5), never zero, from a hash of the index. */
static __global__ void fill_bf16(__nv_bfloat16 *p, size_t n, uint32_t seed)
{
	size_t stride = (size_t)gridDim.x * blockDim.x;

	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		uint32_t h = (uint32_t)i * 0x9e3779b1u ^ (uint32_t)(i >> 32) ^ seed;

		h ^= h >> 16;
		h *= 0x85ebca6bu;
		h ^= h >> 13;
		h *= 0xc2b2ae35u;
		h ^= h >> 16;
		p[i] = __float2bfloat16(((float)(h & 0xffffu) + 0.5f) * (1.0f / 65536.0f) - 0.5f);
	}
}

static int fill(void *p, size_t n, uint32_t seed, cudaStream_t s, char *err, size_t errlen)
{
	const unsigned threads = 256;
	size_t blocks = (n + threads - 1) / threads;
	int ret = 0;

	if (blocks > 65536)
		blocks = 65536; /* grid-stride loop covers the rest */
	fill_bf16<<<(unsigned)blocks, threads, 0, s>>>((__nv_bfloat16 *)p, n, seed);
	CK(cudaGetLastError());
out:
	return ret;
}

extern "C" int moe_cuda_gemm_tflops(int device, int m, int n, int k, double *tflops, char *err,
                                    size_t errlen)
{
	const float alpha = 1.0f, beta = 0.0f;
	struct run r;
	size_t na, nb, nc;
	double ms = 0;
	int ret = 0;

	if (err && errlen)
		err[0] = '\0';
	if (!tflops)
		return fail(err, errlen, "moe_cuda_gemm_tflops: tflops is NULL");
	*tflops = 0;
	if (m <= 0 || n <= 0 || k <= 0)
		return fail(err, errlen, "moe_cuda_gemm_tflops: m=%d n=%d k=%d must be positive", m,
		            n, k);
	na = (size_t)m * (size_t)k;
	nb = (size_t)k * (size_t)n;
	nc = (size_t)m * (size_t)n;
	run_init(&r);
	ret = run_start(&r, device, err, errlen);
	if (ret)
		goto out;
	CK(cudaMalloc(&r.buf[0], na * sizeof(__nv_bfloat16)));
	CK(cudaMalloc(&r.buf[1], nb * sizeof(__nv_bfloat16)));
	CK(cudaMalloc(&r.buf[2], nc * sizeof(__nv_bfloat16)));
	ret = fill(r.buf[0], na, 0x1234u, r.stream, err, errlen);
	if (!ret)
		ret = fill(r.buf[1], nb, 0xabcdu, r.stream, err, errlen);
	if (ret)
		goto out;
	CK(cudaMemsetAsync(r.buf[2], 0, nc * sizeof(__nv_bfloat16), r.stream));
	CKB(cublasCreate(&r.blas));
	CKB(cublasSetStream(r.blas, r.stream));
	CKB(cublasSetPointerMode(r.blas, CUBLAS_POINTER_MODE_HOST));
	/* Column-major C (m x n, ldc m) = op(A) B with A stored k x m (lda k),
	 * transposed, and B stored k x n (ldb k): the "TN" layout. */
	for (int i = 0; i < WARMUP + REPS; i++) {
		int t = i - WARMUP;

		if (t >= 0)
			CK(cudaEventRecord(r.ev[2 * t], r.stream));
		CKB(cublasGemmEx(r.blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, r.buf[0],
		                 CUDA_R_16BF, k, r.buf[1], CUDA_R_16BF, k, &beta, r.buf[2],
		                 CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
		if (t >= 0)
			CK(cudaEventRecord(r.ev[2 * t + 1], r.stream));
		else if (t == -1)
			CK(cudaStreamSynchronize(r.stream)); /* end of the warm-up */
	}
	CK(cudaStreamSynchronize(r.stream));
	ret = median_ms(&r, &ms, err, errlen);
	if (!ret)
		*tflops = 2.0 * (double)m * (double)n * (double)k / (ms * 1e-3) / 1e12;
out:
	run_release(&r);
	return ret;
}
