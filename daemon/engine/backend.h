/* daemon/engine/backend.h — what a kind of device provides to the engine.
 *
 * Two shapes of backend share the seam:
 *  - step backends (cpu) run a chunk of a batch as three stages on each
 *    rank, over buffers the rank owns (struct moe_xbuf), with the engine's
 *    transport (daemon/engine/transport.h) moving rows between them:
 *
 *      dispatch  this rank's share of the tokens: convert, route, choose a
 *                replica per (token, k), permute the rows into the send
 *                buffer by (destination rank, slot) -> send counts
 *      (transport: exchange_counts, then alltoallv of rows and scales)
 *      experts   the rows received, grouped by slot: SwiGLU FFNs scaled by
 *                the routing weight, plus the shared expert(s) over this
 *                rank's own tokens; results in arrival order
 *      (transport: alltoallv back, the inverse of the first)
 *      combine   per own token, its K result rows in k order + shared, in
 *                fp32, cast once into the request's output
 *
 *    A GPU rank fits the same stages (device buffers, an NCCL transport).
 *  - device backends (cuda, single rank for now) provide forward: the whole
 *    batch on the device (convert, route, permute, expert GEMMs, combine),
 *    because a round trip to the host between the steps would cost more
 *    than the steps.
 * Either way the engine owns placement and epochs (which slot serves which
 * expert), the backend owns memory on its device and the math there.
 */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/engine/model.h"
#include "daemon/engine/placement.h"

struct moe_pool;

/* Step backends get at most this many tokens per stage round (the engine
 * works in chunks so that the exchange buffers stay bounded). */
#define MOE_CHUNK_TOKENS 1024

struct moe_slot {
	void *mem;
	size_t bytes;
	uint32_t inter; /* I of the expert held (shared experts differ) */
};

/* One layer on one rank. The host arrays (router, bias, shared_gate) are
 * the engine's, shared read-only by its ranks; router_dev and the shared
 * expert are each rank's own copy (as a GPU's would be). */
struct moe_layer_state {
	const float *router;	  /* [E, H] fp32 (widened from the checkpoint) */
	void *router_dev;	  /* the rank's copy/layout of router (layer_init) */
	const float *bias;	  /* [E] or NULL */
	const float *shared_gate; /* [H] or NULL: Qwen2-MoE sigmoid gate */
	struct moe_slot shared;	  /* .mem NULL without shared experts */
};

/* A run of tokens of one request inside a batch, in host memory. */
struct moe_seg {
	const void *in; /* [n_tokens, H] */
	void *out;	/* [n_tokens, H] */
	enum moe_dtype dtype;
	uint32_t n_tokens;
	/* optional [n_tokens, K] each: the experts each token was routed to,
	 * best first, and their routing weights (written by the engine) */
	uint32_t *topk_ids;
	float *topk_weights;
};

/* One batch of one layer for a device backend. */
struct moe_fwd {
	uint32_t n_tokens;
	uint32_t n_segs;
	const struct moe_seg *segs; /* tokens in order, each n_tokens > 0 */
	const struct moe_slot *const *expert_slot; /* [E]: the slot serving each expert */
	uint32_t *topk_ids;	/* optional [n, K] */
	float *topk_weights;	/* optional [n, K] */
	uint32_t *expert_count; /* out [E]: rows routed to each expert */
	float device_ms;	/* out: device time of the batch, copies from and to the
				 * host included (< 0: not measured) */
	float kernel_ms;	/* out: device time of the layer's kernels alone, input
				 * on the device to output on the device (< 0: not
				 * measured) */
};

/* How a rank's backend is tuned: options the caller resolved (from the
 * configuration or, in the mains, the environment: moe_engine_opts_from_env).
 * NULL/0 fields: the defaults. */
struct moe_backend_tuning {
	const char *isa;	/* CPU kernels: "auto", "scalar", "avx2", "avx512",
				 * "avx512bf16", "amx" */
	const char *isa_from;	/* what named it, for messages ("cpu.isa", "MOE_CPU_ISA") */
	const char *precision;	/* CPU activations: "auto" (bf16 for bf16 models, fp32
				 * otherwise), "bf16" (h rounded to bf16 before the down
				 * projection, as transformers does), "fp32" */
	const char *cuda_gemm;	/* "auto", "cublas", "small", "grouped" (MOE_CUDA_GEMM) */
	bool cuda_no_graphs;	/* MOE_CUDA_GRAPHS=0: small batches launch kernel by kernel */
	bool cuda_fused;	/* MOE_CUDA_FUSED=1: the fused small front */
	unsigned long cuda_fault_at; /* test hook MOED_TEST_CUDA_FAULT: the N-th GPU batch
					performs an illegal access */
};

/* What a rank is sized for (rank_init, workspace_bytes). */
struct moe_rank_shape {
	uint32_t max_tokens;	 /* a batch */
	uint32_t chunk;		 /* tokens per stage round (step backends) */
	uint32_t threads;	 /* the rank's worker threads */
	uint32_t n_ranks;	 /* ranks of the engine */
	uint32_t slots_per_rank; /* per layer */
};

