/* tools/synth.h — synthetic MoE checkpoints in Hugging Face layout.
 *
 * Writes config.json plus model.safetensors (or shards and
 * model.safetensors.index.json) holding the MoE blocks of a model of any
 * supported family: router, experts (per-expert or fused layout), correction
 * bias, shared experts. Dense layers (per the family's rules) get no
 * tensors: moed never reads them. Weights are N(0, 1/fan_in) from a seeded
 * generator, so the same options always give the same bytes.
 *
 * `skew` makes the router favour some experts the way trained routers do:
 * router row e is scaled by 1 + skew * p_e with p_e falling from 1 to 0 over
 * a seeded permutation of the experts, so popular experts get larger logits
 * more often and win top-k more often (skew 0: uniform).
 *
 * `zipf` (DeepSeek-V3 only, whose top-k selects on sigmoid scores plus a
 * per-expert correction bias) sets that bias so that, for inputs of
 * N(0, 1) elements, expert e is chosen with a frequency proportional to
 * 1 / (rank_e + 1)^zipf over a seeded permutation (popular experts
 * scattered): calibrated by simulation on the router's logit
 * distribution, N(0, 4) per expert. It needs n_group = topk_group = 1 and
 * top_k * (the top expert's share) <= 1.
 */
#ifndef MOE_SYNTH_H
#define MOE_SYNTH_H

#include <stdbool.h>
#include <stdint.h>

#include "daemon/engine/model.h"

struct moe_synth_opts {
	enum moe_family family;
	enum moe_layout layout;
	enum moe_dtype dtype;
	uint32_t hidden, inter, shared_inter; /* shared_inter: Qwen2 size; DeepSeek: n_shared * inter */
	uint32_t experts, top_k, layers;
	uint32_t dense_first;	/* DeepSeek first_k_dense_replace */
	uint32_t sparse_step;	/* Qwen decoder_sparse_step */
	uint32_t n_group, topk_group; /* DeepSeek */
	bool group_limited;	/* DeepSeek-V2 topk_method */
	float routed_scale;
	bool norm_topk;
	float skew;
	float zipf; /* DeepSeek-V3: Zipf exponent of the experts' selection; 0: off */
	uint64_t seed;
	uint32_t shards;	/* 1: model.safetensors; >1: index + shards */
	/* Routed experts from their own generators (reload tests mix
	 * checkpoints): with expert_seed != 0, expert x of decoder layer l is
	 * drawn from a generator seeded by (expert_seed, l, x), or by
	 * (expert_seed_alt, l, x) where alt(alt_arg, l, x) says so; the
	 * routers, biases and shared experts still come from `seed`. 0: one
	 * stream for everything. */
	uint64_t expert_seed, expert_seed_alt;
	bool (*alt)(void *alt_arg, uint32_t layer, uint32_t expert);
	void *alt_arg;
};

void moe_synth_defaults(struct moe_synth_opts *o, enum moe_family f);
int moe_synth_write(const char *dir, const struct moe_synth_opts *o, char *err);
/* Bytes of routed-expert weights the options describe. */
uint64_t moe_synth_expert_bytes(const struct moe_synth_opts *o);

/* The seeded generator, shared with tools and tests. */
struct moe_rng {
	uint64_t s;
};
uint64_t moe_rng_next(struct moe_rng *r);
double moe_rng_uniform(struct moe_rng *r); /* [0, 1) */
double moe_rng_normal(struct moe_rng *r);

#endif
