/* daemon/engine/steps.c — a batch on step backends' ranks: each round (a
 * chunk of the batch) split evenly over the ranks alive, the stages of
 * backend.h run on every rank at once (one driver thread each; with one
 * rank on the calling thread), the rows exchanged through the transport
 * between them, and a rank whose stage fails taken out (lost_rank.c) and
 * the round run again without it.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "daemon/engine/engine_internal.h"
#include "daemon/engine/stats.h"
#include "daemon/engine/threadpool.h"

enum stage { ST_DISPATCH, ST_EXPERTS, ST_COMBINE };

struct stage_ctx {
	struct moe_engine *e;
	enum stage which;
	int ret[MOE_MAX_RANKS];
};

static int run_stage(struct moe_engine *e, uint32_t r, enum stage which)
{
	struct moe_rank *rk = &e->ranks[r];
	struct moe_stage *st = &e->st[r];
	uint64_t t0;
	int ret;

	if (atomic_load_explicit(&e->dead[r], memory_order_relaxed))
		return 0; /* (no tokens, no rows: its counts stay 0) */
	if (which == ST_EXPERTS && e->rank_fault_at && r == e->rank_fault &&
	    e->batches == e->rank_fault_at)
		return -EIO; /* the test hook: this rank fails */
	switch (which) {
	case ST_DISPATCH:
		return rk->ops->dispatch(rk, e->m, st);
	case ST_EXPERTS:
		t0 = now_ns();
		ret = rk->ops->experts(rk, e->m, st);
		st->busy_ns = now_ns() - t0;
		return ret;
	case ST_COMBINE:
		rk->ops->combine(rk, e->m, st);
		return 0;
	}
	return -EINVAL;
}

static void stage_task(void *arg, uint32_t r, uint32_t worker)
{
	struct stage_ctx *c = arg;

	(void)worker;
	c->ret[r] = run_stage(c->e, r, c->which);
}

/* One stage on every rank at once (one driver thread each); the first
 * rank's error, if any. */
static int on_ranks(struct moe_engine *e, enum stage which)
{
	struct stage_ctx c = {e, which, {0}};

	if (e->n_ranks == 1) {
		int ret = run_stage(e, 0, which);

		e->failed_rank = ret ? 0 : -1;
		return ret;
	}
	moe_pool_run(e->driver, e->n_ranks, stage_task, &c);
	for (uint32_t r = 0; r < e->n_ranks; r++) {
		if (c.ret[r]) {
			e->failed_rank = (int)r;
			return c.ret[r];
		}
	}
	return 0;
}

/* Rows per peer from the per-(peer, slot) counts. */
static void peer_rows(const uint32_t *counts, uint32_t R, uint32_t S, uint32_t *rows)
{
	for (uint32_t p = 0; p < R; p++) {
		rows[p] = 0;
		for (uint32_t s = 0; s < S; s++)
			rows[p] += counts[p * S + s];
	}
}

/* dir 0: the rows and their weights to the ranks that run them; dir 1:
 * the results back into the senders' send buffers. */
