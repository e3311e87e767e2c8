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
 * Two jobs today, both self-tests of a path the next features take:
 * MOE_ADMIN_EPOCH_CYCLE publishes epochs with the same placement and
 * weights; MOE_ADMIN_PLACEMENT_CYCLE publishes random valid placements
 * whose replicas it copies into spare slots first (moe_engine_replicate:
 * off the serving path) and drops after (freed when the last batch on an
 * epoch naming them ends), ending on the initial placement with every
 * replica dropped. Weight reloads come next, on the same seam.
 */
#include "daemon/server/internal.h"

#include <sys/eventfd.h>

void srv_job_end(struct job *j, uint32_t state, int32_t result)
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
			srv_job_end(j, MOE_JOB_CANCELLED, MOE_ECANCELED);
			return NULL;
		}
		if (moe_engine_publish(j->e, NULL, NULL, &id, err)) {
			snprintf(j->message, sizeof(j->message), "%.120s", err);
			srv_job_end(j, MOE_JOB_FAILED, MOE_EINTERNAL);
			return NULL;
		}
		atomic_store(&j->done, (uint64_t)i + 1);
		j->last_epoch = id;
		if (j->cycle.interval_us)
			usleep(j->cycle.interval_us);
	}
	snprintf(j->message, sizeof(j->message), "published %u epochs, the last %u",
		 j->cycle.count, j->last_epoch);
	srv_job_end(j, MOE_JOB_DONE, 0);
	return NULL;
}

/* splitmix64: the job's random choices (reproducible from its seed). */
static uint64_t next_rand(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* One random placement over the spare slots `use` marks free: the
 * initial one plus, per layer, rank and free spare slot, with probability
 * 1/2 a copy of a random expert the rank does not hold as a primary.
 * used[] gets the slots filled. */
static int random_placement(struct moe_engine *e, uint32_t S, uint64_t *rng, const bool *busy,
			    bool *used, struct moe_placement **out, char *err)
{
	const struct moe_model *m = moe_engine_model(e);
	uint32_t E = m->n_experts, R = moe_engine_ranks(e);
	uint32_t P = (E + R - 1) / R;
	struct moe_placement *p;
	int ret = moe_place_initial(m->n_moe_layers, E, R, S - P, &p);

	if (ret)
		return moe_err(err, ret, "out of memory");
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		for (uint32_t r = 0; r < R; r++) {
			for (uint32_t s = P; s < S; s++) {
				size_t k = ((size_t)l * R + r) * S + s;
				uint32_t x = (uint32_t)(next_rand(rng) % E);
				uint8_t *n = &p->n_replicas[l * E + x];

				used[k] = false;
				if (busy[k] || next_rand(rng) % 2 || (R > 1 && x / P == r) ||
				    *n >= MOE_MAX_REPLICAS)
					continue;
				/* -EBUSY: still held by an epoch a batch pins */
				ret = moe_engine_replicate(e, l, x, r, s, err);
				if (ret == -EBUSY)
					continue;
				if (ret) {
					moe_place_free(p);
					return ret;
				}
				p->rep[((size_t)l * E + x) * MOE_MAX_REPLICAS + *n] =
					(struct moe_replica){(uint16_t)r, (uint16_t)s};
				(*n)++;
				used[k] = true;
			}
		}
	}
	*out = p;
	return 0;
}

/* Drops the spare slots marked in `used` (no longer in the placement). */
static void drop_used(struct moe_engine *e, uint32_t S, bool *used, size_t n)
{
	uint32_t R = moe_engine_ranks(e);
	char err[MOE_ERRLEN];

	for (size_t k = 0; k < n; k++) {
		if (!used[k])
			continue;
		moe_engine_drop_replica(e, (uint32_t)(k / ((size_t)R * S)),
					(uint32_t)(k / S % R), (uint32_t)(k % S), err);
		used[k] = false;
	}
}

