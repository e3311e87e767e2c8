/* client/rings.c — the slot table, the rings, buffers in the shared region, the checks
 * every request shares (see internal.h). */
#include "client/internal.h"

/* ------------------------------------------------------------------------ */
/* Slots and rings — all with c->mu held                                    */

struct slot *mc_find_slot(struct moe_client *c, uint64_t tag)
{
	uint64_t i = tag & ((1u << TAG_SLOT_BITS) - 1);

	if (!c->slots || i >= c->cq_entries || c->slots[i].state == SLOT_FREE ||
	    c->slots[i].tag != tag)
		return NULL;
	return &c->slots[i];
}

static struct slot *get_slot(struct moe_client *c)
{
	struct slot *s;
	uint32_t i;

	if (!c->n_free_slots)
		return NULL;
	i = c->free_slots[--c->n_free_slots];
	s = &c->slots[i];
	memset(s, 0, sizeof(*s));
	s->tag = (++c->tag_gen << TAG_SLOT_BITS) | i;
	return s;
}

void mc_put_slot(struct moe_client *c, struct slot *s)
{
	s->state = SLOT_FREE;
	s->waiters = 0;
	s->tag = 0;
	c->free_slots[c->n_free_slots++] = (uint32_t)(s - c->slots);
}

/* A pending request has finished (from the CQ, or because the daemon left). */
static void finish(struct moe_client *c, struct slot *s, int status, uint32_t epoch)
{
	c->inflight_reqs--;
	c->inflight_tokens -= s->n_tokens;
	if (s->orphan) {
		mc_put_slot(c, s);
		return;
	}
	s->state = SLOT_DONE;
	s->status = status;
	s->epoch = epoch;
}

/* Something changed: wake every waiter, the poller included. */
void mc_wake_all(struct moe_client *c)
{
	pthread_cond_broadcast(&c->cv);
	if (c->polling) {
		uint64_t one = 1;

		if (write(c->evfd, &one, sizeof(one)) < 0) {
			/* full counter: it is readable anyway */
		}
	}
}

/* Moves finished entries from the completion ring into the slot table.
 * Returns how many, or -1 if the daemon overran the ring. */
static int reap_ring(struct moe_client *c)
{
	uint32_t tail = atomic_load_explicit(&c->hdr->cq_tail, memory_order_acquire), n = 0;

	if (tail - c->cq_head > c->cq_entries)
		return -1;
	for (; c->cq_head != tail; c->cq_head++, n++) {
		struct moe_cqe e = c->cq[c->cq_head & (c->cq_entries - 1)];
		struct slot *s = mc_find_slot(c, e.tag);

		/* Unknown or repeated tags are ignored. */
		if (s && s->state == SLOT_PENDING)
			finish(c, s, e.status ? wire_status(e.status) : 0, e.epoch);
	}
	if (n) {
		atomic_store_explicit(&c->hdr->cq_head, c->cq_head, memory_order_release);
		mc_wake_all(c);
	}
	return (int)n;
}

int mc_reap(struct moe_client *c)
{
	int n;

	if (!c->hdr || c->dead)
		return 0;
	n = reap_ring(c);
	if (n < 0) {
		mc_mark_dead(c); /* a daemon that overruns the ring is not one to talk to */
		return 0;
	}
	return n;
}

void mc_mark_dead(struct moe_client *c)
{
	if (c->dead)
		return;
	if (c->hdr)
		reap_ring(c); /* completions already posted are real */
	c->dead = 1;
	for (uint32_t i = 0; c->slots && i < c->cq_entries; i++)
		if (c->slots[i].state == SLOT_PENDING)
			finish(c, &c->slots[i], MOE_EDAEMON, 0);
	c->inflight_reqs = c->inflight_tokens = 0;
	mc_calls_fail(c);
	/* A sleeping poller still polls the socket: it closes it on waking. */
	if (!c->polling && c->sock >= 0) {
		close(c->sock);
		c->sock = -1;
	}
	mc_wake_all(c);
}

/* ------------------------------------------------------------------------ */
/* Buffers                                                                  */

void *mc_buf_alloc_locked(struct moe_client *c, uint64_t bytes)
{
	uint64_t off;

	if (!c->region || moe_shm_alloc_get(&c->alloc, bytes, &off))
		return NULL;
	return c->data + off;
}

