/* daemon/server/worker.c — the engine worker: the one thread that makes device calls.
 *
 * The serving loop hands it work (a batch to run, a client region to pin
 * or to release) through a FIFO under a mutex; the worker runs each item
 * in order and hands it back on a second FIFO, then writes the eventfd the
 * loop polls. A batch's completions do not wait for that: the worker puts
 * them in the clients' rings and rings their doorbells as soon as the
 * batch ends (srv_post_batch, under each client's cq_lock); the loop only
 * counts them and drops the references when it collects the batch. The
 * worker also writes the eventfd when it starts a batch the loop asked
 * about (want_start: requests are left that only a later batch can take),
 * so that the loop can block in epoll whatever is queued.
 *
 * FIFO order is what makes a region's release safe: it is posted once no
 * batch holds the client (internal.h), and even a pin still queued for
 * that region runs before it.
 *
 * Ownership (see also docs/ARCHITECTURE.md):
 *  - A work item belongs to the loop until srv_worker_post, to the worker
 *    until it is on the done list, to the loop again after srv_worker_collect;
 *    except that a posted batch the worker has not started (x->started,
 *    read and written under the lock) may still take requests from the loop.
 *  - While a batch is the worker's, the loop does not read or write its
 *    requests, their clients' output spans, or the batch arrays; the
 *    requests' clients hold a reference each, so their regions stay mapped.
 *  - Every device call runs here: moe_engine_forward, host register and
 *    unregister (CUDA's pinning), and the epoch a batch pins.
 *
 * The worker's heartbeat (beat_ns: when its current item started, 0 when
 * idle) tells the loop's watchdog whether a batch has wedged.
 */
#include "daemon/server/internal.h"

#include <sys/eventfd.h>

#include "daemon/engine/model.h"
#include "kernels/dtype.h"

/* A request larger than max_batch_tokens, alone in its batch: run in
 * pieces of max_batch_tokens rows, one after the other, all under the
 * epoch the caller pinned. Rows are independent (and the CPU engine is
 * batch-invariant), so the result is the unsplit run's; each piece reads
 * its rows before it writes them, so in == out stays allowed. */
static int run_pieces(struct worker *w, struct moe_epoch *ep, struct work *b,
		      struct moe_stage_times *tm)
{
	const struct moe_model *m = moe_engine_model(w->e);
	const struct moe_seg *s = &b->segs[0];
	uint32_t maxt = moe_engine_max_tokens(w->e), K = m->top_k;
	size_t row = (size_t)m->hidden * moe_dtype_size(s->dtype);
	int ret = 0;

	for (uint32_t t0 = 0; t0 < s->n_tokens && !ret; t0 += maxt) {
		uint32_t n = s->n_tokens - t0 < maxt ? s->n_tokens - t0 : maxt;
		struct moe_seg part = {
			(const char *)s->in + t0 * row, (char *)s->out + t0 * row, s->dtype, n,
			s->topk_ids ? s->topk_ids + (size_t)t0 * K : NULL,
			s->topk_weights ? s->topk_weights + (size_t)t0 * K : NULL};
		struct moe_stage_times t = {{0}};
		struct moe_batch mb = {.layer = b->layer, .n_tokens = n, .n_segs = 1,
				       .segs = &part, .times = &t};

		ret = moe_engine_forward(w->e, ep, &mb, b->err);
		for (int i = 0; i < MOE_STAGE_COUNT; i++)
			tm->ns[i] += t.ns[i];
	}
	return ret;
}

/* The batch's figures (metrics.h: the worker is these histograms' only
 * writer): queue wait per request, the engine's stages, the batch's size,
 * and, once the completions are posted, each request's latency. */
/* (not inlined: bench/metrics_overhead.sh counts their instructions) */
__attribute__((noinline)) static void observe_start(struct worker *w, const struct work *b,
						    uint64_t now)
{
	for (uint32_t i = 0; i < b->n; i++)
		met_observe(&w->met->stage[MET_STAGE_QUEUE], now - b->reqs[i]->queued_ns);
	met_observe(&w->met->batch_tokens, b->tokens);
	met_add(&w->met->batches, 1);
}

__attribute__((noinline)) static void observe_end(struct worker *w, const struct work *b,
						  const struct moe_stage_times *t, uint64_t now)
{
	if (!b->ret) /* every stage this backend has, 0 ns included */
		for (int i = 0; i < MOE_STAGE_COUNT; i++)
			if (w->met->stages & (1u << (1 + i)))
				met_observe(&w->met->stage[1 + i], t->ns[i]);
	for (uint32_t i = 0; i < b->n; i++)
		met_observe(&w->met->latency, now - b->reqs[i]->queued_ns);
}

/* Tracing (trace.c), before the batch runs: every segment's routing goes
 * to the worker's scratch (the engine writes it there, or, for a request
 * that asked for its routing, it is copied from the client's region once
 * the batch has run: trace_routing). False: no memory, no trace. */
