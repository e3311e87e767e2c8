/* daemon/engine/stats.c — see stats.h. */
#include "daemon/engine/stats.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

struct moe_stats {
	uint32_t L, E, R, window_ms;
	uint64_t bucket_ns;
	_Atomic uint64_t *expert_total;	/* [L * E] */
	_Atomic uint64_t *expert_bucket; /* [BUCKETS][L * E] */
	_Atomic uint64_t *rank_total;	/* [L * R] */
	_Atomic uint64_t *rank_bucket;	/* [BUCKETS][L * R] */
	_Atomic uint64_t *busy_ns;	/* [R] */
	_Atomic uint64_t stamp[MOE_STATS_BUCKETS]; /* the bucket number each holds, +1 */
};

/* single writer: no locked instruction */
static void add(_Atomic uint64_t *c, uint64_t v)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
			      memory_order_relaxed);
}

static uint64_t get(const _Atomic uint64_t *c)
{
	return atomic_load_explicit((_Atomic uint64_t *)c, memory_order_relaxed);
}

int moe_stats_create(uint32_t n_layers, uint32_t n_experts, uint32_t n_ranks, uint32_t window_ms,
		     struct moe_stats **out)
{
	struct moe_stats *st = calloc(1, sizeof(*st));
	size_t le = (size_t)n_layers * n_experts, lr = (size_t)n_layers * n_ranks;

	if (!st)
		return -ENOMEM;
	st->L = n_layers, st->E = n_experts, st->R = n_ranks;
	st->window_ms = window_ms ? window_ms : 60000;
	st->bucket_ns = (uint64_t)st->window_ms * 1000000u / MOE_STATS_BUCKETS;
	st->expert_total = calloc(le ? le : 1, sizeof(*st->expert_total));
	st->expert_bucket = calloc(le * MOE_STATS_BUCKETS + 1, sizeof(*st->expert_bucket));
	st->rank_total = calloc(lr ? lr : 1, sizeof(*st->rank_total));
	st->rank_bucket = calloc(lr * MOE_STATS_BUCKETS + 1, sizeof(*st->rank_bucket));
	st->busy_ns = calloc(n_ranks ? n_ranks : 1, sizeof(*st->busy_ns));
	if (!st->expert_total || !st->expert_bucket || !st->rank_total || !st->rank_bucket ||
	    !st->busy_ns) {
		moe_stats_free(st);
		return -ENOMEM;
	}
	*out = st;
	return 0;
}

void moe_stats_free(struct moe_stats *st)
{
	if (!st)
		return;
	free(st->expert_total);
	free(st->expert_bucket);
	free(st->rank_total);
	free(st->rank_bucket);
	free(st->busy_ns);
	free(st);
}

/* The bucket `now` falls in, cleared if the writer enters it anew. */
static uint32_t enter(struct moe_stats *st, uint64_t now_ns)
{
	uint64_t n = now_ns / st->bucket_ns;
	uint32_t b = (uint32_t)(n % MOE_STATS_BUCKETS);

	if (get(&st->stamp[b]) != n + 1) {
		size_t le = (size_t)st->L * st->E, lr = (size_t)st->L * st->R;

		/* (marked stale first: a reader then skips it while it is
		 * cleared) */
		atomic_store_explicit(&st->stamp[b], 0, memory_order_release);
		for (size_t i = 0; i < le; i++)
			atomic_store_explicit(&st->expert_bucket[b * le + i], 0,
					      memory_order_relaxed);
		for (size_t i = 0; i < lr; i++)
			atomic_store_explicit(&st->rank_bucket[b * lr + i], 0,
					      memory_order_relaxed);
		atomic_store_explicit(&st->stamp[b], n + 1, memory_order_release);
	}
	return b;
}

void moe_stats_routed(struct moe_stats *st, uint32_t layer, const uint32_t *ids, uint64_t n,
		      uint64_t now_ns)
{
	size_t le = (size_t)st->L * st->E, base = (size_t)layer * st->E;
	uint32_t b = enter(st, now_ns);

	for (uint64_t i = 0; i < n; i++) {
		add(&st->expert_total[base + ids[i]], 1);
		add(&st->expert_bucket[b * le + base + ids[i]], 1);
	}
}

