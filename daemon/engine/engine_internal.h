/* daemon/engine/engine_internal.h — the engine's state, shared by its files:
 * engine.c (create, load, the forward call), steps.c (a batch over the
 * ranks: stages and exchanges), replicas.c (slots,
 * publishing placements, copying and dropping replicas) and lost_rank.c
 * (taking a failed rank out). Not for anyone else: the API is engine.h.
 */
#ifndef MOE_ENGINE_INTERNAL_H
#define MOE_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/transport.h"

#define CHUNK_TOKENS	   MOE_CHUNK_TOKENS
#define DEFAULT_MAX_TOKENS 4096

struct moe_engine {
	struct moe_model *m;
	uint32_t max_tokens, chunk;
	struct moe_pool **rank_pool; /* [n_ranks]: each rank's own threads */
	struct moe_pool *driver;     /* n_ranks > 1: one thread per rank runs its stages */
	struct moe_transport *tr;    /* n_ranks > 1 */
	uint32_t n_ranks;
	struct moe_rank *ranks;
	struct moe_slot *slots; /* [(rank * n_moe_layers + layer) * slots_per_rank + slot] */
	struct moe_layer_state *ls; /* [rank * n_moe_layers + layer]: each rank's copy */
	struct layer_host *lh;	    /* [n_moe_layers]: the host arrays the ranks share */
	struct moe_placement *placement; /* the loaded one, until epoch 1 takes it */
	_Atomic uint32_t slots_per_rank; /* in use (the placements'), <= stride */
	uint32_t stride;	 /* slots per (rank, layer) in the table */
	int32_t *slot_expert; /* [like slots]: the expert a slot holds, -1 none */
	atomic_bool dead[MOE_MAX_RANKS]; /* lost ranks (written under fwd_lock) */
	uint32_t n_dead;
	uint32_t loss_epoch; /* the epoch published after the last rank lost */
	uint32_t ran_epoch;  /* the epoch the last batch ran on (fwd_lock) */
	int failed_rank; /* the rank whose stage failed in on_ranks, -1 */
	/* Slot bookkeeping for replicas (slot_lock): how many live epochs name
	 * each slot, and which slots are to be freed once none does. Publishes
	 * are serialized by publish_lock (outer; the retire hook, which a
	 * publish may run, takes slot_lock only). */
	pthread_mutex_t slot_lock, publish_lock;
	uint32_t *slot_refs;
	uint32_t *slot_reading; /* [like slots]: copies reading it now */
	bool *slot_drop;
	_Atomic uint64_t weight_bytes; /* router, shared experts and every slot held */

	struct moe_epochs *epochs;
	/* weights versions (versions.c; slot_lock) */
	struct layer_vers *lv;	/* [n_moe_layers] */
	bool lv_ready;		/* counted from epoch 1 on */
	struct wsource *src;	/* checkpoints weights came from: [0] the loaded one */
	uint32_t n_src, cap_src;
	uint64_t kept_bytes;	/* snapshots kept for rollback */
	uint8_t *last_reload;	/* [n_moe_layers]: changed by the last reload: 1 its
				   previous weights kept, 2 not kept (rollback) */

	pthread_mutex_t fwd_lock;
	uint32_t *ids;	  /* [max_tokens, K]: the batch's routing */
	float *w;	  /* [max_tokens, K] */
	struct moe_stage st[MOE_MAX_RANKS]; /* this round's, per rank */
	struct moe_stats *stats; /* load statistics (written here, read by status) */
	_Atomic uint64_t transport_ns; /* time in the transport's calls */

	bool device;	  /* the backend runs whole batches (ops->forward) */
	bool sizing;	  /* alloc_workspaces counts and allocates nothing */
	uint64_t ws_bytes; /* host workspaces, the engine's and its ranks' */
	const struct moe_slot **slot_tab; /* [E]: device backends */
	uint32_t *ecount; /* [E]: device backends */
	float last_ms, last_kernel_ms;
	atomic_bool lost;
	unsigned long fault_at, calls; /* MOED_TEST_ENGINE_FAULT */
	uint32_t rank_fault;	      /* MOED_TEST_RANK_FAULT: rank, */
	unsigned long rank_fault_at, batches; /* its batch, batches so far */
};

/* A layer's host arrays: read from the checkpoint once, shared read-only
 * by the ranks (each makes its own device copy in layer_init). */
struct layer_host {
	float *router, *bias, *shared_gate;
};

/* versions.c: see its header. */
struct wsource {
	char *path;
	uint64_t identity;
	struct moe_model *m; /* its tensor sources (files closed); e->m for [0] */
};

struct ver_rec {
	uint32_t version;
	uint32_t router_ver, router_src; /* router, bias, shared experts */
	uint32_t *ever, *esrc;		 /* [E]: each expert's version and source */
	bool rollback;			 /* made by a rollback */
};

