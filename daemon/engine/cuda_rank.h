/* daemon/engine/cuda_rank.h — what the CUDA backend's files share: the rank and
 * layer structs, the error macros, and the functions one file calls in the
 * other. backend_cuda.c: the rank (workspaces, layers, slots, pinning, the
 * ops table); backend_cuda_forward.c: a batch (GEMMs, the small path and
 * its graphs, cuBLAS per expert and grouped). Not installed. */
#ifndef MOE_CUDA_RANK_H
#define MOE_CUDA_RANK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdbool.h>
#include <stdio.h>

#include "daemon/engine/backend.h"
#include "kernels/cuda/moe_cuda.h"

#define BLAS_WS_BYTES (32u << 20) /* cuBLAS' recommendation for Hopper */
#define SMALL_ROWS    2	  /* auto: small kernels up to this many rows per expert on
				   * average */
#define GROUPED_EXPERTS 16 /* auto: grouped cuBLAS past small for more experts */
#define SMALL_SHARED  16	  /* ... and for the shared expert up to one pass of tokens */

#define GRAPH_MAX     64	  /* batches of up to this many tokens run from a graph */

enum gemm_mode { GEMM_AUTO, GEMM_CUBLAS, GEMM_SMALL, GEMM_GROUPED };

/* Host-side arguments of cublasGemmGroupedBatchedEx: one group per expert
 * hit (each has its own row count), for each of the two GEMMs. */
struct grouped_args {
	cublasOperation_t *ta, *tb;
	int *m, *n, *k, *lda, *ldb, *ldc, *size;
	float *alpha, *beta;
};

struct cuda_rank {
	int dev;
	cudaStream_t st;
	cublasHandle_t blas;
	cudaEvent_t ev0, ev1, evk0, evk1; /* end to end; the layer's kernels */
	uint32_t max_tokens;
	bool graphs; /* small batches replayed from CUDA graphs (MOE_CUDA_GRAPHS) */
	bool fused;  /* small batches' front in three kernels (MOE_CUDA_FUSED=1) */
	bool lost;
	char lost_msg[256];
	unsigned long fault_at, calls; /* MOED_TEST_CUDA_FAULT */
	enum gemm_mode gemm;
	bool small_ok, small_shared_ok, grouped_ok;
	struct grouped_args ga;
	size_t dev_bytes;	       /* workspaces */
	bool sizing;		       /* count what alloc_workspaces would take, allocate nothing */

	/* device */
	void *blas_ws;
	char *in_raw, *out_raw;
	void *x, *xs, *h, *shh;
	float *logits, *w, *gsc, *gu, *ys, *shgu, *shy;
	uint32_t *ids, *count, *off, *pos, *src, *act;
	struct moe_cuda_seg *segs_d;
	const void **wptr_d; /* [6E]: the A|B|C pointer arrays of both grouped GEMMs */
	/* pinned host */
	struct moe_cuda_seg *segs_h;
	const void **wptr_h; /* [6E] */
	uint32_t *count_h, *ids_h;
	float *w_h;
	void *stage;
	size_t stage_bytes;
};

struct cuda_layer {
	void *router; /* [E (+1 shared gate row), H] model dtype */
	float *bias;  /* [E] or NULL */
	/* The slot of each expert as the small kernels read it, uploaded
	 * again only when the placement gives this layer other slots. */
	const void **slots_d; /* [E] device */
	const void **slots_h; /* [E] what slots_d holds; NULL entries: unset */
	/* The small path of an n-token batch (n <= GRAPH_MAX) captured once
	 * and replayed: every pointer it reads is fixed per rank and layer
	 * (slots go through slots_d), except the shared expert's slot, so a
	 * new shared slot means a new capture. */
	cudaGraphExec_t graph[GRAPH_MAX + 1];
	const void *graph_shared[GRAPH_MAX + 1];
};

static inline cudaDataType_t cuda_type(enum moe_dtype dt)
{
	return dt == MOE_DT_BF16 ? CUDA_R_16BF : dt == MOE_DT_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* A failure during a batch: the rank is lost from here on. */
static inline int lose(struct cuda_rank *c, const char *what, const char *why, char *err)
{
	if (!c->lost) {
		/* Work already queued (copies from and to client regions) must
		 * not outlive the answer: after a sticky error this returns at
		 * once, after another it waits for the queue to drain. */
		cudaStreamSynchronize(c->st);
		cudaGetLastError();
		c->lost = true;
		snprintf(c->lost_msg, sizeof(c->lost_msg), "GPU %d: %s failed: %s", c->dev, what,
			 why);
	}
	return moe_err(err, -ENOTRECOVERABLE, "%s", c->lost_msg);
}

#define CK(call)                                                                               \
	do {                                                                                   \
		cudaError_t e_ = (call);                                                       \
		if (e_ != cudaSuccess)                                                         \
			return lose(c, #call, cudaGetErrorString(e_), err);                    \
	} while (0)
#define KL(call)                                                                               \
	do {                                                                                   \
		int e_ = (call);                                                               \
		if (e_)                                                                        \
			return lose(c, #call, cudaGetErrorString((cudaError_t)e_), err);       \
	} while (0)


/* backend_cuda_forward.c */
bool cuda_probe_grouped(struct cuda_rank *c, const struct moe_model *m);
int cuda_forward(struct moe_rank *r, const struct moe_model *m, const struct moe_layer_state *ls,
		 struct moe_fwd *f, char *err);

#endif
