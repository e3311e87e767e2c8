/* tests/fuzz/session_engine.c — a stand-in for the engine under daemon/
 * server.c, for fuzz_session: a small OLMoE-shaped model (hidden 64, three
 * decoder layers, 0 and 2 MoE) whose forward reads every input element and
 * writes every output element of every segment (out = 2 * in), so that a
 * segment the server let point outside a region faults, and nothing else.
 * Only the functions server.c calls are here. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "daemon/engine/reload.h"
#include "kernels/cpu/convert.h"

#define FZ_HIDDEN 64

static struct moe_layer_desc g_layers[2] = {{.index = 0}, {.index = 2}};
static struct moe_model g_model = {
	.family = MOE_FAM_OLMOE,
	.dtype = MOE_DT_BF16,
	.hidden = FZ_HIDDEN,
	.inter = 32,
	.n_experts = 4,
	.top_k = 2,
	.n_layers = 3,
	.n_moe_layers = 2,
	.layers = g_layers,
};
/* (as the real engine's: every MoE layer at weights version 1) */
static const uint32_t g_versions[2] = {1, 1};
static struct moe_epoch g_epoch = {.id = 1, .weights_version = g_versions};

const char *moe_family_name(enum moe_family f)
{
	return f == MOE_FAM_OLMOE ? "olmoe" : "?";
}

const struct moe_model *moe_engine_model(const struct moe_engine *e)
{
	(void)e;
	return &g_model;
}

uint32_t moe_engine_max_tokens(const struct moe_engine *e)
{
	(void)e;
	return 64;
}

uint32_t moe_engine_threads(const struct moe_engine *e)
{
	(void)e;
	return 1;
}

uint32_t moe_engine_ranks(const struct moe_engine *e)
{
	(void)e;
	return 1;
}

const char *moe_engine_backend(const struct moe_engine *e)
{
	(void)e;
	return "fuzz";
}

const char *moe_engine_kernels(const struct moe_engine *e)
{
	(void)e;
	return "none";
}

const char *moe_engine_device(const struct moe_engine *e)
{
	(void)e;
	return "none";
}

float moe_engine_last_device_ms(const struct moe_engine *e)
{
	(void)e;
	return -1.0f;
}

bool moe_engine_lost(const struct moe_engine *e)
{
	(void)e;
	return false;
}

uint64_t moe_engine_expert_tokens(const struct moe_engine *e, uint32_t pos, uint32_t x)
{
	(void)e, (void)pos, (void)x;
	return 0;
}

int moe_engine_host_register(struct moe_engine *e, void *p, size_t len, char *err)
{
	(void)e, (void)p, (void)len, (void)err;
	return -ENOTSUP;
}

void moe_engine_host_unregister(struct moe_engine *e, void *p)
{
	(void)e, (void)p;
}

struct moe_epoch *moe_epoch_acquire(struct moe_engine *e)
{
	(void)e;
	return &g_epoch;
}

void moe_epoch_release(struct moe_epoch *ep)
{
	(void)ep;
}

int moe_engine_publish(struct moe_engine *e, struct moe_placement *p, const uint32_t *versions,
		       uint32_t *id, char *err)
{
	(void)e, (void)p, (void)versions, (void)err;
	*id = ++g_epoch.id;
	return 0;
}

struct moe_epochs *moe_engine_epochs(struct moe_engine *e)
{
	(void)e;
	return NULL;
}

int moe_epochs_info(struct moe_epochs *t, uint32_t id, struct moe_epoch_info *info,
		    uint32_t *versions, uint32_t cap)
{
	(void)t, (void)id, (void)info, (void)versions, (void)cap;
	return -ENOENT;
}

void moe_epochs_counts(struct moe_epochs *t, uint64_t *published, uint64_t *retired,
		       uint32_t *current_id)
{
	(void)t;
	*published = g_epoch.id;
	*retired = g_epoch.id - 1;
	*current_id = g_epoch.id;
}

int moe_engine_forward(struct moe_engine *e, struct moe_epoch *ep, const struct moe_batch *b,
		       char *err)
{
	float row[FZ_HIDDEN];
	uint32_t total = 0;

	(void)e, (void)ep, (void)err;
	for (uint32_t s = 0; s < b->n_segs; s++) {
		const struct moe_seg *g = &b->segs[s];
		size_t es = moe_dtype_size(g->dtype);

		for (uint32_t t = 0; t < g->n_tokens; t++) {
			moe_cpu_to_f32(g->dtype, (const char *)g->in + (size_t)t * FZ_HIDDEN * es, row,
				       FZ_HIDDEN);
			for (int j = 0; j < FZ_HIDDEN; j++)
				row[j] *= 2.0f;
			moe_cpu_from_f32(g->dtype, row, (char *)g->out + (size_t)t * FZ_HIDDEN * es,
					 FZ_HIDDEN);
		}
		total += g->n_tokens;
	}
	if (total != b->n_tokens || total > 64)
		abort(); /* the server formed a batch it must not */
	return 0;
}