static int exchange(struct moe_engine *e, int dir)
{
	uint32_t R = e->n_ranks, S = e->stride;
	size_t row = (size_t)e->m->hidden * sizeof(float);
	struct moe_a2a a[MOE_MAX_RANKS];
	uint64_t t0 = now_ns();
	int ret = 0;

	if (!dir) {
		const uint32_t *send[MOE_MAX_RANKS];
		uint32_t *recv[MOE_MAX_RANKS];

		for (uint32_t r = 0; r < R; r++) {
			send[r] = e->ranks[r].xb.send_counts;
			recv[r] = e->ranks[r].xb.recv_counts;
		}
		ret = e->tr->ops->exchange_counts(e->tr, send, recv, S);
		for (uint32_t r = 0; r < R && !ret; r++) {
			struct moe_xbuf *xb = &e->ranks[r].xb;

			peer_rows(xb->send_counts, R, S, xb->send_rows);
			peer_rows(xb->recv_counts, R, S, xb->recv_rows);
		}
		for (uint32_t r = 0; r < R; r++) {
			struct moe_xbuf *xb = &e->ranks[r].xb;

			a[r] = (struct moe_a2a){xb->send, xb->send_rows, xb->recv, xb->recv_rows};
		}
		if (!ret)
			ret = e->tr->ops->alltoallv(e->tr, a, row);
		for (uint32_t r = 0; r < R; r++) {
			struct moe_xbuf *xb = &e->ranks[r].xb;

			a[r] = (struct moe_a2a){xb->send_scale, xb->send_rows, xb->recv_scale,
						xb->recv_rows};
		}
		if (!ret)
			ret = e->tr->ops->alltoallv(e->tr, a, sizeof(float));
	} else {
		for (uint32_t r = 0; r < R; r++) {
			struct moe_xbuf *xb = &e->ranks[r].xb;

			a[r] = (struct moe_a2a){xb->ret, xb->recv_rows, xb->send, xb->send_rows};
		}
		ret = e->tr->ops->alltoallv(e->tr, a, row);
	}
	atomic_fetch_add_explicit(&e->transport_ns, now_ns() - t0, memory_order_relaxed);
	return ret;
}

/* The dispatch stage's wall time split into convert, router and dispatch:
 * the first two as the slowest rank measured them, the rest dispatch. */
static void stage_split(struct moe_engine *e, struct moe_stage_times *tm, uint64_t wall)
{
	uint64_t cv = 0, rt = 0;

	for (uint32_t r = 0; r < e->n_ranks; r++) {
		if (e->st[r].convert_ns + e->st[r].route_ns > cv + rt) {
			cv = e->st[r].convert_ns;
			rt = e->st[r].route_ns;
		}
	}
	if (cv + rt > wall) /* (clock granularity) */
		wall = cv + rt;
	tm->ns[MOE_STAGE_CONVERT] += cv;
	tm->ns[MOE_STAGE_ROUTER] += rt;
	tm->ns[MOE_STAGE_DISPATCH] += wall - cv - rt;
}

/* The batch on the ranks, a chunk at a time: each alive rank's share of
 * the chunk dispatched, exchanged, run, returned and combined. No output
 * is written before every rank's dispatch and experts have succeeded; a
 * rank that fails there is taken out and the chunk runs again without it
 * (on the epoch lose_rank publishes, pinned here until the batch ends). */
