/* daemon/server/placement_ops.c — operator commands that change where
 * experts live: replicate, unreplicate, rebalance (ipc/moe_admin.h).
 *
 * The handler runs on the loop and decides everything that can be refused
 * (an unknown layer, expert or rank; a replica that exists or does not; no
 * free slot; an expert's last replica; another change running; nothing to
 * plan from), so that a refusal changes nothing and says why. What it
 * accepts becomes a target — the ranks that should hold each expert — and
 * a job moves the engine there (moe_engine_migrate: weight copies off the
 * serving path, at most placement.copy_bytes_per_s, each placement
 * published once its copies are complete, freed slots returned when the
 * last batch of their epoch ends). One change at a time.
 *
 * rebalance plans from the load statistics' window (tokens per expert over
 * placement.stats_window_s) with the planner of daemon/engine/rebalance.h.
 * Its targets keep one slot per rank and layer free when there are spare
 * slots, so that any target can be reached by moves (two experts cannot
 * swap ranks through full slots).
 */
#include "daemon/server/internal.h"

#include "daemon/engine/migrate.h"
#include "daemon/engine/rebalance.h"
#include "daemon/engine/stats.h"

struct placement_change {
	uint64_t *want; /* [n_moe_layers * E]: ranks per expert */
	uint64_t steps; /* replicas to copy + to drop (the job's total) */
	char what[120];
};

void srv_placement_change_free(struct placement_change *pc)
{
	if (!pc)
		return;
	free(pc->want);
	free(pc);
}

uint64_t srv_placement_change_steps(const struct placement_change *pc)
{
	return pc->steps;
}

struct job *srv_placement_busy(struct server *s)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = s->jobs[i];

		if (j && (j->op == MOE_ADMIN_PLACEMENT_CYCLE || j->op == MOE_ADMIN_REPLICATE ||
			  j->op == MOE_ADMIN_UNREPLICATE || j->op == MOE_ADMIN_REBALANCE ||
			  j->op == MOE_ADMIN_RELOAD) &&
		    atomic_load(&j->state) == MOE_JOB_RUNNING)
			return j;
	}
	return NULL;
}

void *srv_placement_job(void *arg)
{
	struct job *j = arg;
	struct moe_migrate_opts o = {.bytes_per_s = j->copy_bytes_per_s, .cancel = &j->cancel,
				     .steps = &j->done};
	struct moe_migrate_result r;
	char err[MOE_ERRLEN];
	uint64_t t0 = srv_now_ns();
	sigset_t all;
	int ret;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	ret = moe_engine_migrate(j->e, j->change->want, &o, &r, err);
	j->last_epoch = r.epoch;
	if (ret)
		snprintf(j->message, sizeof(j->message), "%.60s: %.60s", j->change->what, err);
	else
		snprintf(j->message, sizeof(j->message),
			 "%.50s: %u copied (%.1f MiB, %.2f s), %u dropped, epoch %u",
			 j->change->what, r.added, (double)r.bytes / (1 << 20),
			 (double)(srv_now_ns() - t0) / 1e9, r.dropped, r.epoch);
	srv_job_end(j, ret == -ECANCELED ? MOE_JOB_CANCELLED : ret ? MOE_JOB_FAILED : MOE_JOB_DONE,
		    ret == -ECANCELED ? MOE_ECANCELED : ret == -ENOSPC ? MOE_ELIMIT
		    : ret == -EAGAIN ? MOE_EAGAIN /* a rank lost since it was planned */
		    : ret ? MOE_EINTERNAL : 0);
	return NULL;
}

const char *srv_check_replica(const void *payload)
{
	return ((const struct moe_admin_replica *)payload)->reserved ? "reserved field not 0"
								     : NULL;
}

const char *srv_check_rebalance(const void *payload)
{
	const struct moe_admin_rebalance *x = payload;

	return x->mode > MOE_PLAN_KIND_FULL ? "mode must be keep (0) or full (1)" : NULL;
}

/* The checks every change shares; the MoE layer position, or -1 with the
 * refusal sent. */
