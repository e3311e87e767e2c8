/* daemon/engine/threadpool.c — see threadpool.h.
 *
 * A run is published by one atomic word, `state` = generation << 40 |
 * front << 20 | back: the tasks claimed from the front (0, 1, ...) and
 * from the back (n - 1, n - 2, ...). The run's function, argument and task
 * count live in one of two slots (generation & 1), written before the
 * word. A task is claimed by a compare-and-swap of the word to the word
 * with front or back one higher, so a thread that wakes late, after its
 * run has moved on, can never take a task of a run it has not read the
 * slot of: its swap fails (the generation has 24 bits: a thread would have
 * to stall between its load and its swap for a multiple of 2^24 runs and
 * find the same front and back). Even
 * workers (the caller is 0) claim from the front, odd ones from the back;
 * the run is over when the two ends meet. The caller returns once the
 * run's `finished` count reaches the task count — it waits only for tasks
 * that were claimed, never for a thread that has not woken up yet (on a
 * busy machine a wake-up can take longer than the whole run: the old
 * pool, which waited for every helper to check in, paid it on every stage
 * of every batch).
 *
 * Waiting is spin-then-sleep on both sides: a helper with nothing to do
 * spins HELPER_SPIN_NS for the next run (the stages of a batch follow each
 * other within a microsecond) and then sleeps on a condition variable; the
 * caller spins CALLER_SPIN_NS for claimed tasks to finish and then sleeps.
 * Who sleeps is counted, so that nobody pays a futex call for a thread that
 * is awake anyway. Sleep and wake use the Dekker pattern over seq_cst
 * atomics (announce, then re-check) so no wake-up is lost.
 */
#include "daemon/engine/threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* Long enough to bridge the stages of one batch (back to back, < 1 µs
 * apart), short enough not to spin across batches: with 1-token requests
 * and 16 client processes on 2 vCPUs, 30/50 µs spent 13 % of moed's samples
 * spinning and 41 µs of CPU per request, 5/5 µs 38 µs (bench/RESULTS.md). */
#define HELPER_SPIN_NS MOE_POOL_SPIN_NS
#define CALLER_SPIN_NS 5000u

struct worker {
	struct moe_pool *pool;
	uint32_t id;
	pthread_t thread;
};

struct run {
	_Atomic(moe_task_fn) fn;
	_Atomic(void *) arg;
	atomic_uint n_tasks;
	atomic_uint finished;
};

