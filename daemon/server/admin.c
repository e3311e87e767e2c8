/* daemon/server/admin.c — operator commands as a table (see internal.h).
 *
 * Each op of ipc/moe_admin.h has a row: the privilege it needs, a check of
 * its payload (the wire decoder has checked the size already: here the
 * fields), and a handler. Handlers run on the loop and return at once;
 * long work starts a job (jobs.c) and replies with its id. An op the table
 * does not know, a payload of the wrong size or with bad fields, or a
 * caller without the privilege get an error reply; the session goes on.
 */
#include "daemon/server/internal.h"

void srv_admin_reply_with(struct client *c, uint32_t seq, int status, const char *msg,
			  const void *result, uint32_t len)
{
	struct {
		struct moe_msg_admin_reply r;
		char data[MOE_ADMIN_DATA_MAX];
	} m = {.r.status = status};

	snprintf(m.r.message, sizeof(m.r.message), "%s", msg);
	if (status && c->met)
		met_add(&c->met->errors[met_status_index(status)], 1);
	if (len)
		memcpy(m.data, result, len);
	srv_send_msg_seq(c->fd, MOE_MSG_ADMIN_REPLY, seq, &m, sizeof(m.r) + len, -1);
}

void srv_admin_reply(struct client *c, uint32_t seq, int status, const char *msg)
{
	srv_admin_reply_with(c, seq, status, msg, NULL, 0);
}

void srv_status_line(struct server *s)
{
	struct job *j = srv_reload_running(s);
	char rl[80] = "";

	if (j) {
		uint64_t done, total;

		srv_reload_progress(j, &done, &total);
		snprintf(rl, sizeof(rl), "; reloading weights (job %u): %llu/%llu steps", j->id,
			 (unsigned long long)done, (unsigned long long)total);
	}
	srv_notify("STATUS=%s %s on %s (%s kernels): %llu requests served, %u clients%s",
	       s->draining ? "draining" : "serving", moe_family_name(s->m->family),
	       moe_engine_backend(s->e), moe_engine_kernels(s->e),
	       (unsigned long long)s->completed, s->n_clients, rl);
}

/* Re-reads the configuration through the caller's hook; serving goes on
 * whatever the outcome. */
int srv_reload_config(struct server *s, char *msg, size_t n)
{
	struct timespec t;
	char *old_path = s->o.model_path ? strdup(s->o.model_path) : NULL;
	int ret;

	if (!s->o.reload) {
		free(old_path);
		snprintf(msg, n, "no configuration file to reload (started without -c)");
		return -ENOENT;
	}
	clock_gettime(CLOCK_MONOTONIC, &t);
	srv_notify("RELOADING=1\nMONOTONIC_USEC=%llu",
	       (unsigned long long)t.tv_sec * 1000000ull + (unsigned long long)t.tv_nsec / 1000);
	ret = s->o.reload(s->o.reload_arg, &s->o, msg, n);
	if (ret) {
		s->reloads_refused++;
		moe_log(LOG_ERR, "configuration reload refused, serving on: %s", msg);
		srv_notify("READY=1\nSTATUS=configuration reload refused: %.400s", msg);
		free(old_path);
		return ret;
	}
	s->reloads++;
	moe_log_set_level(s->o.log_level);
	atomic_store(&s->met.per_expert, s->o.metrics_per_expert);
	met_set(&s->met.slo_ns, (uint64_t)s->o.metrics_slo_ms * 1000000u);
	moe_log(LOG_NOTICE, "configuration reloaded: %s", msg);
	/* a new model.path: its weights rolled in while serving */
	if (old_path && s->o.model_path && strcmp(old_path, s->o.model_path)) {
		char rmsg[400];
		size_t len = strlen(msg);

		ret = srv_reload_model_path(s, rmsg, sizeof(rmsg));
		moe_log(ret ? LOG_ERR : LOG_NOTICE, "%s", rmsg);
		snprintf(msg + len, n - len, "; %s", rmsg);
		ret = 0;
	}
	free(old_path);
	srv_notify("READY=1");
	srv_status_line(s);
	return 0;
}

/* ---- the ops ------------------------------------------------------------ */

static void op_drain(const struct admin_call *a)
{
	struct server *s = a->s;
	char msg[240];

	/* what clients submitted before the drain is queued, not refused;
	 * what they have seen complete is counted as done */
	srv_settle(s);
	for (struct client *x = s->clients; x; x = x->next)
		srv_poll_sq(s, x);
	if (!s->draining)
		moe_log(LOG_NOTICE, "draining: new requests are refused, %u queued finish",
			s->pending);
	s->draining = true;
	srv_status_line(s);
	if ((a->flags & MOE_ADMIN_WAIT) && s->pending) {
		a->c->drain_waiter = true;
		a->c->drain_seq = a->seq;
		return;
	}
	snprintf(msg, sizeof(msg), "draining; %u requests queued", s->pending);
	srv_admin_reply(a->c, a->seq, 0, msg);
}

