/* daemon/server/sched.c — the submission rings, the queue (fair shares), batches, completions,
 * deadlines, cancel
 * (see internal.h). */
#include "daemon/server/internal.h"

#include <sched.h>

/* ---- completions -------------------------------------------------------- */

/* Both producers of completions (the loop, the worker) hold c->cq_lock
 * around what follows (internal.h). */

/* Moves queued completions into the client's ring while there is room;
 * false if the head the client wrote claims more than the ring holds (a
 * corrupt region: the loop drops the client, the worker leaves it be). */
static bool flush_locked(struct client *c)
{
	uint32_t head, used, i = 0;

	head = atomic_load_explicit(&c->hdr->cq_head, memory_order_acquire);
	used = c->cq_tail - head;
	if (used > c->cq_entries)
		return false;
	while (i < c->n_overflow && used < c->cq_entries) {
		c->cq[c->cq_tail & (c->cq_entries - 1)] = c->overflow[i++];
		c->cq_tail++;
		used++;
	}
	if (i) {
		atomic_store_explicit(&c->hdr->cq_tail, c->cq_tail, memory_order_release);
		memmove(c->overflow, c->overflow + i, (c->n_overflow - i) * sizeof(*c->overflow));
		c->n_overflow -= i;
		c->notify = true;
	}
	return true;
}

/* Queues one completion and flushes; false if out of memory. */
static bool post_locked(struct client *c, uint64_t tag, int status, uint32_t epoch)
{
	if (c->n_overflow == c->overflow_cap) {
		uint32_t cap = c->overflow_cap ? 2 * c->overflow_cap : 64;
		struct moe_cqe *v = realloc(c->overflow, cap * sizeof(*v));

		if (!v)
			return false;
		c->overflow = v;
		c->overflow_cap = cap;
	}
	c->overflow[c->n_overflow++] = (struct moe_cqe){tag, status, epoch};
	flush_locked(c);
	return true;
}

void srv_flush_cq(struct client *c)
{
	bool ok;

	if (!c->attached || c->dead)
		return;
	pthread_mutex_lock(&c->cq_lock);
	ok = flush_locked(c);
	pthread_mutex_unlock(&c->cq_lock);
	if (!ok) {
		moe_log(LOG_WARNING, "client %u (pid %d): completion ring head is corrupt; "
			"dropping it", c->id, (int)c->pid);
		c->dead = true;
	}
}

/* The status every request of a batch gets from the engine's return. */
int srv_batch_status(int ret)
{
	return !ret ? 0 : ret == -ENOTRECOVERABLE ? MOE_EDEVICE : MOE_EINTERNAL;
}

/* On the worker, as soon as a batch ends: each request's completion goes
 * into its client's ring, and each client that got one a doorbell, now
 * rather than once the loop has woken and collected the batch. Counts and
 * references stay the loop's (batch_done). A session dropped meanwhile
 * (gone) gets nothing; a request whose completion cannot be queued (no
 * memory) is left to the loop, which drops that client. */
void srv_post_batch(struct work *b, int status, uint32_t epoch)
{
	for (uint32_t i = 0; i < b->n; i++) {
		struct request *r = b->reqs[i];
		struct client *c = r->c;

		pthread_mutex_lock(&c->cq_lock);
		if (!c->gone)
			r->posted = post_locked(c, r->tag, status, epoch);
		pthread_mutex_unlock(&c->cq_lock);
	}
	for (uint32_t i = 0; i < b->n; i++) {
		struct client *c = b->reqs[i]->c;

		pthread_mutex_lock(&c->cq_lock);
		if (c->notify && !c->gone) {
			/* never blocks; EAGAIN: a doorbell is pending anyway */
			srv_send_msg(c->fd, MOE_MSG_DOORBELL, NULL, 0, -1);
			c->notify = false;
		}
		pthread_mutex_unlock(&c->cq_lock);
	}
}

/* epoch: the id of the epoch the request ran on, 0 if it did not run.
 * posted: the worker queued its completion already; only count it. */
