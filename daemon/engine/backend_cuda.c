/* daemon/engine/backend_cuda.c — the CUDA backend: one rank per GPU, a whole batch
 * on the device (kernels/cuda/moe_cuda.h has the data path), expert GEMMs
 * with cuBLAS.
 *
 * Memory. Every expert lives in a device slot: W_gate over W_up as one
 * [2I, H] matrix (one GEMM gives both halves), then W_down [H, I], in the
 * model dtype, uploaded once through a pinned staging buffer. Every
 * workspace is allocated at start for scheduler.max_batch_tokens; a batch
 * allocates nothing (cuBLAS gets a workspace of its own too). Activations
 * between the GEMMs are fp32 where they are sums (GEMM outputs, combine)
 * and the model dtype where they feed a GEMM.
 *
 * Two ways to run the experts, chosen per batch:
 *  - cublas: the host syncs once in the middle of the batch, since cuBLAS
 *    takes GEMM sizes on the host: the per-expert row counts come back,
 *    then one gate/up GEMM, the SwiGLU kernel and one down GEMM per expert
 *    hit (cublasGemmEx);
 *  - small: grouped kernels that read the counts on the device, SwiGLU
 *    fused (kernels/cuda/experts_small.cu): no host sync in the batch;
 *  - grouped: like cublas, but each of the two GEMMs is one
 *    cublasGemmGroupedBatchedEx call over the experts hit (one launch
 *    instead of one per expert). Its output is in the model dtype (cuBLAS
 *    has no bf16-in/fp32-out grouped GEMM), rounded where transformers
 *    rounds too. Probed at start; needs the small path's alignment.
 * auto follows the crossovers measured on an H200 (bench/RESULTS.md, both
 * benchmark shapes, every path at 1-4096 tokens): small while the rows per
 * expert average at most SMALL_ROWS (decode: the small kernels beat
 * cuBLAS there by skipping the host sync, and lose beyond since they run
 * on CUDA cores, not tensor cores); past that, grouped for models of more
 * than GROUPED_EXPERTS experts (per-expert cuBLAS calls cost a launch
 * each: 128 for an OLMoE layer, 2-4.5x the grouped call's time at 16-1024
 * tokens), else cublas (8 experts: per-expert GEMMs are as fast at 16-64
 * tokens and 2x faster from 1024 on). MOE_CUDA_GEMM=cublas|small|grouped|
 * auto forces one, for measurement (moe-bench, tools/gpu-check.sh).
 *
 * Faults are crash-only: any CUDA or cuBLAS error during a batch marks the
 * rank lost (-ENOTRECOVERABLE) and every later call fails the same way;
 * moed answers what is in flight and exits so that systemd restarts it on
 * a fresh context. Nothing tries to recover a context in place.
 *
 * Not batch-invariant: cuBLAS picks its algorithm by shape, so a token's
 * result may differ in the last bits with the batch it lands in (the CPU
 * backend is bit-exact across batches). Results stay within the bf16
 * tolerance of the CPU engine (tests/test_cuda.c).
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/backend.h"
#include "daemon/engine/log.h"
#include "kernels/cpu/convert.h"
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

static cudaDataType_t cuda_type(enum moe_dtype dt)
{
	return dt == MOE_DT_BF16 ? CUDA_R_16BF : dt == MOE_DT_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* A failure during a batch: the rank is lost from here on. */
static int lose(struct cuda_rank *c, const char *what, const char *why, char *err)
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

static int cuda_oom(struct cuda_rank *c, const char *what, size_t bytes, char *err)
{
	size_t fr = 0, tot = 0;

	cudaGetLastError(); /* an allocation failure is not sticky */
	cudaMemGetInfo(&fr, &tot);
	return moe_err(err, -ENOMEM,
		       "GPU %d: out of device memory for %s (%.1f MiB; %.1f MiB free of %.1f MiB)",
		       c->dev, what, (double)bytes / (1 << 20), (double)fr / (1 << 20),
		       (double)tot / (1 << 20));
}

static int dalloc(struct cuda_rank *c, void *pp, size_t bytes, const char *what, char *err)
{
	void **p = pp;

	if (c->sizing) {
		*p = NULL;
		c->dev_bytes += bytes;
		return 0;
	}
	if (cudaMalloc(p, bytes ? bytes : 1) != cudaSuccess) {
		*p = NULL;
		return cuda_oom(c, what, bytes, err);
	}
	c->dev_bytes += bytes;
	return 0;
}

static int halloc(struct cuda_rank *c, void *pp, size_t bytes, char *err)
{
	void **p = pp;

	if (c->sizing) {
		*p = NULL;
		return 0;
	}
	if (cudaMallocHost(p, bytes ? bytes : 1) != cudaSuccess) {
		*p = NULL;
		cudaGetLastError();
		return moe_err(err, -ENOMEM, "GPU %d: cannot allocate %.1f MiB of pinned host memory",
			       c->dev, (double)bytes / (1 << 20));
	}
	return 0;
}

