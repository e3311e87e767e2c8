/* daemon/engine.h — runs the MoE block of one layer for a batch of tokens.
 *
 * The only calls the scheduler makes: acquire an epoch, forward batches on
 * it, release it. An epoch pins one version of (placement, weights) from the
 * start of a batch to its end; a change (replication, rebalance, reload)
 * publishes a new epoch and the old one is freed when its last holder
 * releases it.
 *
 * Forward semantics (DESIGN.md): input = hidden states entering the MoE block
 * [n_tokens, hidden] row-major, in f32/bf16/f16; they are first rounded to
 * the model dtype, as inside a model of that dtype. Output = routed + shared
 * experts, without the residual, in the request's dtype. The math runs in
 * fp32 (routing weights, expert outputs and their sum), and is cast once.
 *
 * Threading: moe_engine_forward() may be called from several threads; batches
 * run one at a time (the engine uses all its threads for one batch).
 */
#ifndef MOE_ENGINE_H
#define MOE_ENGINE_H

#include <stdatomic.h>

#include "daemon/backend.h"
#include "daemon/model.h"
#include "daemon/placement.h"

struct moe_engine;

struct moe_engine_opts {
	uint32_t threads;	  /* 0: all online CPUs */
	uint32_t max_batch_tokens; /* workspaces are sized for this; 0: 4096 */
	uint32_t n_ranks;	  /* 1 for now */
	uint32_t spare_slots;	  /* per rank per layer */
	const char *isa;	  /* CPU kernels: NULL/"auto", "scalar", "avx2", "avx512"
				     (MOE_CPU_ISA in the environment overrides) */
	/* Called after each layer is loaded (a large checkpoint takes a while:
	 * moed extends systemd's start timeout from here). */
	void (*progress)(void *arg, uint32_t layers_done, uint32_t layers);
	void *progress_arg;
};

struct moe_epoch {
	uint64_t id;
	atomic_uint refs;
	struct moe_engine *engine;
	const struct moe_placement *placement;
};

struct moe_batch {
	uint32_t layer; /* decoder-layer index in the checkpoint */
	uint32_t n_tokens;
	enum moe_dtype dtype;
	const void *in; /* [n_tokens, hidden] */
	void *out;	/* [n_tokens, hidden] */
	uint32_t *topk_ids;   /* optional [n_tokens, K]: chosen experts, best first */
	float *topk_weights;  /* optional [n_tokens, K] */
};

/* Loads every MoE layer of `m` into slots (reading the checkpoint with
 * pread), verifies that no shard changed during the load, and closes the
 * files. `m` must outlive the engine. */
int moe_engine_create(struct moe_model *m, const struct moe_engine_opts *o,
		      struct moe_engine **out, char *err);
void moe_engine_destroy(struct moe_engine *e);

struct moe_epoch *moe_epoch_acquire(struct moe_engine *e);
void moe_epoch_release(struct moe_epoch *ep);

/* 0, or -EINVAL (layer is not MoE, bad dtype), -E2BIG (too many tokens);
 * err gets the reason. */
int moe_engine_forward(struct moe_engine *e, struct moe_epoch *ep, const struct moe_batch *b,
		       char *err);

/* Bytes of host memory the engine's workspaces take for these options
 * (weights not included). */
uint64_t moe_engine_workspace_bytes(const struct moe_model *m, const struct moe_engine_opts *o);

const struct moe_model *moe_engine_model(const struct moe_engine *e);
uint32_t moe_engine_threads(const struct moe_engine *e);
uint32_t moe_engine_max_tokens(const struct moe_engine *e);
const char *moe_engine_backend(const struct moe_engine *e);
/* The kernels in use on rank 0 ("scalar", "avx2", "avx512"). */
const char *moe_engine_kernels(const struct moe_engine *e);
/* Bytes of weights held by the engine (slots + router state). */
uint64_t moe_engine_weight_bytes(const struct moe_engine *e);
/* Tokens routed to expert `x` of MoE layer position `pos` since start. */
uint64_t moe_engine_expert_tokens(const struct moe_engine *e, uint32_t pos, uint32_t x);

#endif