static void complete(struct server *s, struct client *c, uint64_t tag, int status, uint32_t epoch,
		     bool posted)
{
	bool ok = true;

	if (!posted) {
		pthread_mutex_lock(&c->cq_lock);
		ok = post_locked(c, tag, status, epoch);
		pthread_mutex_unlock(&c->cq_lock);
	}
	if (!ok) {
		c->dead = true; /* cannot answer: drop rather than lose silently */
		return;
	}
	if (status) {
		c->errors++;
		s->errors++;
	}
	c->requests++;
	srv_flush_cq(c);
}

/* Answers a request that is no longer queued (cancelled, expired, or back
 * from the worker). A client dropped meanwhile gets no completion: its
 * region may already be gone. */
void srv_finish(struct server *s, struct request *r, int status, uint32_t epoch)
{
	struct client *c = r->c;

	c->inflight--;
	c->inflight_tokens -= r->n_tokens;
	s->pending--;
	s->pending_tokens -= r->n_tokens;
	if (status == MOE_ETIMEDOUT)
		s->timeouts++;
	else if (status == MOE_ECANCELED)
		s->cancelled++;
	else if (status == 0)
		s->completed++;
	/* counted once answered: posted by the worker (its client may have
	 * seen it and hung up since), or answered here; a dropped client's
	 * unanswered requests are not */
	if (!c->gone || r->posted)
		srv_count_request(s, status, r->n_tokens);
	if (!c->gone)
		complete(s, c, r->tag, status, epoch, r->posted);
	free(r);
}

/* ---- the client's submission ring --------------------------------------- */

static void enqueue(struct server *s, struct client *c, struct request *r)
{
	r->next = NULL;
	if (c->queue_tail)
		c->queue_tail->next = r;
	else
		c->queue = r;
	c->queue_tail = r;
	c->inflight++;
	c->inflight_tokens += r->n_tokens;
	s->queued++;
	s->pending++;
	s->pending_tokens += r->n_tokens;
}

/* Validates a copied-out entry (ipc/moe_ring.h); 0 or the MOE_E* code. */
static int check_sqe(struct server *s, struct client *c, const struct moe_sqe *q)
{
	struct moe_sqe_limits l = {
		.hidden = s->m->hidden,
		.data_bytes = c->data_bytes,
		/* a request larger than a batch is split (the worker);
		 * one larger than the client's whole budget never fits */
		.max_tokens = s->o.max_inflight_tokens,
		.top_k = s->m->top_k,
		.max_inflight_tokens = s->o.max_inflight_tokens,
		.n_layers = s->m->n_layers,
		.is_moe = s->is_moe,
	};

	return moe_sqe_validate(q, &l);
}

