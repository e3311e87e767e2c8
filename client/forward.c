/* client/forward.c — the forward API: submit, forward (sync), poll, wait, cancel
 * (see internal.h). */
#include "client/internal.h"

MOE_API int moe_submit(moe_client *c, uint32_t layer, moe_dtype dtype, const void *in_buf,
                       void *out_buf, uint32_t n_tokens, uint32_t timeout_ms, uint64_t *tag)
{
	struct moe_sqe e = {0};
	uint64_t bytes;
	int r;

	if (!c || !tag || !n_tokens)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = mc_enter(c);
	if (!r)
		r = mc_check_request(c, layer, dtype, n_tokens, &bytes);
	if (!r)
		r = mc_data_offset(c, in_buf, bytes, &e.in_off);
	if (!r)
		r = mc_data_offset(c, out_buf, bytes, &e.out_off);
	if (!r) {
		mc_drain(c);
		mc_reap(c);
		r = c->dead ? MOE_EDAEMON : mc_has_room(c, n_tokens) ? 0 : MOE_EBUSY;
	}
	if (!r) {
		e.layer = layer;
		e.n_tokens = n_tokens;
		e.dtype = (uint16_t)dtype;
		e.timeout_ms = timeout_ms;
		r = mc_push(c, &e, tag);
	}
	pthread_mutex_unlock(&c->mu);
	return r;
}

/* moe_forward and moe_forward_ex: through buffers of the data area (one
 * for the input and the output, one for the routing when asked). */