static void cuda_rank_fini(struct moe_rank *r)
{
	struct cuda_rank *c = r->priv;

	if (!c)
		return;
	void *dev[] = {c->blas_ws, c->in_raw,  c->out_raw, c->x,      c->xs,
		       c->h,	   c->shh,     c->logits,  c->w,      c->gsc,
		       c->gu,	   c->ys,      c->shgu,	   c->shy,    c->ids,
		       c->count,   c->off,     c->pos,	   c->src,    c->segs_d,
		       (void *)c->wptr_d, c->act};
	void *host[] = {c->segs_h, c->count_h, c->ids_h, c->w_h, c->stage, (void *)c->wptr_h};

	cudaSetDevice(c->dev);
	/* A lost context refuses most calls: what cannot be freed goes with
	 * the process, which exits right after. */
	for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
		if (dev[i])
			cudaFree(dev[i]);
	for (size_t i = 0; i < sizeof(host) / sizeof(host[0]); i++)
		if (host[i])
			cudaFreeHost(host[i]);
	free(c->ga.ta), free(c->ga.tb), free(c->ga.m), free(c->ga.n), free(c->ga.k);
	free(c->ga.lda), free(c->ga.ldb), free(c->ga.ldc), free(c->ga.size);
	free(c->ga.alpha), free(c->ga.beta);
	if (c->blas)
		cublasDestroy(c->blas);
	if (c->ev0)
		cudaEventDestroy(c->ev0);
	if (c->ev1)
		cudaEventDestroy(c->ev1);
	if (c->evk0)
		cudaEventDestroy(c->evk0);
	if (c->evk1)
		cudaEventDestroy(c->evk1);
	if (c->st)
		cudaStreamDestroy(c->st);
	cudaGetLastError();
	free(c);
	r->priv = NULL;
}

static int alloc_workspaces(struct cuda_rank *c, const struct moe_model *m, char *err)
{
	size_t T = c->max_tokens, H = m->hidden, K = m->top_k, E = m->n_experts, I = m->inter;
	size_t Is = m->shared_inter, ds = moe_dtype_size(m->dtype), TK = T * K;
	size_t imax = I > Is ? I : Is;
	int ret;

	/* segments start 16-byte aligned (a bf16 segment of odd length
	 * followed by an f32 one): one pad per token bounds the padding */
	ret = dalloc(c, &c->in_raw, T * (H * 4 + 16), "the batch input buffer", err);
	ret = ret ? ret : dalloc(c, &c->out_raw, T * (H * 4 + 16), "the batch output buffer", err);
	ret = ret ? ret : dalloc(c, &c->x, T * H * ds, "the batch activations", err);
	ret = ret ? ret : dalloc(c, &c->logits, T * (E + 1) * 4, "the router logits", err);
	ret = ret ? ret : dalloc(c, &c->ids, TK * 4, "the top-k ids", err);
	ret = ret ? ret : dalloc(c, &c->w, TK * 4, "the top-k weights", err);
	ret = ret ? ret : dalloc(c, &c->gsc, T * 4, "the shared-expert gates", err);
	ret = ret ? ret : dalloc(c, &c->count, E * 4, "the expert counts", err);
	ret = ret ? ret : dalloc(c, &c->off, (E + 1) * 4, "the expert offsets", err);
	ret = ret ? ret : dalloc(c, &c->act, (E + 1) * 4, "the active experts", err);
	ret = ret ? ret : dalloc(c, &c->pos, TK * 4, "the dispatch positions", err);
	ret = ret ? ret : dalloc(c, &c->src, TK * 4, "the dispatch sources", err);
	ret = ret ? ret : dalloc(c, &c->xs, TK * H * ds, "the dispatched rows", err);
	ret = ret ? ret : dalloc(c, &c->gu, TK * 2 * I * 4, "the gate/up GEMM output", err);
	ret = ret ? ret : dalloc(c, &c->h, TK * I * ds, "the SwiGLU output", err);
	ret = ret ? ret : dalloc(c, &c->ys, TK * H * 4, "the expert outputs", err);
	ret = ret ? ret : dalloc(c, &c->segs_d, T * sizeof(struct moe_cuda_seg), "segments", err);
	ret = ret ? ret : dalloc(c, &c->wptr_d, 6 * E * sizeof(void *), "the slot table", err);
	if (!ret && Is) {
		ret = dalloc(c, &c->shgu, T * 2 * Is * 4, "the shared gate/up output", err);
		ret = ret ? ret : dalloc(c, &c->shh, T * Is * ds, "the shared SwiGLU output", err);
		ret = ret ? ret : dalloc(c, &c->shy, T * H * 4, "the shared expert output", err);
	}
	ret = ret ? ret : dalloc(c, &c->blas_ws, BLAS_WS_BYTES, "the cuBLAS workspace", err);
	c->stage_bytes = 3 * imax * H * ds;
	ret = ret ? ret : halloc(c, &c->segs_h, T * sizeof(struct moe_cuda_seg), err);
	ret = ret ? ret : halloc(c, &c->count_h, E * 4, err);
	ret = ret ? ret : halloc(c, &c->ids_h, TK * 4, err);
	ret = ret ? ret : halloc(c, &c->w_h, TK * 4, err);
	ret = ret ? ret : halloc(c, &c->stage, c->stage_bytes, err);
	ret = ret ? ret : halloc(c, &c->wptr_h, 6 * E * sizeof(void *), err);
	if (!ret && !c->sizing) {
		struct grouped_args *g = &c->ga;

		g->ta = calloc(E, sizeof(*g->ta)), g->tb = calloc(E, sizeof(*g->tb));
		g->m = calloc(E, sizeof(int)), g->n = calloc(E, sizeof(int));
		g->k = calloc(E, sizeof(int)), g->lda = calloc(E, sizeof(int));
		g->ldb = calloc(E, sizeof(int)), g->ldc = calloc(E, sizeof(int));
		g->size = calloc(E, sizeof(int));
		g->alpha = calloc(E, sizeof(float)), g->beta = calloc(E, sizeof(float));
		if (!g->ta || !g->tb || !g->m || !g->n || !g->k || !g->lda || !g->ldb || !g->ldc ||
		    !g->size || !g->alpha || !g->beta)
			ret = moe_err(err, -ENOMEM, "out of memory");
		for (size_t i = 0; !ret && i < E; i++) {
			g->ta[i] = CUBLAS_OP_T, g->tb[i] = CUBLAS_OP_N;
			g->size[i] = 1, g->alpha[i] = 1.0f, g->beta[i] = 0.0f;
		}
	}
	return ret;
}

