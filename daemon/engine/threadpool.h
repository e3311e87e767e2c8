/* daemon/engine/threadpool.h — a persistent pool of worker threads.
 *
 * moe_pool_run() hands out task indices 0..n-1 to the workers and the calling
 * thread (worker 0) through an atomic word, so uneven tasks (skewed
 * routing) even out, and returns when all have run. Even workers take tasks
 * from the front (0, 1, ...), odd ones from the back (n - 1, n - 2, ...),
 * until the two ends meet (a run of more than 2^20 - 1 tasks goes as
 * several runs, each with two ends): a caller that orders its tasks by
 * kind (the CPU backend puts its compute-bound tiles first and its
 * memory-bound ones last) gets the two kinds running side by side. Threads
 * are created once; a run costs one wake-up, not a thread creation. One
 * run at a time.
 */
#ifndef MOE_THREADPOOL_H
#define MOE_THREADPOOL_H

#include <stdint.h>

struct moe_pool;

/* A helper with nothing to do spins this long for the next run before it
 * sleeps: a run published within it costs no wake-up. */
#define MOE_POOL_SPIN_NS 5000u

typedef void (*moe_task_fn)(void *arg, uint32_t task, uint32_t worker);

/* n_threads includes the caller; 0 means all online CPUs. */
int moe_pool_create(uint32_t n_threads, struct moe_pool **out);
void moe_pool_destroy(struct moe_pool *p);
uint32_t moe_pool_threads(const struct moe_pool *p);
void moe_pool_run(struct moe_pool *p, uint32_t n_tasks, moe_task_fn fn, void *arg);

#endif
