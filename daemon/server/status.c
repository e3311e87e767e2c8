/* daemon/server/status.c — the status JSON, one snapshot per loop iteration (see internal.h). */
#include "daemon/server/internal.h"

#include "daemon/engine/stats.h"

/* ---- status ------------------------------------------------------------- */

/* A layer's load (window and total) and where its experts live (the
 * current placement: per expert, its replicas as [rank, slot]). */
static void layer_load(struct server *s, const struct moe_placement *pl, uint32_t l, cJSON *x)
{
	const struct moe_stats *st = moe_engine_stats(s->e);
	uint32_t R = moe_engine_ranks(s->e), E = s->m->n_experts;
	uint64_t now = srv_now_ns();
	cJSON *t, *o;

	if (!st)
		return;
	t = cJSON_AddArrayToObject(x, "expert_tokens_window");
	for (uint32_t e = 0; e < E; e++)
		cJSON_AddItemToArray(t, cJSON_CreateNumber(
						(double)moe_stats_expert_window(st, l, e, now)));
	t = cJSON_AddArrayToObject(x, "rank_rows");
	for (uint32_t r = 0; r < R; r++)
		cJSON_AddItemToArray(t, cJSON_CreateNumber(
						(double)moe_stats_rank_rows(st, l, r, now, 0)));
	t = cJSON_AddArrayToObject(x, "rank_rows_window");
	for (uint32_t r = 0; r < R; r++)
		cJSON_AddItemToArray(t, cJSON_CreateNumber(
						(double)moe_stats_rank_rows(st, l, r, now, 1)));
	o = cJSON_AddObjectToObject(x, "imbalance");
	cJSON_AddNumberToObject(o, "rank_max_over_mean", moe_stats_rank_imbalance(st, l, now, 1));
	cJSON_AddNumberToObject(o, "expert_cv", moe_stats_expert_cv(st, l, now, 1));
	cJSON_AddNumberToObject(o, "rank_max_over_mean_total",
				moe_stats_rank_imbalance(st, l, now, 0));
	cJSON_AddNumberToObject(o, "expert_cv_total", moe_stats_expert_cv(st, l, now, 0));
	if (pl) {
		t = cJSON_AddArrayToObject(x, "placement");
		for (uint32_t e = 0; e < E; e++) {
			uint32_t n;
			const struct moe_replica *rep = moe_place_get(pl, l, e, &n);
			cJSON *reps = cJSON_CreateArray();

			for (uint32_t i = 0; i < n; i++) {
				cJSON *pair = cJSON_CreateArray();

				cJSON_AddItemToArray(pair, cJSON_CreateNumber(rep[i].rank));
				cJSON_AddItemToArray(pair, cJSON_CreateNumber(rep[i].slot));
				cJSON_AddItemToArray(reps, pair);
			}
			cJSON_AddItemToArray(t, reps);
		}
	}
}

/* The ranks' work since start, and the window the windowed counts cover. */
static void load_summary(struct server *s, cJSON *j)
{
	const struct moe_stats *st = moe_engine_stats(s->e);
	uint32_t R = moe_engine_ranks(s->e);
	uint64_t now = srv_now_ns();
	cJSON *o, *a;

	if (!st)
		return;
	o = cJSON_AddObjectToObject(j, "load");
	cJSON_AddNumberToObject(o, "window_s", moe_stats_window_ms(st) / 1000.0);
	a = cJSON_AddArrayToObject(o, "ranks");
	for (uint32_t r = 0; r < R; r++) {
		cJSON *x = cJSON_CreateObject();
		uint64_t rows = 0, win = 0;

		for (uint32_t l = 0; l < s->m->n_moe_layers; l++) {
			rows += moe_stats_rank_rows(st, l, r, now, 0);
			win += moe_stats_rank_rows(st, l, r, now, 1);
		}
		cJSON_AddNumberToObject(x, "rank", r);
		cJSON_AddBoolToObject(x, "lost", moe_engine_rank_lost(s->e, r));
		cJSON_AddNumberToObject(x, "rows", (double)rows);
		cJSON_AddNumberToObject(x, "rows_window", (double)win);
		cJSON_AddNumberToObject(x, "busy_ms", moe_stats_rank_busy_ns(st, r) / 1e6);
		cJSON_AddItemToArray(a, x);
	}
}

