/* daemon/engine/engine.c — a batch of one layer, end to end on the ranks:
 *
 *   dispatch  per rank, its share of the tokens: convert to fp32 rounded to
 *             the model dtype, route (router GEMM, family scoring, top-k),
 *             permute the (token, k) rows by destination (rank, slot)
 *   exchange  counts, then rows and routing weights, to the ranks that hold
 *             the chosen replicas
 *   experts   grouped SwiGLU FFNs over the rows received, scaled by the
 *             routing weight, plus the shared expert(s) over the rank's own
 *             tokens; the results go back by the inverse exchange
 *   combine   per token, sum of its K rows in k order + shared, in fp32,
 *             cast once to the request dtype
 *
 * Tokens are processed in chunks of CHUNK_TOKENS so that the exchange
 * buffers stay bounded whatever max_batch_tokens is. Each chunk is split
 * over the ranks; every rank runs the stages (backend.h) on its share, the
 * ranks at the same time (one driver thread each, each rank's math on its
 * own pool), and the transport (transport.h) moves the rows between them.
 * With one rank the stages run on the calling thread and nothing moves.
 *
 * A device backend (CUDA) takes the whole batch instead (ops->forward):
 * the engine then only picks the slot of each expert from the epoch's
 * placement and keeps the statistics; the steps above run on the device.
 *
 * A lost rank (a rank's stage fails): the rank is taken out, the experts
 * that only it held are read again from the checkpoint into empty slots of
 * the surviving ranks (spare slots first, then the room every rank keeps
 * for this: `stride` slots per (rank, layer) in the table, slots_per_rank
 * in use until a rank is lost), a placement without it is published, and
 * the chunk whose stage failed runs again on it; its outputs had not been
 * written (combine runs only after every rank's experts succeeded), and
 * its inputs are read again from the requests, which nothing has touched.
 * When the experts cannot all be placed, or the checkpoint changed on
 * disk, the batch fails with -ENOTRECOVERABLE (moed exits to be restarted).
 *
 * Test hooks: MOED_TEST_ENGINE_FAULT=N makes the N-th batch fail as a lost
 * device does (-ENOTRECOVERABLE), on any backend, so that the daemon's
 * crash-only path is tested without a GPU; MOED_TEST_RANK_FAULT=R:N makes
 * rank R's expert stage fail in the N-th batch (CPU ranks).
 */
#include "daemon/engine/engine_internal.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/engine/log.h"
#include "daemon/engine/stats.h"
#include "daemon/engine/threadpool.h"
#include "daemon/engine/transport.h"
#include "kernels/cpu/convert.h"

/* One workspace of the engine: allocated (zeroed or not), or with
 * e->sizing only counted. alloc_workspaces is the one list: what moed -t
 * prints (moe_engine_workspace_bytes) is what it allocates. */
static void *ws(struct moe_engine *e, size_t bytes, bool zero)
{
	e->ws_bytes += bytes;
	if (e->sizing)
		return NULL;
	return zero ? calloc(1, bytes ? bytes : 1) : malloc(bytes ? bytes : 1);
}

static int alloc_workspaces(struct moe_engine *e)
{
	const struct moe_model *m = e->m;
	size_t K = m->top_k, E = m->n_experts, T = e->max_tokens;

	/* the batch's routing: the ranks' own, a device's copy when asked */
	e->ids = ws(e, T * K * sizeof(uint32_t), false);
	e->w = ws(e, T * K * sizeof(float), false);
	if (e->device) {
		e->slot_tab = ws(e, E * sizeof(*e->slot_tab), true);
		e->ecount = ws(e, E * sizeof(*e->ecount), true);
	}
	return e->sizing || (e->ids && e->w && (!e->device || (e->slot_tab && e->ecount)))
		       ? 0
		       : -ENOMEM;
}

