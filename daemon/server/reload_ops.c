/* daemon/server/reload_ops.c — new expert weights while serving: the admin
 * ops `reload` (with its rollback and cancel) and `version-info`, the job
 * that runs a reload (daemon/engine/reload.h), and the rolling reload a
 * changed model.path starts at a configuration reload (SIGHUP).
 *
 * The handler runs on the loop and refuses, changing nothing, what it can
 * judge there: another change running ("busy: ..."; a reload and a
 * placement change never run together), a relative or too long path, a
 * layer that is not MoE, an expert out of range, a rollback with nothing
 * kept. What needs the checkpoint (its architecture, its tensors, its
 * values) is checked by the job before anything is staged, and a failure
 * there ends the job with the reason (moectl reload --wait exits 1 with
 * it). The options in force (reload.*) are taken when the job starts.
 */
#include "daemon/server/internal.h"

#include <limits.h>

#include "daemon/engine/reload.h"

struct reload_req {
	struct moe_admin_reload req;
	char dir[PATH_MAX];	/* "" : the configured model.path */
	uint32_t layers[MOE_RELOAD_MAX_LAYER + 1], n_layers;
	uint32_t experts[MOE_RELOAD_MAX_EXPERT + 1], n_experts;
	uint64_t max_staging_bytes, bytes_per_s;
	bool keep_previous;
	struct moe_reload_progress prog;
	uint64_t t0_ns, end_ns;
	char what[160];
};

void srv_reload_req_free(struct reload_req *r)
{
	free(r);
}

struct job *srv_reload_running(struct server *s)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = s->jobs[i];

		if (j && j->op == MOE_ADMIN_RELOAD &&
		    atomic_load(&j->state) == MOE_JOB_RUNNING)
			return j;
	}
	return NULL;
}

void srv_reload_progress(const struct job *j, uint64_t *done, uint64_t *total)
{
	*done = atomic_load(&j->reload->prog.steps_done);
	*total = atomic_load(&j->reload->prog.steps_total);
}

const char *srv_check_reload(const void *payload)
{
	const struct moe_admin_reload *x = payload;

	if (x->flags & ~(uint32_t)MOE_RELOAD_FLAGS)
		return "unknown reload flags";
	if (x->max_parallel > 64)
		return "max_parallel must be 0..64";
	if (!memchr(x->model, '\0', sizeof(x->model)))
		return "the model path is not NUL-terminated";
	return NULL;
}

const char *srv_check_version(const void *payload)
{
	return ((const struct moe_admin_version_ref *)payload)->reserved ? "reserved field not 0"
									  : NULL;
}

static int result_code(int ret)
{
	switch (ret) {
	case 0: return 0;
	case -ECANCELED: return MOE_ECANCELED;
	case -ENOSPC: return MOE_ELIMIT;
	case -ENOMEM: return MOE_ENOMEM;
	case -ENOENT:
	case -ENODATA: return MOE_ENOENT;
	case -EAGAIN: return MOE_EAGAIN;
	case -ENOTRECOVERABLE: return MOE_EDEVICE;
	default: return MOE_EINVAL;
	}
}

void *srv_reload_job(void *arg)
{
	struct job *j = arg;
	struct reload_req *q = j->reload;
	struct moe_reload_opts o = {
		.dir = q->dir,
		.layers = q->n_layers ? q->layers : NULL,
		.n_layers = q->n_layers,
		.experts = q->n_experts ? q->experts : NULL,
		.n_experts = q->n_experts,
		.atomic = q->req.flags & MOE_RELOAD_ATOMIC,
		.max_parallel = q->req.max_parallel,
		.max_staging_bytes = q->max_staging_bytes,
		.keep_previous = q->keep_previous,
		.bytes_per_s = q->bytes_per_s,
		.cancel = &j->cancel,
		.progress = &q->prog,
	};
	struct moe_reload_result r;
	char err[MOE_ERRLEN];
	sigset_t all;
	int ret;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	if (q->req.flags & MOE_RELOAD_ROLLBACK)
		ret = moe_engine_rollback(j->e, &o, &r, err);
	else
		ret = moe_engine_reload(j->e, &o, &r, err);
	q->end_ns = srv_now_ns();
	j->last_epoch = r.last_epoch;
	if (ret)
		snprintf(j->message, sizeof(j->message), "%.120s", err);
	else
		snprintf(j->message, sizeof(j->message),
			 "%u layer%s in %u epoch%s (%u..%u), %.1f MiB staged, %.2f s%s", r.layers,
			 r.layers == 1 ? "" : "s", r.steps, r.steps == 1 ? "" : "s", r.first_epoch,
			 r.last_epoch, (double)r.bytes / (1 << 20),
			 (double)(q->end_ns - q->t0_ns) / 1e9,
			 r.not_kept ? "; previous weights not all kept" : "");
	srv_job_end(j, ret == -ECANCELED ? MOE_JOB_CANCELLED : ret ? MOE_JOB_FAILED : MOE_JOB_DONE,
		    result_code(ret));
	return NULL;
}