static bool trace_prepare(struct worker *w, struct work *b)
{
	const struct moe_model *m = moe_engine_model(w->e);
	size_t need = (size_t)b->tokens * m->top_k, off = 0;

	if (need > w->tr_cap) {
		uint32_t *p = realloc(w->tr_ids, need * sizeof(*p));

		if (!p)
			return false;
		w->tr_ids = p;
		w->tr_cap = need;
	}
	if (!w->tr_count && !(w->tr_count = calloc(m->n_experts, sizeof(*w->tr_count))))
		return false;
	if (!w->tr_seen && !(w->tr_seen = calloc((m->n_experts + 63) / 64, sizeof(*w->tr_seen))))
		return false;
	for (uint32_t i = 0; i < b->n; i++) {
		if (!b->segs[i].topk_ids)
			b->segs[i].topk_ids = w->tr_ids + off;
		off += (size_t)b->segs[i].n_tokens * m->top_k;
	}
	return true;
}

/* Before the completions are posted (the client may write its region once
 * it has seen its completion): the routing clients asked for, into the
 * scratch. */
static void trace_routing(struct worker *w, struct work *b)
{
	uint32_t K = moe_engine_model(w->e)->top_k;
	size_t off = 0;

	for (uint32_t i = 0; i < b->n; i++) {
		size_t n = (size_t)b->segs[i].n_tokens * K;

		if (b->segs[i].topk_ids != w->tr_ids + off)
			memcpy(w->tr_ids + off, b->segs[i].topk_ids, n * sizeof(uint32_t));
		off += n;
	}
}

/* After posting: each request's hits, counted from the scratch, ascending
 * expert (a bitmap of the experts seen: O(tokens x top-k + E / 64) a
 * request, not O(E)). An id out of range (a hostile client can write its
 * own routing span while the batch runs) is not counted. */
static void trace_hits(struct worker *w, struct work *b)
{
	const struct moe_model *m = moe_engine_model(w->e);
	uint32_t K = m->top_k, E = m->n_experts, nh = 0;
	size_t cap = 0, off = 0;

	for (uint32_t i = 0; i < b->n; i++) {
		size_t n = (size_t)b->segs[i].n_tokens * K;

		cap += n < E ? n : E;
	}
	if (cap > b->hits_cap) {
		struct moe_trace_hit *p = realloc(b->hits, cap * sizeof(*p));

		if (!p) {
			b->routed = false;
			return;
		}
		b->hits = p;
		b->hits_cap = cap;
	}
	for (uint32_t i = 0; i < b->n; i++) {
		size_t n = (size_t)b->segs[i].n_tokens * K;
		const uint32_t *ids = w->tr_ids + off;

		b->hit_off[i] = nh;
		for (size_t k = 0; k < n; k++) {
			uint32_t x = ids[k];

			if (x < E && !w->tr_count[x]++)
				w->tr_seen[x / 64] |= 1ull << (x % 64);
		}
		for (uint32_t wd = 0; wd < (E + 63) / 64; wd++) {
			for (uint64_t bits = w->tr_seen[wd]; bits; bits &= bits - 1) {
				uint32_t x = wd * 64 + (uint32_t)__builtin_ctzll(bits);

				b->hits[nh++] = (struct moe_trace_hit){x, w->tr_count[x]};
				w->tr_count[x] = 0;
			}
			w->tr_seen[wd] = 0;
		}
		off += n;
	}
	b->hit_off[b->n] = nh;
}

static void run_batch(struct worker *w, struct work *b)
{
	struct moe_stage_times tm = {{0}};
	struct moe_batch mb = {.layer = b->layer, .n_tokens = b->tokens, .n_segs = b->n,
			       .segs = b->segs, .times = &tm};
	struct moe_epoch *ep;

	if (w->stall_ms)
		usleep(w->stall_ms * 1000u);
	b->start_ns = srv_now_ns();
	observe_start(w, b, b->start_ns);
	b->routed = b->trace && trace_prepare(w, b);
	/* the whole batch, and so each request in it, runs under one epoch */
	ep = moe_epoch_acquire(w->e);
	b->epoch = ep->id;
	if (b->trace) {
		int pos = moe_model_layer_pos(moe_engine_model(w->e), b->layer);

		b->wversion = pos >= 0 ? ep->weights_version[pos] : 0;
	}
	if (b->n == 1 && b->tokens > moe_engine_max_tokens(w->e))
		b->ret = run_pieces(w, ep, b, &tm);
	else
		b->ret = moe_engine_forward(w->e, ep, &mb, b->err);
	/* (after a lost rank: the epoch published without it) */
	if (!b->ret && moe_engine_last_epoch(w->e))
		b->epoch = moe_engine_last_epoch(w->e);
	moe_epoch_release(ep);
	b->device_ms = moe_engine_last_device_ms(w->e);
	b->times = tm;
	b->routed = b->routed && !b->ret;
	if (b->routed)
		trace_routing(w, b);
	/* the results are in the clients' regions: tell them now */
	atomic_store(&w->handing_back, true);
	srv_post_batch(b, srv_batch_status(b->ret), b->epoch);
	b->end_ns = srv_now_ns();
	observe_end(w, b, &tm, b->end_ns);
	if (b->routed)
		trace_hits(w, b);
}