/* The shape each rank is sized for. */
static struct moe_rank_shape rank_shape(const struct moe_engine *e, uint32_t threads)
{
	return (struct moe_rank_shape){e->max_tokens, e->chunk, threads, e->n_ranks, e->stride};
}

int eng_upload(struct moe_engine *e, struct moe_rank *r, struct moe_slot *s,
	       const struct moe_expert_src *src, uint32_t layer, const char *what, char *err)
{
	return eng_upload_from(e, e->m, r, s, src, layer, what, err);
}

int eng_upload_from(struct moe_engine *e, struct moe_model *m, struct moe_rank *r,
		    struct moe_slot *s, const struct moe_expert_src *src, uint32_t layer,
		    const char *what, char *err)
{
	char why[MOE_ERRLEN];
	int ret = r->ops->slot_alloc(r, m, src->gate.rows, s, why);

	if (ret)
		return moe_err(err, ret, "%s rank %u: cannot hold layer %u's %s: %s (%.1f GiB of "
			       "weights loaded so far)", r->ops->name, r->id, layer, what, why,
			       (double)e->weight_bytes / (1 << 30));
	e->weight_bytes += s->bytes;
	ret = r->ops->slot_upload(r, s, m, src, err);
	if (ret) { /* (no half-filled slot keeps its memory) */
		e->weight_bytes -= s->bytes;
		r->ops->slot_free(r, s);
		*s = (struct moe_slot){0};
	}
	return ret;
}

int eng_read_host(struct moe_engine *e, struct moe_model *m, uint32_t l, struct layer_host *lh,
		  char *err)
{
	const struct moe_layer_desc *d = &m->layers[l];
	size_t EH = (size_t)m->n_experts * m->hidden;
	int ret;

	lh->router = malloc(EH * sizeof(float));
	if (!lh->router)
		return moe_err(err, -ENOMEM, "out of memory for layer %u's router", d->index);
	atomic_fetch_add(&e->weight_bytes, EH * sizeof(float));
	ret = moe_model_read_f32(m, &d->router, lh->router, err);
	/* Outside DeepSeek the router is an nn.Linear of the model's dtype:
	 * transformers casts a router stored in another dtype to it on load.
	 * DeepSeek's stays as stored (F32 or bf16), its logits computed in
	 * F32. */
	if (!ret && !m->router_fp32)
		moe_cpu_round(m->dtype, lh->router, EH);
	if (!ret && e->device && m->router_fp32 && d->router.dtype != m->dtype &&
	    !moe_cpu_representable(m->dtype, lh->router, EH))
		ret = moe_err(err, -ENOTSUP,
			      "layer %u: the router '%s' holds %s values that %s cannot "
			      "represent, and the GPU backend computes the router in the "
			      "model's dtype (an F32 router GEMM is not written yet); serve "
			      "this checkpoint with devices: cpu",
			      d->index, d->router.at.t->name, moe_dtype_name(d->router.dtype),
			      moe_dtype_name(m->dtype));
	if (!ret && d->has_bias) {
		lh->bias = malloc(m->n_experts * sizeof(float));
		ret = lh->bias ? moe_model_read_f32(m, &d->bias, lh->bias, err)
			       : moe_err(err, -ENOMEM, "out of memory");
	}
	if (!ret && d->has_shared_gate) {
		lh->shared_gate = malloc(m->hidden * sizeof(float));
		ret = lh->shared_gate ? moe_model_read_f32(m, &d->shared_gate, lh->shared_gate, err)
				      : moe_err(err, -ENOMEM, "out of memory");
	}
	return ret;
}