void moe_stats_counts(struct moe_stats *st, uint32_t layer, const uint32_t *counts,
		      uint64_t now_ns)
{
	size_t le = (size_t)st->L * st->E, base = (size_t)layer * st->E;
	uint32_t b = enter(st, now_ns);

	for (uint32_t x = 0; x < st->E; x++) {
		add(&st->expert_total[base + x], counts[x]);
		add(&st->expert_bucket[b * le + base + x], counts[x]);
	}
}

void moe_stats_rank(struct moe_stats *st, uint32_t layer, uint32_t rank, uint64_t rows,
		    uint64_t busy_ns, uint64_t now_ns)
{
	size_t lr = (size_t)st->L * st->R, k = (size_t)layer * st->R + rank;
	uint32_t b = enter(st, now_ns);

	add(&st->rank_total[k], rows);
	add(&st->rank_bucket[b * lr + k], rows);
	add(&st->busy_ns[rank], busy_ns);
}

uint32_t moe_stats_window_ms(const struct moe_stats *st)
{
	return st->window_ms;
}

/* Sum of counter k over the buckets of the last window. */
static uint64_t window_sum(const struct moe_stats *st, const _Atomic uint64_t *buckets,
			   size_t stride, size_t k, uint64_t now_ns)
{
	uint64_t n = now_ns / st->bucket_ns, sum = 0;

	for (uint32_t b = 0; b < MOE_STATS_BUCKETS; b++) {
		uint64_t s = atomic_load_explicit((_Atomic uint64_t *)&st->stamp[b],
						  memory_order_acquire);

		/* buckets n - BUCKETS + 1 .. n (stamp = number + 1) */
		if (s && s <= n + 1 && s + MOE_STATS_BUCKETS > n + 1)
			sum += get(&buckets[b * stride + k]);
	}
	return sum;
}

uint64_t moe_stats_expert_total(const struct moe_stats *st, uint32_t layer, uint32_t x)
{
	return get(&st->expert_total[(size_t)layer * st->E + x]);
}

uint64_t moe_stats_expert_window(const struct moe_stats *st, uint32_t layer, uint32_t x,
				 uint64_t now_ns)
{
	return window_sum(st, st->expert_bucket, (size_t)st->L * st->E,
			  (size_t)layer * st->E + x, now_ns);
}

uint64_t moe_stats_rank_rows(const struct moe_stats *st, uint32_t layer, uint32_t rank,
			     uint64_t now_ns, int window)
{
	size_t k = (size_t)layer * st->R + rank;

	return window ? window_sum(st, st->rank_bucket, (size_t)st->L * st->R, k, now_ns)
		      : get(&st->rank_total[k]);
}

uint64_t moe_stats_rank_busy_ns(const struct moe_stats *st, uint32_t rank)
{
	return get(&st->busy_ns[rank]);
}

double moe_stats_rank_imbalance(const struct moe_stats *st, uint32_t layer, uint64_t now_ns,
				int window)
{
	uint64_t max = 0, sum = 0;

	for (uint32_t r = 0; r < st->R; r++) {
		uint64_t v = moe_stats_rank_rows(st, layer, r, now_ns, window);

		sum += v;
		max = v > max ? v : max;
	}
	return sum ? (double)max * st->R / (double)sum : 0.0;
}

double moe_stats_expert_cv(const struct moe_stats *st, uint32_t layer, uint64_t now_ns,
			   int window)
{
	double sum = 0, sq = 0, mean;

	for (uint32_t x = 0; x < st->E; x++) {
		double v = (double)(window ? moe_stats_expert_window(st, layer, x, now_ns)
					   : moe_stats_expert_total(st, layer, x));

		sum += v;
		sq += v * v;
	}
	if (sum <= 0)
		return 0.0;
	mean = sum / st->E;
	return sqrt(fmax(sq / st->E - mean * mean, 0.0)) / mean;
}