static void *placement_cycle(void *arg)
{
	struct job *j = arg;
	struct moe_engine *e = j->e;
	const struct moe_model *m = moe_engine_model(e);
	/* the slots per rank once: a lost rank changes them (the job then stops) */
	uint32_t S = moe_engine_slots_per_rank(e);
	size_t n = (size_t)m->n_moe_layers * moe_engine_ranks(e) * S;
	bool *prev = calloc(n ? n : 1, 1), *now = calloc(n ? n : 1, 1);
	uint64_t rng = j->pcycle.seed;
	char err[MOE_ERRLEN];
	uint32_t id, i = 0;
	uint64_t replicas = 0;
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	if (!prev || !now) {
		snprintf(j->message, sizeof(j->message), "out of memory");
		goto fail;
	}
	if (moe_engine_slots_per_rank(e) <= (m->n_experts + moe_engine_ranks(e) - 1) /
						     moe_engine_ranks(e)) {
		snprintf(j->message, sizeof(j->message),
			 "no spare slots to copy replicas into (placement.spare_slots is 0)");
		goto fail;
	}
	for (; i < j->pcycle.count; i++) {
		struct moe_placement *p = NULL;

		if (atomic_load(&j->cancel))
			break;
		if (moe_engine_slots_per_rank(e) != S) {
			snprintf(j->message, sizeof(j->message), "a rank was lost: stopped after %u "
				 "placements", i);
			drop_used(e, S, prev, n);
			goto fail;
		}
		/* the slots the current placement names are busy this round */
		if (random_placement(e, S, &rng, prev, now, &p, err) ||
		    moe_engine_publish(e, p, NULL, &id, err)) {
			snprintf(j->message, sizeof(j->message), "%.120s", err);
			drop_used(e, S, now, n);
			goto fail;
		}
		for (size_t k = 0; k < n; k++)
			replicas += now[k];
		drop_used(e, S, prev, n); /* not named any more: freed after their epoch */
		memcpy(prev, now, n);
		atomic_store(&j->done, (uint64_t)i + 1);
		j->last_epoch = id;
		if (j->pcycle.interval_us)
			usleep(j->pcycle.interval_us);
	}
	/* back to the initial placement, every replica dropped */
	{
		struct moe_placement *p;
		uint32_t R = moe_engine_ranks(e);

		if (moe_place_initial(m->n_moe_layers, m->n_experts, R,
				      S - (m->n_experts + R - 1) / R, &p) ||
		    moe_engine_publish(e, p, NULL, &id, err)) {
			snprintf(j->message, sizeof(j->message), "%.120s", err);
			goto fail;
		}
		j->last_epoch = id;
		drop_used(e, S, prev, n);
	}
	if (i < j->pcycle.count) {
		snprintf(j->message, sizeof(j->message), "cancelled after %u of %u placements", i,
			 j->pcycle.count);
		srv_job_end(j, MOE_JOB_CANCELLED, MOE_ECANCELED);
	} else {
		snprintf(j->message, sizeof(j->message),
			 "published %u placements (%llu replicas copied), then the initial one: "
			 "epoch %u", i, (unsigned long long)replicas, j->last_epoch);
		srv_job_end(j, MOE_JOB_DONE, 0);
	}
	free(prev);
	free(now);
	return NULL;
fail:
	free(prev);
	free(now);
	srv_job_end(j, MOE_JOB_FAILED, MOE_EINTERNAL);
	return NULL;
}

