/* daemon/engine/engine.h — runs the MoE block of one layer for a batch of tokens.
 *
 * The only calls the scheduler makes: acquire an epoch, forward batches on
 * it, release it. An epoch pins one version of (placement, weights) from the
 * start of a batch to its end; a change (replication, rebalance, reload)
 * publishes a new epoch and the old one is retired when its last holder
 * releases it (daemon/engine/epoch.h).
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
#include <stdbool.h>

#include "daemon/engine/backend.h"
#include "daemon/engine/epoch.h"
#include "daemon/engine/model.h"
#include "daemon/engine/placement.h"

struct moe_engine;

struct moe_engine_opts {
	uint32_t threads;	  /* 0: all online CPUs */
	uint32_t max_batch_tokens; /* workspaces are sized for this; 0: 4096 */
	uint32_t n_ranks;	  /* CPU ranks (each its own threads, slots and weights);
				     device backends: 1 for now */
	uint32_t spare_slots;	  /* per rank per layer */
	uint32_t stats_window_ms; /* load statistics' sliding window; 0: 60 s */
	const char *backend;	  /* NULL/"cpu", or "cuda" (built with CUDA) */
	int device;		  /* GPU index for "cuda" */
	/* Called after each layer is loaded (a large checkpoint takes a while:
	 * moed extends systemd's start timeout from here). */
	/* Called after each MoE layer is loaded; non-zero stops the load
	 * (moe_engine_create fails with -ECANCELED). */
	int (*progress)(void *arg, uint32_t layers_done, uint32_t layers);
	void *progress_arg;
	/* Test hook (moed: MOED_TEST_ENGINE_FAULT): the N-th batch fails as a
	 * lost device does, on any backend; 0: never. */
	unsigned long test_fault_at;
	/* Test hook (moed: MOED_TEST_RANK_FAULT=R:N): rank R's expert stage
	 * fails in the N-th batch (the rank is lost); 0: never. */
	uint32_t test_rank_fault_rank;
	unsigned long test_rank_fault_at;
	/* The backend's kernels and test hooks (isa: the CPU kernels) */
	struct moe_backend_tuning tuning;
};

/* The environment's overrides, for a program's main() only (the library
 * itself never reads the environment): MOE_CPU_ISA, MOE_CUDA_GEMM,
 * MOE_CUDA_GRAPHS=0, MOE_CUDA_FUSED=1, and the test hooks
 * MOED_TEST_ENGINE_FAULT=N, MOED_TEST_RANK_FAULT=R:N and MOED_TEST_CUDA_FAULT=N. Fields the
 * environment does not name are left as they are. */
void moe_engine_opts_from_env(struct moe_engine_opts *o);


struct moe_batch {
	uint32_t layer; /* decoder-layer index in the checkpoint */
	uint32_t n_tokens;
	enum moe_dtype dtype;
	const void *in; /* [n_tokens, hidden] */
	void *out;	/* [n_tokens, hidden] */
	uint32_t *topk_ids;   /* optional [n_tokens, K]: chosen experts, best first */
	float *topk_weights;  /* optional [n_tokens, K] */
	/* Or, with n_segs > 0, the tokens come in segments (one per request,
	 * each with its own buffers and dtype; in, out and dtype above are
	 * then unused). The segments' n_tokens must add up to n_tokens. */
	uint32_t n_segs;
	const struct moe_seg *segs;
	/* optional out: where the batch's time went (below) */
	struct moe_stage_times *times;
};

/* Where a batch's time went, in ns, summed over its rounds (moe_batch.times;
 * written only when the call succeeds, else left as it was). Step backends
 * (the CPU): convert (the inputs read from the segments and converted to
 * fp32: the copy-in), router (logits, top-k), dispatch (rows sorted into
 * slots), exchange (the transport between ranks, both ways; 0 with one
 * rank), experts (the expert FFNs), combine (the K results and the shared
 * expert summed, converted and written to the segments: the copy-out).
 * With several ranks each stage counts the slowest rank's time. Device
 * backends: device only (the whole batch on the device, copies included,
 * as the device measured it). */
enum moe_stage_id {
	MOE_STAGE_CONVERT,
	MOE_STAGE_ROUTER,
	MOE_STAGE_DISPATCH,
	MOE_STAGE_EXCHANGE,
	MOE_STAGE_EXPERTS,
	MOE_STAGE_COMBINE,
	MOE_STAGE_DEVICE,
	MOE_STAGE_COUNT
};

struct moe_stage_times {
	uint64_t ns[MOE_STAGE_COUNT];
};

/* Loads every MoE layer of `m` into slots (reading the checkpoint with
 * pread), verifies that no shard changed during the load, and closes the
 * files. `m` must outlive the engine. */
int moe_engine_create(struct moe_model *m, const struct moe_engine_opts *o,
		      struct moe_engine **out, char *err);
void moe_engine_destroy(struct moe_engine *e);

/* The current epoch, pinned until moe_epoch_release (epoch.h). */
struct moe_epoch *moe_epoch_acquire(struct moe_engine *e);
/* Publishes a new epoch: `p` (taken over; NULL: the current placement)
 * must fit the engine's slots and name for each replica a slot that holds
 * that expert; `versions` [n_moe_layers] (NULL: unchanged). 0 and the new
 * id, or -EINVAL / -ENOMEM with err. Any thread. */
int moe_engine_publish(struct moe_engine *e, struct moe_placement *p, const uint32_t *versions,
		       uint32_t *id, char *err);