static int common_checks(const struct admin_call *a, uint32_t layer, bool any_layer)
{
	struct server *s = a->s;
	const struct moe_model *m = s->m;
	struct job *busy = srv_placement_busy(s);
	char msg[200];
	int pos = any_layer ? 0 : moe_model_layer_pos(m, layer);

	if (pos < 0) {
		snprintf(msg, sizeof(msg), "layer %u is not an MoE layer of this model (MoE layers "
			 "%u..%u)", layer, m->layers[0].index,
			 m->layers[m->n_moe_layers - 1].index);
	} else if (strcmp(moe_engine_backend(s->e), "cpu")) {
		snprintf(msg, sizeof(msg), "placement changes need CPU ranks for now: the %s "
			 "backend serves one rank", moe_engine_backend(s->e));
		pos = -1;
	} else if (busy) {
		snprintf(msg, sizeof(msg), "busy: %s runs (job %u): wait for it or cancel it "
			 "(moectl job %u --cancel)", moe_admin_op_name(busy->op), busy->id,
			 busy->id);
		srv_admin_reply(a->c, a->seq, MOE_EBUSY, msg);
		s->admin_refused++;
		return -1;
	}
	if (pos < 0) {
		srv_admin_reply(a->c, a->seq, MOE_EINVAL, msg);
		s->admin_refused++;
	}
	return pos;
}

static uint64_t *current_masks(struct server *s)
{
	const struct moe_model *m = s->m;
	uint64_t *w = malloc(sizeof(uint64_t) * m->n_moe_layers * m->n_experts);

	if (w)
		moe_engine_placement_masks(s->e, w);
	return w;
}

/* The job's reply: the job (as for every job op), and in the message what
 * it does (rebalance: the plan's figures). */
static void start_change(const struct admin_call *a, struct placement_change *pc,
			 const char *plan)
{
	struct moe_admin_job d;
	const char *why = NULL;
	struct job *j;
	int st = srv_job_start(a->s, a->c, a->op, a->seq, pc, &j, &why);
	char msg[240];

	if (st) {
		srv_placement_change_free(pc);
		srv_admin_reply(a->c, a->seq, st, why);
		return;
	}
	srv_job_describe(j, &d);
	moe_log(LOG_NOTICE, "placement change (job %u) by client %u (pid %d): %s%s%s", j->id,
		a->c->id, (int)a->c->pid, pc->what, plan ? ": " : "", plan ? plan : "");
	snprintf(msg, sizeof(msg), "job %u: %.200s", j->id, plan ? plan : pc->what);
	srv_admin_reply_with(a->c, a->seq, 0, msg, &d, sizeof(d));
}

void srv_op_replicate(const struct admin_call *a)
{
	const struct moe_admin_replica *x = a->payload;
	struct server *s = a->s;
	const struct moe_model *m = s->m;
	uint32_t E = m->n_experts, R = moe_engine_ranks(s->e), S = moe_engine_slots_per_rank(s->e);
	bool add = a->op == MOE_ADMIN_REPLICATE;
	int pos = common_checks(a, x->layer, false), st = MOE_EINVAL;
	struct placement_change *pc;
	uint64_t *want, bit;
	uint32_t on_rank = 0;
	size_t k;
	char msg[200] = "";

	if (pos < 0)
		return;
	if (x->expert >= E || x->rank >= R) {
		snprintf(msg, sizeof(msg), x->expert >= E ? "expert %u: layer %u has %u experts"
							  : "rank %u: moed runs %u ranks",
			 x->expert >= E ? x->expert : x->rank,
			 x->expert >= E ? x->layer : R, E);
		if (x->expert < E)
			snprintf(msg, sizeof(msg), "rank %u: moed runs %u rank%s (devices: cpu:R)",
				 x->rank, R, R == 1 ? "" : "s");
		srv_admin_reply(a->c, a->seq, MOE_EINVAL, msg);
		s->admin_refused++;
		return;
	}
	want = current_masks(s);
	if (!want) {
		srv_admin_reply(a->c, a->seq, MOE_ENOMEM, "out of memory");
		return;
	}
	k = (size_t)pos * E + x->expert;
	bit = 1ull << x->rank;
	for (uint32_t e = 0; e < E; e++)
		on_rank += (want[(size_t)pos * E + e] >> x->rank) & 1;
	if (add && moe_engine_rank_lost(s->e, x->rank))
		snprintf(msg, sizeof(msg), "rank %u is lost (taken out after a failure)", x->rank);
	else if (add && (want[k] & bit))
		snprintf(msg, sizeof(msg), "layer %u: rank %u already holds expert %u", x->layer,
			 x->rank, x->expert);
	else if (add && __builtin_popcountll(want[k]) >= MOE_MAX_REPLICAS)
		snprintf(msg, sizeof(msg), "layer %u: expert %u has %d replicas, the most there "
			 "can be", x->layer, x->expert, MOE_MAX_REPLICAS);
	else if (add && on_rank >= S)
		st = MOE_ELIMIT, snprintf(msg, sizeof(msg), "layer %u: rank %u has no free slot "
					 "(%u of %u hold experts; placement.spare_slots adds "
					 "room)", x->layer, x->rank, on_rank, S);
	else if (!add && !(want[k] & bit))
		st = MOE_ENOENT, snprintf(msg, sizeof(msg), "layer %u: rank %u holds no replica "
					 "of expert %u", x->layer, x->rank, x->expert);
	else if (!add && want[k] == bit)
		snprintf(msg, sizeof(msg), "layer %u: rank %u holds expert %u's last replica (an "
			 "expert keeps at least one)", x->layer, x->rank, x->expert);
	if (msg[0]) {
		free(want);
		srv_admin_reply(a->c, a->seq, st, msg);
		s->admin_refused++;
		return;
	}
	want[k] ^= bit;
	pc = calloc(1, sizeof(*pc));
	if (!pc) {
		free(want);
		srv_admin_reply(a->c, a->seq, MOE_ENOMEM, "out of memory");
		return;
	}
	pc->want = want;
	pc->steps = 1;
	snprintf(pc->what, sizeof(pc->what), "%s layer %u expert %u %s rank %u",
		 add ? "replicate" : "unreplicate", x->layer, x->expert, add ? "on" : "from",
		 x->rank);
	start_change(a, pc, NULL);
}