static int load_layer(struct moe_engine *e, uint32_t l, char *err)
{
	struct moe_model *m = e->m;
	const struct moe_layer_desc *d = &m->layers[l];
	struct layer_host *lh = &e->lh[l];
	int ret = eng_read_host(e, m, l, lh, err);

	/* Every rank its own copy of the router (its layout) and of the shared
	 * expert, as a GPU rank would hold them: each routes its share of the
	 * tokens and runs the shared expert over them. */
	for (uint32_t r = 0; r < e->n_ranks && !ret; r++) {
		struct moe_rank *rk = &e->ranks[r];
		struct moe_layer_state *ls = &e->ls[(size_t)r * m->n_moe_layers + l];

		ls->router = lh->router;
		ls->bias = lh->bias;
		ls->shared_gate = lh->shared_gate;
		/* (after bias and shared gate: a device backend uploads them too) */
		if (rk->ops->layer_init(rk, m, ls))
			ret = moe_err(err, -ENOMEM, "%s rank %u: out of memory for layer %u's "
				      "router", rk->ops->name, r, d->index);
		if (!ret && d->has_shared)
			ret = eng_upload(e, rk, &ls->shared, &d->shared, d->index, "shared expert",
				     err);
	}
	for (uint32_t x = 0; x < m->n_experts && !ret; x++) {
		uint32_t n;
		const struct moe_replica *rep = moe_place_get(e->placement, l, x, &n);
		char what[32];

		snprintf(what, sizeof(what), "expert %u", x);
		for (uint32_t i = 0; i < n && !ret; i++) {
			ret = eng_upload(e, &e->ranks[rep[i].rank],
				     slot_at(e, rep[i].rank, l, rep[i].slot), &d->experts[x],
				     d->index, what, err);
			e->slot_expert[slot_index(e, rep[i].rank, l, rep[i].slot)] = (int32_t)x;
		}
	}
	return ret;
}

/* The table's slots per (rank, layer): those in use plus room for everything
 * a lost rank may hold alone (as many as its slots, after a rebalance)
 * spread over the others. Only table entries: memory is allocated when a
 * slot is filled. */
static uint32_t stride_for(uint32_t E, uint32_t R, uint32_t spare)
{
	uint32_t S = (E + R - 1) / R + spare;

	return S + (R > 1 ? (S + R - 2) / (R - 1) : 0);
}

static uint32_t opts_threads(const struct moe_engine_opts *o)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return o && o->threads ? o->threads : n > 0 ? (uint32_t)n : 1;
}

static int backend_ops(const char *name, const struct moe_backend_ops **ops, char *err)
{
	*ops = &moe_backend_cpu;
	if (name && !strcmp(name, "cuda")) {
#ifdef MOE_HAVE_CUDA
		*ops = &moe_backend_cuda;
#else
		return moe_err(err, -ENOTSUP, "this moed was built without CUDA (MOE_CUDA=OFF)");
#endif
	} else if (name && strcmp(name, "cpu")) {
		return moe_err(err, -EINVAL, "unknown backend \"%s\"", name);
	}
	return 0;
}

int moe_engine_create(struct moe_model *m, const struct moe_engine_opts *o,
		      struct moe_engine **out, char *err)
{
	struct moe_engine *e;
	const struct moe_backend_ops *ops;
	struct moe_backend_tuning tuning = {0};
	uint32_t R = o && o->n_ranks ? o->n_ranks : 1, T;
	int ret;

