/* daemon/engine/rebalance.c — see rebalance.h. */
#include "daemon/engine/rebalance.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GAIN MOE_PLAN_MIN_GAIN
#define NONE	UINT32_MAX

/* A replica (a unit of load) and its key in the sort order of packing. */
struct unit {
	double w;	 /* its share of the expert's load */
	uint32_t e, r, s; /* expert; rank (NONE while unplaced); slot */
};

struct unit_key {
	double w;
	uint32_t e, u;
};

/* The planner's workspace for one layer. Units (replicas) are numbered in
 * expert order: expert e's are base[e] .. base[e] + n[e] - 1. */
struct ws {
	const double *load;
	uint32_t E, R, S, cap; /* cap: most replicas of one expert */
	const uint8_t *cur_n;  /* NULL: no current placement */
	const struct moe_replica *cur_rep;
	uint8_t *n;	   /* [E] replicas per expert */
	uint32_t *base;	   /* [E] its first unit */
	uint32_t *seq;	   /* [max_add] experts in the order they get replicas */
	uint32_t nu;	   /* units */
	struct unit *u;	   /* [U] */
	struct unit_key *keys; /* [U] */
	uint8_t *holds;	   /* [R * E] rank r holds expert e */
	uint8_t *used;	   /* [R * S] slots the plan uses */
	uint8_t *cur_used; /* [R * S] slots the current placement uses */
	uint8_t *out_n;	   /* [E] the plan, before it is written out */
	struct moe_replica *out_rep; /* [E * MOE_MAX_REPLICAS] */
	char *mem;		     /* where the arrays are carved from */
	double rl[MOE_MAX_RANKS];    /* rank loads */
	uint32_t rc[MOE_MAX_RANKS];  /* units per rank */
};

static int check_in(const struct moe_load_in *in)
{
	if (!in || !in->load || !in->n_experts || !in->n_ranks || in->n_ranks > MOE_MAX_RANKS ||
	    in->slots_per_rank > 65535 ||
	    (uint64_t)in->n_ranks * in->slots_per_rank < in->n_experts)
		return -EINVAL;
	for (uint32_t e = 0; e < in->n_experts; e++)
		if (!(in->load[e] >= 0) || isinf(in->load[e]))
			return -EINVAL;
	return 0;
}

/* The predicted max/mean of a placement row (1 with no load) into *mm;
 * -EINVAL if the row has a bad count or names a rank out of range. */
static int row_score(const struct moe_load_in *in, const uint8_t *n,
		     const struct moe_replica *rep, double *mm)
{
	double rl[MOE_MAX_RANKS] = {0}, total = 0, mx = 0;

	for (uint32_t e = 0; e < in->n_experts; e++) {
		const struct moe_replica *x = &rep[(size_t)e * MOE_MAX_REPLICAS];

		if (n[e] < 1 || n[e] > MOE_MAX_REPLICAS)
			return -EINVAL;
		for (uint32_t i = 0; i < n[e]; i++) {
			if (x[i].rank >= in->n_ranks)
				return -EINVAL;
			rl[x[i].rank] += in->load[e] / n[e];
		}
		total += in->load[e];
	}
	for (uint32_t r = 0; r < in->n_ranks; r++)
		mx = rl[r] > mx ? rl[r] : mx;
	*mm = total > 0 ? mx / (total / in->n_ranks) : 1.0;
	return 0;
}

double moe_plan_max_mean(const struct moe_load_in *in, const uint8_t *n_replicas,
			 const struct moe_replica *rep)
{
	double mm;

	if (check_in(in) || !n_replicas || !rep || row_score(in, n_replicas, rep, &mm))
		return NAN;
	return mm;
}

/* 0 if the current row is a valid placement for these ranks and slots (as
 * moe_place_validate); marks the slots it uses in w->cur_used. */
