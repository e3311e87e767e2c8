/* daemon/engine/backend_cpu.h — the CPU backend's insides, shared by its
 * two files: backend_cpu.c (rank, slots, routing and the expert FFN
 * kernels over the rank's pool) and backend_cpu_stages.c (the stages
 * dispatch, experts and combine over the rank's exchange buffers).
 */
#ifndef MOE_BACKEND_CPU_H
#define MOE_BACKEND_CPU_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "daemon/engine/backend.h"
#include "kernels/cpu/pairs.h"

/* One expert FFN over the rows given to it:
 *   y[r] = scale[r] * down(silu(gate x[r]) * up x[r])   for r < n */
struct cpu_group {
	const struct moe_slot *slot;
	uint32_t n;
	const float *x;	    /* [n, H] */
	float *h;	    /* [n, inter] scratch */
	float *y;	    /* [n, H] */
	const float *scale; /* [n] or NULL (1) */
	/* the bf16 kernels' copies (pairs.h; rows of ldxb / ldhb elements) */
	uint16_t *xb; /* [n, ldxb] x in bf16 */
	uint16_t *hb; /* [n, ldhb] h in bf16 */
	uint32_t ldxb, ldhb;
	bool xb_ready; /* xb written already (dispatch on one rank): x unused */
};

struct cpu_tile {
	uint32_t group, t0, p0;
};

/* CLOCK_MONOTONIC in ns (the stages' timers, the small-round rule). */
static inline uint64_t cpu_mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct cpu_rank {
	const struct moe_cpu_kernels *k;	/* fp32 activations (and the router) */
	const struct moe_pairs_kernels *kb; /* bf16 activations, or NULL */
	bool round_h;			    /* k rounds h to bf16 (cpu.precision bf16) */
	uint32_t n_workers;
	uint32_t share_cap; /* tokens of a chunk one rank routes: ceil(chunk / R) */
	uint32_t recv_cap;  /* rows a rank may receive in a round */
	/* routing */
	float *logits;	      /* [share_cap, E] */
	float *route_scratch; /* per worker MOE_ROUTE_SCRATCH(E) */
	/* dispatch: the share in fp32, where each (t, k) row went */
	float *x;	    /* [share_cap, H] */
	uint32_t *pos;	    /* [share_cap * K]: row of (t, k) in send/back */
	uint32_t *ecount;   /* [E] */
	uint32_t *eseen;    /* [E] */
	uint32_t *rkey;	    /* [E * MOE_MAX_REPLICAS]: dest rank * S + slot */
	uint32_t *rtake;    /* [E * MOE_MAX_REPLICAS]: rows to that replica */
	uint32_t *kpos;	    /* [R * S]: next free row per (dest, slot) */
	uint32_t *to_rank;  /* [R]: rows given to each rank this round */
	/* experts: rows in slot order when several ranks sent some */
	float *xs, *xs_scale; /* [recv_cap, H], [recv_cap] (R > 1) */
	float *hs;	      /* [recv_cap, I] */
	float *sh_h, *sh_y, *sh_sc; /* shared: [share_cap, Is], [.., H], [..] */
	bool permuted;	      /* this round's rows went through xs */
	bool sent_bf16;	      /* this round's dispatch wrote the routed rows to
				 xb16, not send (one rank, bf16 kernels) */
	/* kb only: x of every group then of the share, h of the routed groups
	 * and of the shared expert, in bf16 (zeroed: the columns past H / I
	 * stay zero; MOE_PAIRS_SLACK_ROWS rows past each) */
	uint16_t *xb16, *hb16, *shb16;
	uint32_t ldxb, ldhb, ldshb;
	struct cpu_group *groups; /* [S + 1] */
	uint32_t *gorder;	  /* [S + 1]: groups by the height of their last block */
	/* combine */
	float *acc; /* [n_workers, H] */
	/* the FFN kernels' tiles, reused by every round */
	struct cpu_tile *tiles;
	uint32_t tiles_cap;
	uint64_t groups_end_ns; /* when the last cpu_run_groups ended (0: never) */
};

/* Tasks 0..n-1 of fn on the rank's pool, or on the calling thread alone
 * when inline_run (small rounds: a wake-up costs more than the work). */
void cpu_tasks(struct moe_rank *r, uint32_t n, void (*fn)(void *, uint32_t, uint32_t), void *arg,
	       bool inline_run);

/* Router GEMM, family scoring and top-k of n tokens (n <= share_cap) on
 * the rank's pool. */
int cpu_route(struct moe_rank *r, const struct moe_model *m, const struct moe_layer_state *ls,
	      const float *x, uint32_t n, uint32_t *ids, float *w);
/* Every group's FFN on the rank's pool (tiles, not groups, are the work
 * unit). -EOVERFLOW if the tiles do not fit (they always do for a round). */
int cpu_run_groups(struct moe_rank *r, enum moe_dtype wdt, uint32_t hidden,
		   const struct cpu_group *g, uint32_t n_groups);

int cpu_dispatch(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st);
int cpu_experts(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st);
void cpu_combine(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st);

#endif