struct moe_pool {
	uint32_t n_threads;
	struct worker *workers;
	_Alignas(64) _Atomic uint64_t state; /* generation << 40 | front << 20 | back */
	_Alignas(64) struct run runs[2];     /* by generation & 1 */
	_Alignas(64) atomic_uint sleepers;   /* helpers asleep (or about to be) */
	atomic_bool caller_asleep;
	atomic_bool stop;
	pthread_mutex_t lock;
	pthread_cond_t wake, done;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define END_BITS 20
#define END_MASK ((1u << END_BITS) - 1)
#define FRONT_ONE (1ull << END_BITS)
#define GEN_SHIFT (2 * END_BITS)
/* the most tasks of one published run (moe_pool_run splits larger ones) */
#define RUN_MAX END_MASK

static uint32_t gen_of(uint64_t s)
{
	return (uint32_t)(s >> GEN_SHIFT);
}

/* Claims and runs tasks of the current run until none is left, from the
 * front for even workers, from the back for odd ones; returns the
 * generation it found exhausted (the one to wait past). */
static uint32_t drain(struct moe_pool *p, uint32_t worker)
{
	uint64_t s = atomic_load(&p->state);
	bool back = worker & 1;

	for (;;) {
		struct run *r = &p->runs[gen_of(s) & 1];
		uint32_t f = (uint32_t)(s >> END_BITS) & END_MASK, b = (uint32_t)s & END_MASK;
		uint32_t n = atomic_load(&r->n_tasks), i;

		/* (a stale n_tasks is harmless: the swap below fails unless
		 * the word still names the run whose slot was read) */
		if (f + b >= n)
			return gen_of(s);
		if (!atomic_compare_exchange_weak(&p->state, &s, s + (back ? 1 : FRONT_ONE)))
			continue; /* s now holds the current word */
		/* Claimed: the run cannot finish, so its slot cannot be reused,
		 * until this task is counted below. n is read before that count
		 * for the same reason. */
		i = back ? n - 1 - b : f;
		atomic_load_explicit(&r->fn, memory_order_relaxed)(
			atomic_load_explicit(&r->arg, memory_order_relaxed), i, worker);
		if (atomic_fetch_add(&r->finished, 1) + 1 == n && atomic_load(&p->caller_asleep)) {
			pthread_mutex_lock(&p->lock);
			pthread_cond_signal(&p->done);
			pthread_mutex_unlock(&p->lock);
		}
		s = atomic_load(&p->state);
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct moe_pool *p = w->pool;
	for (;;) {
		uint32_t seen;
		uint64_t t0;

		seen = drain(p, w->id);
		/* nothing left: wait for the next run, spinning first */
		t0 = now_ns();
		while (gen_of(atomic_load_explicit(&p->state, memory_order_relaxed)) == seen &&
		       !atomic_load_explicit(&p->stop, memory_order_relaxed) &&
		       now_ns() - t0 < HELPER_SPIN_NS)
			for (int k = 0; k < 32; k++)
				cpu_relax();
		pthread_mutex_lock(&p->lock);
		atomic_fetch_add(&p->sleepers, 1);
		while (gen_of(atomic_load(&p->state)) == seen && !atomic_load(&p->stop))
			pthread_cond_wait(&p->wake, &p->lock);
		atomic_fetch_sub(&p->sleepers, 1);
		pthread_mutex_unlock(&p->lock);
		if (atomic_load(&p->stop))
			break;
	}
	return NULL;
}

int moe_pool_create(uint32_t n_threads, struct moe_pool **out)
{
	struct moe_pool *p;
	long ncpu;

	if (!n_threads) {
		ncpu = sysconf(_SC_NPROCESSORS_ONLN);
		n_threads = ncpu > 0 ? (uint32_t)ncpu : 1;
	}
	p = aligned_alloc(64, (sizeof(*p) + 63) / 64 * 64);
	if (!p)
		return -ENOMEM;
	*p = (struct moe_pool){.n_threads = n_threads};
	atomic_init(&p->state, 0);
	for (int i = 0; i < 2; i++) {
		atomic_init(&p->runs[i].fn, NULL);
		atomic_init(&p->runs[i].arg, NULL);
		atomic_init(&p->runs[i].n_tasks, 0);
		atomic_init(&p->runs[i].finished, 0);
	}
	atomic_init(&p->sleepers, 0);
	atomic_init(&p->caller_asleep, false);
	atomic_init(&p->stop, false);
	p->workers = calloc(n_threads, sizeof(*p->workers));
	if (!p->workers) {
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->wake, NULL);
	pthread_cond_init(&p->done, NULL);
	/* Workers are created with every signal blocked, so that process
	 * signals (SIGTERM, SIGINT) go to the thread that reads them through
	 * a signalfd, never to a worker (whose default action would kill the
	 * process without a clean shutdown). */
	sigset_t all, old;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (uint32_t i = 1; i < n_threads; i++) {
		p->workers[i] = (struct worker){p, i, 0};
		if (pthread_create(&p->workers[i].thread, NULL, worker_main, &p->workers[i])) {
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			p->n_threads = i;
			moe_pool_destroy(p);
			return -EAGAIN;
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	*out = p;
	return 0;
}

void moe_pool_destroy(struct moe_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	atomic_store(&p->stop, true);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->lock);
	for (uint32_t i = 1; i < p->n_threads; i++)
		pthread_join(p->workers[i].thread, NULL);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->wake);
	pthread_cond_destroy(&p->done);
	free(p->workers);
	free(p);
}

uint32_t moe_pool_threads(const struct moe_pool *p)
{
	return p->n_threads;
}

static void run_one(struct moe_pool *p, uint32_t n_tasks, moe_task_fn fn, void *arg)
{
	uint32_t gen;
	struct run *r;
	uint64_t t0;

	/* One run at a time: the previous run's tasks have all finished, so
	 * nobody reads the slot this run writes (the one before last's). */
	gen = (gen_of(atomic_load(&p->state)) + 1) & ((1u << (64 - GEN_SHIFT)) - 1);
	r = &p->runs[gen & 1];
	atomic_store_explicit(&r->fn, fn, memory_order_relaxed);
	atomic_store_explicit(&r->arg, arg, memory_order_relaxed);
	atomic_store_explicit(&r->n_tasks, n_tasks, memory_order_relaxed);
	atomic_store_explicit(&r->finished, 0, memory_order_relaxed);
	atomic_store(&p->state, (uint64_t)gen << GEN_SHIFT); /* publishes the slot */
	if (atomic_load(&p->sleepers)) {
		pthread_mutex_lock(&p->lock);
		pthread_cond_broadcast(&p->wake);
		pthread_mutex_unlock(&p->lock);
	}

	drain(p, 0);

	/* what others claimed: spin a little, then sleep until the last ends */
	t0 = now_ns();
	while (atomic_load(&r->finished) != n_tasks && now_ns() - t0 < CALLER_SPIN_NS)
		for (int k = 0; k < 32; k++)
			cpu_relax();
	if (atomic_load(&r->finished) == n_tasks)
		return;
	pthread_mutex_lock(&p->lock);
	atomic_store(&p->caller_asleep, true);
	while (atomic_load(&r->finished) != n_tasks)
		pthread_cond_wait(&p->done, &p->lock);
	atomic_store(&p->caller_asleep, false);
	pthread_mutex_unlock(&p->lock);
}

/* a run of more than RUN_MAX tasks: parts of RUN_MAX, each offset */
struct part {
	moe_task_fn fn;
	void *arg;
	uint32_t base;
};

static void part_task(void *arg, uint32_t task, uint32_t worker)
{
	struct part *pt = arg;

	pt->fn(pt->arg, pt->base + task, worker);
}

void moe_pool_run(struct moe_pool *p, uint32_t n_tasks, moe_task_fn fn, void *arg)
{
	if (n_tasks == 0)
		return;
	if (p->n_threads == 1 || n_tasks == 1) {
		for (uint32_t t = 0; t < n_tasks; t++)
			fn(arg, t, 0);
		return;
	}
	if (n_tasks <= RUN_MAX) {
		run_one(p, n_tasks, fn, arg);
		return;
	}
	/* (on the count left: base + RUN_MAX could wrap near 2^32) */
	for (uint32_t base = 0, left = n_tasks; left;) {
		struct part pt = {fn, arg, base};
		uint32_t n = left < RUN_MAX ? left : RUN_MAX;

		run_one(p, n, part_task, &pt);
		base += n;
		left -= n;
	}
}
