#include "kernels/cpu/route.h"

#include <math.h>

/* Index of the largest v[i] over i < n with !taken[i]; lowest index wins ties. */
static uint32_t argmax_free(const float *v, const unsigned char *taken, uint32_t n)
{
	uint32_t best = UINT32_MAX;

	for (uint32_t i = 0; i < n; i++) {
		if (taken[i])
			continue;
		if (best == UINT32_MAX || v[i] > v[best])
			best = i;
	}
	return best;
}

static void score_row(const struct moe_route_params *p, const float *l, float *s)
{
	uint32_t E = p->n_experts;

	if (p->score == MOE_SCORE_SIGMOID) {
		for (uint32_t e = 0; e < E; e++)
			s[e] = 1.0f / (1.0f + expf(-l[e]));
		return;
	}
	float mx = l[0], sum = 0;

	for (uint32_t e = 1; e < E; e++)
		mx = l[e] > mx ? l[e] : mx;
	for (uint32_t e = 0; e < E; e++) {
		s[e] = expf(l[e] - mx);
		sum += s[e];
	}
	for (uint32_t e = 0; e < E; e++)
		s[e] /= sum;
}

/* Replaces sel[] of experts outside the topk_group best groups by -inf. */
static void group_mask(const struct moe_route_params *p, float *sel)
{
	uint32_t G = p->n_group, per = p->n_experts / G;
	float gs[MOE_MAX_EXPERTS];
	unsigned char keep[MOE_MAX_EXPERTS] = {0}, taken[MOE_MAX_EXPERTS] = {0};

	for (uint32_t g = 0; g < G; g++) {
		const float *v = sel + (size_t)g * per;
		float a = v[0], b = -INFINITY;

		for (uint32_t i = 1; i < per; i++) {
			if (v[i] > a) {
				b = a;
				a = v[i];
			} else if (v[i] > b) {
				b = v[i];
			}
		}
		gs[g] = p->group == MOE_GROUP_MAX ? a : a + (per > 1 ? b : 0.0f);
	}
	for (uint32_t k = 0; k < p->topk_group; k++) {
		uint32_t g = argmax_free(gs, taken, G);

		taken[g] = 1;
		keep[g] = 1;
	}
	for (uint32_t g = 0; g < G; g++)
		if (!keep[g])
			for (uint32_t i = 0; i < per; i++)
				sel[(size_t)g * per + i] = -INFINITY;
}

void moe_cpu_route(const struct moe_route_params *p, const float *logits, uint32_t n,
		   uint32_t *ids, float *weights, float *scratch)
{
	uint32_t E = p->n_experts, K = p->top_k;
	float *s = scratch, *sel = scratch + E;

	for (uint32_t t = 0; t < n; t++) {
		unsigned char taken[MOE_MAX_EXPERTS] = {0};
		uint32_t *id = ids + (size_t)t * K;
		float *w = weights + (size_t)t * K, sum = 0;

		score_row(p, logits + (size_t)t * E, s);
		for (uint32_t e = 0; e < E; e++)
			sel[e] = p->bias ? s[e] + p->bias[e] : s[e];
		if (p->group != MOE_GROUP_NONE)
			group_mask(p, sel);
		for (uint32_t k = 0; k < K; k++) {
			id[k] = argmax_free(sel, taken, E);
			taken[id[k]] = 1;
			w[k] = s[id[k]];
			sum += w[k];
		}
		for (uint32_t k = 0; k < K; k++) {
			if (p->renormalize)
				w[k] /= sum + p->renorm_eps;
			w[k] *= p->scale;
		}
	}
}
