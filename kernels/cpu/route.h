/* kernels/cpu/route.h — expert selection from router logits, per family.
 *
 * The families differ only in the parameters below (see shared/MODELS.md):
 *   Mixtral:        softmax, top-k, renormalize
 *   Qwen2/3, OLMoE: softmax, top-k, renormalize iff norm_topk_prob
 *   DeepSeek-V2:    softmax, [group score = max, keep topk_group groups],
 *                   top-k, weight * routed_scaling_factor
 *   DeepSeek-V3:    sigmoid, selection on score + correction bias, group
 *                   score = sum of the group's top-2, keep topk_group groups,
 *                   top-k, weight = score (no bias), renormalize (+1e-20),
 *                   * routed_scaling_factor
 * Experts of dropped groups get selection value -inf, as transformers 5.x
 * does for DeepSeek-V3 (earlier versions filled 0.0, which let a dropped
 * expert beat a kept one whose biased score was negative). For V2, whose
 * scores are positive probabilities, 0.0 and -inf select the same experts.
 * Ties go to the lower expert index.
 */
#ifndef MOE_CPU_ROUTE_H
#define MOE_CPU_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MOE_MAX_EXPERTS 1024
#define MOE_MAX_TOPK	64

enum moe_score_fn { MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID };
enum moe_group_fn { MOE_GROUP_NONE, MOE_GROUP_MAX, MOE_GROUP_SUM_TOP2 };

struct moe_route_params {
	uint32_t n_experts, top_k;
	enum moe_score_fn score;
	enum moe_group_fn group;
	uint32_t n_group, topk_group; /* with group != NONE; n_experts % n_group == 0 */
	bool renormalize;
	float renorm_eps;	/* added to the sum before dividing (V3: 1e-20) */
	float scale;		/* routed_scaling_factor, 1 for most families */
	const float *bias;	/* [n_experts] selection bias or NULL */
};

/* Scratch floats moe_cpu_route() needs. */
#define MOE_ROUTE_SCRATCH(E) (2 * (size_t)(E) + 64)

/* For each of n tokens: ids[t*K + j], weights[t*K + j] for j < K, in order
 * of selection (best first). logits is [n, E] fp32 (already rounded to the
 * model dtype where the family's router runs in it). */
void moe_cpu_route(const struct moe_route_params *p, const float *logits, uint32_t n,
		   uint32_t *ids, float *weights, float *scratch);

#endif