static int check_cur(struct ws *w)
{
	memset(w->cur_used, 0, (size_t)w->R * w->S);
	for (uint32_t e = 0; e < w->E; e++) {
		const struct moe_replica *x = &w->cur_rep[(size_t)e * MOE_MAX_REPLICAS];

		if (w->cur_n[e] < 1 || w->cur_n[e] > MOE_MAX_REPLICAS)
			return -EINVAL;
		for (uint32_t i = 0; i < w->cur_n[e]; i++) {
			size_t s = (size_t)x[i].rank * w->S + x[i].slot;

			if (x[i].rank >= w->R || x[i].slot >= w->S || w->cur_used[s])
				return -EINVAL;
			w->cur_used[s] = 1;
		}
	}
	return 0;
}

/* The slot of expert e on rank r in the current placement, or NONE. */
static uint32_t cur_slot(const struct ws *w, uint32_t e, uint32_t r)
{
	const struct moe_replica *x;

	if (!w->cur_n)
		return NONE;
	x = &w->cur_rep[(size_t)e * MOE_MAX_REPLICAS];
	for (uint32_t i = 0; i < w->cur_n[e]; i++)
		if (x[i].rank == r)
			return x[i].slot;
	return NONE;
}

/* 1 if expert e on rank r needs its weights copied there. */
static int copy_cost(const struct ws *w, uint32_t e, uint32_t r)
{
	return cur_slot(w, e, r) == NONE;
}

static void place(struct ws *w, uint32_t u, uint32_t r)
{
	w->u[u].r = r;
	w->rl[r] += w->u[u].w;
	w->rc[r]++;
	w->holds[(size_t)r * w->E + w->u[u].e] = 1;
}

static void unplace(struct ws *w, uint32_t u)
{
	uint32_t r = w->u[u].r;

	w->rl[r] -= w->u[u].w;
	w->rc[r]--;
	w->holds[(size_t)r * w->E + w->u[u].e] = 0;
	w->u[u].r = NONE;
}

static int cmp_key(const void *pa, const void *pb)
{
	const struct unit_key *a = pa, *b = pb;

	if (a->w != b->w)
		return a->w > b->w ? -1 : 1;
	if (a->e != b->e)
		return a->e < b->e ? -1 : 1;
	return a->u < b->u ? -1 : a->u > b->u;
}

/* Step 1: the order in which experts get their extra replicas (w->seq);
 * returns its length. */
static uint32_t replication_seq(struct ws *w, uint32_t max_add)
{
	uint32_t k = 0;

	for (uint32_t e = 0; e < w->E; e++)
		w->n[e] = 1;
	while (k < max_add) {
		uint32_t best = NONE;
		double bw = 0;

		for (uint32_t e = 0; e < w->E; e++) {
			if (w->n[e] < w->cap && w->load[e] / w->n[e] > bw) {
				best = e;
				bw = w->load[e] / w->n[e];
			}
		}
		if (best == NONE)
			break;
		w->n[best]++;
		w->seq[k++] = best;
	}
	return k;
}

/* Every rank with a free slot holds unit u's expert: move a replica of
 * another expert from a full rank that does not hold it to one of those
 * ranks, and put u in its place (the pair with the lowest max of the two
 * ranks). Such a pair exists: u's expert is on at most R - 1 ranks, so some
 * rank r2 lacks it (and is full); a rank r with a free slot holds at most
 * S - 1 replicas, one of them u's expert's, so at least one of the S
 * experts on r2 is missing from r. */
static int repair(struct ws *w, uint32_t u)
{
	uint32_t e = w->u[u].e, by = NONE, to = NONE, r2;
	double bm = INFINITY;

	for (uint32_t r = 0; r < w->R; r++) {
		if (w->rc[r] >= w->S)
			continue;
		for (uint32_t y = 0; y < w->nu; y++) {
			double m;

			r2 = w->u[y].r;
			if (r2 == NONE || w->holds[(size_t)r2 * w->E + e] ||
			    w->holds[(size_t)r * w->E + w->u[y].e])
				continue;
			m = fmax(w->rl[r] + w->u[y].w, w->rl[r2] - w->u[y].w + w->u[u].w);
			if (m < bm) {
				bm = m;
				by = y;
				to = r;
			}
		}
	}
	if (by == NONE)
		return -ENOSPC; /* not reached (see above) */
	r2 = w->u[by].r;
	unplace(w, by);
	place(w, by, to);
	place(w, u, r2);
	return 0;
}

