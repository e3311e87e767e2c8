/* daemon/engine/migrate.c — see migrate.h. Only the engine's public calls:
 * publish, replicate, drop, slot state. */
#include "daemon/engine/migrate.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ROUNDS 64

static void nap_ms(uint32_t ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

	nanosleep(&ts, NULL);
}

int moe_engine_placement_masks(struct moe_engine *e, uint64_t *want)
{
	const struct moe_model *m = moe_engine_model(e);
	struct moe_epoch *ep = moe_epoch_acquire(e);

	for (uint32_t l = 0; l < m->n_moe_layers; l++)
		for (uint32_t x = 0; x < m->n_experts; x++) {
			uint32_t n;
			const struct moe_replica *r = moe_place_get(ep->placement, l, x, &n);
			uint64_t mask = 0;

			for (uint32_t i = 0; i < n; i++)
				mask |= 1ull << r[i].rank;
			want[(size_t)l * m->n_experts + x] = mask;
		}
	moe_epoch_release(ep);
	return 0;
}

static int check_want(struct moe_engine *e, const uint64_t *want, char *err)
{
	const struct moe_model *m = moe_engine_model(e);
	uint32_t R = moe_engine_ranks(e), S = moe_engine_slots_per_rank(e), E = m->n_experts;

	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		uint32_t per_rank[MOE_MAX_RANKS] = {0};

		for (uint32_t x = 0; x < E; x++) {
			uint64_t mask = want[(size_t)l * E + x];

			if (!mask)
				return moe_err(err, -EINVAL, "MoE layer %u: expert %u on no rank", l,
					       x);
			if (R < 64 && mask >> R)
				return moe_err(err, -EINVAL, "MoE layer %u: expert %u on a rank "
					       "beyond the %u there are", l, x, R);
			if (__builtin_popcountll(mask) > MOE_MAX_REPLICAS)
				return moe_err(err, -EINVAL, "MoE layer %u: expert %u on %d ranks, "
					       "at most %d replicas", l, x,
					       __builtin_popcountll(mask), MOE_MAX_REPLICAS);
			for (uint32_t r = 0; r < R; r++) {
				per_rank[r] += (mask >> r) & 1;
				/* (lost after the target was planned: plan again) */
				if (((mask >> r) & 1) && moe_engine_rank_lost(e, r))
					return moe_err(err, -EAGAIN, "MoE layer %u: expert %u on "
						       "rank %u, which is lost: plan again", l, x,
						       r);
			}
		}
		for (uint32_t r = 0; r < R; r++)
			if (per_rank[r] > S)
				return moe_err(err, -EINVAL, "MoE layer %u: %u experts on rank %u, "
					       "which has %u slots", l, per_rank[r], r, S);
	}
	return 0;
}

/* Removes replica i of (l, x) from p. */
static void remove_replica(struct moe_placement *p, uint32_t l, uint32_t x, uint32_t i)
{
	size_t k = (size_t)l * p->n_experts + x;
	struct moe_replica *r = &p->rep[k * MOE_MAX_REPLICAS];

	memmove(&r[i], &r[i + 1], (p->n_replicas[k] - i - 1) * sizeof(*r));
	p->n_replicas[k]--;
}

static bool on_rank(const struct moe_placement *p, uint32_t l, uint32_t x, uint32_t rank)
{
	uint32_t n;
	const struct moe_replica *r = moe_place_get(p, l, x, &n);

	for (uint32_t i = 0; i < n; i++)
		if (r[i].rank == rank)
			return true;
	return false;
}

/* Slots rank r keeps free in the target, layer l (S minus its experts). */
static uint32_t slack(const uint64_t *want, uint32_t E, uint32_t S, uint32_t l, uint32_t r)
{
	uint32_t n = 0;

	for (uint32_t x = 0; x < E; x++)
		n += (want[(size_t)l * E + x] >> r) & 1;
	return S - n;
}

static int empty_slot(struct moe_engine *e, uint32_t l, uint32_t r, uint32_t S)
{
	for (uint32_t s = 0; s < S; s++)
		if (moe_engine_slot_state(e, l, r, s) == MOE_SLOT_EMPTY)
			return (int)s;
	return -1;
}

