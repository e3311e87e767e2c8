/* daemon/engine/env.c — the environment's overrides of the engine's options,
 * for programs' main() (see moe_engine_opts_from_env in engine.h). Nothing
 * else in the library reads the environment. */
#include "daemon/engine/engine.h"

#include <stdlib.h>
#include <string.h>

static const char *env(const char *name)
{
	const char *v = getenv(name);

	return v && *v ? v : NULL;
}

void moe_engine_opts_from_env(struct moe_engine_opts *o)
{
	const char *v;

	if ((v = env("MOE_CPU_ISA"))) {
		o->tuning.isa = v;
		o->tuning.isa_from = "MOE_CPU_ISA";
	}
	if ((v = env("MOE_CUDA_GEMM")))
		o->tuning.cuda_gemm = v;
	if ((v = env("MOE_CUDA_GRAPHS")))
		o->tuning.cuda_no_graphs = !strcmp(v, "0");
	if ((v = env("MOE_CUDA_FUSED")))
		o->tuning.cuda_fused = !strcmp(v, "1");
	if ((v = env("MOED_TEST_ENGINE_FAULT")))
		o->test_fault_at = strtoul(v, NULL, 10);
	if ((v = env("MOED_TEST_RANK_FAULT"))) {
		char *end;
		unsigned long r = strtoul(v, &end, 10);

		if (*end == ':' && r < MOE_MAX_RANKS) {
			o->test_rank_fault_rank = (uint32_t)r;
			o->test_rank_fault_at = strtoul(end + 1, NULL, 10);
		}
	}
	if ((v = env("MOED_TEST_CUDA_FAULT")))
		o->tuning.cuda_fault_at = strtoul(v, NULL, 10);
}