/* Step 2 for one unit: the lightest rank with a free slot that does not
 * hold its expert (ties: one that holds the expert now, then the lower). */
static int pack_unit(struct ws *w, uint32_t u)
{
	uint32_t e = w->u[u].e, best = NONE;

	for (uint32_t r = 0; r < w->R; r++) {
		if (w->rc[r] >= w->S || w->holds[(size_t)r * w->E + e])
			continue;
		if (best == NONE || w->rl[r] < w->rl[best] ||
		    (w->rl[r] == w->rl[best] && !copy_cost(w, e, r) && copy_cost(w, e, best)))
			best = r;
	}
	if (best == NONE)
		return repair(w, u);
	place(w, u, best);
	return 0;
}

/* Step 3: moves and swaps off the heaviest rank while they lower it. A
 * candidate x < nu is a swap with unit x, x >= nu a move to rank x - nu. */
static void improve(struct ws *w)
{
	for (uint32_t it = 0; it < 4 * w->nu + 16; it++) {
		uint32_t h = 0, ba = NONE, bx = NONE, to;
		double top, bm = 0;
		int bc = 0;

		for (uint32_t r = 1; r < w->R; r++)
			h = w->rl[r] > w->rl[h] ? r : h;
		top = w->rl[h];
		for (uint32_t a = 0; a < w->nu; a++) {
			const struct unit *ua = &w->u[a];
			int ca;

			if (ua->r != h || !(ua->w > 0))
				continue;
			ca = copy_cost(w, ua->e, h);
			for (uint32_t x = 0; x < w->nu + w->R; x++) {
				const struct unit *ub = x < w->nu ? &w->u[x] : NULL;
				uint32_t r = ub ? ub->r : x - w->nu;
				double d = ua->w - (ub ? ub->w : 0);
				double m = fmax(top - d, w->rl[r] + d);
				int c;

				if (r == h || !(d > 0) || !(m < top - GAIN * top) ||
				    w->holds[(size_t)r * w->E + ua->e] ||
				    (ub ? w->holds[(size_t)h * w->E + ub->e] : w->rc[r] >= w->S))
					continue;
				c = copy_cost(w, ua->e, r) - ca;
				if (ub)
					c += copy_cost(w, ub->e, h) - copy_cost(w, ub->e, r);
				if (ba == NONE || m < bm || (m == bm && c < bc)) {
					ba = a;
					bx = x;
					bm = m;
					bc = c;
				}
			}
		}
		if (ba == NONE)
			return;
		to = bx < w->nu ? w->u[bx].r : bx - w->nu;
		unplace(w, ba);
		if (bx < w->nu) {
			unplace(w, bx);
			place(w, bx, h);
		}
		place(w, ba, to);
	}
}

/* MOE_PLAN_KEEP: units placed where the current placement has them. */
static void keep_current(struct ws *w)
{
	uint32_t nk = 0;

	for (uint32_t pass = 0; pass < 2; pass++) {
		for (uint32_t i = 0; i < (pass ? nk : w->E); i++) {
			uint32_t e = pass ? w->keys[i].e : i, cr[MOE_MAX_REPLICAS], m = 0;
			const struct moe_replica *x = &w->cur_rep[(size_t)e * MOE_MAX_REPLICAS];

			/* its current ranks, each once */
			for (uint32_t j = 0; j < w->cur_n[e]; j++)
				if (cur_slot(w, e, x[j].rank) == x[j].slot)
					cr[m++] = x[j].rank;
			if (!pass && m > w->n[e]) {
				/* fewer replicas than now: after the others, heaviest first */
				w->keys[nk++] = (struct unit_key){w->load[e], e, 0};
				continue;
			}
			for (uint32_t k = 0; k < w->n[e] && k < m; k++) {
				uint32_t best = k;

				for (uint32_t j = k + 1; pass && j < m; j++)
					best = w->rl[cr[j]] < w->rl[cr[best]] ? j : best;
				if (best != k) {
					uint32_t t = cr[k];

					cr[k] = cr[best];
					cr[best] = t;
				}
				place(w, w->base[e] + k, cr[k]);
			}
		}
		if (!pass)
			qsort(w->keys, nk, sizeof(*w->keys), cmp_key);
	}
}

