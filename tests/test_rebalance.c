/* tests/test_rebalance.c — the rebalancing planner. Property tests on
 * random and skewed loads (every plan a valid placement, no two replicas of
 * an expert on one rank, kept replicas keep their slots, the summary right,
 * never predicted worse than the current placement; both modes, from the
 * initial placement and from a replicated one), the figures of the issue
 * (E=64, R=4, 2 spare slots, Zipf 1.0), bad input, and small cases checked
 * by hand. Predictions are recomputed here from first principles. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/engine/placement.h"
#include "daemon/engine/rebalance.h"
#include "tests/testutil.h"
#include "tools/synth.h"

#define NL 2 /* layers per placement in the property tests */

enum load_kind { LOAD_UNIFORM, LOAD_ZIPF05, LOAD_ZIPF10, LOAD_ZIPF15, LOAD_ONE, LOAD_ZEROS, KINDS };

static const char *const kind_name[KINDS] = {"uniform", "zipf 0.5", "zipf 1.0",
					      "zipf 1.5", "one expert", "1/3 zeros"};

static void shuffle(struct moe_rng *rng, double *x, uint32_t n)
{
	for (uint32_t i = n; i > 1; i--) {
		uint32_t j = (uint32_t)(moe_rng_next(rng) % i);
		double t = x[i - 1];

		x[i - 1] = x[j];
		x[j] = t;
	}
}

/* Zipf loads are shuffled over the experts: the popular ones anywhere. */
static void fill_load(struct moe_rng *rng, enum load_kind k, uint32_t E, double *load)
{
	static const double s[] = {0.5, 1.0, 1.5};

	for (uint32_t e = 0; e < E; e++) {
		if (k == LOAD_UNIFORM)
			load[e] = 1000 * moe_rng_uniform(rng);
		else if (k == LOAD_ONE)
			load[e] = 0;
		else if (k == LOAD_ZEROS)
			load[e] = moe_rng_next(rng) % 3 ? 1000 * moe_rng_uniform(rng) : 0;
		else
			load[e] = 1000 / pow(e + 1, s[k - LOAD_ZIPF05]);
	}
	if (k == LOAD_ONE)
		load[moe_rng_next(rng) % E] = 1000;
	if (k >= LOAD_ZIPF05 && k <= LOAD_ZIPF15)
		shuffle(rng, load, E);
}

/* max/mean of the ranks' loads, an expert's load split evenly over its
 * replicas; 1 when there is no load. */
static double ref_max_mean(const struct moe_placement *p, uint32_t l, const double *load)
{
	double rl[MOE_MAX_RANKS] = {0}, total = 0, mx = 0;

	for (uint32_t e = 0; e < p->n_experts; e++) {
		uint32_t n;
		const struct moe_replica *r = moe_place_get(p, l, e, &n);

		for (uint32_t i = 0; i < n; i++)
			rl[r[i].rank] += load[e] / n;
		total += load[e];
	}
	for (uint32_t r = 0; r < p->n_ranks; r++)
		mx = rl[r] > mx ? rl[r] : mx;
	return total > 0 ? mx * p->n_ranks / total : 1.0;
}