	if (R > MOE_MAX_RANKS)
		return moe_err(err, -EINVAL, "%u ranks requested: at most %u", R, MOE_MAX_RANKS);
	ret = backend_ops(o ? o->backend : NULL, &ops, err);
	if (ret)
		return ret;
	if (R != 1 && ops->forward)
		return moe_err(err, -ENOTSUP, "%u %s ranks requested: the %s backend runs one rank "
			       "for now", R, ops->name, ops->name);
	e = calloc(1, sizeof(*e));
	if (!e)
		return moe_err(err, -ENOMEM, "out of memory");
	e->m = m;
	e->max_tokens = o && o->max_batch_tokens ? o->max_batch_tokens : DEFAULT_MAX_TOKENS;
	e->chunk = e->max_tokens < CHUNK_TOKENS ? e->max_tokens : CHUNK_TOKENS;
	e->n_ranks = R;
	e->last_ms = e->last_kernel_ms = -1.0f;
	pthread_mutex_init(&e->fwd_lock, NULL);
	pthread_mutex_init(&e->slot_lock, NULL);
	pthread_mutex_init(&e->publish_lock, NULL);
	/* cpu.threads split between the ranks, at least one each (R may
	 * exceed the cores); a rank's threads are its own */
	T = opts_threads(o);
	e->rank_pool = calloc(R, sizeof(*e->rank_pool));
	if (!e->rank_pool) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto err_destroy;
	}
	for (uint32_t r = 0; r < R; r++) {
		uint32_t t = T / R + (r < T % R);

		ret = moe_pool_create(t ? t : 1, &e->rank_pool[r]);
		if (!ret && R > 1 && r == 0)
			ret = moe_pool_create(R, &e->driver);
		if (!ret && R > 1 && r == 0)
			ret = moe_transport_local_create(R, e->driver, &e->tr);
		if (ret) {
			ret = moe_err(err, ret, "cannot start worker threads");
			goto err_destroy;
		}
	}
	ret = moe_place_initial(m->n_moe_layers, m->n_experts, R, o ? o->spare_slots : 0,
				&e->placement);
	if (ret) {
		ret = moe_err(err, ret, "cannot build the initial placement");
		goto err_destroy;
	}
	e->device = ops->forward != NULL;
	e->slots_per_rank = e->placement->slots_per_rank;
	e->stride = e->device ? e->slots_per_rank
			      : stride_for(m->n_experts, R, e->slots_per_rank -
							       (m->n_experts + R - 1) / R);
	e->failed_rank = -1;
	e->ranks = calloc(R, sizeof(*e->ranks));
	e->slots = calloc((size_t)R * m->n_moe_layers * e->stride, sizeof(*e->slots));
	e->slot_expert = malloc((size_t)R * m->n_moe_layers * e->stride * sizeof(*e->slot_expert));
	e->slot_refs = calloc((size_t)R * m->n_moe_layers * e->stride, sizeof(*e->slot_refs));
	e->slot_reading = calloc((size_t)R * m->n_moe_layers * e->stride,
				 sizeof(*e->slot_reading));
	e->slot_drop = calloc((size_t)R * m->n_moe_layers * e->stride, sizeof(*e->slot_drop));
	e->ls = calloc((size_t)R * m->n_moe_layers, sizeof(*e->ls));
	e->lh = calloc(m->n_moe_layers, sizeof(*e->lh));
	if (!e->ranks || !e->slots || !e->slot_expert || !e->slot_refs || !e->slot_reading ||
	    !e->slot_drop || !e->ls ||
	    !e->lh || alloc_workspaces(e)) {
		ret = moe_err(err, -ENOMEM, "out of memory for the engine's workspaces (%u tokens)",
			      e->max_tokens);
		goto err_destroy;
	}
	for (size_t i = 0; i < (size_t)R * m->n_moe_layers * e->stride; i++)
		e->slot_expert[i] = -1;
	if (o)
		tuning = o->tuning;
	for (uint32_t r = 0; r < R; r++) {
		struct moe_rank_shape sh = rank_shape(e, moe_pool_threads(e->rank_pool[r]));

		e->ranks[r] = (struct moe_rank){.id = r, .device = o ? o->device : 0, .ops = ops,
						.pool = e->rank_pool[r], .shape = sh};
		ret = ops->rank_init(&e->ranks[r], m, &tuning, err);
		if (!ret && !e->device && ops->workspace_bytes)
			e->ws_bytes += ops->workspace_bytes(m, &sh, &tuning);
		if (ret) {
			e->ranks[r].ops = NULL; /* rank_init cleaned up */
			goto err_destroy;
		}
	}
	e->fault_at = o ? o->test_fault_at : 0;
	if (o && o->test_rank_fault_at && o->test_rank_fault_rank < R) {
		e->rank_fault = o->test_rank_fault_rank;
		e->rank_fault_at = o->test_rank_fault_at;
	}
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		ret = load_layer(e, l, err);
		if (ret)
			goto err_destroy;
		if (o && o->progress && o->progress(o->progress_arg, l + 1, m->n_moe_layers)) {
			ret = moe_err(err, -ECANCELED, "loading stopped after %u of %u MoE layers",
				      l + 1, m->n_moe_layers);
			goto err_destroy;
		}
	}
	ret = moe_model_close_files(m, err);
	if (ret)
		goto err_destroy;
	ret = moe_stats_create(m->n_moe_layers, m->n_experts, R, o ? o->stats_window_ms : 0,
			       &e->stats);
	if (ret) {
		ret = moe_err(err, ret, "out of memory");
		goto err_destroy;
	}
	eng_count_slots(e, e->placement, 1);
	ret = eng_versions_init(e);
	if (ret) {
		moe_place_free(e->placement);
		e->placement = NULL;
		ret = moe_err(err, ret, "out of memory");
		goto err_destroy;
	}
	ret = moe_epochs_create(e->placement, m->n_moe_layers, eng_retire_epoch, e, &e->epochs);
	e->placement = NULL; /* epoch 1's now, whatever the outcome */
	if (ret) {
		ret = moe_err(err, ret, "out of memory");
		goto err_destroy;
	}
	e->lv_ready = true;
	for (uint32_t l = 0; l < m->n_moe_layers; l++)
		e->lv[l].cur_refs = 1; /* epoch 1 */
	*out = e;
	return 0;