/* Packs the layer with the first k extra replicas of w->seq; returns the
 * highest rank load, or a negative errno. */
static int pack(struct ws *w, enum moe_plan_mode mode, uint32_t k, double *max)
{
	uint32_t nk = 0;

	for (uint32_t e = 0; e < w->E; e++)
		w->n[e] = 1;
	for (uint32_t i = 0; i < k; i++)
		w->n[w->seq[i]]++;
	w->nu = 0;
	for (uint32_t e = 0; e < w->E; e++) {
		w->base[e] = w->nu;
		for (uint32_t i = 0; i < w->n[e]; i++)
			w->u[w->nu++] = (struct unit){w->load[e] / w->n[e], e, NONE, NONE};
	}
	memset(w->holds, 0, (size_t)w->R * w->E);
	memset(w->rl, 0, sizeof(w->rl));
	memset(w->rc, 0, sizeof(w->rc));
	if (mode == MOE_PLAN_KEEP)
		keep_current(w);
	for (uint32_t u = 0; u < w->nu; u++)
		if (w->u[u].r == NONE)
			w->keys[nk++] = (struct unit_key){w->u[u].w, w->u[u].e, u};
	qsort(w->keys, nk, sizeof(*w->keys), cmp_key);
	for (uint32_t i = 0; i < nk; i++) {
		int ret = pack_unit(w, w->keys[i].u);

		if (ret)
			return ret;
	}
	improve(w);
	/* the loads afresh, without the drift of the moves' additions */
	memset(w->rl, 0, sizeof(w->rl));
	for (uint32_t u = 0; u < w->nu; u++)
		w->rl[w->u[u].r] += w->u[u].w;
	*max = 0;
	for (uint32_t r = 0; r < w->R; r++)
		*max = w->rl[r] > *max ? w->rl[r] : *max;
	return 0;
}

/* The lowest slot of rank r free in the plan (and in the current
 * placement too, if both), or NONE. */
static uint32_t free_slot(const struct ws *w, uint32_t r, int both)
{
	for (uint32_t s = 0; s < w->S; s++) {
		size_t i = (size_t)r * w->S + s;

		if (!w->used[i] && !(both && w->cur_used[i]))
			return s;
	}
	return NONE;
}

/* Slots for the packed units, then the rows into w->out_n, w->out_rep. */
static void emit(struct ws *w)
{
	/* pass 0: the slot the current placement has the expert in on that
	 * rank; 1: the lowest slot free in the plan and now; 2: in the plan */
	memset(w->used, 0, (size_t)w->R * w->S);
	for (int pass = 0; pass < 3; pass++) {
		for (uint32_t i = 0; i < w->nu; i++) {
			struct unit *u = &w->u[i];

			if (u->s != NONE)
				continue;
			u->s = pass ? free_slot(w, u->r, pass == 1) : cur_slot(w, u->e, u->r);
			if (u->s != NONE)
				w->used[(size_t)u->r * w->S + u->s] = 1;
		}
	}
	memset(w->out_rep, 0, (size_t)w->E * MOE_MAX_REPLICAS * sizeof(*w->out_rep));
	for (uint32_t e = 0; e < w->E; e++) {
		struct moe_replica *o = &w->out_rep[(size_t)e * MOE_MAX_REPLICAS];
		uint32_t b = w->base[e], n = w->n[e], k = 0;
		uint8_t done[MOE_MAX_REPLICAS] = {0};

		/* those where the current placement had them, in its order */
		for (uint32_t j = 0; w->cur_n && j < w->cur_n[e]; j++) {
			const struct moe_replica *x = &w->cur_rep[(size_t)e * MOE_MAX_REPLICAS + j];

			for (uint32_t i = 0; i < n; i++) {
				const struct unit *u = &w->u[b + i];

				if (!done[i] && u->r == x->rank && u->s == x->slot) {
					o[k++] = *x;
					done[i] = 1;
				}
			}
		}
		/* the others by rank */
		for (uint32_t r = 0; r < w->R; r++)
			for (uint32_t i = 0; i < n; i++)
				if (!done[i] && w->u[b + i].r == r)
					o[k++] = (struct moe_replica){(uint16_t)r,
								      (uint16_t)w->u[b + i].s};
		w->out_n[e] = (uint8_t)n;
	}
}