/* Every property of a plan p of cur under loads; returns the copies. */
static uint32_t check_plan(const struct moe_placement *cur, const struct moe_placement *p,
			   const double *loads, const struct moe_plan_summary *s)
{
	struct moe_plan_summary t = {0};
	uint32_t E = cur->n_experts;

	assert_int_equal(p->n_layers, cur->n_layers);
	assert_int_equal(p->n_experts, E);
	assert_int_equal(p->n_ranks, cur->n_ranks);
	assert_int_equal(p->slots_per_rank, cur->slots_per_rank);
	/* >= 1 replica each, slots in range, no slot holds two */
	assert_int_equal(moe_place_validate(p), 0);
	for (uint32_t l = 0; l < p->n_layers; l++) {
		const double *load = loads + (size_t)l * E;
		double b = ref_max_mean(cur, l, load), a = ref_max_mean(p, l, load);
		uint32_t changed = 0;
		size_t row = (size_t)E * MOE_MAX_REPLICAS;
		/* the current layer given back (which may have two replicas of
		 * an expert on one rank: moe_place_validate allows it) */
		int same = !memcmp(p->n_replicas + l * E, cur->n_replicas + l * E, E) &&
			   !memcmp(p->rep + l * row, cur->rep + l * row, row * sizeof(*p->rep));

		assert_true(a <= b + 1e-12);
		t.before += b / p->n_layers;
		t.after += a / p->n_layers;
		t.worst_before = fmax(t.worst_before, b);
		t.worst_after = fmax(t.worst_after, a);
		for (uint32_t e = 0; e < E; e++) {
			uint32_t n, cn, copies = 0;
			const struct moe_replica *r = moe_place_get(p, l, e, &n);
			const struct moe_replica *c = moe_place_get(cur, l, e, &cn);

			assert_true(n >= 1 && (same || n <= p->n_ranks));
			for (uint32_t i = 0; i < n; i++) {
				uint32_t j = 0;

				for (uint32_t k = i + 1; k < n && !same; k++)
					assert_int_not_equal(r[i].rank, r[k].rank);
				while (j < cn && c[j].rank != r[i].rank)
					j++;
				if (j == cn)
					copies++;
				else if (!same) /* kept where it was: the same slot */
					assert_int_equal(r[i].slot, c[j].slot);
			}
			t.added += n > cn ? n - cn : 0;
			t.dropped += cn > n ? cn - n : 0;
			t.copies += copies;
			assert_true(copies >= (n > cn ? n - cn : 0));
			t.moved += copies - (n > cn ? n - cn : 0);
			changed |= copies || cn > n;
		}
		t.layers_changed += changed;
	}
	assert_int_equal(s->added, t.added);
	assert_int_equal(s->dropped, t.dropped);
	assert_int_equal(s->copies, t.copies);
	assert_int_equal(s->moved, t.moved);
	assert_int_equal(s->layers_changed, t.layers_changed);
	assert_true(fabs(s->before - t.before) < 1e-9 && fabs(s->after - t.after) < 1e-9);
	assert_true(fabs(s->worst_before - t.worst_before) < 1e-9);
	assert_true(fabs(s->worst_after - t.worst_after) < 1e-9);
	return t.copies;
}

static struct moe_placement *plan_checked(const struct moe_placement *cur, const double *loads,
					  enum moe_plan_mode mode, struct moe_plan_summary *s)
{
	struct moe_placement *p = NULL;

	assert_int_equal(moe_place_plan(cur, loads, mode, &p, s), 0);
	check_plan(cur, p, loads, s);
	return p;
}

struct tally {
	uint32_t cases;
	double init, full1, keep1, before2, full2, keep2;
	uint64_t copies_full2, copies_keep2;
};

/* A random valid current placement: every expert in a random slot, then
 * replicas in random free slots (two of an expert may share a rank). */
static void random_current(struct moe_rng *rng, struct moe_placement *p)
{
	uint32_t RS = p->n_ranks * p->slots_per_rank, *slot = malloc(RS * sizeof(*slot));

	assert_non_null(slot);
	for (uint32_t l = 0; l < p->n_layers; l++) {
		for (uint32_t i = 0; i < RS; i++) {
			uint32_t j = (uint32_t)(moe_rng_next(rng) % (i + 1));

			slot[i] = slot[j];
			slot[j] = i;
		}
		for (uint32_t next = 0; next < RS; next++) {
			uint32_t e = next, s = slot[next];
			uint8_t *n;

			if (next >= p->n_experts)
				e = (uint32_t)(moe_rng_next(rng) % p->n_experts);
			n = &p->n_replicas[l * p->n_experts + e];
			if (next < p->n_experts)
				*n = 0;
			else if (*n == MOE_MAX_REPLICAS || moe_rng_next(rng) % 2)
				continue;
			p->rep[(l * p->n_experts + e) * MOE_MAX_REPLICAS + (*n)++] =
				(struct moe_replica){(uint16_t)(s / p->slots_per_rank),
						     (uint16_t)(s % p->slots_per_rank)};
		}
	}
	free(slot);
	assert_int_equal(moe_place_validate(p), 0);
}

/* One case: plans from the initial placement under l1, then from the FULL
 * plan and from a random placement under l2 (another kind of load), both
 * modes, every plan checked. */
static void run_case(struct moe_rng *rng, uint32_t E, uint32_t R, uint32_t spare,
		     enum load_kind k, struct tally *t)
{
	double *l1 = malloc(NL * E * sizeof(double)), *l2 = malloc(NL * E * sizeof(double));
	struct moe_placement *init, *f1, *k1, *f2, *k2, *one;
	struct moe_plan_summary s;
	struct moe_load_in in = {E, R, 0, l1};
	double m;

