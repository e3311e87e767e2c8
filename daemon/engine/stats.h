/* daemon/engine/stats.h — load statistics: how tokens spread over experts
 * and ranks, in total and over a sliding window.
 *
 * Per MoE layer and expert: tokens routed (total, and over the last
 * `window_ms`); per layer and rank: rows computed (total and window); per
 * rank: rows and busy time of its expert stage. The forward path is the
 * only writer (it holds the engine's forward lock): it adds with relaxed
 * load + store, no locked instruction, and readers (status, on another
 * thread) load relaxed; a read is a consistent-enough snapshot of
 * monotone counters. The window is MOE_STATS_BUCKETS buckets of
 * window_ms / MOE_STATS_BUCKETS each; the writer clears a bucket when it
 * enters it, a reader sums the buckets of the last window.
 */
#ifndef MOE_STATS_H
#define MOE_STATS_H

#include <stdint.h>

#define MOE_STATS_BUCKETS 8

struct moe_stats;

int moe_stats_create(uint32_t n_layers, uint32_t n_experts, uint32_t n_ranks, uint32_t window_ms,
		     struct moe_stats **out);
void moe_stats_free(struct moe_stats *st);

/* Writer side (the forward path). */
void moe_stats_routed(struct moe_stats *st, uint32_t layer, const uint32_t *ids, uint64_t n,
		      uint64_t now_ns);
/* The same from per-expert counts [E] (a device backend's). */
void moe_stats_counts(struct moe_stats *st, uint32_t layer, const uint32_t *counts,
		      uint64_t now_ns);
void moe_stats_rank(struct moe_stats *st, uint32_t layer, uint32_t rank, uint64_t rows,
		    uint64_t busy_ns, uint64_t now_ns);

/* Reader side. */
uint32_t moe_stats_window_ms(const struct moe_stats *st);
uint64_t moe_stats_expert_total(const struct moe_stats *st, uint32_t layer, uint32_t x);
uint64_t moe_stats_expert_window(const struct moe_stats *st, uint32_t layer, uint32_t x,
				 uint64_t now_ns);
uint64_t moe_stats_rank_rows(const struct moe_stats *st, uint32_t layer, uint32_t rank,
			     uint64_t now_ns, int window);
uint64_t moe_stats_rank_busy_ns(const struct moe_stats *st, uint32_t rank);

/* max / mean of the ranks' rows for `layer` (window or total; 0 with no
 * rows), and the coefficient of variation (stddev / mean) of its experts'
 * token counts (window or total; 0 with no tokens). */
double moe_stats_rank_imbalance(const struct moe_stats *st, uint32_t layer, uint64_t now_ns,
				int window);
double moe_stats_expert_cv(const struct moe_stats *st, uint32_t layer, uint64_t now_ns,
			   int window);

#endif
