/* client/shm_alloc.h — the allocator of a client's shared data area
 * (internal to libmoeclient).
 *
 * First fit over a free list sorted by offset, 64-byte granules, coalescing
 * on free. The bookkeeping lives in private memory, never in the shared
 * area (the daemon writes outputs there). Not thread-safe: the client's
 * mutex protects it.
 */
#ifndef MOE_SHM_ALLOC_H
#define MOE_SHM_ALLOC_H

#include <stddef.h>
#include <stdint.h>

#define MOE_SHM_ALIGN 64u

struct moe_shm_span {
	uint64_t off, len;
};

struct moe_shm_alloc {
	uint64_t size;             /* bytes managed, a multiple of MOE_SHM_ALIGN */
	struct moe_shm_span *free; /* sorted by off, never adjacent */
	size_t n_free, cap_free;
	struct moe_shm_span *used; /* sorted by off */
	size_t n_used, cap_used;
};

/* Manages [0, size) rounded down to MOE_SHM_ALIGN. 0 or -ENOMEM. */
int moe_shm_alloc_init(struct moe_shm_alloc *a, uint64_t size);
void moe_shm_alloc_fini(struct moe_shm_alloc *a);

/* 0 and *off (a multiple of MOE_SHM_ALIGN) of a block of at least `bytes`
 * bytes; -EINVAL for 0 bytes, -ENOMEM if no free span is large enough. */
int moe_shm_alloc_get(struct moe_shm_alloc *a, uint64_t bytes, uint64_t *off);

/* Frees the block starting at `off`: 0, or -ENOENT if no block starts there. */
int moe_shm_alloc_put(struct moe_shm_alloc *a, uint64_t off);

/* The length of the block starting at `off`, or 0 if none does. */
uint64_t moe_shm_alloc_len(const struct moe_shm_alloc *a, uint64_t off);

/* The largest free span (what one allocation can get at most). */
uint64_t moe_shm_alloc_largest(const struct moe_shm_alloc *a);

#endif