static void op_undrain(const struct admin_call *a)
{
	if (a->s->draining)
		moe_log(LOG_NOTICE, "undrained: accepting requests again");
	a->s->draining = false;
	srv_status_line(a->s);
	srv_admin_reply(a->c, a->seq, 0, "accepting requests");
}

static void op_reload_config(const struct admin_call *a)
{
	char msg[240];
	int ret = srv_reload_config(a->s, msg, sizeof(msg));

	srv_admin_reply(a->c, a->seq, ret ? MOE_EINVAL : 0, msg);
}

static const char *check_epoch(const void *p)
{
	const struct moe_admin_epoch *x = p;

	return x->reserved ? "reserved field not 0" : !x->id ? "epoch ids start at 1" : NULL;
}

static void op_epoch_info(const struct admin_call *a)
{
	const struct moe_admin_epoch *x = a->payload;
	struct {
		struct moe_admin_epoch_info i;
		uint32_t v[MOE_MAX_MOE_LAYERS];
	} r;
	struct moe_epoch_info info;
	uint32_t n;
	char msg[120];

	if (moe_epochs_info(moe_engine_epochs(a->s->e), x->id, &info, r.v, MOE_MAX_MOE_LAYERS)) {
		snprintf(msg, sizeof(msg), "epoch %u: unknown (never published, or older than the "
			 "last %d)", x->id, MOE_EPOCH_HISTORY);
		srv_admin_reply(a->c, a->seq, MOE_ENOENT, msg);
		return;
	}
	n = info.n_layers < MOE_MAX_MOE_LAYERS ? info.n_layers : MOE_MAX_MOE_LAYERS;
	r.i = (struct moe_admin_epoch_info){
		.id = info.id,
		.flags = (info.current ? MOE_EPOCH_CURRENT : 0) | (info.retired ? MOE_EPOCH_RETIRED : 0),
		.placement_gen = info.placement_gen,
		.n_layers = n};
	snprintf(msg, sizeof(msg), "epoch %u: placement generation %llu, %s", info.id,
		 (unsigned long long)info.placement_gen,
		 info.current ? "current" : info.retired ? "retired" : "live (pinned by a batch)");
	srv_admin_reply_with(a->c, a->seq, 0, msg, &r, (uint32_t)(sizeof(r.i) + n * sizeof(uint32_t)));
}

static const char *check_cycle(const void *p)
{
	const struct moe_admin_cycle *x = p;

	return !x->count || x->count > 1000000 ? "count must be 1..1000000"
	       : x->interval_us > 1000000	 ? "interval_us must be at most 1000000"
					 : NULL;
}

static const char *check_pcycle(const void *p)
{
	const struct moe_admin_placement_cycle *x = p;

	return !x->count || x->count > 100000 ? "count must be 1..100000"
	       : x->interval_us > 1000000	 ? "interval_us must be at most 1000000"
					 : NULL;
}

/* The jobs: epoch-cycle, placement-cycle. */
static void op_start_job(const struct admin_call *a)
{
	struct moe_admin_job d;
	const char *why = NULL;
	struct job *j, *busy = a->op == MOE_ADMIN_PLACEMENT_CYCLE ? srv_placement_busy(a->s) : NULL;
	int st = busy ? MOE_EBUSY : srv_job_start(a->s, a->c, a->op, a->seq, a->payload, &j, &why);
	char msg[120];

	if (busy) {
		snprintf(msg, sizeof(msg), "busy: %s runs (job %u): wait for it",
			 moe_admin_op_name(busy->op), busy->id);
		srv_admin_reply(a->c, a->seq, st, msg);
		return;
	}
	if (st) {
		srv_admin_reply(a->c, a->seq, st, why);
		return;
	}
	srv_job_describe(j, &d);
	snprintf(msg, sizeof(msg), "job %u started", j->id);
	srv_admin_reply_with(a->c, a->seq, 0, msg, &d, sizeof(d));
}

static const char *check_job(const void *p)
{
	return ((const struct moe_admin_job_ref *)p)->reserved ? "reserved field not 0" : NULL;
}

static void op_job(const struct admin_call *a)
{
	const struct moe_admin_job_ref *x = a->payload;
	struct job *j = srv_job_find(a->s, x->job);
	struct moe_admin_job d;
	char msg[160];

	if (!j) {
		snprintf(msg, sizeof(msg), "job %u: unknown (or forgotten: the last %d are kept)",
			 x->job, MAX_JOBS);
		srv_admin_reply(a->c, a->seq, MOE_ENOENT, msg);
		return;
	}
	if (a->op == MOE_ADMIN_JOB_CANCEL)
		atomic_store(&j->cancel, true);
	srv_job_describe(j, &d);
	snprintf(msg, sizeof(msg), "job %u: %s", j->id,
		 d.state == MOE_JOB_RUNNING
			 ? (a->op == MOE_ADMIN_JOB_CANCEL ? "cancelling at its next step" : "running")
			 : d.message);
	srv_admin_reply_with(a->c, a->seq, 0, msg, &d, sizeof(d));
}