/* The rank-owned buffers of the exchange (step backends; host memory on
 * the CPU, device memory on a GPU rank), allocated by rank_init for a
 * chunk. Rows are [H] fp32.
 *  send, send_scale: this rank's (token, k) rows grouped by destination
 *      rank, then by slot (dispatch writes them and send_counts); the
 *      results come back into the same places (the return alltoallv);
 *  recv, recv_scale: the rows received, grouped by source rank, then slot
 *      (recv_counts, from exchange_counts); with one rank recv is send;
 *  ret: the expert stage's results in the order of recv (the return
 *      alltoallv's send buffer);
 *  back: where combine reads a row's result (send, or ret with one rank). */
struct moe_xbuf {
	float *send, *send_scale;
	float *recv, *recv_scale;
	float *ret, *back;
	uint32_t *send_counts, *recv_counts; /* [n_ranks * slots_per_rank] */
	uint32_t *send_rows, *recv_rows;     /* [n_ranks]: sums per peer (engine) */
	uint32_t send_cap, recv_cap;	     /* rows */
};

/* One stage round of one layer on one rank: its share of a chunk. */
struct moe_stage {
	const struct moe_layer_state *ls;  /* this rank's copy of the layer */
	const struct moe_seg *segs;	   /* the batch's segments */
	uint32_t n_segs;
	uint32_t t0, n;			   /* this rank's tokens: [t0, t0 + n) of the batch */
	uint32_t *ids;			   /* [n, K]: their routing (dispatch writes) */
	float *w;			   /* [n, K] */
	const struct moe_placement *place; /* the epoch's */
	uint32_t layer;			   /* MoE layer position in place */
	const struct moe_slot *slots;	   /* [slots_per_rank]: this rank's, of the layer */
	uint64_t busy_ns;		   /* out (experts): time of the expert FFNs */
	uint64_t convert_ns, route_ns;	   /* out (dispatch): its first two parts,
					      for moe_stage_times (0: not measured) */
};

struct moe_rank {
	uint32_t id;
	int device; /* GPU index for device backends */
	const char *kernels; /* name of the kernels in use, for logs and status */
	const struct moe_backend_ops *ops;
	void *priv;
	struct moe_pool *pool;
	struct moe_rank_shape shape; /* set before rank_init */
	struct moe_xbuf xb;	     /* step backends: set by rank_init */
	char desc[192]; /* what the rank runs on, for logs and status */
};

struct moe_backend_ops {
	const char *name;
	int (*rank_init)(struct moe_rank *r, const struct moe_model *m,
			 const struct moe_backend_tuning *t, char *err);
	/* Bytes of workspaces rank_init allocates for this shape (host memory
	 * for the CPU, device memory for a device backend), from the same
	 * list rank_init allocates: moed -t prints what is allocated. */
	uint64_t (*workspace_bytes)(const struct moe_model *m, const struct moe_rank_shape *s,
				    const struct moe_backend_tuning *t);
	void (*rank_fini)(struct moe_rank *r);
	/* Makes ls->router_dev from ls->router; layer_fini frees it. */
	int (*layer_init)(struct moe_rank *r, const struct moe_model *m, struct moe_layer_state *ls);
	void (*layer_fini)(struct moe_rank *r, struct moe_layer_state *ls);
	/* Room for an expert of intermediate size `inter` (its layout is the
	 * backend's: the CPU packs panels). */
	int (*slot_alloc)(struct moe_rank *r, const struct moe_model *m, uint32_t inter,
			  struct moe_slot *s, char *err);
	/* Reads an expert's three matrices from the checkpoint into the slot. */
	int (*slot_upload)(struct moe_rank *r, struct moe_slot *s, struct moe_model *m,
			   const struct moe_expert_src *src, char *err);
	void (*slot_free)(struct moe_rank *r, struct moe_slot *s);

	/* Step backends: the stages (see the top of this file). Each runs on
	 * one thread of the engine per rank, the ranks at the same time, and
	 * uses the rank's own pool. dispatch and experts may fail (the batch
	 * then fails and no output has been written); combine cannot. */
	int (*dispatch)(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st);
	int (*experts)(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st);
	void (*combine)(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st);

	/* Device backends: the whole batch. -ENOTRECOVERABLE when the device
	 * is lost (a sticky error): every later call fails the same way. */
	int (*forward)(struct moe_rank *r, const struct moe_model *m,
		       const struct moe_layer_state *ls, struct moe_fwd *f, char *err);
	/* Optional: pins host memory that batches will read and write (client
	 * regions), so that copies to and from the device are DMA. */
	int (*host_register)(struct moe_rank *r, void *p, size_t len, char *err);
	void (*host_unregister)(struct moe_rank *r, void *p);
};

extern const struct moe_backend_ops moe_backend_cpu;
/* The kernels a CPU rank runs this model's experts with under tuning t
 * ("amx", or "avx512" for an f32 model on amx...), and in note why a bf16
 * path does not run (or ""); NULL and err when t is refused. */
const char *moe_backend_cpu_kernels(const struct moe_model *m, const struct moe_backend_tuning *t,
				    char *note, size_t n, char *err);
#ifdef MOE_HAVE_CUDA
extern const struct moe_backend_ops moe_backend_cuda;
#endif

#endif
