/* tests/test_stats.c — the load statistics: totals, the sliding window
 * (bucket expiry with a controlled clock), per-rank rows and busy time,
 * max/mean rank load and the experts' coefficient of variation, checked
 * against a float64 computation on random counts. */
#include <math.h>
#include <stdlib.h>

#include "daemon/engine/stats.h"
#include "tests/testutil.h"
#include "tools/synth.h"

#define MS 1000000ull

static void test_window_and_totals(void **state)
{
	struct moe_stats *st;
	uint32_t ids[6] = {0, 1, 1, 3, 3, 3};

	(void)state;
	/* 2 layers, 4 experts, 2 ranks, a window of 800 ms = 8 buckets of 100 */
	assert_int_equal(moe_stats_create(2, 4, 2, 800, &st), 0);
	assert_int_equal(moe_stats_window_ms(st), 800);
	moe_stats_routed(st, 1, ids, 6, 1000 * MS);
	assert_int_equal(moe_stats_expert_total(st, 1, 3), 3);
	assert_int_equal(moe_stats_expert_window(st, 1, 3, 1000 * MS), 3);
	assert_int_equal(moe_stats_expert_total(st, 0, 3), 0);
	/* 700 ms later: still in the window; 900 ms later: out of it */
	moe_stats_routed(st, 1, ids + 3, 3, 1700 * MS);
	assert_int_equal(moe_stats_expert_window(st, 1, 3, 1700 * MS), 6);
	assert_int_equal(moe_stats_expert_window(st, 1, 3, 1850 * MS), 3);
	assert_int_equal(moe_stats_expert_window(st, 1, 3, 2600 * MS), 0);
	assert_int_equal(moe_stats_expert_total(st, 1, 3), 6);
	/* a bucket reused 800 ms on starts from zero */
	moe_stats_routed(st, 1, ids, 1, 2800 * MS);
	assert_int_equal(moe_stats_expert_window(st, 1, 0, 2800 * MS), 1);
	assert_int_equal(moe_stats_expert_total(st, 1, 0), 2);
	/* ranks */
	moe_stats_rank(st, 0, 0, 30, 5 * MS, 3000 * MS);
	moe_stats_rank(st, 0, 1, 10, 2 * MS, 3000 * MS);
	assert_int_equal(moe_stats_rank_rows(st, 0, 0, 3000 * MS, 0), 30);
	assert_int_equal(moe_stats_rank_rows(st, 0, 1, 3000 * MS, 1), 10);
	assert_int_equal(moe_stats_rank_busy_ns(st, 0), 5 * MS);
	assert_true(fabs(moe_stats_rank_imbalance(st, 0, 3000 * MS, 1) - 1.5) < 1e-12);
	assert_true(moe_stats_rank_imbalance(st, 0, 9000 * MS, 1) == 0.0); /* window empty */
	assert_true(fabs(moe_stats_rank_imbalance(st, 0, 9000 * MS, 0) - 1.5) < 1e-12);
	moe_stats_free(st);
}

static void test_cv_random(void **state)
{
	struct moe_rng rng = {42};

	(void)state;
	for (int trial = 0; trial < 20; trial++) {
		uint32_t E = 2 + (uint32_t)(moe_rng_next(&rng) % 60), R = 1 + trial % 4;
		uint32_t *counts = malloc(E * sizeof(*counts));
		uint64_t rows[4] = {0};
		double sum = 0, sq = 0, mean, cv, mx = 0, rs = 0;
		struct moe_stats *st;

		assert_non_null(counts);
		assert_int_equal(moe_stats_create(1, E, R, 1000, &st), 0);
		for (uint32_t x = 0; x < E; x++) {
			counts[x] = 1 + (uint32_t)(moe_rng_next(&rng) % 1000);
			sum += counts[x];
			sq += (double)counts[x] * counts[x];
		}
		moe_stats_counts(st, 0, counts, 5 * MS);
		for (uint32_t r = 0; r < R; r++) {
			rows[r] = moe_rng_next(&rng) % 5000;
			moe_stats_rank(st, 0, r, rows[r], 0, 5 * MS);
			rs += (double)rows[r];
			mx = (double)rows[r] > mx ? (double)rows[r] : mx;
		}
		mean = sum / E;
		cv = sqrt(sq / E - mean * mean) / mean;
		assert_true(fabs(moe_stats_expert_cv(st, 0, 5 * MS, 1) - cv) <= 1e-12 * (1 + cv));
		assert_true(fabs(moe_stats_expert_cv(st, 0, 5 * MS, 0) - cv) <= 1e-12 * (1 + cv));
		if (rs > 0)
			assert_true(fabs(moe_stats_rank_imbalance(st, 0, 5 * MS, 1) - mx * R / rs) <
				    1e-12);
		moe_stats_free(st);
		free(counts);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_window_and_totals),
		cmocka_unit_test(test_cv_random),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
