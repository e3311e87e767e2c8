/* daemon/engine/migrate.h — from the placement being served to another,
 * while serving.
 *
 * The target says, per MoE layer and expert, which ranks should hold a
 * replica (a mask: bit r for rank r); slot numbers are the engine's choice.
 * The move goes in rounds, each one or two published epochs:
 *   1. replicas on ranks the target does not name are dropped from the
 *      placement (an expert keeps one until a wanted replica exists) and
 *      their slots freed once the last batch on an epoch naming them ends;
 *   2. each missing replica is copied into an empty slot of its rank (off
 *      the serving path, at most bytes_per_s), and the placement with the
 *      new replicas published once every copy of the round is complete.
 * A rank that must receive a replica but is full passes one of its experts
 * that the target puts elsewhere to a rank with an empty slot first (a
 * temporary home when its own target rank is full too). A batch never sees
 * a slot being written, an expert never lacks a replica, and each
 * published placement is valid. With every slot of every rank full no
 * expert can move at all (two cannot swap without a slot to pass through):
 * targets that keep one slot per rank and layer free are always reached in
 * practice (the planner's do; test_migrate moves through random ones), and
 * when a move is stuck it stops with -ENOSPC, what was reached staying
 * published (valid, just not the target).
 */
#ifndef MOE_MIGRATE_H
#define MOE_MIGRATE_H

#include <stdatomic.h>
#include <stdint.h>

#include "daemon/engine/engine.h"

struct moe_migrate_opts {
	uint64_t bytes_per_s;	   /* copy rate cap; 0: none */
	const atomic_bool *cancel; /* may be NULL: stops between copies and rounds */
	_Atomic uint64_t *copied;  /* may be NULL: bytes copied so far */
	_Atomic uint64_t *steps;   /* may be NULL: replicas added + dropped so far */
	uint32_t wait_ms;	   /* for a dropped slot to be freed; 0: 10 s */
};

struct moe_migrate_result {
	uint32_t added, dropped, publishes;
	uint32_t epoch; /* the last published (0: none) */
	uint64_t bytes; /* copied */
};

/* want[layer * E + e]: the ranks that should hold expert e of MoE layer
 * position `layer`. 0, or -EINVAL (a mask empty, naming a rank that does
 * not exist, more than MOE_MAX_REPLICAS replicas, more than slots_per_rank
 * experts on a rank), -ENOSPC, -ECANCELED, -ETIMEDOUT, -ENOMEM, with err. */
int moe_engine_migrate(struct moe_engine *e, const uint64_t *want,
		       const struct moe_migrate_opts *o, struct moe_migrate_result *res,
		       char *err);

/* The current placement as masks (want[n_moe_layers * E]). */
int moe_engine_placement_masks(struct moe_engine *e, uint64_t *want);

#endif
