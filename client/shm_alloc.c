/* client/shm_alloc.c — first-fit allocator of the shared data area. */
#include "client/shm_alloc.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int moe_shm_alloc_init(struct moe_shm_alloc *a, uint64_t size)
{
	memset(a, 0, sizeof(*a));
	a->size = size & ~(uint64_t)(MOE_SHM_ALIGN - 1);
	if (!a->size)
		return 0;
	a->free = malloc(sizeof(*a->free));
	if (!a->free)
		return -ENOMEM;
	a->cap_free = 1;
	a->free[0] = (struct moe_shm_span){0, a->size};
	a->n_free = 1;
	return 0;
}

void moe_shm_alloc_fini(struct moe_shm_alloc *a)
{
	free(a->free);
	free(a->used);
	memset(a, 0, sizeof(*a));
}

/* Makes room for one more span in *v (capacity *cap). */
static int reserve(struct moe_shm_span **v, size_t n, size_t *cap)
{
	struct moe_shm_span *p;
	size_t c;

	if (n < *cap)
		return 0;
	c = *cap ? *cap * 2 : 16;
	p = realloc(*v, c * sizeof(*p));
	if (!p)
		return -ENOMEM;
	*v = p;
	*cap = c;
	return 0;
}

/* The index of the first span with off >= `off`. */
static size_t lower_bound(const struct moe_shm_span *v, size_t n, uint64_t off)
{
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (v[mid].off < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

int moe_shm_alloc_get(struct moe_shm_alloc *a, uint64_t bytes, uint64_t *off)
{
	size_t i, u;

	if (!bytes)
		return -EINVAL;
	if (bytes > UINT64_MAX - (MOE_SHM_ALIGN - 1))
		return -ENOMEM;
	bytes = (bytes + MOE_SHM_ALIGN - 1) & ~(uint64_t)(MOE_SHM_ALIGN - 1);
	for (i = 0; i < a->n_free; i++)
		if (a->free[i].len >= bytes)
			break;
	if (i == a->n_free)
		return -ENOMEM;
	/* Reserve first, so that failing leaves everything as it was. */
	if (reserve(&a->used, a->n_used, &a->cap_used))
		return -ENOMEM;
	*off = a->free[i].off;
	a->free[i].off += bytes;
	a->free[i].len -= bytes;
	if (!a->free[i].len) {
		memmove(&a->free[i], &a->free[i + 1], (a->n_free - i - 1) * sizeof(*a->free));
		a->n_free--;
	}
	u = lower_bound(a->used, a->n_used, *off);
	memmove(&a->used[u + 1], &a->used[u], (a->n_used - u) * sizeof(*a->used));
	a->used[u] = (struct moe_shm_span){*off, bytes};
	a->n_used++;
	return 0;
}

int moe_shm_alloc_put(struct moe_shm_alloc *a, uint64_t off)
{
	size_t u = lower_bound(a->used, a->n_used, off), i;
	struct moe_shm_span s;
	int join_prev, join_next;

	if (u == a->n_used || a->used[u].off != off)
		return -ENOENT;
	s = a->used[u];
	i = lower_bound(a->free, a->n_free, s.off);
	join_prev = i > 0 && a->free[i - 1].off + a->free[i - 1].len == s.off;
	join_next = i < a->n_free && s.off + s.len == a->free[i].off;
	if (!join_prev && !join_next && reserve(&a->free, a->n_free, &a->cap_free))
		return -ENOMEM; /* the block stays allocated: a leak, not a corruption */
	memmove(&a->used[u], &a->used[u + 1], (a->n_used - u - 1) * sizeof(*a->used));
	a->n_used--;
	if (join_prev && join_next) {
		a->free[i - 1].len += s.len + a->free[i].len;
		memmove(&a->free[i], &a->free[i + 1], (a->n_free - i - 1) * sizeof(*a->free));
		a->n_free--;
	} else if (join_prev) {
		a->free[i - 1].len += s.len;
	} else if (join_next) {
		a->free[i].off = s.off;
		a->free[i].len += s.len;
	} else {
		memmove(&a->free[i + 1], &a->free[i], (a->n_free - i) * sizeof(*a->free));
		a->free[i] = s;
		a->n_free++;
	}
	return 0;
}

uint64_t moe_shm_alloc_len(const struct moe_shm_alloc *a, uint64_t off)
{
	size_t u = lower_bound(a->used, a->n_used, off);

	return u < a->n_used && a->used[u].off == off ? a->used[u].len : 0;
}

uint64_t moe_shm_alloc_largest(const struct moe_shm_alloc *a)
{
	uint64_t m = 0;

	for (size_t i = 0; i < a->n_free; i++)
		if (a->free[i].len > m)
			m = a->free[i].len;
	return m;
}
