#include "daemon/engine/placement.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int moe_place_initial(uint32_t n_layers, uint32_t n_experts, uint32_t n_ranks, uint32_t spare,
		      struct moe_placement **out)
{
	struct moe_placement *p;
	uint32_t per;
	size_t n;

	if (!n_layers || !n_experts || !n_ranks || n_ranks > 65535)
		return -EINVAL;
	per = (n_experts + n_ranks - 1) / n_ranks;
	if ((uint64_t)per + spare > 65535)
		return -EINVAL;
	n = (size_t)n_layers * n_experts;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->n_replicas = calloc(n, 1);
	p->rep = calloc(n * MOE_MAX_REPLICAS, sizeof(*p->rep));
	if (!p->n_replicas || !p->rep) {
		moe_place_free(p);
		return -ENOMEM;
	}
	p->n_layers = n_layers;
	p->n_experts = n_experts;
	p->n_ranks = n_ranks;
	p->slots_per_rank = per + spare;
	for (uint32_t l = 0; l < n_layers; l++) {
		for (uint32_t e = 0; e < n_experts; e++) {
			size_t i = (size_t)l * n_experts + e;

			p->n_replicas[i] = 1;
			p->rep[i * MOE_MAX_REPLICAS] =
				(struct moe_replica){(uint16_t)(e / per), (uint16_t)(e % per)};
		}
	}
	*out = p;
	return 0;
}

void moe_place_free(struct moe_placement *p)
{
	if (!p)
		return;
	free(p->n_replicas);
	free(p->rep);
	free(p);
}

int moe_place_copy(const struct moe_placement *p, struct moe_placement **out)
{
	size_t n = (size_t)p->n_layers * p->n_experts;
	struct moe_placement *q = calloc(1, sizeof(*q));

	if (!q)
		return -ENOMEM;
	*q = *p;
	q->n_replicas = malloc(n);
	q->rep = malloc(n * MOE_MAX_REPLICAS * sizeof(*q->rep));
	if (!q->n_replicas || !q->rep) {
		free(q->rep);
		free(q->n_replicas);
		free(q);
		return -ENOMEM;
	}
	memcpy(q->n_replicas, p->n_replicas, n);
	memcpy(q->rep, p->rep, n * MOE_MAX_REPLICAS * sizeof(*q->rep));
	*out = q;
	return 0;
}

const struct moe_replica *moe_place_get(const struct moe_placement *p, uint32_t layer, uint32_t e,
					uint32_t *n)
{
	size_t i = (size_t)layer * p->n_experts + e;

	*n = p->n_replicas[i];
	return &p->rep[i * MOE_MAX_REPLICAS];
}

int moe_place_validate(const struct moe_placement *p)
{
	size_t slots = (size_t)p->n_ranks * p->slots_per_rank;
	unsigned char *used = malloc(slots ? slots : 1);
	int ret = 0;

	if (!used)
		return -ENOMEM;
	for (uint32_t l = 0; l < p->n_layers && !ret; l++) {
		for (size_t s = 0; s < slots; s++)
			used[s] = 0;
		for (uint32_t e = 0; e < p->n_experts && !ret; e++) {
			uint32_t n;
			const struct moe_replica *r = moe_place_get(p, l, e, &n);

			if (n < 1 || n > MOE_MAX_REPLICAS)
				ret = -EINVAL;
			for (uint32_t i = 0; i < n && !ret; i++) {
				size_t s = (size_t)r[i].rank * p->slots_per_rank + r[i].slot;

				if (r[i].rank >= p->n_ranks || r[i].slot >= p->slots_per_rank ||
				    used[s])
					ret = -EINVAL;
				else
					used[s] = 1;
			}
		}
	}
	free(used);
	return ret;
}