/* ---- rebalance ---------------------------------------------------------- */

/* One layer's current placement with each rank's slots numbered 0..n-1 in
 * order (the plan's slot numbers do not matter: the move picks slots), and
 * the ranks renumbered to the surviving ones (to_plan[rank]; lost ranks
 * hold nothing). */
static uint32_t compact_layer(const struct moe_placement *p, uint32_t l, const uint32_t *to_plan,
			      uint8_t *n, struct moe_replica *rep)
{
	uint32_t E = p->n_experts, used[MOE_MAX_RANKS] = {0}, most = 0;

	for (uint32_t x = 0; x < E; x++) {
		uint32_t c;
		const struct moe_replica *r = moe_place_get(p, l, x, &c);

		n[x] = (uint8_t)c;
		for (uint32_t i = 0; i < MOE_MAX_REPLICAS; i++)
			rep[x * MOE_MAX_REPLICAS + i] = (struct moe_replica){0, 0};
		for (uint32_t i = 0; i < c; i++) {
			rep[x * MOE_MAX_REPLICAS + i] = (struct moe_replica){
				(uint16_t)to_plan[r[i].rank], (uint16_t)used[r[i].rank]++};
			if (used[r[i].rank] > most)
				most = used[r[i].rank];
		}
	}
	return most;
}

/* A rebalance plan from the load window: all layers, or MoE layer
 * position `pos` only. 0 with *plan and *want (the target, malloc'd), or a
 * MOE_E* with msg. Runs on the loop (the planner takes tens of ms for the
 * largest models). */
static int plan_rebalance(struct server *s, bool all, uint32_t pos, uint32_t mode,
			  struct moe_admin_plan *plan, uint64_t **want_out, char *msg, size_t mlen)
{
	const struct moe_model *m = s->m;
	uint32_t E = m->n_experts, R = moe_engine_ranks(s->e), S = moe_engine_slots_per_rank(s->e);
	uint32_t P = (E + R - 1) / R;
	uint32_t to_plan[MOE_MAX_RANKS], from_plan[MOE_MAX_RANKS], na = 0;
	const struct moe_stats *st = moe_engine_stats(s->e);
	uint64_t *want = current_masks(s), now = srv_now_ns();
	double *load = malloc(sizeof(double) * E), total = 0;
	uint8_t *cn = malloc(E), *nn = malloc(E);
	struct moe_replica *cr = malloc(sizeof(*cr) * E * MOE_MAX_REPLICAS);
	struct moe_replica *nr = malloc(sizeof(*nr) * E * MOE_MAX_REPLICAS);
	struct moe_epoch *ep;
	int ret = 0;