err_destroy:
	moe_engine_destroy(e);
	return ret;
}

void moe_engine_destroy(struct moe_engine *e)
{
	if (!e)
		return;
	moe_epochs_destroy(e->epochs);
	e->lv_ready = false;
	eng_versions_free(e);
	for (uint32_t r = 0; e->ls && e->ranks && r < e->n_ranks; r++) {
		for (uint32_t l = 0; l < e->m->n_moe_layers; l++) {
			struct moe_layer_state *ls = &e->ls[(size_t)r * e->m->n_moe_layers + l];

			if (ls->router_dev)
				e->ranks[r].ops->layer_fini(&e->ranks[r], ls);
			if (ls->shared.mem)
				e->ranks[r].ops->slot_free(&e->ranks[r], &ls->shared);
		}
	}
	for (uint32_t l = 0; e->lh && l < e->m->n_moe_layers; l++) {
		free(e->lh[l].router);
		free(e->lh[l].bias);
		free(e->lh[l].shared_gate);
	}
	if (e->slots)
		for (uint32_t r = 0; r < e->n_ranks; r++)
			for (uint32_t l = 0; l < e->m->n_moe_layers; l++)
				for (uint32_t s = 0; s < e->stride; s++)
					if (slot_at(e, r, l, s)->mem)
						e->ranks[r].ops->slot_free(&e->ranks[r],
									   slot_at(e, r, l, s));
	for (uint32_t r = 0; e->ranks && r < e->n_ranks; r++)
		if (e->ranks[r].ops)
			e->ranks[r].ops->rank_fini(&e->ranks[r]);
	moe_place_free(e->placement);
	for (uint32_t r = 0; e->rank_pool && r < e->n_ranks; r++)
		moe_pool_destroy(e->rank_pool[r]);
	free(e->rank_pool);
	moe_transport_destroy(e->tr);
	moe_pool_destroy(e->driver);
	free(e->ranks);
	free(e->slots);
	free(e->slot_expert);
	free(e->slot_refs);
	free(e->slot_reading);
	free(e->slot_drop);
	free(e->ls);
	free(e->lh);
	free(e->ids);
	free(e->w);
	moe_stats_free(e->stats);
	free(e->slot_tab);
	free(e->ecount);
	pthread_mutex_destroy(&e->fwd_lock);
	pthread_mutex_destroy(&e->slot_lock);
	pthread_mutex_destroy(&e->publish_lock);
	free(e);
}