static bool probe_grouped(struct cuda_rank *c, const struct moe_model *m);

/* Device memory alloc_workspaces takes: the same list, counted. */
static uint64_t cuda_workspace_bytes(const struct moe_model *m, uint32_t max_tokens,
				     uint32_t threads)
{
	struct cuda_rank c = {.sizing = true, .max_tokens = max_tokens};
	char err[MOE_ERRLEN];

	(void)threads;
	alloc_workspaces(&c, m, err);
	return c.dev_bytes;
}

static int cuda_rank_init(struct moe_rank *r, const struct moe_model *m, uint32_t max_tokens,
			  const struct moe_backend_tuning *t, char *err)
{
	struct cuda_rank *c = calloc(1, sizeof(*c));
	struct cudaDeviceProp p;
	cudaError_t e;
	int n = 0, ret;

	if (!c)
		return moe_err(err, -ENOMEM, "cuda rank: out of memory");
	r->priv = c;
	c->dev = r->device;
	c->max_tokens = max_tokens;
	e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess || r->device < 0 || r->device >= n) {
		ret = e != cudaSuccess
			      ? moe_err(err, -ENODEV, "no usable GPU: %s", cudaGetErrorString(e))
			      : moe_err(err, -ENODEV, "GPU %d requested, %d visible", r->device, n);
		cudaGetLastError();
		goto fail;
	}
	if (cudaSetDevice(c->dev) != cudaSuccess || cudaGetDeviceProperties(&p, c->dev)) {
		ret = moe_err(err, -ENODEV, "GPU %d: cannot open it", c->dev);
		goto fail;
	}
	if (p.major < 8) {
		ret = moe_err(err, -ENOTSUP,
			      "GPU %d (%.96s) has compute capability %d.%d; moed's CUDA kernels "
			      "need 8.0 or newer",
			      c->dev, p.name, p.major, p.minor);
		goto fail;
	}
	snprintf(r->desc, sizeof(r->desc), "GPU %d: %.96s, %.1f GiB, compute %d.%d, %d SMs", c->dev,
		 p.name, (double)p.totalGlobalMem / (1 << 30), p.major, p.minor,
		 p.multiProcessorCount);
	if (cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking) != cudaSuccess ||
	    cudaEventCreate(&c->ev0) != cudaSuccess || cudaEventCreate(&c->ev1) != cudaSuccess ||
	    cudaEventCreate(&c->evk0) != cudaSuccess || cudaEventCreate(&c->evk1) != cudaSuccess ||
	    cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
		ret = moe_err(err, -ENODEV, "GPU %d: cannot create a stream, events or cuBLAS",
			      c->dev);
		goto fail;
	}
	ret = alloc_workspaces(c, m, err);
	if (ret)
		goto fail;
	if (cublasSetStream(c->blas, c->st) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetWorkspace(c->blas, c->blas_ws, BLAS_WS_BYTES) != CUBLAS_STATUS_SUCCESS) {
		ret = moe_err(err, -ENODEV, "GPU %d: cannot set cuBLAS' stream and workspace",
			      c->dev);
		goto fail;
	}
	c->fault_at = t->cuda_fault_at;
	c->small_ok = moe_cuda_small_ok(m->dtype, m->hidden, m->inter);
	c->small_shared_ok = m->shared_inter && moe_cuda_small_ok(m->dtype, m->hidden,
								   m->shared_inter);
	{
		const char *g = t->cuda_gemm;

		c->gemm = !g || !strcmp(g, "auto") ? GEMM_AUTO
			  : !strcmp(g, "cublas")   ? GEMM_CUBLAS
			  : !strcmp(g, "small")	   ? GEMM_SMALL
			  : !strcmp(g, "grouped")  ? GEMM_GROUPED
						   : (enum gemm_mode)-1;
		if ((int)c->gemm < 0) {
			ret = moe_err(err, -EINVAL,
				      "MOE_CUDA_GEMM=%s: expected auto, cublas, small or grouped", g);
			goto fail;
		}
		c->grouped_ok = c->small_ok && probe_grouped(c, m);
		if (c->gemm == GEMM_GROUPED && !c->grouped_ok) {
			ret = moe_err(err, -ENOTSUP, "MOE_CUDA_GEMM=grouped: this cuBLAS refuses a "
				      "grouped %s GEMM, or hidden %u / inter %u are not multiples "
				      "of %d", moe_dtype_name(m->dtype), m->hidden, m->inter,
				      m->dtype == MOE_DT_F32 ? 4 : 8);
			goto fail;
		}
		if (c->gemm == GEMM_SMALL && !c->small_ok) {
			ret = moe_err(err, -EINVAL, "MOE_CUDA_GEMM=small: hidden %u and inter %u "
				      "must be multiples of %d", m->hidden, m->inter,
				      m->dtype == MOE_DT_F32 ? 4 : 8);
			goto fail;
		}
		if (g && c->gemm != GEMM_AUTO)
			moe_log(LOG_NOTICE, "MOE_CUDA_GEMM=%s: expert GEMMs forced", g);
	}
	{
		c->graphs = !t->cuda_no_graphs;
		if (!c->graphs)
			moe_log(LOG_NOTICE, "MOE_CUDA_GRAPHS=0: small batches launch kernel by kernel");
		/* Opt-in: measured slower on an H200 at 1-4 tokens (bench/
		 * RESULTS.md: its few blocks wait on DRAM where cuBLAS spreads
		 * the router over the GPU), kept for measurement. */
		c->fused = t->cuda_fused && moe_cuda_front_small_ok(m->hidden, m->n_experts);
		if (t->cuda_fused)
			moe_log(LOG_NOTICE, "MOE_CUDA_FUSED=1: small batches %s", c->fused
				? "use the fused front" : "cannot use the fused front (hidden or experts too large)");
	}
	r->kernels = c->small_ok ? (c->graphs ? "cublas+small (graphs)" : "cublas+small")
				 : "cublas";
	moe_log(LOG_INFO, "%s: %.1f MiB of workspaces for %u tokens", r->desc,
		(double)c->dev_bytes / (1 << 20), max_tokens);
	return 0;