	*plan = (struct moe_admin_plan){0};
	*want_out = NULL;
	if (!load || !cn || !nn || !cr || !nr || !want) {
		snprintf(msg, mlen, "out of memory");
		ret = MOE_ENOMEM;
		goto out;
	}
	for (uint32_t r = 0; r < R; r++) { /* the surviving ranks, numbered for the planner */
		to_plan[r] = UINT32_MAX;
		if (!moe_engine_rank_lost(s->e, r))
			to_plan[r] = na, from_plan[na++] = r;
	}
	ep = moe_epoch_acquire(s->e);
	/* a rank being taken out right now: its experts are still in the
	 * current placement until the engine publishes one without it */
	for (uint32_t l = 0; l < m->n_moe_layers && !ret; l++)
		for (uint32_t x = 0; x < E && !ret; x++) {
			uint32_t n;
			const struct moe_replica *rp = moe_place_get(ep->placement, l, x, &n);

			for (uint32_t i = 0; i < n; i++)
				if (to_plan[rp[i].rank] == UINT32_MAX)
					ret = MOE_EAGAIN;
		}
	if (ret) {
		moe_epoch_release(ep);
		snprintf(msg, mlen, "a lost rank is being replaced: try again in a moment");
		goto out;
	}
	for (uint32_t l = all ? 0 : pos; l < (all ? m->n_moe_layers : pos + 1) && !ret; l++) {
		struct moe_load_in in = {E, na, S, load};
		uint32_t most = compact_layer(ep->placement, l, to_plan, cn, cr);
		double before, after;
		bool changed = false;
		int r;

		for (uint32_t e = 0; e < E; e++) {
			load[e] = (double)moe_stats_expert_window(st, l, e, now);
			total += load[e];
		}
		/* one slot per rank left free when there are spares and the
		 * current placement allows it (see the top of the file) */
		if (S > P && most < S && (uint64_t)na * (S - 1) >= E)
			in.slots_per_rank = S - 1;
		r = moe_plan_layer(&in, mode == MOE_PLAN_KIND_FULL ? MOE_PLAN_FULL : MOE_PLAN_KEEP,
				   cn, cr, nn, nr);
		if (r) {
			snprintf(msg, mlen, "layer %u: the planner failed: %s", m->layers[l].index,
				 strerror(-r));
			ret = MOE_EINTERNAL;
			break;
		}
		before = moe_plan_max_mean(&in, cn, cr);
		after = moe_plan_max_mean(&in, nn, nr);
		plan->layers++;
		if (before > plan->before)
			plan->before = before;
		if (after > plan->after)
			plan->after = after;
		for (uint32_t e = 0; e < E; e++) {
			size_t k = (size_t)l * E + e;
			uint64_t mask = 0;

			for (uint32_t i = 0; i < nn[e]; i++)
				mask |= 1ull << from_plan[nr[e * MOE_MAX_REPLICAS + i].rank];
			plan->added += nn[e] > cn[e] ? nn[e] - cn[e] : 0;
			plan->dropped += cn[e] > nn[e] ? cn[e] - nn[e] : 0;
			plan->moved += (uint32_t)__builtin_popcountll(mask & ~want[k]);
			changed |= mask != want[k];
			want[k] = mask;
		}
		plan->layers_changed += changed;
	}
	moe_epoch_release(ep);
	if (!ret && total == 0) {
		snprintf(msg, mlen, "no tokens in the last %u s to plan from (the load window, "
			 "placement.stats_window_s)", moe_stats_window_ms(st) / 1000);
		ret = MOE_EAGAIN;
	}
	if (ret)
		goto out;
	/* (moved so far counts every copy: the added ones are not moves) */
	plan->copy_bytes = (uint64_t)plan->moved * m->expert_bytes;
	plan->moved = plan->moved > plan->added ? plan->moved - plan->added : 0;
	snprintf(msg, mlen, "%u of %u layers change: +%u replicas, %u moved, %u dropped, %.1f MiB "
		 "to copy; predicted max/mean %.3f -> %.3f", plan->layers_changed, plan->layers,
		 plan->added, plan->moved, plan->dropped, (double)plan->copy_bytes / (1 << 20),
		 plan->before, plan->after);
	*want_out = want;
	want = NULL;
out:
	free(load);
	free(cn);
	free(nn);
	free(cr);
	free(nr);
	free(want);
	return ret;
}

static struct placement_change *new_change(uint64_t *want, const struct moe_admin_plan *plan,
					   const char *what)
{
	struct placement_change *pc = calloc(1, sizeof(*pc));

	if (!pc) {
		free(want);
		return NULL;
	}
	pc->want = want;
	pc->steps = plan->added + plan->moved * 2 + plan->dropped;
	snprintf(pc->what, sizeof(pc->what), "%s: max/mean %.2f -> %.2f", what, plan->before,
		 plan->after);
	return pc;
}