static void run(struct worker *w, struct work *x)
{
	switch (x->kind) {
	case WORK_BATCH:
		run_batch(w, x);
		break;
	case WORK_PIN:
		x->ret = moe_engine_host_register(w->e, x->region, x->bytes, x->err);
		break;
	case WORK_RELEASE:
		if (x->pinned)
			moe_engine_host_unregister(w->e, x->region);
		munmap(x->region, x->bytes);
		break;
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	sigset_t all;

	sigfillset(&all); /* signals are the loop's (signalfd) */
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_mutex_lock(&w->lock);
	for (;;) {
		struct work *x;
		uint64_t one = 1;

		while (!w->todo && !w->stop)
			pthread_cond_wait(&w->cond, &w->lock);
		if (!w->todo)
			break; /* stopping, and nothing left to run */
		x = w->todo;
		x->started = true;
		if (w->want_start && x->kind == WORK_BATCH) {
			w->want_start = false;
			if (write(w->efd, &one, sizeof(one)) < 0) {
				/* cannot fail, see below */
			}
		}
		w->todo = x->next;
		if (!w->todo)
			w->todo_tail = NULL;
		pthread_mutex_unlock(&w->lock);

		atomic_store(&w->beat_ns, srv_now_ns());
		run(w, x);
		atomic_store(&w->beat_ns, 0);

		pthread_mutex_lock(&w->lock);
		x->next = NULL;
		if (w->done_tail)
			w->done_tail->next = x;
		else
			w->done = x;
		w->done_tail = x;
		atomic_store(&w->handing_back, false);
		if (write(w->efd, &one, sizeof(one)) < 0) {
			/* cannot fail: the counter is read before it nears 2^64 */
		}
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

int srv_worker_start(struct worker *w, struct moe_engine *e, struct srv_metrics *met,
		     uint32_t stall_ms)
{
	*w = (struct worker){.e = e, .met = met, .stall_ms = stall_ms, .efd = -1};
	atomic_init(&w->beat_ns, 0);
	atomic_init(&w->handing_back, false);
	w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (w->efd < 0)
		return -errno;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	if (pthread_create(&w->thread, NULL, worker_main, w)) {
		close(w->efd);
		w->efd = -1;
		return -EAGAIN;
	}
	w->started = true;
	return 0;
}

void srv_worker_post(struct worker *w, struct work *x)
{
	x->next = NULL;
	pthread_mutex_lock(&w->lock);
	if (w->todo_tail)
		w->todo_tail->next = x;
	else
		w->todo = x;
	w->todo_tail = x;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

struct work *srv_worker_collect(struct worker *w)
{
	struct work *x;
	uint64_t n;

	if (read(w->efd, &n, sizeof(n)) < 0) {
		/* EAGAIN: nothing signalled since the last collect */
	}
	pthread_mutex_lock(&w->lock);
	x = w->done;
	w->done = w->done_tail = NULL;
	pthread_mutex_unlock(&w->lock);
	return x;
}

/* Lets the worker run what is queued (region releases at shutdown), then
 * joins it. */
void srv_worker_stop(struct worker *w)
{
	if (!w->started)
		return;
	pthread_mutex_lock(&w->lock);
	w->stop = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
	pthread_join(w->thread, NULL);
	w->started = false;
}

/* After srv_worker_stop: runs what was posted since, on the caller's
 * thread (the only one left); returns how many items it ran. */
uint32_t srv_worker_run_left(struct worker *w)
{
	uint32_t n = 0;

	while (w->todo) {
		struct work *x = w->todo;

		w->todo = x->next;
		run(w, x);
		x->next = w->done;
		w->done = x;
		n++;
	}
	w->todo_tail = NULL;
	w->done_tail = NULL;
	for (struct work *x = w->done; x; x = x->next)
		w->done_tail = x;
	return n;
}

void srv_worker_close(struct worker *w)
{
	free(w->tr_ids);
	free(w->tr_count);
	free(w->tr_seen);
	w->tr_ids = w->tr_count = NULL;
	w->tr_seen = NULL;
	if (w->efd >= 0) {
		pthread_mutex_destroy(&w->lock);
		pthread_cond_destroy(&w->cond);
		close(w->efd);
	}
	w->efd = -1;
}

bool srv_worker_wedged(struct worker *w, uint64_t now, uint64_t limit_ns)
{
	uint64_t beat = atomic_load(&w->beat_ns);

	return beat && now - beat > limit_ns;
}
