/* tests/test_threadpool.c — the engine's thread pool: every task of a run
 * runs exactly once, all of them have finished (and their writes are
 * visible) when moe_pool_run returns, and a worker id is never in two tasks
 * at once (the engine keys per-thread scratch by it). Runs follow each other
 * back to back (helpers still spinning, or late from the previous run) and
 * after pauses (helpers asleep), with uneven task times, with more threads
 * than the machine has CPUs. Even workers take tasks from the front and odd
 * ones from the back (the CPU backend orders its tiles for that), and a run
 * larger than one claim word counts still runs every task once. */
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "daemon/engine/threadpool.h"
#include "tests/testutil.h"

#define MAX_TASKS 97
#define MAX_THREADS 6

struct ctx {
	uint32_t n_threads;
	uint64_t run;                       /* this run's number */
	atomic_uint count[MAX_TASKS];       /* times each task ran this run */
	_Atomic uint64_t stamp[MAX_TASKS];  /* run number written at each task's end */
	atomic_int busy[MAX_THREADS];       /* a worker id inside a task */
	atomic_uint bad_worker, overlap;
};

static void sleep_ns(long ns)
{
	struct timespec ts = {0, ns};

	nanosleep(&ts, NULL);
}

static void task(void *arg, uint32_t t, uint32_t w)
{
	struct ctx *c = arg;

	if (w >= c->n_threads) {
		atomic_fetch_add(&c->bad_worker, 1);
		return;
	}
	if (atomic_exchange(&c->busy[w], 1))
		atomic_fetch_add(&c->overlap, 1);
	atomic_fetch_add(&c->count[t], 1);
	/* uneven: most tasks are empty, some spin, some sleep */
	if (t % 13 == 5)
		sleep_ns(20000 + (long)(c->run % 5) * 10000);
	else if (t % 5 == 1)
		for (volatile int k = 0; k < 2000; k++)
			;
	atomic_store_explicit(&c->stamp[t], c->run, memory_order_relaxed);
	atomic_store(&c->busy[w], 0);
}

static void test_exactly_once(void **state)
{
	(void)state;
	for (uint32_t nt = 1; nt <= 4; nt++) {
		struct moe_pool *p;
		struct ctx *c = calloc(1, sizeof(*c));
		uint64_t seed = 0x9e3779b97f4a7c15ull * nt;

		assert_non_null(c);
		assert_int_equal(moe_pool_create(nt, &p), 0);
		assert_int_equal(moe_pool_threads(p), nt);
		c->n_threads = nt;
		for (uint64_t run = 1; run <= 3000; run++) {
			uint32_t n;

			seed = seed * 6364136223846793005ull + 1442695040888963407ull;
			n = 1 + (uint32_t)(seed >> 33) % MAX_TASKS;
			c->run = run;
			for (uint32_t t = 0; t < MAX_TASKS; t++)
				atomic_store(&c->count[t], 0);
			moe_pool_run(p, n, task, c);
			/* plain reads after return: the run's writes are visible */
			for (uint32_t t = 0; t < n; t++) {
				assert_int_equal(atomic_load_explicit(&c->count[t], memory_order_relaxed), 1);
				assert_int_equal(atomic_load_explicit(&c->stamp[t], memory_order_relaxed), run);
			}
			for (uint32_t t = n; t < MAX_TASKS; t++)
				assert_int_equal(atomic_load(&c->count[t]), 0);
			/* now and then a pause long enough for helpers to sleep */
			if ((seed >> 20) % 17 == 0)
				sleep_ns(200000);
		}
		assert_int_equal(atomic_load(&c->bad_worker), 0);
		assert_int_equal(atomic_load(&c->overlap), 0);
		moe_pool_destroy(p);
		free(c);
	}
}

/* Which worker ran each task, and a slow task so that helpers join in. */
struct ends_ctx {
	atomic_uint by[64];
	atomic_uint count[64];
};

static void ends_task(void *arg, uint32_t t, uint32_t w)
{
	struct ends_ctx *c = arg;

	atomic_store(&c->by[t], w);
	atomic_fetch_add(&c->count[t], 1);
	sleep_ns(30000);
}

/* Front claims (even workers) make a prefix of the tasks, back claims (odd
 * workers) a suffix: every task an even worker ran comes before every task
 * an odd one ran. */
static void test_two_ends(void **state)
{
	(void)state;
	for (uint32_t nt = 2; nt <= 4; nt++) {
		struct moe_pool *p;
		uint32_t runs_with_back = 0;

		assert_int_equal(moe_pool_create(nt, &p), 0);
		for (int run = 0; run < 40; run++) {
			struct ends_ctx *c = calloc(1, sizeof(*c));
			uint32_t n = 8 + (uint32_t)run % 57;
			int64_t last_front = -1, first_back = n;

			assert_non_null(c);
			moe_pool_run(p, n, ends_task, c);
			for (uint32_t t = 0; t < n; t++) {
				uint32_t w = atomic_load(&c->by[t]);

				assert_int_equal(atomic_load(&c->count[t]), 1);
				assert_true(w < nt);
				if (w & 1) {
					if ((int64_t)t < first_back)
						first_back = t;
				} else {
					last_front = t;
				}
			}
			assert_true(last_front < first_back);
			runs_with_back += first_back < (int64_t)n;
			free(c);
		}
		/* the helpers did take part (30 µs tasks, 8-47 of them) */
		assert_true(runs_with_back > 0);
		moe_pool_destroy(p);
	}
}

static void count_task(void *arg, uint32_t t, uint32_t w)
{
	(void)w;
	atomic_fetch_add_explicit(&((atomic_uchar *)arg)[t], 1, memory_order_relaxed);
}

/* Around and past what one end of the claim word counts (2^20 - 1 a run):
 * every task still once (the largest, unsplit, would carry one end into
 * the other). */
static void test_large_run(void **state)
{
	static const uint32_t sizes[] = {(1u << 20) - 1, 1u << 20, (3u << 20) + 1000};
	struct moe_pool *p;

	(void)state;
	assert_int_equal(moe_pool_create(2, &p), 0);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		uint32_t n = sizes[k];
		atomic_uchar *seen = calloc(n, sizeof(*seen));

		assert_non_null(seen);
		moe_pool_run(p, n, count_task, seen);
		for (uint32_t t = 0; t < n; t++)
			if (atomic_load(&seen[t]) != 1)
				fail_msg("%u tasks: task %u ran %u times", n, t,
					 (unsigned)atomic_load(&seen[t]));
		free(seen);
	}
	moe_pool_destroy(p);
}

/* A pool created and destroyed at once (helpers may not have started), and
 * one destroyed while its helpers sleep. */
static void test_lifecycle(void **state)
{
	(void)state;
	for (int i = 0; i < 50; i++) {
		struct moe_pool *p;

		assert_int_equal(moe_pool_create(3, &p), 0);
		if (i & 1) {
			struct ctx *c = calloc(1, sizeof(*c));

			assert_non_null(c);
			c->n_threads = 3;
			c->run = 1;
			moe_pool_run(p, 40, task, c);
			for (uint32_t t = 0; t < 40; t++)
				assert_int_equal(atomic_load(&c->count[t]), 1);
			sleep_ns(100000);
			free(c);
		}
		moe_pool_destroy(p);
	}
	moe_pool_destroy(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_exactly_once),
		cmocka_unit_test(test_lifecycle),
		cmocka_unit_test(test_two_ends),
		cmocka_unit_test(test_large_run),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