static int forward(moe_client *c, const moe_forward_args *a)
{
	struct moe_sqe e = {0};
	unsigned char *bin = NULL, *bout = NULL, *broute = NULL;
	uint64_t bytes, rbytes = 0, need, tag;
	bool routing = a->flags & MOE_FWD_ROUTING;
	uint32_t epoch = 0;
	int r, status = 0;

	pthread_mutex_lock(&c->mu);
	r = mc_enter(c);
	if (!r)
		r = mc_check_request(c, a->layer, (moe_dtype)a->dtype, a->n_tokens, &bytes);
	if (r)
		goto out_unlock;
	if (routing)
		rbytes = (uint64_t)a->n_tokens * c->info.top_k * 8u;
	need = (bytes + MOE_SHM_ALIGN - 1) / MOE_SHM_ALIGN * MOE_SHM_ALIGN * 2 +
	       (rbytes + MOE_SHM_ALIGN - 1) / MOE_SHM_ALIGN * MOE_SHM_ALIGN;
	if (need > c->data_bytes) {
		r = MOE_ENOMEM;
		goto out_unlock;
	}
	c->forwards++;
	/* Room taken by other moe_forward calls comes back; room the caller
	 * holds in its own buffers does not: then fail rather than wait. */
	for (;;) {
		bin = mc_buf_alloc_locked(c, bytes);
		bout = bin ? mc_buf_alloc_locked(c, bytes) : NULL;
		broute = bout && routing ? mc_buf_alloc_locked(c, rbytes) : NULL;
		if (bout && (broute || !routing))
			break;
		mc_buf_free_locked(c, bin);
		mc_buf_free_locked(c, bout);
		bin = bout = NULL;
		if (c->forwards == 1) {
			r = MOE_ENOMEM;
			goto out_forwards;
		}
		if (c->dead) {
			r = MOE_EDAEMON;
			goto out_forwards;
		}
		mc_wait_step(c, NO_DEADLINE);
	}
	memcpy(bin, a->in, bytes);
	r = mc_wait_room(c, a->n_tokens, NO_DEADLINE);
	if (r)
		goto out_free;
	e.layer = a->layer;
	e.n_tokens = a->n_tokens;
	e.dtype = (uint16_t)a->dtype;
	e.timeout_ms = a->timeout_ms;
	e.in_off = (uint64_t)(bin - c->data);
	e.out_off = (uint64_t)(bout - c->data);
	if (routing) {
		e.flags = MOE_SQE_ROUTING;
		e.route_off = (uint64_t)(broute - c->data);
	}
	mc_push(c, &e, &tag);
	r = mc_wait_tag(c, tag, NO_DEADLINE, &status, &epoch);
	if (!r)
		r = status;
	if (!r) {
		memcpy(a->out, bout, bytes);
		if (routing) {
			memcpy(a->topk_ids, broute, rbytes / 2);
			memcpy(a->topk_weights, broute + rbytes / 2, rbytes / 2);
		}
		if (a->epoch)
			*a->epoch = epoch;
	}
out_free:
	mc_buf_free_locked(c, bin);
	mc_buf_free_locked(c, bout);
	mc_buf_free_locked(c, broute);
out_forwards:
	c->forwards--;
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_forward(moe_client *c, uint32_t layer, moe_dtype dtype, const void *in, void *out,
                        uint32_t n_tokens)
{
	moe_forward_args a = {.size = sizeof(a), .layer = layer, .dtype = (uint32_t)dtype,
	                      .in = in, .out = out, .n_tokens = n_tokens};

	return moe_forward_ex(c, &a);
}

MOE_API int moe_forward_ex(moe_client *c, const moe_forward_args *args)
{
	moe_forward_args a = {0};

	/* the first version's size is the smallest we know; a caller built
	 * against a newer header than ours passes more, which we cannot honour
	 * unless it is all zero */
	if (!c || !args || args->size < offsetof(moe_forward_args, epoch) + sizeof(a.epoch))
		return MOE_EINVAL;
	if (args->size > sizeof(a)) {
		for (size_t i = sizeof(a); i < args->size; i++)
			if (((const unsigned char *)args)[i])
				return MOE_EINVAL;
	}
	memcpy(&a, args, args->size < sizeof(a) ? args->size : sizeof(a));
	if (a.flags & ~(uint32_t)MOE_FWD_ROUTING)
		return MOE_EINVAL;
	if ((a.flags & MOE_FWD_ROUTING) && (!a.topk_ids || !a.topk_weights))
		return MOE_EINVAL;
	if (!a.n_tokens)
		return 0;
	if (!a.in || !a.out)
		return MOE_EINVAL;
	return forward(c, &a);
}

MOE_API int moe_poll(moe_client *c, moe_completion *out, int max)
{
	int n = 0, pending = 0;

	if (!c || max < 0 || (max && !out))
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	mc_drain(c);
	mc_reap(c);
	for (uint32_t i = 0; i < c->cq_entries; i++) {
		struct slot *s = &c->slots[i];

		if (s->state == SLOT_PENDING)
			pending++;
		if (n >= max || s->state != SLOT_DONE || s->waiters || s->orphan)
			continue;
		out[n++] = (moe_completion){s->tag, s->status, s->epoch};
		mc_put_slot(c, s);
	}
	if (n)
		mc_wake_all(c);
	else if (c->dead && !pending)
		n = MOE_EDAEMON; /* nothing will ever come */
	pthread_mutex_unlock(&c->mu);
	return n;
}

MOE_API int moe_wait(moe_client *c, uint64_t tag, int timeout_ms, int *status)
{
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	mc_drain(c);
	mc_reap(c);
	r = mc_wait_tag(c, tag, deadline_after(timeout_ms), status, NULL);
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_cancel(moe_client *c, uint64_t tag)
{
	struct moe_msg_cancel m = {tag};
	struct slot *s;
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	mc_drain(c);
	mc_reap(c);
	s = mc_find_slot(c, tag);
	if (!s || s->orphan)
		r = MOE_ENOENT;
	else if (s->state == SLOT_DONE)
		r = 0; /* finished already: nothing to cancel */
	else
		r = mc_send_ctl(c, MOE_MSG_CANCEL, &m, sizeof(m), NULL);
	pthread_mutex_unlock(&c->mu);
	return r;
}
