/* daemon/engine/placement.h — where each expert's weights live: per layer,
 * expert -> replicas (rank, slot). Pure functions; a placement is immutable
 * once published (a change builds a new one and publishes it in a new epoch).
 *
 * Every rank has slots_per_rank = ceil(E / R) primary slots plus `spare`
 * slots per layer. The initial placement puts expert e on rank e / ceil(E/R),
 * slot e % ceil(E/R): contiguous blocks, as expert-parallel engines do.
 */
#ifndef MOE_PLACEMENT_H
#define MOE_PLACEMENT_H

#include <stdint.h>

#define MOE_MAX_REPLICAS 8
#define MOE_MAX_RANKS	 64

struct moe_replica {
	uint16_t rank, slot;
};

struct moe_placement {
	uint32_t n_layers, n_experts, n_ranks;
	uint32_t slots_per_rank; /* primary + spare, per layer */
	uint8_t *n_replicas;	 /* [layer * E + e] */
	struct moe_replica *rep; /* [(layer * E + e) * MOE_MAX_REPLICAS + i] */
};

int moe_place_initial(uint32_t n_layers, uint32_t n_experts, uint32_t n_ranks, uint32_t spare,
		      struct moe_placement **out);
void moe_place_free(struct moe_placement *p);
/* A deep copy of p (a new table to edit and publish): 0 or -ENOMEM. */
int moe_place_copy(const struct moe_placement *p, struct moe_placement **out);

/* Replicas of expert e of layer position `layer`; *n gets their count. */
const struct moe_replica *moe_place_get(const struct moe_placement *p, uint32_t layer, uint32_t e,
					uint32_t *n);

/* 0 if every expert has 1..MOE_MAX_REPLICAS replicas on valid (rank, slot)
 * pairs and no slot holds two experts; -EINVAL otherwise. */
int moe_place_validate(const struct moe_placement *p);

#endif
