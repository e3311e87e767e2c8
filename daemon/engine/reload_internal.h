/* daemon/engine/reload_internal.h — what the reload's files share:
 * reload.c (the driver, rollback), reload_checks.c (the new checkpoint
 * checked before anything is staged) and reload_stage.c (staging and the
 * switch). Not for anyone else: the API is reload.h.
 */
#ifndef MOE_RELOAD_INTERNAL_H
#define MOE_RELOAD_INTERNAL_H

#include "daemon/engine/engine_internal.h"
#include "daemon/engine/reload.h"

/* One layer's staged weights. */
struct rl_staged {
	uint32_t l;
	bool whole;		/* router, bias, shared experts too */
	bool *sel;		/* [E]: experts replaced */
	struct layer_host lh;	/* whole */
	struct moe_layer_state *ls; /* [R]: whole: each rank's router layout, shared expert */
	struct moe_slot *slots;	/* [R * stride]: new memory for the slots replaced */
	bool *borrowed;		/* [R * stride] rollback: memory of the kept snapshot */
	bool ls_borrowed;	/* rollback: lh and ls are the kept snapshot's */
	struct layer_old *from; /* rollback: the kept snapshot */
	uint64_t bytes;		/* allocated here (not borrowed) */
};

struct rl_job {
	struct moe_engine *e;
	const struct moe_reload_opts *o;
	struct moe_model *nm; /* the new checkpoint (NULL: rollback) */
	uint32_t src;	      /* its source id once registered, else UINT32_MAX */
	bool *sel;	      /* [E]: the experts a step replaces (all: whole layers) */
	bool whole;
	uint64_t t0_ns, paced_bytes;
	struct moe_reload_result *r;
	bool unkept;	      /* the previous reload's kept weights released */
};

/* reload_stage.c */
uint64_t rl_now_ns(void);
bool rl_cancelled(const struct rl_job *j);
/* Counts staged bytes and sleeps to stay under bytes_per_s; -ECANCELED. */
int rl_pace(struct rl_job *j, uint64_t bytes);
void rl_staged_free(struct moe_engine *e, struct rl_staged *s);
struct rl_staged *rl_staged_new(struct moe_engine *e, uint32_t l, bool whole, const bool *sel);
/* Which (rank, slot) of layer l the current placement fills with a
 * selected expert: want[k] = expert + 1, 0 for the others. */
void rl_wanted_slots(struct moe_engine *e, uint32_t l, const bool *sel, uint32_t *want);
/* Layer l from the new checkpoint into fresh memory (off every lock). */
int rl_stage(struct rl_job *j, uint32_t l, struct rl_staged **out, char *err);
/* Switches n staged layers in one epoch; -EAGAIN when the placement moved
 * under one (a lost rank). */
int rl_switch(struct rl_job *j, struct rl_staged **st, uint32_t n, char *err);

/* reload_checks.c */
/* The same architecture as served, or -EINVAL naming the difference. */
int rl_same_arch(const struct moe_model *a, const struct moe_model *b, char *err);
/* Experts steps: the layer's router and shared tensors as served. */
int rl_check_shared_same(struct rl_job *j, uint32_t l, char *err);
/* The checksums of every tensor a step of layer l reads. */
int rl_check_sums(struct rl_job *j, uint32_t l, char *err);

#endif