uint32_t moe_engine_last_epoch(const struct moe_engine *e)
{
	return e->ran_epoch;
}

struct moe_epoch *moe_epoch_acquire(struct moe_engine *e)
{
	return moe_epochs_acquire(e->epochs);
}

static bool wants_routing(const struct moe_seg *segs, uint32_t n_segs)
{
	for (uint32_t i = 0; i < n_segs; i++)
		if (segs[i].topk_ids || segs[i].topk_weights)
			return true;
	return false;
}

/* The batch's routing (e->ids, e->w) to the segments that asked for it,
 * and to the batch's own buffers if it has them. */
static void scatter_routing(struct moe_engine *e, const struct moe_batch *b,
			    const struct moe_seg *segs, uint32_t n_segs)
{
	size_t K = e->m->top_k, t0 = 0;

	for (uint32_t i = 0; i < n_segs; i++) {
		size_t n = (size_t)segs[i].n_tokens * K;

		if (segs[i].topk_ids)
			memcpy(segs[i].topk_ids, e->ids + t0 * K, n * sizeof(uint32_t));
		if (segs[i].topk_weights)
			memcpy(segs[i].topk_weights, e->w + t0 * K, n * sizeof(float));
		t0 += segs[i].n_tokens;
	}
	if (b->topk_ids)
		memcpy(b->topk_ids, e->ids, t0 * K * sizeof(uint32_t));
	if (b->topk_weights)
		memcpy(b->topk_weights, e->w, t0 * K * sizeof(float));
}

/* The whole batch on a device backend. */
static int forward_device(struct moe_engine *e, struct moe_epoch *ep, uint32_t l,
			  const struct moe_batch *b, const struct moe_seg *segs, uint32_t n_segs,
			  char *err)
{
	const struct moe_model *m = e->m;
	struct moe_rank *r = &e->ranks[0];
	bool seg_routing = wants_routing(segs, n_segs);
	struct moe_fwd f = {b->n_tokens, n_segs, segs, e->slot_tab,
			    seg_routing ? e->ids : b->topk_ids,
			    seg_routing ? e->w : b->topk_weights, e->ecount, -1.0f, -1.0f};
	struct layer_view view;
	int ret;

	eng_view(e, ep, l, &view);
	for (uint32_t x = 0; x < m->n_experts; x++) {
		uint32_t nr;
		const struct moe_replica *rep = moe_place_get(ep->placement, l, x, &nr);

		e->slot_tab[x] = &view.slots[rep[0].rank][rep[0].slot];
	}
	e->ran_epoch = ep->id;
	ret = r->ops->forward(r, m, view.ls[0], &f, err);
	if (ret)
		return ret;
	if (seg_routing)
		scatter_routing(e, b, segs, n_segs);
	e->last_ms = f.device_ms;
	e->last_kernel_ms = f.kernel_ms;
	if (b->times) {
		*b->times = (struct moe_stage_times){{0}};
		b->times->ns[MOE_STAGE_DEVICE] =
			f.device_ms > 0 ? (uint64_t)((double)f.device_ms * 1e6) : 0;
	}
	moe_stats_counts(e->stats, l, e->ecount, now_ns());
	return 0;
}

static int forward_locked(struct moe_engine *e, struct moe_epoch *ep, uint32_t l,
			  const struct moe_batch *b, const struct moe_seg *segs, uint32_t n_segs,
			  char *err)
{
	int ret;

	if (e->fault_at && ++e->calls == e->fault_at) {
		atomic_store(&e->lost, true);
		return moe_err(err, -ENOTRECOVERABLE,
			       "injected device fault (MOED_TEST_ENGINE_FAULT=%lu)", e->fault_at);
	}
	if (e->device)
		return forward_device(e, ep, l, b, segs, n_segs, err);
	ret = eng_forward_steps(e, ep, l, b, segs, n_segs, err);
	if (ret)
		return ret;
	moe_stats_routed(e->stats, l, e->ids, (uint64_t)b->n_tokens * e->m->top_k, now_ns());
	if (b->topk_ids || b->topk_weights || wants_routing(segs, n_segs))
		scatter_routing(e, b, segs, n_segs);
	return 0;
}