void srv_op_rebalance(const struct admin_call *a)
{
	const struct moe_admin_rebalance *x = a->payload;
	struct server *s = a->s;
	bool all = x->layer == MOE_ADMIN_ALL_LAYERS, dry = a->flags & MOE_ADMIN_DRY_RUN;
	int pos = common_checks(a, x->layer, all), st;
	struct moe_admin_plan plan;
	struct placement_change *pc;
	uint64_t *want;
	char msg[200], what[64];

	if (pos < 0)
		return;
	st = plan_rebalance(s, all, (uint32_t)pos, x->mode, &plan, &want, msg, sizeof(msg));
	if (st) {
		srv_admin_reply(a->c, a->seq, st, msg);
		return;
	}
	if (dry || !plan.layers_changed) {
		free(want);
		srv_admin_reply_with(a->c, a->seq, 0, msg, &plan, sizeof(plan));
		return;
	}
	if (all)
		snprintf(what, sizeof(what), "rebalance all layers");
	else
		snprintf(what, sizeof(what), "rebalance layer %u", x->layer);
	pc = new_change(want, &plan, what);
	if (!pc) {
		srv_admin_reply(a->c, a->seq, MOE_ENOMEM, "out of memory");
		return;
	}
	start_change(a, pc, msg);
}

/* ---- automatic rebalancing ---------------------------------------------- */

/* The worst layer's measured max/mean rank load over the window. */
static double measured_imbalance(struct server *s, uint64_t now)
{
	const struct moe_stats *st = moe_engine_stats(s->e);
	double worst = 0;

	for (uint32_t l = 0; st && l < s->m->n_moe_layers; l++) {
		double v = moe_stats_rank_imbalance(st, l, now, 1);

		worst = v > worst ? v : worst;
	}
	return worst;
}

void srv_auto_rebalance(struct server *s)
{
	struct auto_rebalance *ar = &s->autob;
	uint64_t now = srv_now_ns(), window_ns;
	struct moe_admin_plan plan;
	struct placement_change *pc;
	const char *why = NULL;
	struct job *j;
	uint64_t *want;
	char msg[200];
	double measured;
	int st;

	if (!s->o.auto_rebalance || strcmp(moe_engine_backend(s->e), "cpu") ||
	    moe_engine_ranks(s->e) < 2 || srv_placement_busy(s))
		return;
	window_ns = (uint64_t)moe_stats_window_ms(moe_engine_stats(s->e)) * 1000000ull;
	/* the last run's outcome, measured once a whole window has passed */
	if (ar->runs && !ar->after_logged && now - ar->ended_ns >= window_ns && ar->ended_ns) {
		ar->measured_after = measured_imbalance(s, now);
		ar->after_logged = true;
		moe_log(LOG_NOTICE, "auto-rebalance %u: measured rank max/mean %.3f before, %.3f "
			"after (a window later; predicted %.3f)", ar->runs, ar->measured_before,
			ar->measured_after, ar->predicted_after);
	}
	if (ar->last_ns && now - ar->last_ns < (uint64_t)s->o.rebalance_interval_s * 1000000000ull)
		return;
	/* and not before a whole window has measured the last run's effect:
	 * the next decision is made on load the last one shaped */
	if (ar->runs && !ar->after_logged)
		return;
	measured = measured_imbalance(s, now);
	if (measured < s->o.rebalance_threshold)
		return;
	ar->last_ns = now; /* (planned or not, not again before the interval) */
	st = plan_rebalance(s, true, 0, MOE_PLAN_KIND_KEEP, &plan, &want, msg, sizeof(msg));
	if (st || !plan.layers_changed || plan.after >= measured) {
		if (!st)
			free(want);
		moe_log(LOG_INFO, "auto-rebalance: measured rank max/mean %.3f >= %.2f, but no "
			"plan does better: %s", measured, s->o.rebalance_threshold, msg);
		return;
	}
	pc = new_change(want, &plan, "auto-rebalance");
	if (!pc)
		return;
	st = srv_job_start(s, NULL, MOE_ADMIN_REBALANCE, 0, pc, &j, &why);
	if (st) {
		srv_placement_change_free(pc);
		moe_log(LOG_WARNING, "auto-rebalance: cannot start: %s", why);
		return;
	}
	ar->runs++;
	ar->job = j->id;
	ar->measured_before = measured;
	ar->predicted_after = plan.after;
	ar->after_logged = false;
	ar->ended_ns = 0;
	moe_log(LOG_NOTICE, "auto-rebalance %u (job %u): measured rank max/mean %.3f over the last "
		"%.0f s (threshold %.2f): %s", ar->runs, j->id, measured, (double)window_ns / 1e9,
		s->o.rebalance_threshold, msg);
}
