/* daemon/engine/backend.h — what a kind of device provides to the engine.
 *
 * Two shapes of backend share the seam:
 *  - step backends (cpu) provide route + experts; the engine does the
 *    conversion, dispatch and combine on the host between them;
 *  - device backends (cuda) provide forward: the whole batch on the device
 *    (convert, route, permute, expert GEMMs, combine), because a round trip
 *    to the host between the steps would cost more than the steps.
 * Either way the engine owns placement and epochs (which slot serves which
 * expert), the backend owns memory on its device and the math there.
 */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/engine/model.h"

struct moe_pool;

/* Step backends get at most this many tokens per `experts` call (the
 * engine works in chunks so that its sorted buffers stay bounded). */
#define MOE_CHUNK_TOKENS 1024

/* Room for one expert's weights on a rank. CPU: gate | up | down, each
 * row-major in the model dtype. */
struct moe_slot {
	void *mem;
	size_t bytes;
	uint32_t inter; /* I of the expert held (shared experts differ) */
};

/* Router state of one layer, shared by the ranks of a host. */
struct moe_layer_state {
	float *router;	    /* [E, H] fp32 (widened from the checkpoint) */
	void *router_dev;   /* the backend's copy/layout of router (layer_init) */
	float *bias;	    /* [E] or NULL */
	float *shared_gate; /* [H] or NULL: Qwen2-MoE sigmoid gate */
	struct moe_slot shared; /* .mem NULL without shared experts */
};

/* One expert FFN over the rows routed to it:
 *   y[r] = scale[r] * down(silu(gate x[r]) * up x[r])   for r < n */
struct moe_ffn_group {
	const struct moe_slot *slot;
	uint32_t n;
	const float *x;	    /* [n, H] */
	float *h;	    /* [n, inter] scratch */
	float *y;	    /* [n, H] */
	const float *scale; /* [n] or NULL (1) */
};

struct moe_rank_work {
	enum moe_dtype wdt;
	uint32_t hidden;
	uint32_t n_groups;
	struct moe_ffn_group *groups;
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
	const char *isa;	/* CPU kernels: "auto", "scalar", "avx2", "avx512" */
	const char *isa_from;	/* what named it, for messages ("cpu.isa", "MOE_CPU_ISA") */
	const char *cuda_gemm;	/* "auto", "cublas", "small", "grouped" (MOE_CUDA_GEMM) */
	bool cuda_no_graphs;	/* MOE_CUDA_GRAPHS=0: small batches launch kernel by kernel */
	bool cuda_fused;	/* MOE_CUDA_FUSED=1: the fused small front */
	unsigned long cuda_fault_at; /* test hook MOED_TEST_CUDA_FAULT: the N-th GPU batch
					performs an illegal access */
};

struct moe_rank {
	uint32_t id;
	int device; /* GPU index for device backends */
	const char *kernels; /* name of the kernels in use, for logs and status */
	const struct moe_backend_ops *ops;
	void *priv;
	struct moe_pool *pool;
	char desc[192]; /* what the rank runs on, for logs and status */
};

struct moe_backend_ops {
	const char *name;
	int (*rank_init)(struct moe_rank *r, const struct moe_model *m, uint32_t max_tokens,
			 const struct moe_backend_tuning *t, char *err);
	/* Bytes of workspaces rank_init allocates for these arguments (host
	 * memory for the CPU, device memory for a device backend), from the
	 * same list rank_init allocates: moed -t prints what is allocated. */
	uint64_t (*workspace_bytes)(const struct moe_model *m, uint32_t max_tokens,
				    uint32_t threads);
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
	/* Top-k ids and weights for n tokens x [n, H] fp32. */
	int (*route)(struct moe_rank *r, const struct moe_model *m, const struct moe_layer_state *ls,
		     const float *x, uint32_t n, uint32_t *ids, float *w);
	/* Runs every group of the work (grouped expert FFNs). */
	int (*experts)(struct moe_rank *r, const struct moe_rank_work *w);

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
#ifdef MOE_HAVE_CUDA
extern const struct moe_backend_ops moe_backend_cuda;
#endif

#endif
