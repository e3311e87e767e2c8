/* daemon/engine/transport_local.c — the `local` transport: ranks of one
 * process, rows copied with memcpy. Each receiving rank's copies run as one
 * task of the pool (receivers write disjoint buffers, senders' buffers are
 * only read), so R ranks copy at once as R GPUs' copy engines would; an
 * exchange under LOCAL_PARALLEL_BYTES runs on the calling thread instead.
 * A rank's block to itself is copied too: the buffers are rank-owned, and
 * the engine skips the transport altogether when there is one rank.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/placement.h"
#include "daemon/engine/threadpool.h"
#include "daemon/engine/transport.h"

/* Below this many bytes in all, the copies run on the calling thread. */
#define LOCAL_PARALLEL_BYTES (256u << 10)

struct local {
	struct moe_transport t;
	struct moe_pool *pool;
};

struct a2a_ctx {
	const struct moe_a2a *ranks;
	uint32_t n_ranks;
	size_t elem;
	uint64_t moved[MOE_MAX_RANKS]; /* per receiver: bytes from other ranks */
};

static int local_exchange_counts(struct moe_transport *t, const uint32_t *const *send,
				 uint32_t *const *recv, uint32_t n)
{
	for (uint32_t r = 0; r < t->n_ranks; r++)
		for (uint32_t p = 0; p < t->n_ranks; p++)
			memcpy(recv[p] + (size_t)r * n, send[r] + (size_t)p * n,
			       n * sizeof(uint32_t));
	return 0;
}

/* Receiver r: the block each rank p holds for it, in rank order. */
static void recv_task(void *arg, uint32_t r, uint32_t worker)
{
	struct a2a_ctx *c = arg;
	const struct moe_a2a *me = &c->ranks[r];
	size_t at = 0;

	(void)worker;
	c->moved[r] = 0;
	for (uint32_t p = 0; p < c->n_ranks; p++) {
		const struct moe_a2a *src = &c->ranks[p];
		size_t from = 0, n = me->recv_counts[p];

		for (uint32_t q = 0; q < r; q++)
			from += src->send_counts[q];
		if (n)
			memcpy((char *)me->recv + at * c->elem,
			       (const char *)src->send + from * c->elem, n * c->elem);
		if (p != r)
			c->moved[r] += n * c->elem;
		at += n;
	}
}

static int local_alltoallv(struct moe_transport *t, const struct moe_a2a *ranks,
			   size_t elem_bytes)
{
	struct local *l = (struct local *)t;
	struct a2a_ctx c = {ranks, t->n_ranks, elem_bytes, {0}};
	size_t total = 0;

	for (uint32_t r = 0; r < t->n_ranks; r++)
		for (uint32_t p = 0; p < t->n_ranks; p++)
			if (ranks[r].recv_counts[p] != ranks[p].send_counts[r])
				return -EPROTO;
	/* small exchanges (decode) on the calling thread: waking the pool
	 * costs more than copying a few rows */
	for (uint32_t r = 0; r < t->n_ranks; r++)
		for (uint32_t p = 0; p < t->n_ranks; p++)
			total += (size_t)ranks[r].recv_counts[p] * elem_bytes;
	if (l->pool && total >= LOCAL_PARALLEL_BYTES)
		moe_pool_run(l->pool, t->n_ranks, recv_task, &c);
	else
		for (uint32_t r = 0; r < t->n_ranks; r++)
			recv_task(&c, r, 0);
	for (uint32_t r = 0; r < t->n_ranks; r++)
		t->bytes += c.moved[r];
	return 0;
}

static void local_destroy(struct moe_transport *t)
{
	free(t);
}

static const struct moe_transport_ops local_ops = {
	.name = "local",
	.exchange_counts = local_exchange_counts,
	.alltoallv = local_alltoallv,
	.destroy = local_destroy,
};

int moe_transport_local_create(uint32_t n_ranks, struct moe_pool *pool,
			       struct moe_transport **out)
{
	struct local *l;

	if (!n_ranks || n_ranks > MOE_MAX_RANKS)
		return -EINVAL;
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->t = (struct moe_transport){&local_ops, n_ranks, 0};
	l->pool = pool;
	*out = &l->t;
	return 0;
}
