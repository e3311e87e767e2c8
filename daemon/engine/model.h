/* daemon/engine/model.h — what a checkpoint says about its MoE layers.
 *
 * Reads config.json, decides the family (model_type, or an override), which
 * decoder layers are MoE, the routing parameters, and where each tensor of
 * each MoE layer lives (shard, tensor, byte offset), for both checkpoint
 * layouts: per-expert nn.Linear tensors and transformers v5's fused
 * experts.gate_up_proj [E, 2I, H] + experts.down_proj [E, H, I]. Every shape
 * and dtype is checked against the config before anything is read. It knows
 * nothing of ranks or slots: the engine decides where weights go.
 *
 * The tensor descriptions point into the open checkpoint: they are valid
 * until moe_model_close_files().
 */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdbool.h>

#include "daemon/engine/checkpoint.h"
#include "kernels/cpu/route.h"
#include "kernels/dtype.h"

enum moe_family {
	MOE_FAM_MIXTRAL,
	MOE_FAM_QWEN2_MOE,
	MOE_FAM_QWEN3_MOE,
	MOE_FAM_OLMOE,
	MOE_FAM_DEEPSEEK_V2,
	MOE_FAM_DEEPSEEK_V3,
	MOE_FAM_COUNT
};

enum moe_layout { MOE_LAYOUT_PER_EXPERT, MOE_LAYOUT_FUSED };

/* Tensors of an MoE block, for naming (moe_model_tensor_name). */
enum moe_tensor_kind {
	MOE_T_ROUTER,		/* [E, H] */
	MOE_T_BIAS,		/* [E] DeepSeek-V3 e_score_correction_bias */
	MOE_T_GATE,		/* per expert [I, H] */
	MOE_T_UP,		/* per expert [I, H] */
	MOE_T_DOWN,		/* per expert [H, I] */
	MOE_T_FUSED_GATE_UP,	/* [E, 2I, H] */
	MOE_T_FUSED_DOWN,	/* [E, H, I] */
	MOE_T_SHARED_GATE,	/* [Is, H] */
	MOE_T_SHARED_UP,	/* [Is, H] */
	MOE_T_SHARED_DOWN,	/* [H, Is] */
	MOE_T_SHARED_EXPERT_GATE, /* Qwen2-MoE [1, H] */
};

/* A row-major matrix inside a checkpoint tensor. */
struct moe_mat_src {
	struct moe_ckpt_tensor at;
	uint64_t off; /* byte offset inside the tensor */
	uint32_t rows, cols;
	enum moe_dtype dtype;
};

struct moe_expert_src {
	struct moe_mat_src gate; /* [I, H] */
	struct moe_mat_src up;	 /* [I, H] */
	struct moe_mat_src down; /* [H, I] */
};

struct moe_layer_desc {
	uint32_t index; /* decoder-layer index: model.layers.{index} */
	enum moe_layout layout;
	struct moe_mat_src router; /* [E, H] */
	bool has_bias;
	struct moe_mat_src bias; /* [1, E] */
	struct moe_expert_src *experts; /* [E] */
	bool has_shared;
	struct moe_expert_src shared;
	bool has_shared_gate;
	struct moe_mat_src shared_gate; /* [1, H] */
};

struct moe_model {
	char *dir;
	enum moe_family family;
	enum moe_dtype dtype;	/* of every MoE weight */
	uint32_t hidden;	/* H */
	uint32_t inter;		/* I: per routed expert */
	uint32_t shared_inter;	/* Is: 0 without shared experts */
	uint32_t n_experts;	/* E */
	uint32_t top_k;		/* K */
	uint32_t n_layers;	/* decoder layers, dense ones included */
	uint32_t n_moe_layers;
	struct moe_layer_desc *layers; /* the MoE layers, ascending index */
	struct moe_route_params route; /* bias is per layer: NULL here */
	bool router_fp32;	/* DeepSeek: logits stay fp32, else rounded to dtype */
	uint64_t expert_bytes;	/* one routed expert's weights */
	uint64_t layer_fixed_bytes; /* router, bias, shared expert(s) of one layer */
	uint64_t identity;	/* hash of all shards' identities */
	bool check_finite;	/* moe_model_read refuses a NaN or an Inf (-EDOM) */
	struct moe_ckpt *ckpt;	/* open until moe_model_close_files() */
};

struct moe_model_opts {
	const char *family;	/* NULL: from config.json model_type */
	moe_ckpt_read_hook hook; /* tests: called after every tensor read */
	void *hook_arg;
};

const char *moe_family_name(enum moe_family f);
int moe_family_parse(const char *s); /* -1 if unknown */

int moe_model_open(const char *dir, const struct moe_model_opts *opts, struct moe_model **out,
		   char *err);
/* The config.json part of moe_model_open(), from memory (the fuzz target
 * drives it): fills m's family, shape and routing, and *is_moe (malloc'd,
 * one flag per decoder layer). `path` names the source in messages. */
int moe_model_parse_config(const char *path, const char *json, size_t len,
			   const char *family_override, struct moe_model *m, bool **is_moe,
			   char *err);

/* Checks that no shard changed since open (after the last read), then closes
 * the files. -ESTALE with a message if one did. */
int moe_model_close_files(struct moe_model *m, char *err);
void moe_model_free(struct moe_model *m);
/* Opens the checkpoint again (after moe_model_close_files) to read experts
 * anew, e.g. for a lost rank's: -ESTALE if any shard changed since the load
 * (its identity), else 0 with every tensor source pointing into the new
 * open. Close with moe_model_close_files. Not thread-safe with readers of
 * the layers' tensor sources (the engine's own). */
int moe_model_reopen_files(struct moe_model *m, char *err);

/* Position of decoder layer `index` in m->layers, or -1 if it is not MoE. */
int moe_model_layer_pos(const struct moe_model *m, uint32_t index);

/* Copies a matrix in its checkpoint dtype: rows*cols*size(dtype) bytes. */
int moe_model_read(struct moe_model *m, const struct moe_mat_src *s, void *dst, char *err);
/* Copies and widens a matrix to fp32 (any float dtype, f32/bf16/f16). */
int moe_model_read_f32(struct moe_model *m, const struct moe_mat_src *s, float *dst, char *err);

/* The checkpoint name of a tensor (tools write checkpoints with it). */
int moe_model_tensor_name(enum moe_family f, enum moe_layout layout, uint32_t layer,
			  enum moe_tensor_kind kind, uint32_t expert, char *buf, size_t n);

/* Reads a small regular file whole (NUL-terminated). */
int moe_read_small_file(const char *path, size_t max, char **out, size_t *len, char *err);

#endif