	assert_non_null(l1);
	assert_non_null(l2);
	assert_int_equal(moe_place_initial(NL, E, R, spare, &init), 0);
	for (uint32_t l = 0; l < NL; l++) {
		fill_load(rng, k, E, l1 + l * E);
		fill_load(rng, (enum load_kind)((k + 1 + l) % KINDS), E, l2 + l * E);
	}
	/* from the initial placement */
	f1 = plan_checked(init, l1, MOE_PLAN_FULL, &s);
	t->init += s.before;
	t->full1 += s.after;
	k1 = plan_checked(init, l1, MOE_PLAN_KEEP, &s);
	t->keep1 += s.after;
	/* from a replicated placement, the load changed */
	f2 = plan_checked(f1, l2, MOE_PLAN_FULL, &s);
	t->before2 += s.before;
	t->full2 += s.after;
	t->copies_full2 += s.copies;
	k2 = plan_checked(f1, l2, MOE_PLAN_KEEP, &s);
	t->keep2 += s.after;
	t->copies_keep2 += s.copies;
	random_current(rng, init);
	moe_place_free(plan_checked(init, l2, MOE_PLAN_FULL, &s));
	moe_place_free(plan_checked(init, l2, MOE_PLAN_KEEP, &s));
	/* FULL with no current placement: still a valid plan */
	assert_int_equal(moe_place_initial(1, E, R, spare, &one), 0);
	in.slots_per_rank = one->slots_per_rank;
	assert_int_equal(moe_plan_layer(&in, MOE_PLAN_FULL, NULL, NULL, one->n_replicas, one->rep),
			 0);
	m = ref_max_mean(one, 0, l1);
	assert_true(fabs(moe_plan_max_mean(&in, one->n_replicas, one->rep) - m) < 1e-12);
	/* (compared with itself: valid, replicas on distinct ranks) */
	check_plan(one, one, l1, &(struct moe_plan_summary){.before = m, .after = m,
							     .worst_before = m, .worst_after = m});
	t->cases++;
	moe_place_free(one);
	moe_place_free(k2);
	moe_place_free(f2);
	moe_place_free(k1);
	moe_place_free(f1);
	moe_place_free(init);
	free(l2);
	free(l1);
}

static void test_properties(void **state)
{
	static const uint32_t Es[] = {8, 16, 60, 64, 128}, Rs[] = {1, 2, 3, 4, 8};
	static const uint32_t spares[] = {0, 1, 2, 4};
	struct moe_rng rng = {20250601};
	struct tally t[KINDS] = {{0}};
	uint32_t cases = 0;

	(void)state;
	for (uint32_t a = 0; a < 5; a++)
		for (uint32_t b = 0; b < 5; b++)
			for (uint32_t c = 0; c < 4; c++)
				for (uint32_t k = 0; k < KINDS; k++, cases++)
					run_case(&rng, Es[a], Rs[b], spares[c], (enum load_kind)k,
						 &t[k]);
	printf("%u cases (E 8..128, R 1..8, spare 0..4) x %d layers, mean predicted max/mean:\n",
	       cases, NL);
	printf("  %-10s  %7s %7s %7s | %7s %7s %7s  %8s %8s\n", "load", "initial", "FULL", "KEEP",
	       "then", "FULL", "KEEP", "copies F", "copies K");
	for (uint32_t k = 0; k < KINDS; k++) {
		double n = t[k].cases;

		printf("  %-10s  %7.3f %7.3f %7.3f | %7.3f %7.3f %7.3f  %8.1f %8.1f\n",
		       kind_name[k], t[k].init / n, t[k].full1 / n, t[k].keep1 / n,
		       t[k].before2 / n, t[k].full2 / n, t[k].keep2 / n,
		       t[k].copies_full2 / n, t[k].copies_keep2 / n);
	}
	printf("  (then: the FULL plan as current, the load of the next kind; copies per case)\n");
}

/* The figures: E=64, R=4, 2 spare slots per rank, expert i's load
 * 1/(i+1). */