static size_t r8(size_t n)
{
	return (n + 7) & ~(size_t)7;
}

/* n bytes off *p, 8-byte aligned. */
static void *carve(char **p, size_t n)
{
	void *q = *p;

	*p += r8(n);
	return q;
}

/* The workspace's arrays, in one allocation (w->mem, freed by the caller). */
static int ws_init(struct ws *w, const struct moe_load_in *in, uint32_t max_add)
{
	size_t E = in->n_experts, U = E + max_add, RS = (size_t)in->n_ranks * in->slots_per_rank;
	size_t rows = E * MOE_MAX_REPLICAS * sizeof(*w->out_rep);
	char *p;

	w->load = in->load;
	w->E = in->n_experts;
	w->R = in->n_ranks;
	w->S = in->slots_per_rank;
	w->cap = w->R < MOE_MAX_REPLICAS ? w->R : MOE_MAX_REPLICAS;
	p = w->mem = malloc(r8(U * sizeof(*w->u)) + r8(U * sizeof(*w->keys)) + r8(rows) +
			    r8(E * sizeof(*w->base)) + r8((max_add + 1) * sizeof(*w->seq)) +
			    2 * r8(E) + r8(E * w->R) + 2 * r8(RS));
	if (!p)
		return -ENOMEM;
	w->u = carve(&p, U * sizeof(*w->u));
	w->keys = carve(&p, U * sizeof(*w->keys));
	w->out_rep = carve(&p, rows);
	w->base = carve(&p, E * sizeof(*w->base));
	w->seq = carve(&p, (max_add + 1) * sizeof(*w->seq));
	w->n = carve(&p, E);
	w->out_n = carve(&p, E);
	w->holds = carve(&p, E * w->R);
	w->used = carve(&p, RS);
	w->cur_used = carve(&p, RS);
	memset(w->cur_used, 0, RS);
	return 0;
}

int moe_plan_layer(const struct moe_load_in *in, enum moe_plan_mode mode, const uint8_t *cur_n,
		   const struct moe_replica *cur_rep, uint8_t *n_replicas, struct moe_replica *rep)
{
	struct ws w = {0};
	uint32_t max_add, cap, k_all, best_k = 0;
	double total = 0, floor = 0, best = 0, mx;
	size_t row = (size_t)MOE_MAX_REPLICAS * sizeof(*rep);
	int ret = check_in(in);

	if (ret)
		return ret;
	if (!n_replicas || !rep || (mode != MOE_PLAN_FULL && mode != MOE_PLAN_KEEP) ||
	    !cur_n != !cur_rep || (mode == MOE_PLAN_KEEP && !cur_n))
		return -EINVAL;
	cap = in->n_ranks < MOE_MAX_REPLICAS ? in->n_ranks : MOE_MAX_REPLICAS;
	max_add = in->n_ranks * in->slots_per_rank - in->n_experts;
	if ((uint64_t)max_add > (uint64_t)in->n_experts * (cap - 1))
		max_add = in->n_experts * (cap - 1);
	ret = ws_init(&w, in, max_add);
	if (ret)
		return ret;
	w.cur_n = cur_n;
	w.cur_rep = cur_rep;
	if (cur_n && (ret = check_cur(&w)))
		goto out;
	k_all = replication_seq(&w, max_add);
	/* no count does better than the mean, nor than the heaviest replica
	 * with every replica of the sequence added */
	for (uint32_t e = 0; e < in->n_experts; e++) {
		total += in->load[e];
		floor = fmax(floor, in->load[e] / w.n[e]);
	}
	floor = fmax(floor, total / in->n_ranks);
	for (uint32_t k = 0; k <= k_all; k++) {
		ret = pack(&w, mode, k, &mx);
		if (ret)
			goto out;
		if (!k || mx < best - GAIN * best) {
			best = mx;
			best_k = k;
		}
		if (best <= floor * (1 + GAIN))
			break;
	}
	ret = pack(&w, mode, best_k, &mx);
	if (ret)
		goto out;
	emit(&w);
	if (cur_n) {
		double plan = moe_plan_max_mean(in, w.out_n, w.out_rep);
		double now = moe_plan_max_mean(in, cur_n, cur_rep);

		if (!(plan < now - GAIN * now)) {
			memcpy(w.out_n, cur_n, in->n_experts);
			memcpy(w.out_rep, cur_rep, in->n_experts * row);
		}
	}
	memcpy(n_replicas, w.out_n, in->n_experts);
	memcpy(rep, w.out_rep, in->n_experts * row);
out:
	free(w.mem);
	return ret;
}