fail:
	cuda_rank_fini(r);
	return ret;
}

static int cuda_layer_init(struct moe_rank *r, const struct moe_model *m,
			   struct moe_layer_state *ls)
{
	struct cuda_rank *c = r->priv;
	struct cuda_layer *cl = calloc(1, sizeof(*cl));
	size_t E = m->n_experts, H = m->hidden, ds = moe_dtype_size(m->dtype);
	size_t rows = E + (ls->shared_gate ? 1 : 0);
	char *host = malloc(rows * H * ds);
	char err[MOE_ERRLEN];
	int ret = -ENOMEM;

	if (!cl || !host)
		goto out;
	/* The router and the shared gate row go back to the model dtype: they
	 * were widened from it, so this is exact. */
	moe_cpu_from_f32(m->dtype, ls->router, host, E * H);
	if (ls->shared_gate)
		moe_cpu_from_f32(m->dtype, ls->shared_gate, host + E * H * ds, H);
	cl->slots_h = calloc(E, sizeof(*cl->slots_h));
	if (!cl->slots_h || dalloc(c, &cl->router, rows * H * ds, "a router", err) ||
	    dalloc(c, &cl->slots_d, E * sizeof(void *), "a slot table", err) ||
	    (ls->bias && dalloc(c, &cl->bias, E * 4, "a router bias", err))) {
		moe_log(LOG_ERR, "%s", err);
		goto out;
	}
	/* (synchronised: the compute stream is non-blocking, so nothing else
	 * orders it after a pageable copy) */
	if (cudaMemcpy(cl->router, host, rows * H * ds, cudaMemcpyHostToDevice) != cudaSuccess ||
	    (ls->bias && cudaMemcpy(cl->bias, ls->bias, E * 4, cudaMemcpyHostToDevice)) ||
	    cudaStreamSynchronize(0) != cudaSuccess) {
		cudaGetLastError();
		ret = -EIO;
		goto out;
	}
	ls->router_dev = cl;
	cl = NULL;
	ret = 0;
out:
	if (cl) {
		cudaFree(cl->router);
		cudaFree(cl->bias);
		cudaFree(cl->slots_d);
		free(cl->slots_h);
		free(cl);
	}
	free(host);
	return ret;
}

static void cuda_layer_fini(struct moe_rank *r, struct moe_layer_state *ls)
{
	struct cuda_layer *cl = ls->router_dev;

	(void)r;
	if (!cl)
		return;
	for (int i = 0; i <= GRAPH_MAX; i++)
		if (cl->graph[i])
			cudaGraphExecDestroy(cl->graph[i]);
	cudaFree(cl->router);
	cudaFree(cl->bias);
	cudaFree(cl->slots_d);
	free(cl->slots_h);
	free(cl);
	ls->router_dev = NULL;
}

static int cuda_slot_alloc(struct moe_rank *r, const struct moe_model *m, uint32_t inter,
			   struct moe_slot *s, char *err)
{
	struct cuda_rank *c = r->priv;
	size_t bytes = 3 * (size_t)inter * m->hidden * moe_dtype_size(m->dtype);
	int ret = dalloc(c, &s->mem, bytes, "an expert slot", err);

	c->dev_bytes -= ret ? 0 : bytes; /* weights, not workspaces */
	s->bytes = ret ? 0 : bytes;
	s->inter = inter;
	return ret;
}

static void cuda_slot_free(struct moe_rank *r, struct moe_slot *s)
{
	(void)r;
	cudaFree(s->mem);
	s->mem = NULL;
	s->bytes = 0;
}

/* gate over up, then down: read into the pinned stage, one copy. */
static int cuda_slot_upload(struct moe_rank *r, struct moe_slot *s, struct moe_model *m,
			    const struct moe_expert_src *src, char *err)
{
	struct cuda_rank *c = r->priv;
	uint32_t I = src->gate.rows;
	size_t mat = (size_t)I * m->hidden * moe_dtype_size(m->dtype);
	char *stage = c->stage;
	int ret;

	if (I != s->inter || 3 * mat > c->stage_bytes)
		return moe_err(err, -EINVAL, "slot for inter %u given an expert of %u", s->inter, I);
	ret = moe_model_read(m, &src->gate, stage, err);
	if (!ret)
		ret = moe_model_read(m, &src->up, stage + mat, err);
	if (!ret)
		ret = moe_model_read(m, &src->down, stage + 2 * mat, err);
	if (!ret && cudaMemcpy(s->mem, stage, 3 * mat, cudaMemcpyHostToDevice) != cudaSuccess) {
		ret = moe_err(err, -EIO, "GPU %d: copying an expert to the device failed: %s",
			      c->dev, cudaGetErrorString(cudaGetLastError()));
	}
	return ret;
}