static bool cancelled(const struct moe_migrate_opts *o)
{
	return o && o->cancel && atomic_load(o->cancel);
}

static void step(const struct moe_migrate_opts *o)
{
	if (o && o->steps)
		atomic_fetch_add(o->steps, 1);
}

/* Waits until no slot of the list is still being dropped. */
static int wait_freed(struct moe_engine *e, const struct moe_replica *slots,
		      const uint32_t *layers, uint32_t n, uint32_t wait_ms)
{
	for (uint32_t waited = 0;; waited++) {
		bool busy = false;

		for (uint32_t i = 0; i < n && !busy; i++)
			busy = moe_engine_slot_state(e, layers[i], slots[i].rank, slots[i].slot) ==
			       MOE_SLOT_DROPPING;
		if (!busy)
			return 0;
		if (waited >= wait_ms)
			return -ETIMEDOUT;
		nap_ms(1);
	}
}

/* The ranks lost so far, one bit each. */
static uint64_t lost_mask(const struct moe_engine *e)
{
	uint64_t m = 0;

	for (uint32_t r = 0; r < moe_engine_ranks(e) && r < 64; r++)
		m |= (uint64_t)moe_engine_rank_lost(e, r) << r;
	return m;
}

static int publish(struct moe_engine *e, struct moe_placement *cur, struct moe_migrate_result *res,
		   char *err)
{
	struct moe_placement *p;
	int ret = moe_place_copy(cur, &p);

	if (ret)
		return moe_err(err, ret, "out of memory");
	ret = moe_engine_publish(e, p, NULL, &res->epoch, err);
	if (!ret)
		res->publishes++;
	return ret;
}

/* The replicas of cur that the current epoch does not name (copies of a
 * round not published): dropped, so their slots are freed at once. */
static void drop_unpublished(struct moe_engine *e, const struct moe_placement *cur)
{
	struct moe_epoch *ep = moe_epoch_acquire(e);
	char err[MOE_ERRLEN];

	for (uint32_t l = 0; l < cur->n_layers; l++)
		for (uint32_t x = 0; x < cur->n_experts; x++) {
			uint32_t n, m;
			const struct moe_replica *r = moe_place_get(cur, l, x, &n);
			const struct moe_replica *q = moe_place_get(ep->placement, l, x, &m);

			for (uint32_t i = 0; i < n; i++) {
				bool named = false;

				for (uint32_t j = 0; j < m; j++)
					named |= q[j].rank == r[i].rank && q[j].slot == r[i].slot;
				if (!named)
					moe_engine_drop_replica(e, l, r[i].rank, r[i].slot, err);
			}
		}
	moe_epoch_release(ep);
}

/* Rank r of layer l is full and must receive a replica: one of its
 * experts that the target does not want there and that has no other
 * replica gets a copy elsewhere (on a rank that wants it if one has an
 * empty slot, else on the rank with the most slack), so that the next round
 * can drop it from r. True if a copy was made (published with the round). */
static bool make_room(struct moe_engine *e, struct moe_placement *cur, const uint64_t *want,
		      uint32_t l, uint32_t r, const struct moe_copy_pace *pace,
		      struct moe_migrate_result *res, const struct moe_migrate_opts *o, char *err,
		      int *ret)
{
	uint32_t E = cur->n_experts, R = cur->n_ranks, S = cur->slots_per_rank;

	for (uint32_t u = 0; u < E; u++) {
		size_t k = (size_t)l * E + u;
		uint32_t n, best = UINT32_MAX;
		const struct moe_replica *rp = moe_place_get(cur, l, u, &n);
		int s = -1;

		if (n != 1 || rp[0].rank != r || ((want[k] >> r) & 1))
			continue;
		for (uint32_t d = 0; d < R; d++) {
			bool wanted = (want[k] >> d) & 1;

			if (d == r || moe_engine_rank_lost(e, d) || empty_slot(e, l, d, S) < 0)
				continue;
			if (best == UINT32_MAX || (wanted && !((want[k] >> best) & 1)) ||
			    (wanted == (bool)((want[k] >> best) & 1) &&
			     slack(want, E, S, l, d) > slack(want, E, S, l, best)))
				best = d;
		}
		if (best == UINT32_MAX)
			return false; /* no empty slot anywhere: nothing can move */
		s = empty_slot(e, l, best, S);
		*ret = moe_engine_replicate_paced(e, l, u, best, (uint32_t)s, pace, err);
		if (*ret == -EBUSY)
			return *ret = 0, false;
		if (*ret)
			return false;
		cur->rep[k * MOE_MAX_REPLICAS + cur->n_replicas[k]++] =
			(struct moe_replica){(uint16_t)best, (uint16_t)s};
		res->added++;
		step(o);
		return true;
	}
	return false;
}

