#include "daemon/engine/threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

struct worker {
	struct moe_pool *pool;
	uint32_t id;
	pthread_t thread;
};

struct moe_pool {
	uint32_t n_threads;
	struct worker *workers;
	pthread_mutex_t lock;
	pthread_cond_t start, done;
	uint64_t generation; /* bumped per run, under lock */
	bool stop;
	/* the current run */
	moe_task_fn fn;
	void *arg;
	uint32_t n_tasks;
	atomic_uint next;
	uint32_t active; /* workers still in the run, under lock */
};

static void drain(struct moe_pool *p, uint32_t worker)
{
	for (;;) {
		uint32_t t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);

		if (t >= p->n_tasks)
			break;
		p->fn(p->arg, t, worker);
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct moe_pool *p = w->pool;
	uint64_t seen = 0;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->stop && p->generation == seen)
			pthread_cond_wait(&p->start, &p->lock);
		if (p->stop)
			break;
		seen = p->generation;
		pthread_mutex_unlock(&p->lock);
		drain(p, w->id);
		pthread_mutex_lock(&p->lock);
		if (--p->active == 0)
			pthread_cond_signal(&p->done);
	}
	pthread_mutex_unlock(&p->lock);
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
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->n_threads = n_threads;
	p->workers = calloc(n_threads, sizeof(*p->workers));
	if (!p->workers) {
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->start, NULL);
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
	p->stop = true;
	pthread_cond_broadcast(&p->start);
	pthread_mutex_unlock(&p->lock);
	for (uint32_t i = 1; i < p->n_threads; i++)
		pthread_join(p->workers[i].thread, NULL);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->start);
	pthread_cond_destroy(&p->done);
	free(p->workers);
	free(p);
}

uint32_t moe_pool_threads(const struct moe_pool *p)
{
	return p->n_threads;
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
	pthread_mutex_lock(&p->lock);
	p->fn = fn;
	p->arg = arg;
	p->n_tasks = n_tasks;
	atomic_store_explicit(&p->next, 0, memory_order_relaxed);
	p->active = p->n_threads - 1;
	p->generation++;
	pthread_cond_broadcast(&p->start);
	pthread_mutex_unlock(&p->lock);

	drain(p, 0);

	pthread_mutex_lock(&p->lock);
	while (p->active)
		pthread_cond_wait(&p->done, &p->lock);
	pthread_mutex_unlock(&p->lock);
}