/* C[n, m] (fp32, row-major) = B[n, k] · A[m, k]ᵀ: weights A, activations B,
 * both row-major in dtype t (column-major: C = op(A)ᵀ-free A^T·B). */
static cublasStatus_t gemm(struct cuda_rank *c, cudaDataType_t t, uint32_t m, uint32_t n,
			   uint32_t k, const void *A, const void *B, float *C)
{
	const float one = 1.0f, zero = 0.0f;

	return cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, A, t,
			    (int)k, B, t, (int)k, &zero, C, CUDA_R_32F, (int)m, CUBLAS_COMPUTE_32F,
			    CUBLAS_GEMM_DEFAULT);
}

static cublasStatus_t gemm_grouped(struct cuda_rank *c, cudaDataType_t t, int ng,
				    const void *const *A, const void *const *B, void *const *C)
{
	const struct grouped_args *g = &c->ga;

	return cublasGemmGroupedBatchedEx(c->blas, g->ta, g->tb, g->m, g->n, g->k, g->alpha, A, t,
					  g->lda, B, t, g->ldb, g->beta, C, t, g->ldc, ng, g->size,
					  CUBLAS_COMPUTE_32F);
}

/* Whether cuBLAS runs a grouped GEMM of the model dtype here: one tiny
 * problem on a scratch buffer. */
static bool probe_grouped(struct cuda_rank *c, const struct moe_model *m)
{
	struct grouped_args *g = &c->ga;
	cublasStatus_t st = CUBLAS_STATUS_ALLOC_FAILED;
	cudaError_t e;
	char *buf = NULL; /* A 8x8, B 8x1, C 8x1: 1 KiB covers any dtype */

	g->m[0] = 8, g->n[0] = 1, g->k[0] = 8, g->lda[0] = 8, g->ldb[0] = 8, g->ldc[0] = 8;
	e = cudaMalloc((void **)&buf, 1024);
	if (e == cudaSuccess)
		e = cudaMemset(buf, 0, 1024);
	if (e == cudaSuccess) {
		c->wptr_h[0] = buf, c->wptr_h[1] = buf + 512, c->wptr_h[2] = buf + 768;
		e = cudaMemcpy(c->wptr_d, c->wptr_h, 3 * sizeof(void *), cudaMemcpyHostToDevice);
	}
	if (e == cudaSuccess) {
		st = gemm_grouped(c, cuda_type(m->dtype), 1, c->wptr_d, c->wptr_d + 1,
				  (void *const *)(c->wptr_d + 2));
		e = cudaStreamSynchronize(c->st);
	}
	cudaFree(buf);
	cudaGetLastError();
	if (st != CUBLAS_STATUS_SUCCESS || e != cudaSuccess)
		moe_log(LOG_INFO, "GPU %d: grouped cuBLAS GEMMs unavailable (%s)", c->dev,
			st != CUBLAS_STATUS_SUCCESS ? cublasGetStatusString(st)
						    : cudaGetErrorString(e));
	return st == CUBLAS_STATUS_SUCCESS && e == cudaSuccess;
}

