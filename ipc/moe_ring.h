/* ipc/moe_ring.h — the shared region between a client and moed.
 *
 * Layout (all offsets from the start of the memfd, fixed by the entry
 * counts and the region size, so the daemon recomputes them instead of
 * trusting the client):
 *
 *   0                     struct moe_shm_hdr (one page)
 *   4096                  submission ring: sq_entries x struct moe_sqe
 *   after, 64-aligned     completion ring: cq_entries x struct moe_cqe
 *   after, page-aligned   data area: token buffers, up to region end
 *
 * Rings are single-producer/single-consumer, io_uring style: free-running
 * u32 head/tail, index = counter & (entries - 1), the producer writes the
 * entry then store-releases the tail; the consumer load-acquires the tail,
 * reads, then store-releases the head. The client produces SQEs and
 * consumes CQEs; the daemon the reverse. The daemon treats every byte of the
 * region as hostile: it copies an SQE out once, then validates the copy.
 */
#ifndef MOE_RING_H
#define MOE_RING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MOE_SHM_MAGIC	0x4d454853u /* "SHEM" */
#define MOE_SHM_VERSION 1
#define MOE_RING_MAX	4096
#define MOE_SHM_HDR_BYTES 4096u

/* sqe.flags */
#define MOE_SQE_NOP	0x1 /* no work: completes at once (ping) */
#define MOE_SQE_ROUTING 0x2 /* also write each token's routing at route_off:
			       u32 expert ids [n_tokens, top_k] (best first),
			       then f32 weights [n_tokens, top_k] */
#define MOE_SQE_FLAGS	0x3 /* every known flag */

struct moe_sqe {
	uint64_t tag;	   /* the client's, echoed in the cqe */
	uint32_t layer;	   /* decoder-layer index */
	uint32_t n_tokens;
	uint64_t in_off;   /* byte offsets into the data area */
	uint64_t out_off;
	uint16_t dtype;	   /* enum moe_wire_dtype of in and out */
	uint16_t flags;
	uint32_t timeout_ms; /* 0: the daemon's default deadline */
	uint64_t route_off; /* with MOE_SQE_ROUTING: 4-aligned offset into the
			       data area (8 * n_tokens * top_k bytes); else 0 */
};

struct moe_cqe {
	uint64_t tag;
	int32_t status;	/* 0 or MOE_E* */
	uint32_t epoch;	/* the weights version the request ran on */
};

struct moe_shm_hdr {
	uint32_t magic, version;
	uint32_t sq_entries, cq_entries;
	uint64_t region_bytes;
	/* Written by the daemon: nonzero while it will look at the submission
	 * ring soon anyway (both of its batch slots are taken, and the one
	 * that ends wakes it), so a new entry needs no DOORBELL. The client
	 * publishes sq_tail, then (seq_cst fence) reads this; the daemon
	 * clears it, then (seq_cst fence) reads every sq_tail: one of the two
	 * sees the other's write, so no entry is left unseen. Ringing anyway
	 * is always correct (older clients do). */
	_Atomic uint32_t sq_no_doorbell;
	uint32_t reserved1;
	uint64_t reserved0[4];
	_Alignas(64) _Atomic uint32_t sq_head; /* written by the daemon */
	_Alignas(64) _Atomic uint32_t sq_tail; /* written by the client */
	_Alignas(64) _Atomic uint32_t cq_head; /* written by the client */
	_Alignas(64) _Atomic uint32_t cq_tail; /* written by the daemon */
	_Alignas(64) _Atomic uint32_t client_waiting; /* client asks for a doorbell */
};

struct moe_shm_layout {
	uint64_t sq_off, cq_off, data_off, data_bytes;
};

/* 0 and the layout, or MOE_EINVAL if the counts are not powers of two in
 * 1..MOE_RING_MAX, cq < sq, or the region has no room for a data area. */
int moe_shm_layout(uint32_t sq_entries, uint32_t cq_entries, uint64_t region_bytes,
		   struct moe_shm_layout *out);

/* What a submission entry is checked against (the daemon's side). */
struct moe_sqe_limits {
	uint32_t hidden;	     /* elements per token */
	uint64_t data_bytes;	     /* size of the client's data area */
	uint32_t max_tokens;	     /* per request (larger than a batch: split) */
	uint32_t top_k;		     /* routing entries per token */
	uint32_t max_inflight_tokens; /* per client */
	uint32_t n_layers;	     /* decoder layers */
	const uint8_t *is_moe;	     /* [n_layers]: 1 for an MoE layer */
};

/* Validates a copy of an entry: 0, or the MOE_E* code to answer it with.
 * Checks flags, reserved bits, dtype, layer, token count, that both offsets
 * are aligned to the dtype, and that both the input and the output span lie
 * inside the data area (overflow-safe). */
int moe_sqe_validate(const struct moe_sqe *q, const struct moe_sqe_limits *l);

/* True if [off, off + len) lies inside [0, size), without overflow. */
static inline bool moe_span_ok(uint64_t off, uint64_t len, uint64_t size)
{
	return off <= size && len <= size - off;
}

#endif