/* the placement-cycle job: a stand-in engine has one rank and no spares */
uint32_t moe_engine_slots_per_rank(const struct moe_engine *e)
{
	(void)e;
	return 0;
}

int moe_engine_replicate(struct moe_engine *e, uint32_t l, uint32_t x, uint32_t rank,
			 uint32_t slot, char *err)
{
	(void)e, (void)l, (void)x, (void)rank, (void)slot, (void)err;
	return -ENOTSUP;
}

int moe_engine_drop_replica(struct moe_engine *e, uint32_t l, uint32_t rank, uint32_t slot,
			    char *err)
{
	(void)e, (void)l, (void)rank, (void)slot, (void)err;
	return -ENOENT;
}

uint64_t moe_engine_weight_bytes(const struct moe_engine *e)
{
	(void)e;
	return 0;
}

/* no load statistics in the stand-in: status leaves them out */
const struct moe_stats *moe_engine_stats(const struct moe_engine *e)
{
	(void)e;
	return NULL;
}

/* placement changes: the server refuses them on this backend ("fuzz") before
 * it would call these */
int moe_engine_replicate_paced(struct moe_engine *e, uint32_t l, uint32_t x, uint32_t rank,
			       uint32_t slot, const struct moe_copy_pace *pace, char *err)
{
	(void)pace;
	return moe_engine_replicate(e, l, x, rank, slot, err);
}

int moe_engine_slot_state(struct moe_engine *e, uint32_t l, uint32_t rank, uint32_t slot)
{
	(void)e, (void)l, (void)rank, (void)slot;
	return MOE_SLOT_INVALID;
}

int moe_model_layer_pos(const struct moe_model *m, uint32_t index)
{
	for (uint32_t i = 0; i < m->n_moe_layers; i++)
		if (m->layers[i].index == index)
			return (int)i;
	return -1;
}

bool moe_engine_rank_lost(const struct moe_engine *e, uint32_t rank)
{
	(void)e, (void)rank;
	return false;
}

/* reload: the stand-in serves one weights version and never reloads */
uint32_t moe_engine_last_epoch(const struct moe_engine *e)
{
	(void)e;
	return g_epoch.id;
}

int moe_engine_reload(struct moe_engine *e, const struct moe_reload_opts *o,
		      struct moe_reload_result *r, char *err)
{
	(void)e, (void)o;
	*r = (struct moe_reload_result){0};
	return moe_err(err, -ENOTSUP, "the fuzz engine does not reload");
}

int moe_engine_rollback(struct moe_engine *e, const struct moe_reload_opts *o,
			struct moe_reload_result *r, char *err)
{
	return moe_engine_reload(e, o, r, err);
}

int moe_engine_can_rollback(struct moe_engine *e, char *why, size_t n)
{
	(void)e;
	snprintf(why, n, "no reload to roll back");
	return -ENOENT;
}

uint32_t moe_engine_layer_version(struct moe_engine *e, uint32_t pos)
{
	(void)e;
	return pos < g_model.n_moe_layers ? 1 : 0;
}

int moe_engine_version_info(struct moe_engine *e, uint32_t pos, uint32_t version,
			    struct moe_layer_version *info, uint32_t *expert_version,
			    uint32_t *expert_source)
{
	(void)e;
	if (pos >= g_model.n_moe_layers || version != 1)
		return -ENOENT;
	if (info)
		*info = (struct moe_layer_version){1, 1, 0, false};
	for (uint32_t x = 0; x < g_model.n_experts; x++) {
		if (expert_version)
			expert_version[x] = 1;
		if (expert_source)
			expert_source[x] = 0;
	}
	return 0;
}

uint32_t moe_engine_sources(struct moe_engine *e)
{
	(void)e;
	return 1;
}

int moe_engine_source(struct moe_engine *e, uint32_t i, char *path, size_t n, uint64_t *identity)
{
	(void)e;
	if (i)
		return -ENOENT;
	if (path)
		snprintf(path, n, "/fuzz/model");
	if (identity)
		*identity = 1;
	return 0;
}

uint64_t moe_engine_kept_bytes(struct moe_engine *e)
{
	(void)e;
	return 0;
}
