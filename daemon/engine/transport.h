/* daemon/engine/transport.h — all-to-all-v between the ranks of an engine.
 *
 * Dispatch and combine move rows between rank-owned buffers with two
 * collectives, as MPI and NCCL define them:
 *  - exchange_counts: every rank tells every rank how much it will send (a
 *    receiver cannot know it in advance: it depends on the others' routing);
 *  - alltoallv: every rank sends a contiguous block to each rank (its send
 *    buffer holds the blocks in rank order) and receives each rank's block
 *    into its receive buffer, in rank order.
 *
 * One call covers every rank the engine drives: moed owns all the GPUs of a
 * host in one process, and a single thread driving several devices issues
 * their NCCL sends and receives inside one ncclGroupStart/End (per-rank
 * calls from one thread would deadlock). DESIGN.md sketches per-rank calls;
 * this shape is the one both `local` and a one-process `nccl` can serve. A
 * transport spanning hosts would take its process's ranks in the same call.
 *
 * Implementations: `local` (ranks of one process: memcpy, each receiver's
 * copies on a worker of the pool given). Errors: -EPROTO when counts do not
 * match (what rank p sends to r must be what r expects from p).
 */
#ifndef MOE_TRANSPORT_H
#define MOE_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

struct moe_pool;
struct moe_transport;

/* One rank's side of an alltoallv. Counts are in elements. */
struct moe_a2a {
	const void *send;
	const uint32_t *send_counts; /* [n_ranks]: to each rank, in rank order */
	void *recv;
	const uint32_t *recv_counts; /* [n_ranks]: from each rank (exchange_counts) */
};

struct moe_transport_ops {
	const char *name;
	/* For every rank r and peer p: recv[p][r * n + i] = send[r][p * n + i],
	 * i < n (each pair exchanges a vector of n counts). */
	int (*exchange_counts)(struct moe_transport *t, const uint32_t *const *send,
			       uint32_t *const *recv, uint32_t n);
	/* ranks[n_ranks]; elem_bytes per element. */
	int (*alltoallv)(struct moe_transport *t, const struct moe_a2a *ranks, size_t elem_bytes);
	void (*destroy)(struct moe_transport *t);
};

struct moe_transport {
	const struct moe_transport_ops *ops;
	uint32_t n_ranks;
	uint64_t bytes; /* moved between different ranks so far (statistics) */
};

/* Ranks of one process; `pool` (may be NULL: the caller copies) runs the
 * receivers' copies in parallel. 0 or -EINVAL / -ENOMEM. */
int moe_transport_local_create(uint32_t n_ranks, struct moe_pool *pool,
			       struct moe_transport **out);

static inline void moe_transport_destroy(struct moe_transport *t)
{
	if (t)
		t->ops->destroy(t);
}

#endif