void srv_reload_ended(struct server *s, const struct job *j)
{
	uint32_t state = atomic_load(&((struct job *)j)->state);

	if (state == MOE_JOB_DONE)
		s->wreloads_done++;
	else if (state == MOE_JOB_CANCELLED)
		s->wreloads_cancelled++;
	else
		s->wreloads_failed++;
	snprintf(s->wreload_last, sizeof(s->wreload_last), "job %u (%.40s): %s: %.120s", j->id,
		 j->reload->what, moe_job_state_name(state), j->message);
	srv_status_line(s);
}

/* A change already running, in words (NULL: none). */
static const char *busy_with(struct server *s, char *buf, size_t n)
{
	struct job *j = srv_reload_running(s);

	if (!j)
		j = srv_placement_busy(s);
	if (!j)
		return NULL;
	snprintf(buf, n, "busy: %s runs (job %u): wait for it or cancel it (moectl job %u "
		 "--cancel)", moe_admin_op_name(j->op), j->id, j->id);
	return buf;
}

/* Starts the job for q (taken over); 0 or a MOE_E* with *why. */
static int start(struct server *s, struct client *c, uint32_t seq, struct reload_req *q,
		 struct job **out, const char **why)
{
	int st;

	q->max_staging_bytes = s->o.reload_max_staging_bytes;
	q->keep_previous = s->o.reload_keep_previous;
	q->bytes_per_s = s->o.reload_bytes_per_s;
	q->t0_ns = srv_now_ns();
	st = srv_job_start(s, c, MOE_ADMIN_RELOAD, seq, q, out, why);
	if (st)
		free(q);
	return st;
}

void srv_op_reload(const struct admin_call *a)
{
	const struct moe_admin_reload *x = a->payload;
	struct server *s = a->s;
	const struct moe_model *m = s->m;
	struct reload_req *q;
	struct moe_admin_job d;
	struct job *j;
	const char *why = NULL;
	char msg[240], busy[200];
	int st = MOE_EINVAL;

	msg[0] = '\0';
	if (x->flags & MOE_RELOAD_CANCEL) {
		j = srv_reload_running(s);
		if (!j) {
			srv_admin_reply(a->c, a->seq, MOE_ENOENT, "no reload runs");
			return;
		}
		atomic_store(&j->cancel, true);
		srv_job_describe(j, &d);
		snprintf(msg, sizeof(msg), "job %u: cancelling at its next step", j->id);
		srv_admin_reply_with(a->c, a->seq, 0, msg, &d, sizeof(d));
		return;
	}
	q = calloc(1, sizeof(*q));
	if (!q) {
		srv_admin_reply(a->c, a->seq, MOE_ENOMEM, "out of memory");
		return;
	}
	q->req = *x;
	if (busy_with(s, busy, sizeof(busy))) {
		st = MOE_EBUSY;
		snprintf(msg, sizeof(msg), "%s", busy);
	} else if (x->flags & MOE_RELOAD_ROLLBACK) {
		if (x->model[0] || x->flags & MOE_RELOAD_ATOMIC || x->max_parallel)
			snprintf(msg, sizeof(msg), "a rollback takes no model, --atomic or "
				 "--max-parallel");
		for (int i = 0; !msg[0] && i < 4; i++)
			if (x->layers[i])
				snprintf(msg, sizeof(msg), "a rollback returns every layer the last "
					 "reload changed: it takes no layer list");
		for (int i = 0; !msg[0] && i < 16; i++)
			if (x->experts[i])
				snprintf(msg, sizeof(msg), "a rollback takes no expert list");
		if (!msg[0] && (st = moe_engine_can_rollback(s->e, busy, sizeof(busy)))) {
			snprintf(msg, sizeof(msg), "cannot roll back: %s", busy);
			st = MOE_ENOENT;
		}
		snprintf(q->what, sizeof(q->what), "rollback");
	} else {
		if (x->model[0] && x->model[0] != '/')
			snprintf(msg, sizeof(msg), "%.150s: give the checkpoint's absolute path "
				 "(moed resolves no relative one)", x->model);
		snprintf(q->dir, sizeof(q->dir), "%s",
			 x->model[0] ? x->model : s->o.model_path ? s->o.model_path : m->dir);
		for (uint32_t i = 0; !msg[0] && i <= MOE_RELOAD_MAX_LAYER; i++) {
			if (!((x->layers[i / 64] >> (i % 64)) & 1))
				continue;
			if (moe_model_layer_pos(m, i) < 0)
				snprintf(msg, sizeof(msg), "layer %u is not an MoE layer of this model "
					 "(MoE layers %u..%u)", i, m->layers[0].index,
					 m->layers[m->n_moe_layers - 1].index);
			q->layers[q->n_layers++] = i;
		}
		for (uint32_t i = 0; !msg[0] && i <= MOE_RELOAD_MAX_EXPERT; i++) {
			if (!((x->experts[i / 64] >> (i % 64)) & 1))
				continue;
			if (i >= m->n_experts)
				snprintf(msg, sizeof(msg), "expert %u: the model has %u experts per "
					 "layer", i, m->n_experts);
			q->experts[q->n_experts++] = i;
		}
		snprintf(q->what, sizeof(q->what), "reload%s%s from %.120s",
			 x->flags & MOE_RELOAD_ATOMIC ? " (atomic)" : "",
			 q->n_experts ? " (experts)" : "", q->dir);
	}
	if (msg[0]) {
		free(q);
		s->admin_refused++;
		srv_admin_reply(a->c, a->seq, st, msg);
		return;
	}
	st = start(s, a->c, a->seq, q, &j, &why);
	if (st) {
		srv_admin_reply(a->c, a->seq, st, why);
		return;
	}
	srv_job_describe(j, &d);
	moe_log(LOG_NOTICE, "%s (job %u) by client %u (pid %d)", j->reload->what, j->id,
		a->c->id, (int)a->c->pid);
	snprintf(msg, sizeof(msg), "job %u: %.200s", j->id, j->reload->what);
	srv_admin_reply_with(a->c, a->seq, 0, msg, &d, sizeof(d));
}