/* The epoch table, for moe_epochs_info / moe_epochs_counts. */
struct moe_epochs *moe_engine_epochs(struct moe_engine *e);
/* Copies MoE layer position l's expert x into an empty slot (rank, slot),
 * from any slot that holds it, so that a placement naming it can then be
 * published (CPU ranks; device ranks: -ENOTSUP). The slot must hold no
 * expert (-EBUSY): nothing published names it, so no batch reads it while
 * it is written. Call from one thread at a time. */
int moe_engine_replicate(struct moe_engine *e, uint32_t l, uint32_t x, uint32_t rank,
			 uint32_t slot, char *err);
/* The same, copying at most pace->bytes_per_s (0: unpaced) in pieces, and
 * giving up with -ECANCELED when *pace->cancel becomes true (the slot is
 * then empty again); *pace->copied counts the bytes. */
struct moe_copy_pace {
	uint64_t bytes_per_s;
	const atomic_bool *cancel;   /* may be NULL */
	_Atomic uint64_t *copied;    /* may be NULL */
};
int moe_engine_replicate_paced(struct moe_engine *e, uint32_t l, uint32_t x, uint32_t rank,
			       uint32_t slot, const struct moe_copy_pace *pace, char *err);
/* What a slot holds: an expert (>= 0), or one of these. */
#define MOE_SLOT_EMPTY	  (-1)
#define MOE_SLOT_FILLING  (-2) /* a copy into it runs */
#define MOE_SLOT_DROPPING (-3) /* freed once no live epoch names it */
#define MOE_SLOT_INVALID  (-4) /* no such layer, rank or slot */
int moe_engine_slot_state(struct moe_engine *e, uint32_t l, uint32_t rank, uint32_t slot);
/* Marks a replica's slot to be freed once no live epoch names it (at once
 * if none does); a placement naming it can no longer be published.
 * -ENOENT for an empty slot. */
int moe_engine_drop_replica(struct moe_engine *e, uint32_t l, uint32_t rank, uint32_t slot,
			    char *err);
uint32_t moe_engine_slots_per_rank(const struct moe_engine *e);

/* 0, or -EINVAL (layer is not MoE, bad dtype), -E2BIG (too many tokens),
 * -ENOTRECOVERABLE (the device is lost: every later call fails too, the
 * process should exit and be restarted); err gets the reason. */
int moe_engine_forward(struct moe_engine *e, struct moe_epoch *ep, const struct moe_batch *b,
		       char *err);

/* Bytes of host memory the engine's workspaces take for these options
 * (weights not included): the engine's and, for a host backend, its
 * rank's, counted from the same lists the engine allocates from (so what
 * moed -t prints is what is allocated). */
uint64_t moe_engine_workspace_bytes(const struct moe_model *m, const struct moe_engine_opts *o);
/* The same for a device backend's device memory (0 for the CPU). */
uint64_t moe_engine_device_workspace_bytes(const struct moe_model *m,
					   const struct moe_engine_opts *o);
/* What this engine allocated for its host workspaces (the engine's and
 * rank 0's): moe_engine_workspace_bytes of its options. */
uint64_t moe_engine_allocated_workspace_bytes(const struct moe_engine *e);

const struct moe_model *moe_engine_model(const struct moe_engine *e);
/* Worker threads of all ranks together. */
uint32_t moe_engine_threads(const struct moe_engine *e);
uint32_t moe_engine_ranks(const struct moe_engine *e);
uint32_t moe_engine_max_tokens(const struct moe_engine *e);
const char *moe_engine_backend(const struct moe_engine *e);
/* The kernels in use on rank 0 ("scalar", "avx2", "avx512"). */
const char *moe_engine_kernels(const struct moe_engine *e);
/* What rank 0 runs on ("cpu (avx2 kernels)", "GPU 0: NVIDIA H100 ..."). */
const char *moe_engine_device(const struct moe_engine *e);
/* Device time of the last batch in ms (device backends), or < 0. */
float moe_engine_last_device_ms(const struct moe_engine *e);
/* The part of it spent in the layer's kernels (input already on the
 * device, output not yet copied back), or < 0. */
float moe_engine_last_kernel_ms(const struct moe_engine *e);
/* Non-zero once a device was lost (see moe_engine_forward). */
bool moe_engine_lost(const struct moe_engine *e);
/* The epoch the last batch ran on: the one it was given, or, when a rank
 * was lost since that one was published, the one published without it
 * (the worker reports this id in completions). */
uint32_t moe_engine_last_epoch(const struct moe_engine *e);
/* Pins host memory that batch segments will point into (client regions)
 * for device backends: 0 when pinned, -ENOTSUP when the backend has no use
 * for it (CPU), another -errno with err when pinning failed (copies then
 * go through the driver's staging, slower but correct). */
int moe_engine_host_register(struct moe_engine *e, void *p, size_t len, char *err);
void moe_engine_host_unregister(struct moe_engine *e, void *p);
/* Bytes of weights held by the engine (slots + router state). */
uint64_t moe_engine_weight_bytes(const struct moe_engine *e);
/* Tokens routed to expert `x` of MoE layer position `pos` since start. */
uint64_t moe_engine_expert_tokens(const struct moe_engine *e, uint32_t pos, uint32_t x);
/* The load statistics (daemon/engine/stats.h): read from any thread. */
const struct moe_stats *moe_engine_stats(const struct moe_engine *e);
/* Whether a rank was lost (taken out after a failure; its experts moved). */
bool moe_engine_rank_lost(const struct moe_engine *e, uint32_t rank);
/* Time spent in the transport's calls (exchange of counts, rows and
 * results between ranks) and bytes moved between different ranks, since
 * start; 0 with one rank. Read from the forward thread, or as a rough
 * figure from any thread. */
uint64_t moe_engine_transport_ns(const struct moe_engine *e);
uint64_t moe_engine_transport_bytes(const struct moe_engine *e);

#endif