void srv_poll_sq(struct server *s, struct client *c)
{
	uint32_t tail, avail;

	if (!c->attached || c->dead)
		return;
	tail = atomic_load_explicit(&c->hdr->sq_tail, memory_order_acquire);
	avail = tail - c->sq_head;
	if (avail > c->sq_entries) {
		moe_log(LOG_WARNING, "client %u (pid %d): submission ring tail is corrupt; "
			"dropping it", c->id, (int)c->pid);
		srv_send_error(c, MOE_EPROTO, "submission ring tail is corrupt");
		c->dead = true;
		return;
	}
	while (avail--) {
		struct moe_sqe q;
		struct request *r;
		uint64_t timeout;
		int st;

		/* backpressure: leave entries in the ring past the limits,
		 * past the client's fair share of the queue (poll_rings), and
		 * while the client leaves completions uncollected (else a
		 * client that never reads its completion ring grows
		 * c->overflow without bound) */
		if (c->inflight >= s->o.max_inflight_requests ||
		    s->pending >= s->o.max_queue_requests || c->inflight >= s->share ||
		    c->n_overflow)
			break;
		/* copy once, then validate the copy; never re-read the ring */
		memcpy(&q, &c->sq[c->sq_head & (c->sq_entries - 1)], sizeof(q));
		st = check_sqe(s, c, &q);
		/* over the token limit: leave it in the ring (head not yet
		 * published) and take it again once others finish */
		if (!st && !(q.flags & MOE_SQE_NOP) &&
		    c->inflight_tokens + q.n_tokens > s->o.max_inflight_tokens && c->inflight)
			break;
		c->sq_head++;
		atomic_store_explicit(&c->hdr->sq_head, c->sq_head, memory_order_release);
		if (st || (q.flags & MOE_SQE_NOP) || s->stopping || s->draining) {
			bool refuse = !(q.flags & MOE_SQE_NOP) && (s->stopping || s->draining);

			if (st || refuse) /* (a no-op is not a request) */
				srv_count_request(s, st ? st : s->lost ? MOE_EDEVICE : MOE_ESHUTDOWN,
						  st ? 0 : q.n_tokens);
			complete(s, c, q.tag,
				 st	  ? st
				 : refuse ? (s->lost ? MOE_EDEVICE : MOE_ESHUTDOWN)
					  : 0, 0, false);
			continue;
		}
		r = calloc(1, sizeof(*r));
		if (!r) {
			srv_count_request(s, MOE_ENOMEM, 0);
			complete(s, c, q.tag, MOE_ENOMEM, 0, false);
			continue;
		}
		timeout = q.timeout_ms ? q.timeout_ms : s->o.request_timeout_ms;
		*r = (struct request){.c = c, .tag = q.tag, .layer = q.layer,
				      .n_tokens = q.n_tokens, .dtype = (enum moe_dtype)q.dtype,
				      .in_off = q.in_off, .out_off = q.out_off,
				      .routing = (q.flags & MOE_SQE_ROUTING) != 0,
				      .route_off = q.route_off, .queued_ns = srv_now_ns()};
		if (timeout)
			r->deadline_ns = r->queued_ns + timeout * 1000000ull;
		enqueue(s, c, r);
	}
}

static bool has_work(const struct client *c)
{
	return c->attached && !c->dead &&
	       (c->queue ||
		atomic_load_explicit(&c->hdr->sq_tail, memory_order_relaxed) != c->sq_head);
}

/* Takes what every client's ring holds, within the limits. Fairness of
 * admission: while k clients have work, none may hold more than
 * max_queue_requests / k of the queue, so a newcomer (or an old client
 * behind newer ones in the list) always finds room as the others' requests
 * finish; and the rings are polled from a rotating start, so no position
 * in the list goes first every time. (form_batch is fair between what is
 * queued.) */
void srv_poll_rings(struct server *s)
{
	uint32_t busy = 0, k, i = 0;
	struct client *c;

	for (c = s->clients; c; c = c->next)
		busy += has_work(c);
	s->share = s->o.max_queue_requests / (busy ? busy : 1);
	if (!s->share)
		s->share = 1;
	k = s->n_clients ? s->poll_rr++ % s->n_clients : 0;
	for (c = s->clients; c; c = c->next, i++) {
		if (i < k)
			continue;
		srv_flush_cq(c);
		srv_poll_sq(s, c);
	}
	i = 0;
	for (c = s->clients; c && i < k; c = c->next, i++) {
		srv_flush_cq(c);
		srv_poll_sq(s, c);
	}
}

/* Unlinks r from its client's FIFO. */
void srv_unqueue(struct server *s, struct client *c, struct request *r)
{
	struct request **pp = &c->queue, *prev = NULL;

	while (*pp && *pp != r)
		prev = *pp, pp = &(*pp)->next;
	if (!*pp)
		return;
	*pp = r->next;
	if (c->queue_tail == r)
		c->queue_tail = prev;
	s->queued--;
}

/* ---- scheduling --------------------------------------------------------- */

/* The layer of the next batch: that of the oldest request of the next
 * client in round-robin order that has work, so that a client flooding one
 * layer cannot make another client's request on another layer wait for all
 * of its queue (at most one batch per other client goes first). */
static int64_t next_layer(struct server *s)
{
	uint32_t nc = s->n_clients, i = 0;
	struct client *c = s->clients;

	if (!nc)
		return -1;
	/* from the rr-th client round the list once, wrapping to the head */
	for (; c && i < s->rr % nc; c = c->next)
		i++;
	for (uint32_t k = 0; k < nc; k++) {
		if (!c)
			c = s->clients;
		if (c->queue)
			return c->queue->layer;
		c = c->next;
	}
	return -1;
}

