/* daemon/engine/reload.h — new expert weights while serving: rolling
 * reload, rollback, and what each weights version is.
 *
 * A reload reads a checkpoint of the same architecture as the one served
 * (the same path re-read from disk, or another), and switches the selected
 * MoE layers to it, one *step* at a time:
 *  - by layer (default): router, correction bias, shared experts and every
 *    expert of one layer switch in one epoch;
 *  - by experts (`experts`): only the named experts of a layer switch per
 *    epoch; allowed only when the layer's router and shared tensors are
 *    identical in both checkpoints (else refused, naming the tensor);
 *  - atomic: everything selected is staged first and switches in one epoch.
 * Every replica of an expert switches with it.
 *
 * A step is staged off the serving path (pread into fresh slots: batches
 * go on meanwhile), validated (shape and dtype as served, every value
 * finite, a `moed.sha256.<tensor>` checksum in the shard's __metadata__
 * when there is one, the shards unchanged after the read), then switched:
 * the engine's tables take the new memory and an epoch naming the layer's
 * new version is published; batches on older epochs keep reading the old
 * weights until they end (daemon/engine/versions.c). A switch holds the
 * forward lock for a few pointer swaps, never for a read or a copy.
 *
 * Failure (a missing or mis-shaped tensor, a NaN/Inf, a checksum mismatch,
 * a shard modified while read, no room, cancel): the steps already
 * published stay, the rest keep the old weights (atomic: nothing changes),
 * staging memory is freed, and the error is returned.
 *
 * Versions: each layer's weights version is a number (1: what was loaded,
 * +1 per step that changes it); each expert has the version of the step
 * that last replaced it; each comes from a source (the checkpoints read,
 * [0] the loaded one). An epoch's per-layer versions (epoch.h) thus tell
 * every layer's and expert's version (moe_engine_version_info).
 *
 * Rollback: with keep_previous, the weights a reload replaced are kept
 * (host memory for the CPU backend; counted against max_staging_bytes,
 * layers that do not fit are not kept); moe_engine_rollback switches the
 * layers the last reload changed back to them, layer by layer, as new
 * versions. Refused when a layer's previous weights were not kept.
 *
 * One reload or rollback at a time, and not together with a placement
 * change (the caller serializes: moed's jobs). A lost rank meanwhile is
 * handled: experts it alone held are read again from the checkpoint their
 * current version came from.
 */
#ifndef MOE_RELOAD_H
#define MOE_RELOAD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "daemon/engine/checkpoint.h"

struct moe_engine;

struct moe_reload_progress {
	_Atomic uint32_t steps_done, steps_total;
	_Atomic uint64_t bytes; /* staged so far */
};

struct moe_reload_opts {
	const char *dir;	   /* the checkpoint; NULL: the loaded one, read again */
	const uint32_t *layers;	   /* decoder-layer indices (MoE layers); NULL: all */
	uint32_t n_layers;
	const uint32_t *experts;   /* NULL: whole layers; else these experts of each layer */
	uint32_t n_experts;
	bool atomic;		   /* one epoch for everything */
	uint32_t max_parallel;	   /* layers staged before their switches (0: 1) */
	uint64_t max_staging_bytes; /* staged + kept at most; 0: no bound */
	bool keep_previous;	   /* keep what is replaced, for rollback */
	uint64_t bytes_per_s;	   /* staging reads paced (0: as fast as they go) */
	const atomic_bool *cancel; /* may be NULL */
	struct moe_reload_progress *progress; /* may be NULL */
	moe_ckpt_read_hook hook;   /* tests: after every tensor read */
	void *hook_arg;
};

struct moe_reload_result {
	uint32_t steps;		  /* epochs published */
	uint32_t layers;	  /* layers switched */
	uint32_t first_epoch, last_epoch;
	uint32_t source;	  /* the source id the new weights came from */
	uint64_t bytes;		  /* staged */
	uint32_t not_kept;	  /* layers whose previous weights were not kept */
};

/* 0; or -EINVAL (options, architecture, a tensor refused), -EDOM (a value
 * not finite), -EBADMSG (checksum), -ESTALE (the checkpoint changed while
 * read), -ENOSPC (max_staging_bytes), -ENOMEM, -ECANCELED, -EIO; err says
 * what. `r` (may be NULL) tells what was done either way. */
int moe_engine_reload(struct moe_engine *e, const struct moe_reload_opts *o,
		      struct moe_reload_result *r, char *err);
/* The layers the last reload changed, back to the weights it replaced (o:
 * cancel and progress only). -ENOENT when there is nothing to roll back,
 * -ENODATA when the previous weights were not kept. */
int moe_engine_rollback(struct moe_engine *e, const struct moe_reload_opts *o,
			struct moe_reload_result *r, char *err);
/* Whether a rollback is possible (0), else why (-ENOENT / -ENODATA). */
int moe_engine_can_rollback(struct moe_engine *e, char *why, size_t n);

struct moe_layer_version {
	uint32_t version;
	uint32_t router_version; /* router, bias, shared experts */
	uint32_t router_source;
	bool rollback;		 /* made by a rollback */
};

/* The current weights version of MoE layer position `pos` (0: no such). */
uint32_t moe_engine_layer_version(struct moe_engine *e, uint32_t pos);
/* What version `version` of layer `pos` is; expert_version and
 * expert_source ([E] each) may be NULL. -ENOENT if unknown. */
int moe_engine_version_info(struct moe_engine *e, uint32_t pos, uint32_t version,
			    struct moe_layer_version *info, uint32_t *expert_version,
			    uint32_t *expert_source);
/* Sources: how many, and one's path and checkpoint identity. */
uint32_t moe_engine_sources(struct moe_engine *e);
int moe_engine_source(struct moe_engine *e, uint32_t i, char *path, size_t n, uint64_t *identity);
/* Bytes of previous weights kept for rollback. */
uint64_t moe_engine_kept_bytes(struct moe_engine *e);

#endif