struct layer_old {
	struct layer_old *next;
	uint32_t version, refs; /* refs: live epochs naming the version */
	bool kept;		/* held for rollback (reload.keep_previous) */
	struct moe_slot *slots; /* [R * stride]: the layer's slots as they were */
	int32_t *expert;	/* [R * stride]: what each held */
	bool *own;		/* [R * stride]: memory this snapshot frees */
	struct moe_layer_state *ls; /* [R] */
	bool own_layer;		/* the router arrays, router_dev and shared experts too */
	struct layer_host lh;
	uint64_t bytes;		/* owned */
};

struct layer_vers {
	uint32_t cur;		/* the version in the tables */
	uint32_t cur_refs;	/* live epochs naming it */
	struct layer_old *old;	/* older versions live epochs name, and the kept one */
	struct ver_rec *hist;	/* every version, oldest first */
	uint32_t n_hist, cap_hist;
};

/* Where a batch of layer l on an epoch reads its weights, per rank. */
struct layer_view {
	const struct moe_slot *slots[MOE_MAX_RANKS];
	const struct moe_layer_state *ls[MOE_MAX_RANKS];
};

int eng_versions_init(struct moe_engine *e);
void eng_versions_free(struct moe_engine *e);
void eng_free_old(struct moe_engine *e, struct layer_old *o);
/* +-1 on the versions an epoch names (slot_lock held); a snapshot nobody
 * names and not kept is freed. */
void eng_count_versions(struct moe_engine *e, const uint32_t *versions, int delta);
/* The layer's kept snapshot released (freed if no epoch names it); slot_lock held. */
void eng_unkeep(struct moe_engine *e, uint32_t l);
struct layer_old *eng_kept(struct moe_engine *e, uint32_t l);
/* The weights of ep's version of layer l (fwd_lock held, ep pinned). */
void eng_view(struct moe_engine *e, const struct moe_epoch *ep, uint32_t l, struct layer_view *w);
const struct ver_rec *eng_ver_rec(const struct moe_engine *e, uint32_t l, uint32_t version);
/* A new version record of layer l, a copy of `from` numbered last + 1
 * (slot_lock held). */
int eng_add_ver(struct moe_engine *e, uint32_t l, const struct ver_rec *from, uint32_t *out);
/* The checkpoint the current version of expert x of layer l was read from. */
struct moe_model *eng_expert_model(struct moe_engine *e, uint32_t l, uint32_t x);

static inline size_t slot_index(const struct moe_engine *e, uint32_t rank, uint32_t layer, uint32_t s)
{
	return ((size_t)rank * e->m->n_moe_layers + layer) * e->stride + s;
}

static inline struct moe_slot *slot_at(struct moe_engine *e, uint32_t rank, uint32_t layer, uint32_t s)
{
	return &e->slots[slot_index(e, rank, layer, s)];
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* engine.c: reads an expert into a slot it allocates ("expert 5" or "the
 * shared expert" as `what`, for a message naming what did not fit). */
int eng_upload(struct moe_engine *e, struct moe_rank *r, struct moe_slot *s,
	       const struct moe_expert_src *src, uint32_t layer, const char *what, char *err);
/* The same from another checkpoint of the same architecture. */
int eng_upload_from(struct moe_engine *e, struct moe_model *m, struct moe_rank *r,
		    struct moe_slot *s, const struct moe_expert_src *src, uint32_t layer,
		    const char *what, char *err);

/* engine.c: a layer's host arrays (router widened, bias, shared gate) from m. */
int eng_read_host(struct moe_engine *e, struct moe_model *m, uint32_t l, struct layer_host *lh,
		  char *err);

/* replicas.c */
/* A dropped slot that no live epoch names and no copy reads: free it
 * (slot_lock held). */
static inline bool eng_slot_unused(const struct moe_engine *e, size_t k)
{
	return e->slot_drop[k] && !e->slot_refs[k] && !e->slot_reading[k];
}
/* Frees a replica's slot (slot_lock held; no live epoch names it). */
void eng_free_slot(struct moe_engine *e, size_t i, uint32_t rank);
/* Adds delta to the reference count of every slot p names (slot_lock held). */
void eng_count_slots(struct moe_engine *e, const struct moe_placement *p, int delta);
/* The epochs' retire hook. */
void eng_retire_epoch(void *arg, const struct moe_epoch *ep);
/* moe_engine_publish with publish_lock held. */
int eng_publish_locked(struct moe_engine *e, struct moe_placement *p, const uint32_t *versions,
		       uint32_t *id, char *err);

/* steps.c: the batch on the ranks of a step backend (fwd_lock held). */
int eng_forward_steps(struct moe_engine *e, struct moe_epoch *ep, uint32_t l,
		      const struct moe_batch *b, const struct moe_seg *segs, uint32_t n_segs,
		      char *err);

/* lost_rank.c: takes rank `dead` out (fwd_lock held); 0 or
 * -ENOTRECOVERABLE with err. */
int eng_lose_rank(struct moe_engine *e, uint32_t dead, const char *why, char *err);

#endif
