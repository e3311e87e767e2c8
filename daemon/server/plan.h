/* daemon/server/plan.h — `moed -t`: what the daemon would do with a configuration
 * and a checkpoint, and whether it fits, without loading any weights. */
#ifndef MOE_PLAN_H
#define MOE_PLAN_H

#include <stdbool.h>
#include <stdio.h>

#include "daemon/server/config.h"
#include "daemon/engine/model.h"

struct moe_plan {
	uint32_t n_ranks, slots_per_rank;
	uint64_t weight_bytes_per_rank; /* expert slots + router state + shared */
	uint64_t workspace_bytes;
	uint64_t mem_available; /* host MemAvailable, 0 if unknown */
	bool fits;
	int isa;		/* enum moe_cpu_isa chosen, or -1 */
	char kernels[16];	/* what runs the experts (an f32 model on amx: avx512) */
	char kernels_note[MOE_ERRLEN]; /* why not the chosen path's own, or "" */
	char isa_err[256];	/* why the requested kernels cannot run */
	/* devices: which backend serves. cuda only when asked for (devices:
	 * cuda | [id]); a GPU that was asked for and is not there is an error,
	 * never a silent fall back to the CPU. */
	const char *backend;	/* "cpu" or "cuda" */
	int device;		/* GPU index with cuda */
	bool device_ok;		/* false: device_note says why moed cannot start */
	char device_note[256];	/* cpu: why no GPU; cuda: the GPU; or the error */
	uint64_t device_mem;	/* GPU memory (cuda), 0 otherwise */
};

/* isa_request: MOE_CPU_ISA from the environment (main reads it), or NULL
 * for the configuration's cpu.isa. */
void moe_plan_compute(const struct moe_config *c, const struct moe_model *m,
		      const char *isa_request, struct moe_plan *p);
void moe_plan_print(FILE *f, const struct moe_config *c, const struct moe_model *m,
		    const struct moe_plan *p);

#endif