/* Round robin over the clients, one request of b's layer from each per
 * round, appended to b until max_batch_tokens: every client with work in
 * this layer gets into the batch before any client gets a second request
 * in. Each request taken holds a reference on its client (its region stays
 * mapped) and becomes one segment. Returns how many it took.
 *
 * Only a new batch moves the round robin on (s->rr): a top-up of the
 * waiting batch, which runs on every loop turn, must not, or which client's
 * layer comes next would depend on how many turns the loop took. */
static uint32_t fill_batch(struct server *s, struct work *b, bool topup)
{
	uint32_t n0 = b->n, maxt = moe_engine_max_tokens(s->e), nc = s->n_clients;
	struct client **order;
	bool took = true;
	uint32_t i = 0;

	/* (kept between calls: the loop tops up a waiting batch on every
	 * iteration, and this is its hot path) */
	if (nc > s->order_cap) {
		order = realloc(s->order, nc * sizeof(*order));
		if (!order)
			return 0;
		s->order = order;
		s->order_cap = nc;
	}
	order = s->order;
	for (struct client *c = s->clients; c; c = c->next)
		order[i++] = c;
	while (took) {
		took = false;
		for (uint32_t k = 0; k < nc; k++) {
			struct client *c = order[(s->rr + k) % nc];
			struct request *r;

			if (c->dead) /* its requests go with it (reap_dead) */
				continue;
			for (r = c->queue; r && r->layer != b->layer; r = r->next)
				;
			/* a request larger than a batch goes alone (the
			 * worker runs it in pieces, under one epoch) */
			if (!r || (b->tokens + r->n_tokens > maxt && (b->n || r->n_tokens <= maxt)))
				continue;
			srv_unqueue(s, c, r);
			c->refs++;
			b->segs[b->n] = (struct moe_seg){
				c->data + r->in_off, c->data + r->out_off, r->dtype, r->n_tokens,
				r->routing ? (uint32_t *)(void *)(c->data + r->route_off) : NULL,
				r->routing ? (float *)(void *)(c->data + r->route_off +
							       (uint64_t)r->n_tokens * s->m->top_k * 4)
					   : NULL};
			b->reqs[b->n++] = r;
			b->tokens += r->n_tokens;
			took = true;
		}
	}
	if (!topup)
		s->rr = nc ? (s->rr + 1) % nc : 0;
	return b->n - n0;
}

/* Hands the engine worker work. It holds at most two batches: the one it
 * runs, and the next, which the loop keeps filling with what arrives
 * (same layer, up to max_batch_tokens) until the worker starts it — so
 * batches stay as large as when the loop ran them itself, and the worker
 * goes from one batch to the next without waiting for the loop.
 *
 * Each request is one segment of the batch: the engine reads its input
 * from the client's region and writes its output there, in the request's
 * dtype (on a GPU, DMA from and to the pinned region). The engine reads
 * every input before it writes any output. On the CPU backend a token's
 * result is the same bits whichever batch it lands in. From the moment a
 * request is in a posted batch it is the worker's: cancel and deadlines no
 * longer act on it. */
void srv_submit_batch(struct server *s)
{
	struct work *b = NULL;
	int64_t layer;

	if (!s->queued || s->stopping)
		return;
	for (int i = 0; i < 2; i++) {
		struct work *x = &s->batch[i];
		bool waiting;

		if (!x->n)
			continue;
		/* posted: top it up while the worker has not started it */
		pthread_mutex_lock(&s->w.lock);
		waiting = !x->started;
		if (waiting) {
			/* a tracer that came since it was formed sees what it takes */
			x->trace |= s->trace.n != 0;
			fill_batch(s, x, true);
			/* what did not fit goes in the next batch, formed
			 * when the worker starts this one: it says when */
			s->w.want_start = s->queued != 0;
		}
		pthread_mutex_unlock(&s->w.lock);
		if (waiting)
			return; /* the one waiting: nothing else goes before it starts */
	}
	b = !s->batch[0].n ? &s->batch[0] : !s->batch[1].n ? &s->batch[1] : NULL;
	if (!b)
		return;
	layer = next_layer(s);
	if (layer < 0)
		return;
	*b = (struct work){.kind = WORK_BATCH, .layer = (uint32_t)layer, .reqs = b->reqs,
			   .segs = b->segs, .trace = s->trace.n != 0, .hit_off = b->hit_off,
			   .hits = b->hits, .hits_cap = b->hits_cap};
	if (!fill_batch(s, b, false))
		return;
	srv_worker_post(&s->w, b);
	s->batches_out++;
}

