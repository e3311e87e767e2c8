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

#include "daemon/engine/cuda_rank.h"
#include "daemon/engine/log.h"
#include "kernels/cpu/convert.h"

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


/* Device memory alloc_workspaces takes: the same list, counted. */
static uint64_t cuda_workspace_bytes(const struct moe_model *m, const struct moe_rank_shape *s,
				     const struct moe_backend_tuning *t)
{
	struct cuda_rank c = {.sizing = true, .max_tokens = s->max_tokens};
	char err[MOE_ERRLEN];

	alloc_workspaces(&c, m, err);
	return c.dev_bytes;
}

static int cuda_rank_init(struct moe_rank *r, const struct moe_model *m,
			  const struct moe_backend_tuning *t, char *err)
{
	uint32_t max_tokens = r->shape.max_tokens;
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
		c->grouped_ok = c->small_ok && cuda_probe_grouped(c, m);
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