/* Adds what the plan of one layer changes to *s. */
static void diff_layer(uint32_t E, const uint8_t *cn, const struct moe_replica *crep,
		       const uint8_t *n, const struct moe_replica *rep, struct moe_plan_summary *s)
{
	uint32_t changed = 0;

	for (uint32_t e = 0; e < E; e++) {
		const struct moe_replica *c = &crep[(size_t)e * MOE_MAX_REPLICAS];
		const struct moe_replica *p = &rep[(size_t)e * MOE_MAX_REPLICAS];
		uint32_t copies = 0, add = n[e] > cn[e] ? n[e] - cn[e] : 0;

		for (uint32_t i = 0; i < n[e]; i++) {
			uint32_t j = 0;

			while (j < cn[e] && c[j].rank != p[i].rank)
				j++;
			copies += j == cn[e];
		}
		s->added += add;
		s->dropped += cn[e] > n[e] ? cn[e] - n[e] : 0;
		s->copies += copies;
		s->moved += copies > add ? copies - add : 0;
		changed |= copies || cn[e] > n[e];
	}
	s->layers_changed += changed;
}

int moe_place_plan(const struct moe_placement *cur, const double *loads, enum moe_plan_mode mode,
		   struct moe_placement **out, struct moe_plan_summary *sum)
{
	struct moe_plan_summary s = {0};
	struct moe_placement *p = NULL;
	uint32_t E;
	int ret;

	if (!cur || !loads || !out || !cur->n_layers || !cur->n_experts)
		return -EINVAL;
	E = cur->n_experts;
	ret = moe_place_copy(cur, &p);
	for (uint32_t l = 0; l < cur->n_layers && !ret; l++) {
		struct moe_load_in in = {.n_experts = E, .n_ranks = cur->n_ranks,
					 .slots_per_rank = cur->slots_per_rank};
		const uint8_t *cn = cur->n_replicas + (size_t)l * E;
		const struct moe_replica *cr = cur->rep + (size_t)l * E * MOE_MAX_REPLICAS;
		uint8_t *n = p->n_replicas + (size_t)l * E;
		struct moe_replica *r = p->rep + (size_t)l * E * MOE_MAX_REPLICAS;
		double before, after;

		in.load = loads + (size_t)l * E;
		ret = moe_plan_layer(&in, mode, cn, cr, n, r);
		if (ret)
			break;
		before = moe_plan_max_mean(&in, cn, cr);
		after = moe_plan_max_mean(&in, n, r);
		s.before += before / cur->n_layers;
		s.after += after / cur->n_layers;
		s.worst_before = fmax(s.worst_before, before);
		s.worst_after = fmax(s.worst_after, after);
		diff_layer(E, cn, cr, n, r, &s);
	}
	if (ret) {
		moe_place_free(p);
		return ret;
	}
	if (sum)
		*sum = s;
	*out = p;
	return 0;
}