int srv_reload_model_path(struct server *s, char *msg, size_t n)
{
	struct reload_req *q;
	const char *why = NULL;
	char busy[200];
	struct job *j;

	if (busy_with(s, busy, sizeof(busy))) {
		snprintf(msg, n, "model.path changed, but %s; run moectl reload later", busy);
		return -1;
	}
	q = calloc(1, sizeof(*q));
	if (!q) {
		snprintf(msg, n, "model.path changed, but out of memory to reload it");
		return -1;
	}
	snprintf(q->dir, sizeof(q->dir), "%s", s->o.model_path);
	snprintf(q->what, sizeof(q->what), "reload from %.120s (model.path changed)", q->dir);
	if (start(s, NULL, 0, q, &j, &why)) {
		snprintf(msg, n, "model.path changed, but the reload cannot start: %s", why);
		return -1;
	}
	snprintf(msg, n, "model.path changed: rolling reload from %s (job %u)", s->o.model_path,
		 j->id);
	return 0;
}

void srv_op_version_info(const struct admin_call *a)
{
	const struct moe_admin_version_ref *x = a->payload;
	struct server *s = a->s;
	const struct moe_model *m = s->m;
	int pos = moe_model_layer_pos(m, x->layer);
	struct moe_layer_version info;
	uint32_t E = m->n_experts, v, *ev = NULL, *es = NULL, n;
	struct {
		struct moe_admin_version h;
		uint32_t data[(MOE_ADMIN_DATA_MAX - sizeof(struct moe_admin_version)) / 4];
	} r;
	uint32_t cap = (uint32_t)(sizeof(r.data) / 8);
	char msg[160];

	if (pos < 0) {
		snprintf(msg, sizeof(msg), "layer %u is not an MoE layer of this model", x->layer);
		srv_admin_reply(a->c, a->seq, MOE_ENOLAYER, msg);
		return;
	}
	v = x->version ? x->version : moe_engine_layer_version(s->e, (uint32_t)pos);
	ev = malloc(E * sizeof(uint32_t));
	es = malloc(E * sizeof(uint32_t));
	if (!ev || !es) {
		free(ev);
		free(es);
		srv_admin_reply(a->c, a->seq, MOE_ENOMEM, "out of memory");
		return;
	}
	if (moe_engine_version_info(s->e, (uint32_t)pos, v, &info, ev, es)) {
		snprintf(msg, sizeof(msg), "layer %u has no weights version %u", x->layer, v);
		free(ev);
		free(es);
		srv_admin_reply(a->c, a->seq, MOE_ENOENT, msg);
		return;
	}
	n = x->first_expert < E ? E - x->first_expert : 0;
	n = n < cap ? n : cap;
	r.h = (struct moe_admin_version){x->layer, info.version, info.router_version,
					 info.router_source,
					 info.rollback ? MOE_VERSION_ROLLBACK : 0, E,
					 x->first_expert, n};
	memcpy(r.data, ev + (n ? x->first_expert : 0), n * sizeof(uint32_t));
	memcpy(r.data + n, es + (n ? x->first_expert : 0), n * sizeof(uint32_t));
	free(ev);
	free(es);
	snprintf(msg, sizeof(msg), "layer %u: weights version %u%s", x->layer, info.version,
		 info.rollback ? " (a rollback)" : "");
	srv_admin_reply_with(a->c, a->seq, 0, msg, &r,
			     (uint32_t)(sizeof(r.h) + 2 * n * sizeof(uint32_t)));
}