#define CB(call)                                                                               \
	do {                                                                                   \
		cublasStatus_t b_ = (call);                                                    \
		if (b_ != CUBLAS_STATUS_SUCCESS)                                               \
			return lose(c, #call, cublasGetStatusString(b_), err);                 \
	} while (0)

/* The routing parameters of a layer as the route kernel takes them. */
static struct moe_cuda_route_params route_params(const struct moe_model *m,
						 const struct moe_layer_state *ls)
{
	return (struct moe_cuda_route_params){
		.n_experts = m->n_experts,
		.top_k = m->top_k,
		.score = (uint32_t)m->route.score,
		.group = (uint32_t)m->route.group,
		.n_group = m->route.n_group,
		.topk_group = m->route.topk_group,
		.renormalize = m->route.renormalize,
		.renorm_eps = m->route.renorm_eps,
		.scale = m->route.scale,
		.round_dt = m->router_fp32 ? -1 : (int)m->dtype,
		.ld = m->n_experts + (ls->shared_gate ? 1 : 0),
		.shared_gate = ls->shared_gate != NULL,
	};
}

/* Input rows to routed, dispatched rows: convert, router GEMM, top-k,
 * permute, gather. */
static int front(struct cuda_rank *c, const struct moe_model *m, const struct moe_layer_state *ls,
		 uint32_t n, uint32_t n_segs, char *err)
{
	const struct cuda_layer *cl = ls->router_dev;
	const struct moe_cuda_route_params rp = route_params(m, ls);
	const uint32_t H = m->hidden, K = m->top_k, E = m->n_experts;

	KL(moe_cuda_convert_in(c->st, c->in_raw, c->segs_d, n_segs, n, H, (int)m->dtype, c->x));
	CB(gemm(c, cuda_type(m->dtype), rp.ld, n, H, cl->router, c->x, c->logits));
	KL(moe_cuda_route(c->st, &rp, c->logits, cl->bias, n, c->ids, c->w, c->gsc));
	KL(moe_cuda_permute(c->st, c->ids, n, K, E, c->count, c->off, c->pos, c->src, c->act));
	KL(moe_cuda_gather(c->st, c->x, c->src, n * K, H * moe_dtype_size(m->dtype), c->xs));
	return 0;
}

/* The shared expert (if any) and the combine into the output rows. */
static int back(struct cuda_rank *c, const struct moe_model *m, const struct moe_layer_state *ls,
		uint32_t n, uint32_t n_segs, int ydt, char *err)
{
	const uint32_t H = m->hidden, K = m->top_k;
	const int mdt = (int)m->dtype;
	const size_t ds = moe_dtype_size(m->dtype);

	if (ls->shared.mem && c->small_shared_ok && n <= SMALL_SHARED && c->gemm != GEMM_CUBLAS) {
		KL(moe_cuda_experts_small(c->st, mdt, NULL, ls->shared.mem, NULL, NULL, NULL, 1, 1,
					  n, n, c->x, NULL, H, ls->shared.inter, c->shh, c->shy));
	} else if (ls->shared.mem) {
		uint32_t Is = ls->shared.inter;
		cudaDataType_t t = cuda_type(m->dtype);

		CB(gemm(c, t, 2 * Is, n, H, ls->shared.mem, c->x, c->shgu));
		KL(moe_cuda_swiglu(c->st, c->shgu, MOE_DT_F32, n, Is, mdt, c->shh));
		CB(gemm(c, t, H, n, Is, (const char *)ls->shared.mem + 2 * (size_t)Is * H * ds,
			c->shh, c->shy));
	}
	KL(moe_cuda_combine(c->st, c->ys, ydt, c->pos, c->w, n, K, H,
			    ls->shared.mem ? c->shy : NULL, ls->shared_gate ? c->gsc : NULL,
			    c->segs_d, n_segs, c->out_raw));
	return 0;
}

/* A small batch's kernels, input rows to output rows, with no host sync:
 * what a graph captures. The general front (convert, cuBLAS router GEMM,
 * top-k, permute, gather); or, with MOE_CUDA_FUSED=1 where the shapes
 * allow, a fused one in three kernels (convert + router logits, top-k,
 * one-block permute) with the experts reading x through src. */
static int small_body(struct cuda_rank *c, const struct moe_model *m,
		      const struct moe_layer_state *ls, uint32_t n, uint32_t n_segs, char *err)
{
	const struct cuda_layer *cl = ls->router_dev;
	const uint32_t H = m->hidden, K = m->top_k, E = m->n_experts;
	const bool fused = c->fused && n * K <= 1024;
	int ret = 0;

	if (fused) {
		const struct moe_cuda_route_params rp = route_params(m, ls);

		KL(moe_cuda_front_small(c->st, c->in_raw, c->segs_d, n_segs, n, H, (int)m->dtype,
					cl->router, rp.ld, c->x, c->logits));
		KL(moe_cuda_route(c->st, &rp, c->logits, cl->bias, n, c->ids, c->w, c->gsc));
		KL(moe_cuda_permute_small(c->st, c->ids, n, K, E, c->count, c->off, c->pos, c->src,
					  c->act));
	} else {
		ret = front(c, m, ls, n, n_segs, err);
	}
	if (ret)
		return ret;
	KL(moe_cuda_experts_small(c->st, (int)m->dtype, cl->slots_d, NULL, c->count, c->off,
				  c->act, E, n * K, n, 0, fused ? c->x : c->xs,
				  fused ? c->src : NULL, H, m->inter, c->h, c->ys));
	return back(c, m, ls, n, n_segs, MOE_DT_F32, err);
}

/* small_body replayed from the layer's graph for n tokens, captured on
 * first use. The segment table then has n entries (the padding is never
 * matched), so one graph serves any split of n tokens into requests. */
static int small_graph(struct cuda_rank *c, const struct moe_model *m,
		       const struct moe_layer_state *ls, uint32_t n, char *err)
{
	struct cuda_layer *cl = ls->router_dev;
	cudaGraph_t g = NULL;
	cudaError_t e;
	int ret;

	if (cl->graph[n] && cl->graph_shared[n] != ls->shared.mem) {
		cudaGraphExecDestroy(cl->graph[n]);
		cl->graph[n] = NULL;
	}
	if (!cl->graph[n]) {
		CK(cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal));
		ret = small_body(c, m, ls, n, n, err);
		e = cudaStreamEndCapture(c->st, &g);
		if (ret) {
			if (g)
				cudaGraphDestroy(g);
			return ret;
		}
		if (e != cudaSuccess)
			return lose(c, "capturing a small batch", cudaGetErrorString(e), err);
		e = cudaGraphInstantiate(&cl->graph[n], g, 0);
		cudaGraphDestroy(g);
		if (e != cudaSuccess) {
			cl->graph[n] = NULL;
			return lose(c, "cudaGraphInstantiate", cudaGetErrorString(e), err);
		}
		cl->graph_shared[n] = ls->shared.mem;
	}
	CK(cudaGraphLaunch(cl->graph[n], c->st));
	return 0;
}

/* The expert FFNs of a larger batch with cuBLAS: the row counts come to
 * the host first (one sync), then per-expert GEMMs or two grouped ones. */