static void test_figures(void **state)
{
	enum { E = 64, R = 4 };
	double zipf[E], scat[E], h16 = 0, h64 = 0;
	struct moe_rng rng = {7};
	struct moe_placement *init;
	struct moe_load_in in = {E, R, 0, zipf};

	(void)state;
	for (uint32_t i = 0; i < E; i++) {
		zipf[i] = scat[i] = 1.0 / (i + 1);
		h64 += zipf[i];
		h16 += i < 16 ? zipf[i] : 0;
	}
	shuffle(&rng, scat, E);
	assert_int_equal(moe_place_initial(1, E, R, 2, &init), 0);
	in.slots_per_rank = init->slots_per_rank; /* 16 + 2 */
	for (int v = 0; v < 2; v++) {
		const double *load = v ? scat : zipf;
		struct moe_placement *full, *keep;
		struct moe_plan_summary sf, sk;
		double cur;

		in.load = load;
		cur = moe_plan_max_mean(&in, init->n_replicas, init->rep);
		/* (a): rank 0 holds experts 0..15, H(16) of H(64) */
		if (!v)
			assert_true(fabs(cur - R * h16 / h64) < 1e-12);
		full = plan_checked(init, load, MOE_PLAN_FULL, &sf);
		keep = plan_checked(init, load, MOE_PLAN_KEEP, &sk);
		printf("%s: (%c) contiguous %.3f  (c) FULL %.4f (+%u replicas, %u copies)  "
		       "(d) KEEP %.4f (+%u replicas, %u copies)\n",
		       v ? "popular experts scattered" : "popular experts adjacent",
		       v ? 'b' : 'a', cur, sf.after, sf.added, sf.copies, sk.after, sk.added,
		       sk.copies);
		assert_true(sf.after <= 1.05);
		assert_true(sk.after < cur);
		moe_place_free(keep);
		moe_place_free(full);
	}
	moe_place_free(init);
}