static const struct admin_op {
	enum moe_auth_op priv;
	const char *(*check)(const void *payload); /* NULL: no payload; else why it is bad */
	void (*handle)(const struct admin_call *a);
} ops[MOE_ADMIN_OP_MAX + 1] = {
	[MOE_ADMIN_DRAIN] = {MOE_AUTH_ADMIN, NULL, op_drain},
	[MOE_ADMIN_UNDRAIN] = {MOE_AUTH_ADMIN, NULL, op_undrain},
	[MOE_ADMIN_RELOAD_CONFIG] = {MOE_AUTH_ADMIN, NULL, op_reload_config},
	[MOE_ADMIN_EPOCH_INFO] = {MOE_AUTH_FORWARD, check_epoch, op_epoch_info},
	[MOE_ADMIN_EPOCH_CYCLE] = {MOE_AUTH_ADMIN, check_cycle, op_start_job},
	[MOE_ADMIN_JOB_STATUS] = {MOE_AUTH_ADMIN, check_job, op_job},
	[MOE_ADMIN_JOB_CANCEL] = {MOE_AUTH_ADMIN, check_job, op_job},
	[MOE_ADMIN_PLACEMENT_CYCLE] = {MOE_AUTH_ADMIN, check_pcycle, op_start_job},
	[MOE_ADMIN_REPLICATE] = {MOE_AUTH_ADMIN, srv_check_replica, srv_op_replicate},
	[MOE_ADMIN_UNREPLICATE] = {MOE_AUTH_ADMIN, srv_check_replica, srv_op_replicate},
	[MOE_ADMIN_REBALANCE] = {MOE_AUTH_ADMIN, srv_check_rebalance, srv_op_rebalance},
	[MOE_ADMIN_RELOAD] = {MOE_AUTH_ADMIN, srv_check_reload, srv_op_reload},
	[MOE_ADMIN_VERSION_INFO] = {MOE_AUTH_FORWARD, srv_check_version, srv_op_version_info},
	[MOE_ADMIN_TRACE] = {MOE_AUTH_ADMIN, srv_check_trace, srv_op_trace},
};

/* One ADMIN message (buf, n: the whole datagram, header valid). */
void srv_admin(struct server *s, struct client *c, const void *buf, size_t n, uint32_t seq)
{
	struct moe_msg_admin a = {0};
	char payload[MOE_ADMIN_DATA_MAX], msg[200];
	uint32_t plen = 0;
	int st = moe_msg_decode_admin(buf, n, &a, payload, &plen);
	const struct admin_op *op;
	const char *why;

	s->admin_calls++;
	if (st) {
		int want = moe_admin_payload_size(a.op);

		if (st == MOE_EPROTO)
			snprintf(msg, sizeof(msg), "malformed admin message (%zu bytes)", n);
		else if (want < 0)
			snprintf(msg, sizeof(msg), "unknown admin command %u", a.op);
		else if (a.flags & ~(uint32_t)MOE_ADMIN_FLAGS)
			snprintf(msg, sizeof(msg), "%s: unknown flags 0x%x", moe_admin_op_name(a.op),
				 a.flags);
		else
			snprintf(msg, sizeof(msg), "%s: a payload of %u bytes, it takes %d",
				 moe_admin_op_name(a.op), plen, want);
		s->admin_refused++;
		srv_admin_reply(c, seq, MOE_EINVAL, msg);
		return;
	}
	op = &ops[a.op];
	if (!moe_auth_allowed(&s->o.auth, &c->peer, op->priv)) {
		s->refused_auth++;
		s->admin_refused++;
		srv_log_refusal(s, c->peer.uid, "client %u (pid %d, uid %d): admin command %s "
				"refused: not root or in the admin group%s%s", c->id, (int)c->pid,
				(int)c->uid, moe_admin_op_name(a.op),
				s->o.admin_group && *s->o.admin_group ? " " : "",
				s->o.admin_group ? s->o.admin_group : "");
		srv_admin_reply(c, seq, MOE_EPERM, op->priv == MOE_AUTH_ADMIN
					? "not allowed: root or server.admin_group only"
					: "not allowed: not in the socket's group");
		return;
	}
	if ((a.flags & MOE_ADMIN_DRY_RUN) && a.op != MOE_ADMIN_REBALANCE) {
		snprintf(msg, sizeof(msg), "%s: dry-run applies to rebalance only",
			 moe_admin_op_name(a.op));
		s->admin_refused++;
		srv_admin_reply(c, seq, MOE_EINVAL, msg);
		return;
	}
	if (op->check && (why = op->check(payload))) {
		snprintf(msg, sizeof(msg), "%s: %s", moe_admin_op_name(a.op), why);
		s->admin_refused++;
		srv_admin_reply(c, seq, MOE_EINVAL, msg);
		return;
	}
	op->handle(&(struct admin_call){s, c, a.op, a.flags, seq, payload});
}

/* Clients waiting for a drain to complete get their answer once idle. */
void srv_answer_drain_waiters(struct server *s)
{
	if (s->pending)
		return;
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->drain_waiter) {
			srv_admin_reply(c, c->drain_seq, 0, "drained: nothing queued");
			c->drain_waiter = false;
		}
	}
}