static int experts_blas(struct cuda_rank *c, const struct moe_model *m, const struct moe_fwd *f,
			bool grouped, char *err)
{
	const uint32_t n = f->n_tokens, H = m->hidden, K = m->top_k, E = m->n_experts;
	const int mdt = (int)m->dtype;
	const size_t ds = moe_dtype_size(m->dtype);
	const cudaDataType_t t = cuda_type(m->dtype);
	uint32_t row = 0;

	CK(cudaMemcpyAsync(c->count_h, c->count, E * 4, cudaMemcpyDeviceToHost, c->st));
	CK(cudaStreamSynchronize(c->st)); /* the GEMM sizes */
	if (grouped) {
		const void **P = c->wptr_h; /* A1 B1 C1 A2 B2 C2, E each */
		struct grouped_args *g = &c->ga;
		int ng = 0;

		for (uint32_t x = 0; x < E; x++) {
			const struct moe_slot *s = f->expert_slot[x];
			uint32_t cnt = c->count_h[x];

			if (!cnt)
				continue;
			g->n[ng] = (int)cnt;
			P[ng] = s->mem;
			P[E + ng] = (const char *)c->xs + (size_t)row * H * ds;
			P[2 * E + ng] = (char *)c->gu + (size_t)row * 2 * m->inter * ds;
			P[3 * E + ng] = (const char *)s->mem + 2 * (size_t)s->inter * H * ds;
			P[4 * E + ng] = (const char *)c->h + (size_t)row * m->inter * ds;
			P[5 * E + ng] = (char *)c->ys + (size_t)row * H * ds;
			ng++;
			row += cnt;
		}
		CK(cudaMemcpyAsync(c->wptr_d, c->wptr_h, 6 * E * sizeof(void *),
				   cudaMemcpyHostToDevice, c->st));
		for (int i = 0; i < ng; i++) {
			g->m[i] = (int)(2 * m->inter), g->k[i] = (int)H;
			g->lda[i] = (int)H, g->ldb[i] = (int)H, g->ldc[i] = (int)(2 * m->inter);
		}
		CB(gemm_grouped(c, t, ng, c->wptr_d, c->wptr_d + E, (void *const *)(c->wptr_d + 2 * E)));
		KL(moe_cuda_swiglu(c->st, c->gu, mdt, n * K, m->inter, mdt, c->h));
		for (int i = 0; i < ng; i++) {
			g->m[i] = (int)H, g->k[i] = (int)m->inter;
			g->lda[i] = (int)m->inter, g->ldb[i] = (int)m->inter, g->ldc[i] = (int)H;
		}
		CB(gemm_grouped(c, t, ng, c->wptr_d + 3 * E, c->wptr_d + 4 * E,
				(void *const *)(c->wptr_d + 5 * E)));
		return 0;
	}
	for (uint32_t x = 0; x < E; x++) {
		const struct moe_slot *s = f->expert_slot[x];
		uint32_t cnt = c->count_h[x];

		if (!cnt)
			continue;
		CB(gemm(c, t, 2 * s->inter, cnt, H, s->mem, (char *)c->xs + (size_t)row * H * ds,
			c->gu + (size_t)row * 2 * m->inter));
		row += cnt;
	}
	KL(moe_cuda_swiglu(c->st, c->gu, MOE_DT_F32, n * K, m->inter, mdt, c->h));
	row = 0;
	for (uint32_t x = 0; x < E; x++) {
		const struct moe_slot *s = f->expert_slot[x];
		uint32_t cnt = c->count_h[x];

		if (!cnt)
			continue;
		CB(gemm(c, t, H, cnt, s->inter, (const char *)s->mem + 2 * (size_t)s->inter * H * ds,
			(char *)c->h + (size_t)row * m->inter * ds, c->ys + (size_t)row * H));
		row += cnt;
	}
	return 0;
}