/* status: "weights": sources, each layer's version, the reload running,
 * the last one's outcome, the counters. */
void srv_status_weights(struct server *s, cJSON *root)
{
	const struct moe_model *m = s->m;
	cJSON *w = cJSON_AddObjectToObject(root, "weights"), *a, *x;
	uint32_t n = moe_engine_sources(s->e), E = m->n_experts;
	uint32_t *es = malloc(E * sizeof(uint32_t)), *ev = malloc(E * sizeof(uint32_t));
	struct job *j = srv_reload_running(s);
	char path[PATH_MAX], why[200];
	uint64_t ident;

	a = cJSON_AddArrayToObject(w, "sources");
	for (uint32_t i = 0; i < n; i++) {
		char hex[20];

		if (moe_engine_source(s->e, i, path, sizeof(path), &ident))
			continue;
		x = cJSON_CreateObject();
		snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)ident);
		cJSON_AddNumberToObject(x, "id", i);
		cJSON_AddStringToObject(x, "path", path);
		cJSON_AddStringToObject(x, "identity", hex);
		cJSON_AddItemToArray(a, x);
	}
	a = cJSON_AddArrayToObject(w, "layers");
	for (uint32_t l = 0; es && ev && l < m->n_moe_layers; l++) {
		struct moe_layer_version info;
		uint32_t v = moe_engine_layer_version(s->e, l), mixed = 0;

		if (moe_engine_version_info(s->e, l, v, &info, ev, es))
			continue;
		for (uint32_t e = 0; e < E; e++)
			mixed += es[e] != info.router_source || ev[e] != info.router_version;
		x = cJSON_CreateObject();
		cJSON_AddNumberToObject(x, "layer", m->layers[l].index);
		cJSON_AddNumberToObject(x, "version", v);
		cJSON_AddNumberToObject(x, "router_version", info.router_version);
		cJSON_AddNumberToObject(x, "source", info.router_source);
		/* experts whose version or source is not the router's (experts steps) */
		cJSON_AddNumberToObject(x, "experts_other", mixed);
		cJSON_AddBoolToObject(x, "rollback", info.rollback);
		cJSON_AddItemToArray(a, x);
	}
	free(es);
	free(ev);
	cJSON_AddNumberToObject(w, "kept_bytes", (double)moe_engine_kept_bytes(s->e));
	cJSON_AddStringToObject(w, "rollback", moe_engine_can_rollback(s->e, why, sizeof(why))
						       ? why : "possible");
	cJSON_AddNumberToObject(w, "reloads_done", (double)s->wreloads_done);
	cJSON_AddNumberToObject(w, "reloads_failed", (double)s->wreloads_failed);
	cJSON_AddNumberToObject(w, "reloads_cancelled", (double)s->wreloads_cancelled);
	cJSON_AddStringToObject(w, "last_reload", s->wreload_last);
	cJSON_AddNumberToObject(w, "max_staging_bytes", (double)s->o.reload_max_staging_bytes);
	cJSON_AddBoolToObject(w, "keep_previous", s->o.reload_keep_previous);
	if (j) {
		struct reload_req *q = j->reload;

		x = cJSON_AddObjectToObject(w, "reload");
		cJSON_AddNumberToObject(x, "job", j->id);
		cJSON_AddStringToObject(x, "what", q->what);
		cJSON_AddNumberToObject(x, "steps_done", atomic_load(&q->prog.steps_done));
		cJSON_AddNumberToObject(x, "steps_total", atomic_load(&q->prog.steps_total));
		cJSON_AddNumberToObject(x, "bytes", (double)atomic_load(&q->prog.bytes));
		cJSON_AddNumberToObject(x, "elapsed_s", (double)(srv_now_ns() - q->t0_ns) / 1e9);
	}
}
