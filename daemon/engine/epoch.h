/* daemon/engine/epoch.h — epochs: what the engine serves, versioned.
 *
 * An epoch is one version of what a batch runs on: a placement (expert ->
 * replicas) and a weights version per MoE layer. Exactly one epoch is
 * current. moe_epochs_publish() installs a new one atomically (the current
 * pointer changes under a mutex held for a few instructions); a batch pins
 * the epoch it starts on (moe_epoch_acquire) until it ends
 * (moe_epoch_release), so a request runs entirely under one epoch. At
 * publish the previous epoch loses the table's reference; it is retired when
 * its last batch releases it: the retire hook runs (where the owner frees
 * the slots only that epoch used), then its placement and versions are
 * freed. Any thread may acquire, release or publish.
 *
 * Ids are global: 1 for what was loaded, +1 per publish. The wire carries
 * them in 32 bits (one publish a second wraps after 136 years). What an id
 * means (placement generation, per-layer weights versions) can be looked up
 * for the last MOE_EPOCH_HISTORY epochs, live or retired, so that later
 * changes add versions without changing the completion entry.
 */
#ifndef MOE_EPOCH_H
#define MOE_EPOCH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "daemon/engine/placement.h"

#define MOE_EPOCH_HISTORY 256

struct moe_epochs;

struct moe_epoch {
	uint32_t id;
	atomic_uint refs;
	struct moe_epochs *table;
	const struct moe_placement *placement; /* owned by the epoch */
	uint64_t placement_gen;	/* +1 for each publish that brings a placement */
	const uint32_t *weights_version; /* [n_layers], owned; 1 for what was loaded */
};

struct moe_epoch_info {
	uint32_t id;
	uint32_t n_layers;
	uint64_t placement_gen;
	bool current;
	bool retired; /* its last batch is done and its tables are freed */
};

/* Called once per epoch, when it retires, on the thread that released it
 * last (or that published over it, if no batch held it). */
typedef void moe_epoch_retire_fn(void *arg, const struct moe_epoch *ep);

/* Takes `initial` (the loaded placement) as epoch 1, every layer at weights
 * version 1. */
int moe_epochs_create(struct moe_placement *initial, uint32_t n_layers,
		      moe_epoch_retire_fn *retire, void *arg, struct moe_epochs **out);
/* Releases the current epoch; every other must have been released. */
void moe_epochs_destroy(struct moe_epochs *t);

struct moe_epoch *moe_epochs_acquire(struct moe_epochs *t);
void moe_epoch_release(struct moe_epoch *ep);

/* Installs a new current epoch: `p` (taken over whatever the outcome; NULL:
 * a copy of the current placement, same generation) and `versions`
 * ([n_layers]; NULL: the current ones). Returns 0 and the new id, or
 * -ENOMEM. The caller has validated p. */
int moe_epochs_publish(struct moe_epochs *t, struct moe_placement *p, const uint32_t *versions,
		       uint32_t *id);

/* What epoch `id` was: 0, or -ENOENT (never published, or older than the
 * last MOE_EPOCH_HISTORY). `versions` gets up to `cap` per-layer weights
 * versions (may be NULL). */
int moe_epochs_info(struct moe_epochs *t, uint32_t id, struct moe_epoch_info *info,
		    uint32_t *versions, uint32_t cap);

/* Counts since creation; live = published - retired (the current included). */
void moe_epochs_counts(struct moe_epochs *t, uint64_t *published, uint64_t *retired,
		       uint32_t *current_id);

#endif