/* A batch back from the worker: answer its requests, release their clients.
 *
 * A lost device (-ENOTRECOVERABLE) is not survived in place: the batch and
 * everything queued are answered MOE_EDEVICE, and moed stops with exit
 * status MOE_EXIT_DEVICE_LOST so that systemd restarts it (crash-only). */
static void batch_done(struct server *s, struct work *b)
{
	int status = srv_batch_status(b->ret);

	if (b->ret == -ENOTRECOVERABLE && !s->lost) {
		moe_log(LOG_CRIT, "device lost: %s; answering %u in-flight requests with an error "
			"and exiting (status %d) to be restarted", b->err, s->pending,
			MOE_EXIT_DEVICE_LOST);
		srv_notify("STATUS=device lost: %s", b->err);
		s->lost = true;
		s->stopping = true;
	} else if (b->ret && b->ret != -ENOTRECOVERABLE) {
		moe_log(LOG_ERR, "batch of %u tokens on layer %u failed: %s", b->tokens, b->layer,
			b->err);
	}
	if (b->device_ms >= 0)
		s->last_device_ms = b->device_ms;
	if (s->trace.n)
		srv_trace_batch(s, b);
	for (uint32_t i = 0; i < b->n; i++) {
		struct request *r = b->reqs[i];
		struct client *c = r->c;

		s->tokens += r->n_tokens;
		srv_finish(s, r, status, b->epoch);
		srv_client_put(s, c);
	}
	b->n = 0;
	s->batches_out--;
	s->batches++;
}

/* Everything the worker has finished since the last call. */
void srv_collect(struct server *s)
{
	struct work *x = srv_worker_collect(&s->w), *next;

	for (; x; x = next) {
		next = x->next;
		switch (x->kind) {
		case WORK_BATCH:
			batch_done(s, x);
			break;
		case WORK_PIN:
			srv_pin_done(s, x);
			break;
		case WORK_RELEASE:
			free(x);
			break;
		}
	}
}

/* Brings the loop's counts up to every completion a client can have seen:
 * the worker posts a batch's completions before it hands the batch back,
 * so a client can see its result, then ask for status (or drain) before
 * the loop has counted that batch. Waits out a hand-back in progress (a
 * few instructions: the worker only posts, updates its histograms and,
 * while a tracer is attached, counts each request's experts: O(tokens x
 * top-k) plus a bitmap of the experts) and collects. True if a batch was
 * collected. */
bool srv_settle(struct server *s)
{
	bool any;

	if (!s->w.started)
		return false;
	while (atomic_load(&s->w.handing_back))
		sched_yield();
	pthread_mutex_lock(&s->w.lock);
	any = s->w.done != NULL;
	pthread_mutex_unlock(&s->w.lock);
	if (any)
		srv_collect(s);
	return any;
}

void srv_expire(struct server *s)
{
	uint64_t now = srv_now_ns();

	for (struct client *c = s->clients; c; c = c->next) {
		struct request *r = c->queue, *next;

		for (; r; r = next) {
			next = r->next;
			if (r->deadline_ns && r->deadline_ns <= now) {
				srv_unqueue(s, c, r);
				srv_finish(s, r, MOE_ETIMEDOUT, 0);
			}
		}
	}
}

void srv_cancel(struct server *s, struct client *c, uint64_t tag)
{
	for (struct request *r = c->queue; r; r = r->next) {
		if (r->tag == tag) {
			srv_unqueue(s, c, r);
			srv_finish(s, r, MOE_ECANCELED, 0);
			return;
		}
	}
	/* not queued: inside a batch (it runs) or done; its completion comes
	 * anyway */
}