int moe_engine_forward(struct moe_engine *e, struct moe_epoch *ep, const struct moe_batch *b,
		       char *err)
{
	int l = moe_model_layer_pos(e->m, b->layer);
	struct moe_seg one = {b->in, b->out, b->dtype, b->n_tokens, NULL, NULL};
	const struct moe_seg *segs = b->n_segs ? b->segs : &one;
	uint32_t n_segs = b->n_segs ? b->n_segs : 1;
	uint64_t sum = 0;
	int ret;

	if (l < 0)
		return moe_err(err, -EINVAL, "layer %u is not an MoE layer of this model",
			       b->layer);
	for (uint32_t i = 0; i < n_segs; i++) {
		if (segs[i].dtype != MOE_DT_F32 && segs[i].dtype != MOE_DT_BF16 &&
		    segs[i].dtype != MOE_DT_F16)
			return moe_err(err, -EINVAL, "unknown dtype %d", (int)segs[i].dtype);
		if (!segs[i].n_tokens && b->n_segs)
			return moe_err(err, -EINVAL, "segment %u has no tokens", i);
		sum += segs[i].n_tokens;
	}
	if (sum != b->n_tokens)
		return moe_err(err, -EINVAL, "segments hold %llu tokens, the batch %u",
			       (unsigned long long)sum, b->n_tokens);
	if (b->n_tokens > e->max_tokens)
		return moe_err(err, -E2BIG, "%u tokens exceed max_batch_tokens %u", b->n_tokens,
			       e->max_tokens);
	if (atomic_load(&e->lost))
		return moe_err(err, -ENOTRECOVERABLE, "the device was lost earlier");
	if (!b->n_tokens)
		return 0;
	pthread_mutex_lock(&e->fwd_lock);
	ret = forward_locked(e, ep, (uint32_t)l, b, segs, n_segs, err);
	if (ret == -ENOTRECOVERABLE)
		atomic_store(&e->lost, true);
	pthread_mutex_unlock(&e->fwd_lock);
	return ret;
}

uint64_t moe_engine_workspace_bytes(const struct moe_model *m, const struct moe_engine_opts *o)
{
	const struct moe_backend_ops *ops;
	char err[MOE_ERRLEN];
	struct moe_engine e = {.m = (struct moe_model *)m, .sizing = true};
	uint32_t T = opts_threads(o);

	if (backend_ops(o ? o->backend : NULL, &ops, err))
		return 0;
	e.max_tokens = o && o->max_batch_tokens ? o->max_batch_tokens : DEFAULT_MAX_TOKENS;
	e.chunk = e.max_tokens < CHUNK_TOKENS ? e.max_tokens : CHUNK_TOKENS;
	e.device = ops->forward != NULL;
	e.n_ranks = o && o->n_ranks && !e.device ? o->n_ranks : 1;
	e.slots_per_rank = (m->n_experts + e.n_ranks - 1) / e.n_ranks + (o ? o->spare_slots : 0);
	e.stride = e.device ? e.slots_per_rank
			    : stride_for(m->n_experts, e.n_ranks, o ? o->spare_slots : 0);
	alloc_workspaces(&e);
	for (uint32_t r = 0; !e.device && ops->workspace_bytes && r < e.n_ranks; r++) {
		uint32_t t = T / e.n_ranks + (r < T % e.n_ranks);
		struct moe_rank_shape sh = rank_shape(&e, t ? t : 1);

		e.ws_bytes += ops->workspace_bytes(m, &sh, o ? &o->tuning : &(struct moe_backend_tuning){0});
	}
	return e.ws_bytes;
}