/* What planning a model costs: 58 layers of E=256, R=8, 4 spare slots. */
static void test_timing(void **state)
{
	enum { L = 58, E = 256, R = 8 };
	double *loads = malloc(L * E * sizeof(double));
	struct moe_rng rng = {11};
	struct moe_placement *init, *p;
	struct moe_plan_summary s;

	(void)state;
	assert_non_null(loads);
	for (uint32_t l = 0; l < L; l++)
		fill_load(&rng, LOAD_ZIPF10, E, loads + l * E);
	assert_int_equal(moe_place_initial(L, E, R, 4, &init), 0);
	for (int mode = MOE_PLAN_FULL; mode <= MOE_PLAN_KEEP; mode++) {
		struct timespec t0, t1;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		p = plan_checked(init, loads, (enum moe_plan_mode)mode, &s);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		printf("%d layers, E=%d, R=%d, 4 spare, Zipf 1.0: %s %.1f ms, max/mean %.3f -> "
		       "%.3f (worst layer %.3f), %u copies\n", L, E, R,
		       mode == MOE_PLAN_FULL ? "FULL" : "KEEP",
		       (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6, s.before,
		       s.after, s.worst_after, s.copies);
		moe_place_free(p);
	}
	moe_place_free(init);
	free(loads);
}

/* moe_plan_layer returns -EINVAL and writes nothing. */
static void expect_einval(const struct moe_load_in *in, enum moe_plan_mode mode,
			  const uint8_t *cn, const struct moe_replica *crep)
{
	uint8_t n[16], n0[16];
	struct moe_replica rep[16 * MOE_MAX_REPLICAS], rep0[16 * MOE_MAX_REPLICAS];

	memset(n, 0xa5, sizeof(n));
	memset(rep, 0xa5, sizeof(rep));
	memcpy(n0, n, sizeof(n));
	memcpy(rep0, rep, sizeof(rep));
	assert_int_equal(moe_plan_layer(in, mode, cn, crep, n, rep), -EINVAL);
	assert_memory_equal(n, n0, sizeof(n));
	assert_memory_equal(rep, rep0, sizeof(rep));
}

static void test_bad_input(void **state)
{
	double load[16];
	struct moe_placement *cur, dummy = {0}, *out = &dummy;
	struct moe_plan_summary s = {.copies = 12345};
	struct moe_load_in in = {8, 2, 4, load};
	uint8_t *cn;
	struct moe_replica *crep;

	(void)state;
	for (int i = 0; i < 16; i++)
		load[i] = i;
	assert_int_equal(moe_place_initial(2, 8, 2, 0, &cur), 0);
	cn = cur->n_replicas;
	crep = cur->rep;
	for (int mode = MOE_PLAN_FULL; mode <= MOE_PLAN_KEEP; mode++) {
		enum moe_plan_mode m = (enum moe_plan_mode)mode;

		in.n_ranks = 0;
		expect_einval(&in, m, cn, crep);
		in.n_ranks = MOE_MAX_RANKS + 1;
		expect_einval(&in, m, cn, crep);
		/* 9 experts, 2 ranks: ceil(9 / 2) = 5 slots per rank needed */
		in = (struct moe_load_in){9, 2, 4, load};
		expect_einval(&in, m, NULL, NULL);
		in = (struct moe_load_in){8, 2, 4, load};
		load[3] = NAN;
		expect_einval(&in, m, cn, crep);
		load[3] = -1;
		expect_einval(&in, m, cn, crep);
		load[3] = INFINITY;
		expect_einval(&in, m, cn, crep);
		load[3] = 3;
		in.load = NULL;
		expect_einval(&in, m, cn, crep);
		in.load = load;
		expect_einval(NULL, m, cn, crep);
		/* a current placement that is not valid for 2 ranks of 4 slots */
		crep[5 * MOE_MAX_REPLICAS].slot = 4;
		expect_einval(&in, m, cn, crep);
		crep[5 * MOE_MAX_REPLICAS] = crep[4 * MOE_MAX_REPLICAS]; /* shares a slot */
		expect_einval(&in, m, cn, crep);
		crep[5 * MOE_MAX_REPLICAS] = (struct moe_replica){2, 1}; /* rank 2 */
		expect_einval(&in, m, cn, crep);
		crep[5 * MOE_MAX_REPLICAS] = (struct moe_replica){1, 1};
		cn[6] = 0;
		expect_einval(&in, m, cn, crep);
		cn[6] = MOE_MAX_REPLICAS + 1;
		expect_einval(&in, m, cn, crep);
		cn[6] = 1;
		expect_einval(&in, m, cn, NULL);
		assert_int_equal(moe_place_validate(cur), 0);
	}
	expect_einval(&in, MOE_PLAN_KEEP, NULL, NULL); /* KEEP needs the current placement */
	expect_einval(&in, (enum moe_plan_mode)7, cn, crep);
	assert_true(isnan(moe_plan_max_mean(NULL, cn, crep)));
	cn[2] = 0;
	assert_true(isnan(moe_plan_max_mean(&in, cn, crep)));
	cn[2] = 1;
	crep[2 * MOE_MAX_REPLICAS].rank = 2;
	assert_true(isnan(moe_plan_max_mean(&in, cn, crep)));
	crep[2 * MOE_MAX_REPLICAS].rank = 0;
	assert_false(isnan(moe_plan_max_mean(&in, cn, crep)));
	load[3] = NAN;
	assert_true(isnan(moe_plan_max_mean(&in, cn, crep)));
	/* the whole table: a bad load in a layer (the first, then the second),
	 * nothing written */
	assert_int_equal(moe_place_plan(cur, load, MOE_PLAN_FULL, &out, &s), -EINVAL);
	load[3] = 3;
	load[8 + 5] = -2;
	assert_int_equal(moe_place_plan(cur, load, MOE_PLAN_KEEP, &out, &s), -EINVAL);
	assert_int_equal(moe_place_plan(NULL, load, MOE_PLAN_KEEP, &out, &s), -EINVAL);
	assert_int_equal(moe_place_plan(cur, NULL, MOE_PLAN_KEEP, &out, &s), -EINVAL);
	assert_ptr_equal(out, &dummy);
	assert_int_equal(s.copies, 12345);
	moe_place_free(cur);
}

/* E=4, R=2, 1 spare: 2 + 1 = 3 slots per rank, 6 in all; load {10, 1, 1, 1}:
 * 13 in all, a mean of 6.5 per rank. The initial placement has rank 0 =
 * {0, 1} (11) and rank 1 = {2, 3} (2): max/mean 11 / 6.5.
 * Replication (highest load per replica next, ties the lower expert, at
 * most 2 replicas on 2 ranks; 6 - 4 = 2 free slots): expert 0 (10), then
 * expert 1 (1, the first of three 1s; expert 0 is at its 2). Packed:
 *  0 added: expert 0's 10 alone on a rank: max 10;
 *  1 added (10 = 5 + 5): {5, 1, 1} and {5, 1}: max 7;
 *  2 added (also 1 = .5 + .5): {5, .5, 1} and {5, .5, 1}: max 6.5, the mean.
 * So both modes give experts 0 and 1 a second replica on rank 1 and move
 * one of experts 2, 3 to rank 0: 3 copies, the fewest that reach 1.0 (rank
 * 0 held only experts 0 and 1). FULL, heaviest first, the lighter rank
 * (ties: the rank that holds the expert now): 5 -> rank 0, 5 -> rank 1,
 * expert 2 (1) -> rank 1 (5 = 5, holds it), expert 3 (1) -> rank 0 (5 < 6),
 * expert 1 (.5) -> rank 0 (6 = 6, holds it), expert 1 (.5) -> rank 1.
 * Slots: kept replicas keep theirs (expert 0 at 0/0, 1 at 0/1, 2 at 1/0);
 * then the lowest slot free now as well: expert 0 on rank 1 gets slot 2,
 * expert 3 on rank 0 slot 2; last, expert 1 on rank 1 gets slot 1 (free
 * in the plan, expert 3's now). */
static void test_hand_case(void **state)
{
	double load[4] = {10, 1, 1, 1};
	struct moe_placement *cur, *p;
	struct moe_plan_summary s;
	struct moe_load_in in = {4, 2, 3, load};
	uint32_t n;
	const struct moe_replica *r;

	(void)state;
	assert_int_equal(moe_place_initial(1, 4, 2, 1, &cur), 0);
	assert_true(fabs(moe_plan_max_mean(&in, cur->n_replicas, cur->rep) - 11 / 6.5) < 1e-15);
	for (int mode = MOE_PLAN_FULL; mode <= MOE_PLAN_KEEP; mode++) {
		p = plan_checked(cur, load, (enum moe_plan_mode)mode, &s);
		assert_true(fabs(s.after - 1.0) < 1e-15);
		assert_int_equal(s.added, 2);
		assert_int_equal(s.copies, 3);
		assert_int_equal(s.dropped, 0);
		for (uint32_t e = 0; e < 4; e++) {
			r = moe_place_get(p, 0, e, &n);
			assert_int_equal(n, e < 2 ? 2 : 1);
			if (e < 2) /* kept on rank 0, slot e; the copy on rank 1 */
				assert_true(r[0].rank == 0 && r[0].slot == e && r[1].rank == 1);
		}
		if (mode == MOE_PLAN_FULL) {
			r = moe_place_get(p, 0, 0, &n);
			assert_int_equal(r[1].slot, 2);
			r = moe_place_get(p, 0, 1, &n);
			assert_int_equal(r[1].slot, 1);
			r = moe_place_get(p, 0, 2, &n);
			assert_true(r[0].rank == 1 && r[0].slot == 0);
			r = moe_place_get(p, 0, 3, &n);
			assert_true(r[0].rank == 0 && r[0].slot == 2);
		}
		moe_place_free(p);
	}
	moe_place_free(cur);
}

/* Never worse, never for nothing: an even load on the initial placement
 * (max/mean 1) gives the current placement back, byte for byte. */
static void test_keeps_current(void **state)
{
	double load[2 * 60];
	struct moe_placement *cur, *p;
	struct moe_plan_summary s;

	(void)state;
	for (int i = 0; i < 2 * 60; i++)
		load[i] = i < 60 ? 5 : 0; /* layer 1: no load at all */
	assert_int_equal(moe_place_initial(2, 60, 4, 2, &cur), 0);
	for (int mode = MOE_PLAN_FULL; mode <= MOE_PLAN_KEEP; mode++) {
		p = plan_checked(cur, load, (enum moe_plan_mode)mode, &s);
		assert_memory_equal(p->n_replicas, cur->n_replicas, 2 * 60);
		assert_memory_equal(p->rep, cur->rep, 2 * 60 * MOE_MAX_REPLICAS * sizeof(*p->rep));
		assert_int_equal(s.copies + s.added + s.dropped + s.layers_changed, 0);
		assert_true(s.before == 1.0 && s.after == 1.0);
		moe_place_free(p);
	}
	moe_place_free(cur);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_hand_case),
		cmocka_unit_test(test_keeps_current),
		cmocka_unit_test(test_bad_input),
		cmocka_unit_test(test_figures),
		cmocka_unit_test(test_properties),
		cmocka_unit_test(test_timing),
	};

	return cmocka_run_group_tests_name("rebalance", tests, NULL, NULL);
}