static void job_free(struct job *j)
{
	if (j) {
		srv_placement_change_free(j->change);
		srv_reload_req_free(j->reload);
	}
	free(j);
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
		  const void *payload, struct job **out, const char **why)
{
	void *(*fn)(void *) = op == MOE_ADMIN_PLACEMENT_CYCLE ? placement_cycle
			      : op == MOE_ADMIN_EPOCH_CYCLE ? epoch_cycle
			      : op == MOE_ADMIN_RELOAD	    ? srv_reload_job
							    : srv_placement_job;
	struct job **slot = free_slot(s), *j;

	if (!slot)
		return *why = "8 jobs are running: wait for one to end", MOE_EBUSY;
	j = calloc(1, sizeof(*j));
	if (!j)
		return *why = "out of memory", MOE_ENOMEM;
	*j = (struct job){.id = ++s->next_job, .op = op, .seq = seq, .client_id = c ? c->id : 0,
			  .e = s->e, .efd = s->jobs_efd};
	if (op == MOE_ADMIN_PLACEMENT_CYCLE) {
		j->pcycle = *(const struct moe_admin_placement_cycle *)payload;
		j->total = j->pcycle.count;
	} else if (op == MOE_ADMIN_EPOCH_CYCLE) {
		j->cycle = *(const struct moe_admin_cycle *)payload;
		j->total = j->cycle.count;
	} else if (op == MOE_ADMIN_RELOAD) {
		j->reload = (struct reload_req *)payload; /* (taken over) */
	} else {
		j->change = (struct placement_change *)payload; /* (taken over) */
		j->total = srv_placement_change_steps(j->change);
		j->copy_bytes_per_s = s->o.copy_bytes_per_s;
	}
	atomic_init(&j->state, MOE_JOB_RUNNING);
	atomic_init(&j->done, 0);
	atomic_init(&j->cancel, false);
	if (pthread_create(&j->thread, NULL, fn, j)) {
		j->change = NULL; /* (the caller keeps it) */
		j->reload = NULL;
		free(j);
		return *why = "cannot start a thread", MOE_ENOMEM;
	}
	job_free(*slot);
	*slot = j;
	s->jobs_started++;
	if (c)
		moe_log(LOG_NOTICE, "job %u (%s) started by client %u (pid %d)", j->id,
			moe_admin_op_name(op), c->id, (int)c->pid);
	else
		moe_log(LOG_NOTICE, "job %u (%s) started by moed", j->id, moe_admin_op_name(op));
	*out = j;
	return 0;
}

void srv_job_describe(const struct job *j, struct moe_admin_job *d)
{
	uint32_t state = atomic_load_explicit(&((struct job *)j)->state, memory_order_acquire);

	*d = (struct moe_admin_job){.job = j->id, .op = j->op, .state = state,
				    .done = atomic_load(&((struct job *)j)->done),
				    .total = j->total};
	if (j->op == MOE_ADMIN_RELOAD && j->reload)
		srv_reload_progress(j, &d->done, &d->total);
	if (d->done > d->total) /* (a move's steps are estimated: temporary homes add some) */
		d->total = d->done;
	if (state != MOE_JOB_RUNNING) {
		d->result = j->result;
		snprintf(d->message, sizeof(d->message), "%s", j->message);
	} else {
		snprintf(d->message, sizeof(d->message), "running");
	}
}

/* The loop: joins the jobs that ended and tells their sessions. */
/* moed_placement_changes_total / moed_reloads_total, by result */
static void count_job(struct server *s, const struct moe_admin_job *d)
{
	_Atomic uint64_t *by;
	int r = d->state == MOE_JOB_DONE	? MET_JOB_DONE
		: d->state == MOE_JOB_CANCELLED ? MET_JOB_CANCELLED
						: MET_JOB_FAILED;

	switch (d->op) {
	case MOE_ADMIN_REPLICATE:
	case MOE_ADMIN_UNREPLICATE:
	case MOE_ADMIN_REBALANCE:
	case MOE_ADMIN_PLACEMENT_CYCLE:
		by = s->met.placement_changes;
		break;
	case MOE_ADMIN_RELOAD:
		by = s->met.reloads;
		break;
	default:
		return;
	}
	met_add(&by[r], 1);
}

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
		if (j->id == s->autob.job)
			s->autob.ended_ns = srv_now_ns();
		if (j->op == MOE_ADMIN_RELOAD)
			srv_reload_ended(s, j);
		srv_job_describe(j, &d);
		count_job(s, &d);
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
		job_free(s->jobs[i]);
		s->jobs[i] = NULL;
	}
	if (s->jobs_efd >= 0)
		close(s->jobs_efd);
	s->jobs_efd = -1;
}
