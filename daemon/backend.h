/* daemon/backend.h — what a kind of device provides to the engine (cpu now,
 * cuda later). The engine owns placement, epochs, dispatch and combine; a
 * backend owns memory on its device and the math that runs there.
 */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/model.h"

struct moe_pool;

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

struct moe_rank {
	uint32_t id;
	const char *kernels; /* name of the kernels in use, for logs and status */
	const struct moe_backend_ops *ops;
	void *priv;
	struct moe_pool *pool;
};

struct moe_backend_ops {
	const char *name;
	/* isa: the CPU kernels to use ("auto", "scalar", "avx2", "avx512"). */
	int (*rank_init)(struct moe_rank *r, const struct moe_model *m, uint32_t max_tokens,
			 const char *isa, char *err);
	void (*rank_fini)(struct moe_rank *r);
	/* Makes ls->router_dev from ls->router; layer_fini frees it. */
	int (*layer_init)(struct moe_rank *r, const struct moe_model *m, struct moe_layer_state *ls);
	void (*layer_fini)(struct moe_rank *r, struct moe_layer_state *ls);
	/* Room for an expert of intermediate size `inter` (its layout is the
	 * backend's: the CPU packs panels). */
	int (*slot_alloc)(struct moe_rank *r, const struct moe_model *m, uint32_t inter,
			  struct moe_slot *s);
	/* Reads an expert's three matrices from the checkpoint into the slot. */
	int (*slot_upload)(struct moe_rank *r, struct moe_slot *s, struct moe_model *m,
			   const struct moe_expert_src *src, char *err);
	void (*slot_free)(struct moe_rank *r, struct moe_slot *s);
	/* Top-k ids and weights for n tokens x [n, H] fp32. */
	int (*route)(struct moe_rank *r, const struct moe_model *m, const struct moe_layer_state *ls,
		     const float *x, uint32_t n, uint32_t *ids, float *w);
	/* Runs every group of the work (grouped expert FFNs). */
	int (*experts)(struct moe_rank *r, const struct moe_rank_work *w);
};

extern const struct moe_backend_ops moe_backend_cpu;

#endif