uint64_t moe_engine_device_workspace_bytes(const struct moe_model *m,
					   const struct moe_engine_opts *o)
{
	const struct moe_backend_ops *ops;
	char err[MOE_ERRLEN];
	struct moe_rank_shape sh = {o && o->max_batch_tokens ? o->max_batch_tokens
							     : DEFAULT_MAX_TOKENS,
				    0, opts_threads(o), 1, 0};

	if (backend_ops(o ? o->backend : NULL, &ops, err) || !ops->forward ||
	    !ops->workspace_bytes)
		return 0;
	sh.chunk = sh.max_tokens < CHUNK_TOKENS ? sh.max_tokens : CHUNK_TOKENS;
	return ops->workspace_bytes(m, &sh, o ? &o->tuning : &(struct moe_backend_tuning){0});
}

uint64_t moe_engine_allocated_workspace_bytes(const struct moe_engine *e)
{
	return e->ws_bytes;
}

const struct moe_model *moe_engine_model(const struct moe_engine *e)
{
	return e->m;
}

uint32_t moe_engine_threads(const struct moe_engine *e)
{
	uint32_t n = 0;

	for (uint32_t r = 0; r < e->n_ranks; r++)
		n += moe_pool_threads(e->rank_pool[r]);
	return n;
}

uint32_t moe_engine_ranks(const struct moe_engine *e)
{
	return e->n_ranks;
}

uint32_t moe_engine_max_tokens(const struct moe_engine *e)
{
	return e->max_tokens;
}

const char *moe_engine_backend(const struct moe_engine *e)
{
	return e->ranks[0].ops->name;
}

const char *moe_engine_kernels(const struct moe_engine *e)
{
	return e->ranks[0].kernels;
}

const char *moe_engine_device(const struct moe_engine *e)
{
	return e->ranks[0].desc;
}

float moe_engine_last_device_ms(const struct moe_engine *e)
{
	return e->last_ms;
}

float moe_engine_last_kernel_ms(const struct moe_engine *e)
{
	return e->last_kernel_ms;
}

bool moe_engine_lost(const struct moe_engine *e)
{
	return atomic_load(&((struct moe_engine *)e)->lost);
}

int moe_engine_host_register(struct moe_engine *e, void *p, size_t len, char *err)
{
	for (uint32_t r = 0; r < e->n_ranks; r++) {
		int ret;

		if (!e->ranks[r].ops->host_register)
			return -ENOTSUP;
		ret = e->ranks[r].ops->host_register(&e->ranks[r], p, len, err);
		if (ret) {
			while (r--)
				e->ranks[r].ops->host_unregister(&e->ranks[r], p);
			return ret;
		}
	}
	return 0;
}

void moe_engine_host_unregister(struct moe_engine *e, void *p)
{
	for (uint32_t r = 0; r < e->n_ranks; r++)
		if (e->ranks[r].ops->host_unregister)
			e->ranks[r].ops->host_unregister(&e->ranks[r], p);
}

uint64_t moe_engine_weight_bytes(const struct moe_engine *e)
{
	return atomic_load(&((struct moe_engine *)e)->weight_bytes);
}

uint64_t moe_engine_expert_tokens(const struct moe_engine *e, uint32_t pos, uint32_t x)
{
	return moe_stats_expert_total(e->stats, pos, x);
}

const struct moe_stats *moe_engine_stats(const struct moe_engine *e)
{
	return e->stats;
}

bool moe_engine_rank_lost(const struct moe_engine *e, uint32_t rank)
{
	return rank < e->n_ranks && atomic_load(&((struct moe_engine *)e)->dead[rank]);
}

uint64_t moe_engine_transport_ns(const struct moe_engine *e)
{
	return atomic_load_explicit(&((struct moe_engine *)e)->transport_ns, memory_order_relaxed);
}

uint64_t moe_engine_transport_bytes(const struct moe_engine *e)
{
	return e->tr ? e->tr->bytes : 0;
}
