/* daemon/server/jobs.c — asynchronous admin jobs: long work on its own thread.
 *
 * An admin op that starts a job (admin.c) gets a slot here and a thread
 * that does the work step by step, publishing its progress in atomics and
 * checking its cancel flag between steps; it never touches the loop's
 * state. When it ends it writes the jobs eventfd; the loop then joins it
 * and sends JOB_DONE to the session that started it (if still connected),
 * with the seq of the ADMIN that started it. Finished jobs stay readable
 * (MOE_ADMIN_JOB_STATUS) until their slot is reused.
 *
 * Today's one job, MOE_ADMIN_EPOCH_CYCLE, publishes epochs with the same
 * placement and weights (a self-test of the publish path under load).
 * Weight copies and reloads come next, on the same seam.
 */
#include "daemon/server/internal.h"

#include <sys/eventfd.h>

static void job_end(struct job *j, uint32_t state, int32_t result)
{
	uint64_t one = 1;

	j->result = result;
	atomic_store_explicit(&j->state, state, memory_order_release);
	if (write(j->efd, &one, sizeof(one)) < 0) {
		/* cannot fail: the loop reads the counter */
	}
}

static void *epoch_cycle(void *arg)
{
	struct job *j = arg;
	char err[MOE_ERRLEN];
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (uint32_t i = 0; i < j->cycle.count; i++) {
		uint32_t id;

		if (atomic_load(&j->cancel)) {
			snprintf(j->message, sizeof(j->message), "cancelled after %u of %u epochs",
				 i, j->cycle.count);
			job_end(j, MOE_JOB_CANCELLED, MOE_ECANCELED);
			return NULL;
		}
		if (moe_engine_publish(j->e, NULL, NULL, &id, err)) {
			snprintf(j->message, sizeof(j->message), "%.120s", err);
			job_end(j, MOE_JOB_FAILED, MOE_EINTERNAL);
			return NULL;
		}
		atomic_store(&j->done, (uint64_t)i + 1);
		j->last_epoch = id;
		if (j->cycle.interval_us)
			usleep(j->cycle.interval_us);
	}
	snprintf(j->message, sizeof(j->message), "published %u epochs, the last %u",
		 j->cycle.count, j->last_epoch);
	job_end(j, MOE_JOB_DONE, 0);
	return NULL;
}

int srv_jobs_init(struct server *s)
{
	struct epoll_event ev = {.events = EPOLLIN};

	s->jobs_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (s->jobs_efd < 0)
		return -1;
	ev.data.ptr = &s->jobs_efd;
	return epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->jobs_efd, &ev);
}

struct job *srv_job_find(struct server *s, uint32_t id)
{
	for (int i = 0; i < MAX_JOBS; i++)
		if (s->jobs[i] && s->jobs[i]->id == id)
			return s->jobs[i];
	return NULL;
}

/* A slot: a free one, else the oldest finished job's (announced). */
static struct job **free_slot(struct server *s)
{
	struct job **best = NULL;

	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = s->jobs[i];

		if (!j)
			return &s->jobs[i];
		if (j->joined && (!best || j->id < (*best)->id))
			best = &s->jobs[i];
	}
	return best;
}

int srv_job_start(struct server *s, struct client *c, uint32_t op, uint32_t seq,
		  const struct moe_admin_cycle *cycle, struct job **out, const char **why)
{
	struct job **slot = free_slot(s), *j;

	if (!slot)
		return *why = "8 jobs are running: wait for one to end", MOE_EBUSY;
	j = calloc(1, sizeof(*j));
	if (!j)
		return *why = "out of memory", MOE_ENOMEM;
	*j = (struct job){.id = ++s->next_job, .op = op, .seq = seq, .client_id = c->id,
			  .e = s->e, .efd = s->jobs_efd, .cycle = *cycle};
	atomic_init(&j->state, MOE_JOB_RUNNING);
	atomic_init(&j->done, 0);
	atomic_init(&j->cancel, false);
	j->total = cycle->count;
	if (pthread_create(&j->thread, NULL, epoch_cycle, j)) {
		free(j);
		return *why = "cannot start a thread", MOE_ENOMEM;
	}
	free(*slot);
	*slot = j;
	s->jobs_started++;
	moe_log(LOG_NOTICE, "job %u (%s) started by client %u (pid %d)", j->id,
		moe_admin_op_name(op), c->id, (int)c->pid);
	*out = j;
	return 0;
}

void srv_job_describe(const struct job *j, struct moe_admin_job *d)
{
	uint32_t state = atomic_load_explicit(&((struct job *)j)->state, memory_order_acquire);

	*d = (struct moe_admin_job){.job = j->id, .op = j->op, .state = state,
				    .done = atomic_load(&((struct job *)j)->done),
				    .total = j->total};
	if (state != MOE_JOB_RUNNING) {
		d->result = j->result;
		snprintf(d->message, sizeof(d->message), "%s", j->message);
	} else {
		snprintf(d->message, sizeof(d->message), "running");
	}
}

/* The loop: joins the jobs that ended and tells their sessions. */
void srv_jobs_collect(struct server *s)
{
	uint64_t n;

	if (read(s->jobs_efd, &n, sizeof(n)) < 0) {
		/* EAGAIN: nothing new */
	}
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = s->jobs[i];
		struct moe_admin_job d;

		if (!j || j->joined ||
		    atomic_load_explicit(&j->state, memory_order_acquire) == MOE_JOB_RUNNING)
			continue;
		pthread_join(j->thread, NULL);
		j->joined = true;
		srv_job_describe(j, &d);
		moe_log(d.result ? LOG_WARNING : LOG_NOTICE, "job %u (%s): %s", j->id,
			moe_admin_op_name(j->op), j->message);
		for (struct client *c = s->clients; c; c = c->next)
			if (c->id == j->client_id && !c->dead)
				srv_send_msg_seq(c->fd, MOE_MSG_JOB_DONE, j->seq, &d, sizeof(d), -1);
	}
}

/* Shutdown: every running job is cancelled and joined. */
void srv_jobs_stop(struct server *s)
{
	for (int i = 0; i < MAX_JOBS; i++)
		if (s->jobs[i] && !s->jobs[i]->joined)
			atomic_store(&s->jobs[i]->cancel, true);
	for (int i = 0; i < MAX_JOBS; i++) {
		if (s->jobs[i] && !s->jobs[i]->joined)
			pthread_join(s->jobs[i]->thread, NULL);
		free(s->jobs[i]);
		s->jobs[i] = NULL;
	}
	if (s->jobs_efd >= 0)
		close(s->jobs_efd);
	s->jobs_efd = -1;
}