void mc_buf_free_locked(struct moe_client *c, void *p)
{
	uintptr_t a = (uintptr_t)p, d = (uintptr_t)c->data;

	if (!p || !c->data || a < d || a - d >= c->data_bytes)
		return;
	if (!moe_shm_alloc_put(&c->alloc, a - d))
		mc_wake_all(c);
}

MOE_API void *moe_buf_alloc(moe_client *c, size_t bytes)
{
	void *p;

	if (!c || !bytes)
		return NULL;
	pthread_mutex_lock(&c->mu);
	p = mc_buf_alloc_locked(c, bytes);
	pthread_mutex_unlock(&c->mu);
	return p;
}

MOE_API void moe_buf_free(moe_client *c, void *p)
{
	if (!c || !p)
		return;
	pthread_mutex_lock(&c->mu);
	mc_buf_free_locked(c, p);
	pthread_mutex_unlock(&c->mu);
}

/* ------------------------------------------------------------------------ */
/* Requests                                                                 */

/* The argument checks every request shares; *bytes: of input (= output). */
int mc_check_request(const struct moe_client *c, uint32_t layer, moe_dtype dtype, uint32_t n_tokens,
                     uint64_t *bytes)
{
	uint64_t row;
	uint32_t i;

	if ((unsigned)dtype > MOE_DTYPE_F16)
		return MOE_EDTYPE;
	for (i = 0; i < c->info.n_moe_layers; i++)
		if (c->info.moe_layers[i] == layer)
			break;
	if (i == c->info.n_moe_layers)
		return MOE_ENOLAYER;
	/* (above max_batch_tokens the daemon splits it) */
	if (c->info.max_inflight_tokens && n_tokens > c->info.max_inflight_tokens)
		return MOE_E2BIG;
	row = (uint64_t)c->info.hidden * dtype_size(dtype);
	if (row && n_tokens > UINT64_MAX / row)
		return MOE_ENOMEM;
	*bytes = row * n_tokens;
	return 0;
}

/* Whether one more request of n tokens fits the ring, the slot table and
 * the daemon's per-client limits. */
int mc_has_room(struct moe_client *c, uint32_t n_tokens)
{
	uint32_t head = atomic_load_explicit(&c->hdr->sq_head, memory_order_acquire);
	const moe_model_info *mi = &c->info;

	if (c->sq_tail - head >= c->sq_entries || !c->n_free_slots)
		return 0;
	if (mi->max_inflight_requests && c->inflight_reqs >= mi->max_inflight_requests)
		return 0;
	if (mi->max_inflight_tokens &&
	    c->inflight_tokens + (uint64_t)n_tokens > mi->max_inflight_tokens)
		return 0;
	return 1;
}

/* Pushes one SQE and rings the doorbell; the caller checked mc_has_room. */
int mc_push(struct moe_client *c, struct moe_sqe *e, uint64_t *tag)
{
	struct slot *s = get_slot(c);

	e->tag = s->tag;
	s->state = SLOT_PENDING;
	s->n_tokens = e->n_tokens;
	c->inflight_reqs++;
	c->inflight_tokens += e->n_tokens;
	c->sq[c->sq_tail & (c->sq_entries - 1)] = *e;
	c->sq_tail++;
	atomic_store_explicit(&c->hdr->sq_tail, c->sq_tail, memory_order_release);
	*tag = s->tag;
	/* No doorbell while the daemon says it will look anyway (moe_ring.h);
	 * if it fails the daemon is gone: mc_mark_dead fails the slot. */
	atomic_thread_fence(memory_order_seq_cst);
	if (!atomic_load_explicit(&c->hdr->sq_no_doorbell, memory_order_relaxed))
		mc_send_ctl(c, MOE_MSG_DOORBELL, NULL, 0, NULL);
	return 0;
}

/* The offset of [p, p + bytes) in the data area, or MOE_ERANGE. */
int mc_data_offset(const struct moe_client *c, const void *p, uint64_t bytes, uint64_t *off)
{
	uintptr_t a = (uintptr_t)p, d = (uintptr_t)c->data;

	if (!p || a < d || !moe_span_ok(a - d, bytes, c->data_bytes))
		return MOE_ERANGE;
	*off = a - d;
	return 0;
}