int eng_forward_steps(struct moe_engine *e, struct moe_epoch *ep, uint32_t l,
			 const struct moe_batch *b, const struct moe_seg *segs, uint32_t n_segs,
			 char *err)
{
	const struct moe_model *m = e->m;
	uint32_t R = e->n_ranks, S = e->stride, K = m->top_k, n = b->n_tokens;
	struct moe_epoch *own = NULL; /* after a lost rank */
	struct layer_view view;
	struct moe_stage_times tm = {{0}};
	uint64_t t0;
	int ret = 0;

	e->batches++;
	/* an epoch pinned before a rank was lost still names it (a request
	 * split in pieces, a batch gathered meanwhile): the batch runs on the
	 * placement without it */
	if (e->n_dead && ep->id < e->loss_epoch)
		ep = own = moe_epoch_acquire(e);
	eng_view(e, ep, l, &view);
	for (uint32_t c0 = 0; c0 < n && !ret;) {
		uint32_t nc, chunk, alive[MOE_MAX_RANKS], na = 0;

		for (uint32_t r = 0; r < R; r++)
			if (!atomic_load_explicit(&e->dead[r], memory_order_relaxed))
				alive[na++] = r;
		/* a rank's buffers hold ceil(chunk / R) tokens: with ranks
		 * lost, the rounds get smaller */
		chunk = (e->chunk + R - 1) / R * na;
		chunk = chunk < e->chunk ? chunk : e->chunk;
		nc = n - c0 < chunk ? n - c0 : chunk;
		for (uint32_t r = 0; r < R; r++)
			e->st[r] = (struct moe_stage){.t0 = c0, .n = 0};
		for (uint32_t i = 0; i < na; i++) {
			uint32_t r = alive[i];
			uint32_t a = c0 + (uint32_t)((uint64_t)nc * i / na);
			uint32_t z = c0 + (uint32_t)((uint64_t)nc * (i + 1) / na);

			e->st[r] = (struct moe_stage){
				.ls = view.ls[r],
				.segs = segs,
				.n_segs = n_segs,
				.t0 = a,
				.n = z - a,
				.ids = e->ids + (size_t)a * K,
				.w = e->w + (size_t)a * K,
				.place = ep->placement,
				.layer = l,
				.slots = view.slots[r],
			};
		}
		t0 = now_ns();
		ret = on_ranks(e, ST_DISPATCH);
		stage_split(e, &tm, now_ns() - t0);
		if (ret) {
			ret = moe_err(err, ret, "routing or dispatch failed");
			break;
		}
		t0 = now_ns();
		if (R > 1) {
			ret = exchange(e, 0);
			tm.ns[MOE_STAGE_EXCHANGE] += now_ns() - t0;
			if (ret) {
				ret = moe_err(err, ret, "the %s transport failed", e->tr->ops->name);
				break;
			}
		} else {
			memcpy(e->ranks[0].xb.recv_counts, e->ranks[0].xb.send_counts,
			       S * sizeof(uint32_t));
		}
		/* (never rows for a lost rank: its stages do not run) */
		for (uint32_t r = 0; r < R && e->n_dead; r++) {
			if (!atomic_load_explicit(&e->dead[r], memory_order_relaxed))
				continue;
			for (uint32_t s = 0; s < R * S; s++)
				if (e->ranks[r].xb.recv_counts[s]) {
					ret = moe_err(err, -EPROTO, "rows for lost rank %u", r);
					goto out;
				}
		}
		t0 = now_ns();
		ret = on_ranks(e, ST_EXPERTS);
		tm.ns[MOE_STAGE_EXPERTS] += now_ns() - t0;
		/* a rank lost (-EIO: the test hook; a device rank's sticky
		 * error), not a refusal of the work itself */
		if ((ret == -EIO || ret == -ENOTRECOVERABLE) && e->failed_rank >= 0 &&
		    !e->device) {
			char why[96];

			snprintf(why, sizeof(why), "its expert stage failed: %s", strerror(-ret));
			ret = eng_lose_rank(e, (uint32_t)e->failed_rank, why, err);
			if (ret)
				break;
			if (own)
				moe_epoch_release(own);
			ep = own = moe_epoch_acquire(e);
			eng_view(e, ep, l, &view);
			continue; /* the same chunk again */
		}
		if (ret) {
			ret = moe_err(err, ret, "expert FFNs failed");
			break;
		}
		{
			uint64_t now = now_ns();

			for (uint32_t k = 0; k < R; k++) {
				uint32_t rows = 0;

				for (uint32_t r = 0; r < R; r++)
					for (uint32_t s = 0; s < S; s++)
						rows += e->ranks[r].xb.send_counts[k * S + s];
				moe_stats_rank(e->stats, l, k, rows, e->st[k].busy_ns, now);
			}
		}
		if (R > 1) {
			t0 = now_ns();
			ret = exchange(e, 1);
			tm.ns[MOE_STAGE_EXCHANGE] += now_ns() - t0;
			if (ret) {
				ret = moe_err(err, ret, "the %s transport failed", e->tr->ops->name);
				break;
			}
		}
		t0 = now_ns();
		on_ranks(e, ST_COMBINE);
		tm.ns[MOE_STAGE_COMBINE] += now_ns() - t0;
		c0 += nc;
	}
	if (!ret && b->times)
		*b->times = tm;
out:
	e->ran_epoch = ep->id;
	if (own)
		moe_epoch_release(own);
	return ret;
}