int moe_engine_migrate(struct moe_engine *e, const uint64_t *want,
		       const struct moe_migrate_opts *o, struct moe_migrate_result *res,
		       char *err)
{
	const struct moe_model *m = moe_engine_model(e);
	uint32_t L = m->n_moe_layers, E = m->n_experts, R = moe_engine_ranks(e);
	uint32_t S = moe_engine_slots_per_rank(e), wait_ms = o && o->wait_ms ? o->wait_ms : 10000;
	size_t cap = (size_t)L * R * S;
	struct moe_replica *gone = malloc(cap * sizeof(*gone));
	uint32_t *gone_l = malloc(cap * sizeof(*gone_l));
	_Atomic uint64_t copied = 0;
	struct moe_copy_pace pace = {o ? o->bytes_per_s : 0, o ? o->cancel : NULL,
				     o && o->copied ? o->copied : &copied};
	uint64_t copied0 = atomic_load(pace.copied);
	struct moe_placement *cur = NULL;
	uint64_t lost_start = lost_mask(e);
	int ret = check_want(e, want, err);

	*res = (struct moe_migrate_result){0};
	if (!ret && (!gone || !gone_l))
		ret = moe_err(err, -ENOMEM, "out of memory");
	for (uint32_t round = 0; !ret; round++) {
		uint32_t n_gone = 0, added = 0, missing = 0, moved = 0, blocked_l = 0, blocked_r = 0;
		uint32_t blocked_x = 0;
		struct moe_epoch *ep;

		if (round == MAX_ROUNDS) {
			ret = moe_err(err, -ENOSPC, "the target was not reached in %d rounds",
				      MAX_ROUNDS);
			break;
		}
		if (cancelled(o)) {
			ret = moe_err(err, -ECANCELED, "cancelled");
			break;
		}
		ep = moe_epoch_acquire(e);
		moe_place_free(cur);
		cur = NULL;
		ret = moe_place_copy(ep->placement, &cur);
		moe_epoch_release(ep);
		if (ret) {
			ret = moe_err(err, ret, "out of memory");
			break;
		}
		/* 1. replicas the target does not want, while the expert keeps one */
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t x = 0; x < E; x++) {
				uint64_t mask = want[(size_t)l * E + x];
				uint32_t n;
				const struct moe_replica *r = moe_place_get(cur, l, x, &n);
				bool has_wanted = false;

				for (uint32_t i = 0; i < n; i++)
					has_wanted |= (mask >> r[i].rank) & 1;
				uint32_t keep = UINT32_MAX;

				/* none wanted yet: the one on the rank with the most slack
				 * in the target stays (a temporary home, see below) */
				for (uint32_t i = 0; i < n && !has_wanted; i++)
					if (keep == UINT32_MAX ||
					    slack(want, E, S, l, r[i].rank) >
						    slack(want, E, S, l, r[keep].rank))
						keep = i;
				for (uint32_t i = n; i-- > 0;) {
					if (((mask >> r[i].rank) & 1) || i == keep)
						continue;
					gone[n_gone] = r[i];
					gone_l[n_gone++] = l;
					remove_replica(cur, l, x, i);
					n--;
				}
			}
		if (n_gone) {
			ret = publish(e, cur, res, err);
			for (uint32_t i = 0; i < n_gone && !ret; i++) {
				ret = moe_engine_drop_replica(e, gone_l[i], gone[i].rank,
							      gone[i].slot, err);
				res->dropped++;
				step(o);
			}
			if (!ret && wait_freed(e, gone, gone_l, n_gone, wait_ms))
				ret = moe_err(err, -ETIMEDOUT, "dropped slots not freed within %u "
					      "ms (a batch holds an old epoch)", wait_ms);
			if (ret)
				break;
		}
		/* 2. the replicas missing, into empty slots of their ranks */
		for (uint32_t l = 0; l < L && !ret; l++) {
			for (uint32_t x = 0; x < E && !ret; x++) {
				uint64_t mask = want[(size_t)l * E + x];

				for (uint32_t r = 0; r < R && !ret; r++) {
					uint32_t s, n;

					if (!((mask >> r) & 1) || on_rank(cur, l, x, r))
						continue;
					missing++;
					moe_place_get(cur, l, x, &n);
					for (s = 0; s < S; s++)
						if (moe_engine_slot_state(e, l, r, s) == MOE_SLOT_EMPTY)
							break;
					if (s == S && n < MOE_MAX_REPLICAS &&
					    make_room(e, cur, want, l, r, &pace, res, o, err, &ret))
						s = S + 1; /* (room next round) */
					if (ret)
						break;
					if (s >= S || n >= MOE_MAX_REPLICAS) {
						blocked_l = l, blocked_r = r, blocked_x = x;
						moved += s == S + 1;
						continue;
					}
					ret = moe_engine_replicate_paced(e, l, x, r, s, &pace, err);
					if (ret == -EBUSY) { /* (taken meanwhile: next round) */
						ret = 0;
						continue;
					}
					if (ret)
						break;
					res->bytes = atomic_load(pace.copied) - copied0;
					{
						size_t k = (size_t)l * E + x;

						cur->rep[k * MOE_MAX_REPLICAS + cur->n_replicas[k]++] =
							(struct moe_replica){(uint16_t)r, (uint16_t)s};
					}
					added++;
					res->added++;
					step(o);
				}
			}
		}
		if (ret && (added || moved)) {
			/* stopped (cancelled, say) after some copies of the round:
			 * they are complete, so what was reached is published; if
			 * even that fails, they are dropped (no epoch names them) */
			char why[MOE_ERRLEN];

			if (publish(e, cur, res, why))
				drop_unpublished(e, cur);
			break;
		}
		if (ret)
			break;
		if (added || moved)
			ret = publish(e, cur, res, err);
		if (ret && (ret == -ENODEV || lost_mask(e) != lost_start))
			drop_unpublished(e, cur); /* (a rank lost: see the end) */
		if (ret)
			break;
		if (!missing && !n_gone) {
			/* every wanted replica exists: the last unwanted ones go next
			 * round, unless none is left */
			bool extra = false;

			for (uint32_t l = 0; l < L && !extra; l++)
				for (uint32_t x = 0; x < E && !extra; x++) {
					uint32_t n;
					const struct moe_replica *r = moe_place_get(cur, l, x, &n);

					for (uint32_t i = 0; i < n; i++)
						extra |= !((want[(size_t)l * E + x] >> r[i].rank) & 1);
				}
			if (!extra)
				break;
		} else if (!added && !n_gone && !moved) {
			ret = moe_err(err, -ENOSPC, "MoE layer %u: rank %u has no empty slot for "
				      "expert %u (its slots hold experts still needed there; "
				      "placement.spare_slots adds room)", blocked_l, blocked_r,
				      blocked_x);
		}
	}
	/* A rank lost while the change ran: the round's placement named it,
	 * or was read before the engine published one without it (with more
	 * slots per rank), so the publish or a copy failed. Not this change's
	 * fault: the caller plans again from the placement that is served now
	 * (seen in test_placement_ops' lost rank under load). */
	if (ret && ret != -ECANCELED && (ret == -ENODEV || lost_mask(e) != lost_start))
		ret = moe_err(err, -EAGAIN, "a rank was lost during the change: plan again");
	res->bytes = atomic_load(pace.copied) - copied0;
	moe_place_free(cur);
	free(gone);
	free(gone_l);
	return ret;
}
