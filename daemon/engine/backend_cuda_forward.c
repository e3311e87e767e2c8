/* daemon/engine/backend_cuda_forward.c — the CUDA backend's batch: the front (convert,
 * route, permute), the experts (small kernels from a graph, cuBLAS per
 * expert, or grouped cuBLAS), the back (combine, out); see backend_cuda.c
 * for the choices and cuda_rank.h for what the files share. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/cuda_rank.h"
#include "daemon/engine/log.h"
#include "kernels/cpu/convert.h"

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
bool cuda_probe_grouped(struct cuda_rank *c, const struct moe_model *m)
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

int cuda_forward(struct moe_rank *r, const struct moe_model *m,
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

