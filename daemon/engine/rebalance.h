/* daemon/engine/rebalance.h — the rebalancing planner: from the load each
 * expert saw over a window, a placement that spreads the load evenly over
 * the ranks. Pure functions: no I/O, no globals, nothing of the engine
 * beyond the placement table; the same input gives the same plan.
 *
 * The model: an expert's load is split evenly over its replicas. The engine
 * hands an expert's rows to its replicas one at a time, each to the replica
 * whose rank has been given the fewest rows so far in the chunk (engine.c):
 * an even split when the ranks are even, leaning to the lighter rank when
 * they are not, which the model does not count on. A rank's predicted load
 * is the sum of its replicas' shares; a placement's score is max/mean of
 * the ranks' loads (1.0: perfectly even, and when there is no load).
 *
 * "Lower" below means lower by more than MOE_PLAN_MIN_GAIN, relative: a
 * change that gains less is not worth the weights it copies.
 *
 * The algorithm (DeepSeek's EPLB: replicate, then pack), per layer:
 *  1. Replication: every expert has one replica; the next replica goes to
 *     the expert with the highest load per replica (ties: the lower expert),
 *     while free slots remain and some expert with load can take one more
 *     (at most MOE_MAX_REPLICAS, and at most n_ranks: no two replicas of an
 *     expert share a rank). Every prefix of that sequence (0, 1, 2, ... added
 *     replicas) is packed and scored; the plan takes the best, a larger
 *     count only if its score is lower than the best of the smaller ones.
 *     So all free slots may be used, but replicas that do not lower the
 *     predicted max are not added. The scan stops once a score is within
 *     MOE_PLAN_MIN_GAIN of what no count can beat: the mean, and the
 *     heaviest replica with the whole sequence added.
 *  2. Packing: replicas, heaviest first (load / replicas), each to the rank
 *     with the lowest load that has a free slot and holds no replica of the
 *     same expert (ties: a rank that holds the expert now, then the lower
 *     rank). When every rank with a free slot already holds the expert, a
 *     replica of another expert moves from a full rank to one of them and
 *     the replica takes its place (such a pair always exists when n_ranks *
 *     slots_per_rank replicas fit and no expert has more than n_ranks).
 *  3. Local improvement: while moving one replica off the heaviest rank to a
 *     rank with a free slot, or swapping one of its replicas with a lighter
 *     replica of another rank, leaves both ranks lower than the heaviest
 *     was, the change with the lowest such max is made (ties: the one that
 *     copies fewer weights); at most 4 changes per replica, plus 16.
 * MOE_PLAN_FULL packs every replica afresh (step 2 for all). MOE_PLAN_KEEP
 * starts from the current placement: an expert that keeps at least as many
 * replicas as it has now keeps all of them where they are; one that has
 * fewer keeps those on the least loaded ranks (heaviest experts first);
 * only the new replicas are packed (step 2), then step 3 moves replicas
 * (kept ones too: each move is a copy) while it helps. KEEP copies far
 * fewer weights than FULL for about the same score (test_rebalance prints
 * both).
 *
 * Never worse: when a current placement is given, the plan replaces it only
 * if its predicted max/mean is lower; otherwise the output is the current
 * placement unchanged (so an even load changes nothing), as it is: even with
 * two replicas of an expert on one rank, which moe_place_validate allows and
 * a plan never has.
 *
 * Slots: a replica on a rank that held its expert before keeps that slot;
 * a new one takes the lowest slot of its rank that is free both in the plan
 * and in the current placement (so it can be copied in before the plan is
 * published), else the lowest slot free in the plan. An expert's replicas
 * are listed with those where the current placement had them first (in its
 * order), then the others by rank.
 *
 * Cost per layer: up to (added replicas + 1) packings, each O(U * (R +
 * log U)) plus improvement steps of O(U * (U + R)), U = replicas, R =
 * ranks: 58 layers of 256 experts on 8 ranks plan in tens of ms (FULL) to
 * about 150 ms (KEEP) on one core (test_rebalance prints it).
 */
#ifndef MOE_REBALANCE_H
#define MOE_REBALANCE_H

#include <stdint.h>

#include "daemon/engine/placement.h"

/* The least relative gain in predicted max load worth copying weights for
 * (see "lower" above). */
#define MOE_PLAN_MIN_GAIN 1e-3

/* What the planner plans from, one layer. */
struct moe_load_in {
	uint32_t n_experts;
	uint32_t n_ranks;	 /* 1..MOE_MAX_RANKS */
	uint32_t slots_per_rank; /* capacity per rank; n_ranks * slots_per_rank >= n_experts */
	const double *load;	 /* [n_experts]: tokens over the window, finite, >= 0 */
};

enum moe_plan_mode {
	MOE_PLAN_FULL, /* pack every replica afresh */
	MOE_PLAN_KEEP, /* keep replicas where they are unless moving them helps */
};

/* Plans one layer. n_replicas[E] and rep[E * MOE_MAX_REPLICAS] get the plan
 * in the row format of struct moe_placement (entries past an expert's count
 * are zero, or as in cur_rep when the current placement is kept). cur_n and
 * cur_rep are the layer's current placement in the same format: required by
 * MOE_PLAN_KEEP, optional (both NULL) for MOE_PLAN_FULL, which then has
 * nothing to compare with and copies are not minimised. The outputs may
 * alias cur_n and cur_rep. Returns 0; -EINVAL for bad input (no rank or
 * more than MOE_MAX_RANKS, fewer slots than experts, a load negative or not
 * finite, a current placement that is not valid for these ranks and slots,
 * an unknown mode); -ENOMEM; -ENOSPC if packing found no room (not reached:
 * see the comment at repair() in rebalance.c). Nothing is written unless it
 * returns 0. */
int moe_plan_layer(const struct moe_load_in *in, enum moe_plan_mode mode, const uint8_t *cur_n,
		   const struct moe_replica *cur_rep, uint8_t *n_replicas, struct moe_replica *rep);

/* Predicted max/mean of the ranks' loads of one layer's placement under
 * in->load (the even-split model above); 1.0 when the load is all zero.
 * NaN for bad input (as moe_plan_layer, or a count outside
 * 1..MOE_MAX_REPLICAS, or a rank out of range). */
double moe_plan_max_mean(const struct moe_load_in *in, const uint8_t *n_replicas,
			 const struct moe_replica *rep);

/* What a whole-placement plan changes, summed over layers. */
struct moe_plan_summary {
	uint32_t layers_changed; /* layers with a copy or a dropped replica */
	uint32_t added;		 /* per expert, replicas beyond its current count */
	uint32_t dropped;	 /* per expert, replicas short of its current count */
	uint32_t copies;	 /* replicas on a rank that did not hold their expert: weights to
				  * copy (the caller multiplies by bytes per expert) */
	uint32_t moved;		 /* copies that are not added replicas (copies - added) */
	double before, after;	 /* predicted max/mean, mean over layers */
	double worst_before;	 /* ... of the worst layer */
	double worst_after;
};

/* Plans every layer of cur from loads[layer * E + e] into a new table
 * (*out, freed with moe_place_free; same layers, experts, ranks and slots
 * as cur). sum (may be NULL) gets the summary. Returns 0, -EINVAL (as
 * moe_plan_layer, for any layer) or -ENOMEM; *out and *sum are written only
 * on success. */
int moe_place_plan(const struct moe_placement *cur, const double *loads, enum moe_plan_mode mode,
		   struct moe_placement **out, struct moe_plan_summary *sum);

#endif