static int cuda_forward(struct moe_rank *r, const struct moe_model *m,
			const struct moe_layer_state *ls, struct moe_fwd *f, char *err)
{
	struct cuda_rank *c = r->priv;
	struct cuda_layer *cl = ls->router_dev;
	const uint32_t n = f->n_tokens, H = m->hidden, K = m->top_k, E = m->n_experts;
	const bool small = c->gemm == GEMM_SMALL ||
			   (c->gemm == GEMM_AUTO && c->small_ok &&
			    (uint64_t)n * K <= (uint64_t)SMALL_ROWS * E);
	const bool grouped = !small && (c->gemm == GEMM_GROUPED ||
					(c->gemm == GEMM_AUTO && c->grouped_ok &&
					 E > GROUPED_EXPERTS));
	const bool graph = small && c->graphs && n <= GRAPH_MAX;
	const uint32_t n_segs = graph ? n : f->n_segs; /* as the kernels see it */
	uint64_t boff = 0;
	uint32_t tok = 0;
	float ms = -1.0f, kms = -1.0f;
	int ret;

	f->device_ms = f->kernel_ms = -1.0f;
	if (c->lost)
		return moe_err(err, -ENOTRECOVERABLE, "%s", c->lost_msg);
	if (n > c->max_tokens || f->n_segs > c->max_tokens)
		return moe_err(err, -E2BIG, "%u tokens exceed the workspaces (%u)", n,
			       c->max_tokens);
	c->calls++;
	CK(cudaSetDevice(c->dev));
	CK(cudaEventRecord(c->ev0, c->st));
	for (uint32_t i = 0; i < f->n_segs; i++) {
		const struct moe_seg *sg = &f->segs[i];
		size_t bytes = (size_t)sg->n_tokens * H * moe_dtype_size(sg->dtype);

		c->segs_h[i] = (struct moe_cuda_seg){tok, (uint32_t)sg->dtype, boff};
		CK(cudaMemcpyAsync(c->in_raw + boff, sg->in, bytes, cudaMemcpyHostToDevice, c->st));
		boff += (bytes + 15) & ~(uint64_t)15;
		tok += sg->n_tokens;
	}
	for (uint32_t i = f->n_segs; i < n_segs; i++) /* a graph's padding: never matched */
		c->segs_h[i] = (struct moe_cuda_seg){UINT32_MAX, 0, 0};
	CK(cudaMemcpyAsync(c->segs_d, c->segs_h, n_segs * sizeof(*c->segs_h),
			   cudaMemcpyHostToDevice, c->st));
	if (small) {
		bool same = true;

		for (uint32_t x = 0; x < E; x++)
			same &= cl->slots_h[x] == f->expert_slot[x]->mem;
		if (!same) { /* rare: the first batch, or a new placement */
			for (uint32_t x = 0; x < E; x++)
				c->wptr_h[x] = f->expert_slot[x]->mem;
			CK(cudaMemcpyAsync((void *)cl->slots_d, c->wptr_h, E * sizeof(void *),
					   cudaMemcpyHostToDevice, c->st));
			for (uint32_t x = 0; x < E; x++)
				cl->slots_h[x] = f->expert_slot[x]->mem;
		}
	}
	if (c->fault_at && c->calls == c->fault_at) {
		moe_log(LOG_WARNING, "MOED_TEST_CUDA_FAULT: injecting an illegal access on GPU %d",
			c->dev);
		KL(moe_cuda_inject_fault(c->st));
	}
	CK(cudaEventRecord(c->evk0, c->st));
	if (graph)
		ret = small_graph(c, m, ls, n, err);
	else if (small)
		ret = small_body(c, m, ls, n, n_segs, err);
	else {
		ret = front(c, m, ls, n, n_segs, err);
		ret = ret ? ret : experts_blas(c, m, f, grouped, err);
		ret = ret ? ret
			  : back(c, m, ls, n, n_segs, grouped ? (int)m->dtype : MOE_DT_F32, err);
	}
	if (ret)
		return ret;
	CK(cudaEventRecord(c->evk1, c->st));
	if (small) /* statistics only: at the end, off the critical path */
		CK(cudaMemcpyAsync(c->count_h, c->count, E * 4, cudaMemcpyDeviceToHost, c->st));
	for (uint32_t i = 0; i < f->n_segs; i++) {
		const struct moe_seg *sg = &f->segs[i];

		CK(cudaMemcpyAsync(sg->out, c->out_raw + c->segs_h[i].boff,
				   (size_t)sg->n_tokens * H * moe_dtype_size(sg->dtype),
				   cudaMemcpyDeviceToHost, c->st));
	}
	if (f->topk_ids)
		CK(cudaMemcpyAsync(c->ids_h, c->ids, (size_t)n * K * 4, cudaMemcpyDeviceToHost,
				   c->st));
	if (f->topk_weights)
		CK(cudaMemcpyAsync(c->w_h, c->w, (size_t)n * K * 4, cudaMemcpyDeviceToHost, c->st));
	CK(cudaEventRecord(c->ev1, c->st));
	CK(cudaStreamSynchronize(c->st));
	if (f->topk_ids)
		memcpy(f->topk_ids, c->ids_h, (size_t)n * K * 4);
	if (f->topk_weights)
		memcpy(f->topk_weights, c->w_h, (size_t)n * K * 4);
	memcpy(f->expert_count, c->count_h, E * 4);
	CK(cudaEventElapsedTime(&ms, c->ev0, c->ev1));
	CK(cudaEventElapsedTime(&kms, c->evk0, c->evk1));
	f->device_ms = ms;
	f->kernel_ms = kms;
	return 0;
}

static int cuda_host_register(struct moe_rank *r, void *p, size_t len, char *err)
{
	struct cuda_rank *c = r->priv;
	cudaError_t e;

	if (c->lost)
		return moe_err(err, -ENOTRECOVERABLE, "%s", c->lost_msg);
	cudaSetDevice(c->dev);
	e = cudaHostRegister(p, len, cudaHostRegisterPortable);
	if (e != cudaSuccess) {
		cudaGetLastError(); /* not sticky */
		return moe_err(err, -EIO, "cudaHostRegister of %zu bytes: %s", len,
			       cudaGetErrorString(e));
	}
	return 0;
}

static void cuda_host_unregister(struct moe_rank *r, void *p)
{
	struct cuda_rank *c = r->priv;

	if (c->lost)
		return; /* the process is on its way out */
	cudaSetDevice(c->dev);
	if (cudaHostUnregister(p) != cudaSuccess)
		cudaGetLastError();
}

const struct moe_backend_ops moe_backend_cuda = {
	.name = "cuda",
	.rank_init = cuda_rank_init,
	.rank_fini = cuda_rank_fini,
	.workspace_bytes = cuda_workspace_bytes,
	.layer_init = cuda_layer_init,
	.layer_fini = cuda_layer_fini,
	.slot_alloc = cuda_slot_alloc,
	.slot_upload = cuda_slot_upload,
	.slot_free = cuda_slot_free,
	.forward = cuda_forward,
	.host_register = cuda_host_register,
	.host_unregister = cuda_host_unregister,
};