static char *status_json(struct server *s)
{
	const struct moe_model *m = s->m;
	cJSON *j = cJSON_CreateObject(), *o, *a;
	struct moe_epoch *ep;
	uint32_t lost = 0;
	char *out;

	for (uint32_t r = 0; r < moe_engine_ranks(s->e); r++)
		lost += moe_engine_rank_lost(s->e, r);
	cJSON_AddNumberToObject(j, "version", 1);
	cJSON_AddNumberToObject(j, "uptime_s", (double)(srv_now_ns() - s->start_ns) / 1e9);
	/* degraded: serving, with ranks lost (their experts moved) */
	cJSON_AddStringToObject(j, "state", s->stopping   ? "stopping"
					    : s->draining ? "draining"
					    : lost	  ? "degraded"
							  : "serving");
	o = cJSON_AddObjectToObject(j, "model");
	cJSON_AddStringToObject(o, "path", s->o.model_path ? s->o.model_path : "");
	cJSON_AddStringToObject(o, "family", moe_family_name(m->family));
	cJSON_AddStringToObject(o, "dtype", moe_dtype_name(m->dtype));
	cJSON_AddNumberToObject(o, "hidden", m->hidden);
	cJSON_AddNumberToObject(o, "experts", m->n_experts);
	cJSON_AddNumberToObject(o, "top_k", m->top_k);
	a = cJSON_AddArrayToObject(o, "moe_layers");
	for (uint32_t i = 0; i < m->n_moe_layers; i++)
		cJSON_AddItemToArray(a, cJSON_CreateNumber(m->layers[i].index));
	o = cJSON_AddObjectToObject(j, "backend");
	cJSON_AddStringToObject(o, "name", moe_engine_backend(s->e));
	cJSON_AddStringToObject(o, "kernels", moe_engine_kernels(s->e));
	cJSON_AddNumberToObject(o, "threads", moe_engine_threads(s->e));
	cJSON_AddNumberToObject(o, "ranks", moe_engine_ranks(s->e));
	cJSON_AddNumberToObject(o, "ranks_lost", lost);
	/* router, shared experts and every expert slot held, replicas included */
	cJSON_AddNumberToObject(o, "weight_bytes", (double)moe_engine_weight_bytes(s->e));
	cJSON_AddStringToObject(o, "device", moe_engine_device(s->e));
	cJSON_AddStringToObject(o, "gpu", s->o.gpu ? s->o.gpu : "none");
	cJSON_AddBoolToObject(o, "device_lost", moe_engine_lost(s->e));
	if (s->last_device_ms >= 0)
		cJSON_AddNumberToObject(o, "last_batch_device_ms", s->last_device_ms);
	cJSON_AddNumberToObject(o, "unpinned_clients", (double)s->unpinned);
	{
		uint64_t published, retired;
		uint32_t current;

		moe_epochs_counts(moe_engine_epochs(s->e), &published, &retired, &current);
		o = cJSON_AddObjectToObject(j, "epochs");
		cJSON_AddNumberToObject(o, "current", current);
		cJSON_AddNumberToObject(o, "published", (double)published);
		cJSON_AddNumberToObject(o, "retired", (double)retired);
	}
	o = cJSON_AddObjectToObject(j, "metrics");
	cJSON_AddStringToObject(o, "listen", s->o.metrics_listen ? s->o.metrics_listen : "");
	cJSON_AddStringToObject(o, "address", s->metrics_addr);
	cJSON_AddBoolToObject(o, "per_expert", atomic_load(&s->met.per_expert));
	cJSON_AddNumberToObject(o, "slo_p99_ms", (double)atomic_load(&s->met.slo_ns) / 1e6);
	cJSON_AddNumberToObject(o, "scrapes_http", (double)atomic_load(&s->met.scrapes_http));
	cJSON_AddNumberToObject(o, "scrapes_socket", (double)atomic_load(&s->met.scrapes_socket));
	srv_trace_status(s, j);
	o = cJSON_AddObjectToObject(j, "worker");
	cJSON_AddNumberToObject(o, "batches_held", s->batches_out);
	cJSON_AddNumberToObject(o, "busy_ms",
				atomic_load(&s->w.beat_ns)
					? (double)(srv_now_ns() - atomic_load(&s->w.beat_ns)) / 1e6
					: 0.0);
	o = cJSON_AddObjectToObject(j, "placement");
	cJSON_AddBoolToObject(o, "auto_rebalance", s->o.auto_rebalance);
	cJSON_AddNumberToObject(o, "rebalance_threshold", s->o.rebalance_threshold);
	cJSON_AddNumberToObject(o, "copy_bytes_per_s", (double)s->o.copy_bytes_per_s);
	cJSON_AddNumberToObject(o, "auto_runs", s->autob.runs);
	if (s->autob.runs) {
		cJSON_AddNumberToObject(o, "last_auto_job", s->autob.job);
		cJSON_AddNumberToObject(o, "last_measured_before", s->autob.measured_before);
		cJSON_AddNumberToObject(o, "last_predicted_after", s->autob.predicted_after);
		if (s->autob.after_logged)
			cJSON_AddNumberToObject(o, "last_measured_after", s->autob.measured_after);
	}
	a = cJSON_AddArrayToObject(j, "jobs");
	for (int i = 0; i < MAX_JOBS; i++) {
		struct moe_admin_job d;
		cJSON *x;

		if (!s->jobs[i])
			continue;
		srv_job_describe(s->jobs[i], &d);
		x = cJSON_CreateObject();
		cJSON_AddNumberToObject(x, "id", d.job);
		cJSON_AddStringToObject(x, "op", moe_admin_op_name(d.op));
		cJSON_AddStringToObject(x, "state", moe_job_state_name(d.state));
		cJSON_AddNumberToObject(x, "done", (double)d.done);
		cJSON_AddNumberToObject(x, "total", (double)d.total);
		cJSON_AddStringToObject(x, "message", d.message);
		cJSON_AddItemToArray(a, x);
	}
	a = cJSON_AddArrayToObject(j, "clients");
	for (struct client *c = s->clients; c; c = c->next) {
		cJSON *x = cJSON_CreateObject();

		cJSON_AddNumberToObject(x, "id", c->id);
		cJSON_AddNumberToObject(x, "pid", c->pid);
		cJSON_AddNumberToObject(x, "uid", c->uid);
		cJSON_AddStringToObject(x, "name", c->name);
		cJSON_AddNumberToObject(x, "inflight", c->inflight);
		cJSON_AddNumberToObject(x, "requests", (double)c->requests);
		cJSON_AddNumberToObject(x, "errors", (double)c->errors);
		cJSON_AddItemToArray(a, x);
	}
	o = cJSON_AddObjectToObject(j, "queue");
	cJSON_AddNumberToObject(o, "pending_requests", s->pending);
	cJSON_AddNumberToObject(o, "pending_tokens", s->pending_tokens);
	o = cJSON_AddObjectToObject(j, "requests");
	cJSON_AddNumberToObject(o, "completed", (double)s->completed);
	cJSON_AddNumberToObject(o, "errors", (double)s->errors);
	cJSON_AddNumberToObject(o, "timeouts", (double)s->timeouts);
	cJSON_AddNumberToObject(o, "cancelled", (double)s->cancelled);
	cJSON_AddNumberToObject(o, "tokens", (double)s->tokens);
	cJSON_AddNumberToObject(o, "batches", (double)s->batches);
	cJSON_AddNumberToObject(o, "refused_clients", (double)s->refused);
	cJSON_AddNumberToObject(o, "refused_unauthorized", (double)s->refused_auth);
	cJSON_AddNumberToObject(o, "config_reloads", (double)s->reloads);
	cJSON_AddNumberToObject(o, "config_reloads_refused", (double)s->reloads_refused);
	cJSON_AddNumberToObject(o, "admin_calls", (double)s->admin_calls);
	cJSON_AddNumberToObject(o, "admin_refused", (double)s->admin_refused);
	o = cJSON_AddObjectToObject(j, "control");
	cJSON_AddNumberToObject(o, "loops", (double)s->loops);
	/* this reply's own build and send are not counted yet */
	cJSON_AddNumberToObject(o, "status_builds", (double)s->status_builds);
	cJSON_AddNumberToObject(o, "status_served", (double)s->status_served);
	cJSON_AddNumberToObject(o, "log_lines_suppressed", (double)s->log_suppressed);
	cJSON_AddNumberToObject(o, "shm_bytes", (double)s->shm_bytes);
	cJSON_AddNumberToObject(o, "max_total_shm_bytes", (double)s->o.max_total_shm_bytes);
	cJSON_AddNumberToObject(o, "queue_share", s->share);
	/* one epoch for the whole snapshot: every layer's placement the same
	 * version */
	ep = moe_epoch_acquire(s->e);
	a = cJSON_AddArrayToObject(j, "layers");
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		cJSON *x = cJSON_CreateObject(), *t;

		cJSON_AddNumberToObject(x, "layer", m->layers[l].index);
		t = cJSON_AddArrayToObject(x, "expert_tokens");
		for (uint32_t e = 0; e < m->n_experts; e++)
			cJSON_AddItemToArray(t, cJSON_CreateNumber(
							(double)moe_engine_expert_tokens(s->e, l, e)));
		layer_load(s, ep ? ep->placement : NULL, l, x);
		cJSON_AddItemToArray(a, x);
	}
	if (ep)
		moe_epoch_release(ep);
	load_summary(s, j);
	srv_status_weights(s, j);
	out = cJSON_PrintUnformatted(j);
	cJSON_Delete(j);
	return out;
}

/* The JSON goes in a sealed memfd: no datagram size limit, and the client
 * cannot change it under us (nor we under it). It is built at most once per
 * loop iteration (nothing it reports changes within one), and every client
 * asking in that iteration gets the same memfd (they share its file offset:
 * libmoeclient reads it with pread). A STATUS flood thus costs one build
 * per iteration and a send per message, within each client's
 * MSGS_PER_LOOP. */
static int status_snapshot(struct server *s)
{
	char *json;
	int fd;

	/* counts past every completion the asking client can have seen */
	if (srv_settle(s) && s->status_fd >= 0) {
		close(s->status_fd);
		s->status_fd = -1;
	}
	if (s->status_fd >= 0) /* built in this iteration (closed at its end) */
		return s->status_fd;
	json = status_json(s);
	if (!json)
		return -1;
	s->status_len = strlen(json);
	fd = srv_sealed_memfd("moed-status", json, s->status_len);
	free(json);
	s->status_fd = fd;
	s->status_builds++;
	return fd;
}

void srv_status_reply(struct server *s, struct client *c, uint32_t seq)
{
	int fd = status_snapshot(s);

	if (!srv_text_reply(c, MOE_MSG_STATUS_REPLY, seq, fd, s->status_len))
		s->status_served++;
}
