// SPDX-License-Identifier: MIT
/*
 * fuzz_model_config.c - libFuzzer target for the config.json part of
 * moe_model_open().
 *
 * Any input must give 0 or a negative errno with a message, never a crash,
 * a leak or undefined behaviour. An accepted config must describe a model
 * moed can route: 1 <= K <= E, a decoder-layer mask of n_layers entries and,
 * for grouped routing, groups that divide the experts and keep at least K.
 * Seeds: tests/fuzz/corpus/model_config/.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_model(const struct moe_model *m, const bool *is_moe)
{
	const struct moe_route_params *r = &m->route;
	uint32_t n = 0;

	if ((unsigned)m->family >= MOE_FAM_COUNT || !m->hidden || !m->inter || !m->n_layers)
		__builtin_trap();
	if (!m->top_k || m->top_k > m->n_experts || m->n_experts > MOE_MAX_EXPERTS ||
	    m->top_k > MOE_MAX_TOPK)
		__builtin_trap();
	if (r->n_experts != m->n_experts || r->top_k != m->top_k)
		__builtin_trap();
	if (r->group != MOE_GROUP_NONE &&
	    (!r->n_group || m->n_experts % r->n_group || !r->topk_group ||
	     r->topk_group > r->n_group ||
	     m->top_k > r->topk_group * (m->n_experts / r->n_group)))
		__builtin_trap();
	/* every entry is readable (ASan checks the length); a config with no
	 * MoE layer is refused later, by moe_model_open() */
	for (uint32_t l = 0; l < m->n_layers; l++)
		n += is_moe[l];
	if (n > m->n_layers)
		__builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_model m;
	char err[MOE_ERRLEN];
	bool *is_moe = NULL;
	int rc;

	memset(&m, 0, sizeof(m));
	err[0] = '\0';
	rc = moe_model_parse_config("fuzz/config.json", (const char *)data, size, NULL, &m,
				    &is_moe, err);
	if (rc) {
		/* one NUL-terminated message that names the file */
		if (rc >= 0 || !memchr(err, '\0', sizeof(err)) ||
		    !strstr(err, "fuzz/config.json"))
			__builtin_trap();
		return 0;
	}
	check_model(&m, is_moe);
	free(is_moe);
	return 0;
}
