/* daemon/engine/reload_stage.c — a reload's steps: a layer staged from
 * the new checkpoint into fresh memory off the serving path (paced,
 * cancellable), then switched under the forward lock (the old entries
 * saved in a snapshot, the staged memory installed, the new version
 * recorded, an epoch naming it published).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/engine/reload_internal.h"

uint64_t rl_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

bool rl_cancelled(const struct rl_job *j)
{
	return j->o->cancel && atomic_load(j->o->cancel);
}

/* Sleeps so that staging stays under bytes_per_s (in naps of at most
 * 20 ms, looking at the cancel flag). */
int rl_pace(struct rl_job *j, uint64_t bytes)
{
	j->paced_bytes += bytes;
	if (j->o->progress)
		atomic_fetch_add(&j->o->progress->bytes, bytes);
	if (!j->o->bytes_per_s)
		return rl_cancelled(j) ? -ECANCELED : 0;
	for (;;) {
		uint64_t due = j->t0_ns + (uint64_t)((double)j->paced_bytes * 1e9 /
						     (double)j->o->bytes_per_s);
		uint64_t now = rl_now_ns();

		if (rl_cancelled(j))
			return -ECANCELED;
		if (now >= due)
			return 0;
		usleep((useconds_t)((due - now) / 1000 < 20000 ? (due - now) / 1000 : 20000));
	}
}

/* ---- staging ------------------------------------------------------------ */

void rl_staged_free(struct moe_engine *e, struct rl_staged *s)
{
	uint32_t R = e->n_ranks, S = e->stride;

	if (!s)
		return;
	for (size_t k = 0; s->slots && k < (size_t)R * S; k++)
		if (s->slots[k].mem && !(s->borrowed && s->borrowed[k])) {
			atomic_fetch_sub(&e->weight_bytes, s->slots[k].bytes);
			e->ranks[k / S].ops->slot_free(&e->ranks[k / S], &s->slots[k]);
		}
	if (s->ls && !s->ls_borrowed) {
		for (uint32_t r = 0; r < R; r++) {
			if (s->ls[r].router_dev)
				e->ranks[r].ops->layer_fini(&e->ranks[r], &s->ls[r]);
			if (s->ls[r].shared.mem) {
				atomic_fetch_sub(&e->weight_bytes, s->ls[r].shared.bytes);
				e->ranks[r].ops->slot_free(&e->ranks[r], &s->ls[r].shared);
			}
		}
		if (s->lh.router)
			atomic_fetch_sub(&e->weight_bytes,
					 (uint64_t)e->m->n_experts * e->m->hidden * sizeof(float));
		free(s->lh.router);
		free(s->lh.bias);
		free(s->lh.shared_gate);
	}
	free(s->ls);
	free(s->slots);
	free(s->borrowed);
	free(s->sel);
	free(s);
}

struct rl_staged *rl_staged_new(struct moe_engine *e, uint32_t l, bool whole, const bool *sel)
{
	uint32_t R = e->n_ranks, S = e->stride, E = e->m->n_experts;
	struct rl_staged *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->l = l;
	s->whole = whole;
	s->sel = malloc(E * sizeof(bool));
	s->slots = calloc((size_t)R * S, sizeof(*s->slots));
	s->borrowed = calloc((size_t)R * S, sizeof(bool));
	s->ls = calloc(R, sizeof(*s->ls));
	if (!s->sel || !s->slots || !s->borrowed || !s->ls) {
		rl_staged_free(e, s);
		return NULL;
	}
	memcpy(s->sel, sel, E * sizeof(bool));
	return s;
}

/* Which (rank, slot) of layer l the current placement fills with a
 * selected expert: want[k] = expert + 1, 0 for the others. */
void rl_wanted_slots(struct moe_engine *e, uint32_t l, const bool *sel, uint32_t *want)
{
	struct moe_epoch *ep = moe_epoch_acquire(e);
	uint32_t S = e->stride;

	memset(want, 0, (size_t)e->n_ranks * S * sizeof(uint32_t));
	for (uint32_t x = 0; x < e->m->n_experts; x++) {
		uint32_t n;
		const struct moe_replica *rp = moe_place_get(ep->placement, l, x, &n);

		for (uint32_t i = 0; sel[x] && i < n; i++)
			if (!atomic_load(&e->dead[rp[i].rank]))
				want[(size_t)rp[i].rank * S + rp[i].slot] = x + 1;
	}
	moe_epoch_release(ep);
}

/* A whole layer's router arrays, router layout and shared expert, per rank,
 * from the new checkpoint. */
static int stage_layer_state(struct rl_job *j, struct rl_staged *s, char *err)
{
	struct moe_engine *e = j->e;
	struct moe_model *m = j->nm;
	const struct moe_layer_desc *d = &m->layers[s->l];
	uint64_t host = (uint64_t)m->n_experts * m->hidden * sizeof(float);
	int ret = eng_read_host(e, m, s->l, &s->lh, err);

	if (!ret)
		s->bytes += host, ret = rl_pace(j, host);
	for (uint32_t r = 0; r < e->n_ranks && !ret; r++) {
		struct moe_rank *rk = &e->ranks[r];
		struct moe_layer_state *ls = &s->ls[r];

		if (atomic_load(&e->dead[r]))
			continue;
		ls->router = s->lh.router;
		ls->bias = s->lh.bias;
		ls->shared_gate = s->lh.shared_gate;
		if (rk->ops->layer_init(rk, m, ls))
			ret = moe_err(err, -ENOMEM, "%s rank %u: out of memory for layer %u's "
				      "router", rk->ops->name, r, d->index);
		if (!ret && d->has_shared) {
			ret = rk->ops->slot_alloc(rk, m, d->shared.gate.rows, &ls->shared, err);
			if (!ret)
				atomic_fetch_add(&e->weight_bytes, ls->shared.bytes);
			if (!ret)
				ret = rk->ops->slot_upload(rk, &ls->shared, m, &d->shared, err);
		}
		if (!ret && ls->shared.mem)
			s->bytes += ls->shared.bytes, ret = rl_pace(j, ls->shared.bytes);
	}
	return ret;
}

/* Uploads expert src from model m into a fresh slot of rank r. */
static int upload_from(struct moe_engine *e, struct moe_model *m, uint32_t r,
		       struct moe_slot *s, const struct moe_expert_src *src, uint32_t layer,
		       uint32_t x, char *err)
{
	struct moe_rank *rk = &e->ranks[r];
	char why[MOE_ERRLEN];
	int ret = rk->ops->slot_alloc(rk, m, src->gate.rows, s, why);

	if (ret)
		return moe_err(err, ret, "%s rank %u: no room to stage layer %u's expert %u: %s",
			       rk->ops->name, r, layer, x, why);
	atomic_fetch_add(&e->weight_bytes, s->bytes);
	ret = rk->ops->slot_upload(rk, s, m, src, err);
	if (ret) {
		atomic_fetch_sub(&e->weight_bytes, s->bytes);
		rk->ops->slot_free(rk, s);
		*s = (struct moe_slot){0};
	}
	return ret;
}

int rl_stage(struct rl_job *j, uint32_t l, struct rl_staged **out, char *err)
{
	struct moe_engine *e = j->e;
	uint32_t R = e->n_ranks, S = e->stride;
	uint32_t *want = malloc((size_t)R * S * sizeof(uint32_t));
	struct rl_staged *s = rl_staged_new(e, l, j->whole, j->sel);
	int ret = 0;

	*out = NULL;
	if (!want || !s) {
		free(want);
		rl_staged_free(e, s);
		return moe_err(err, -ENOMEM, "out of memory");
	}
	if (j->whole)
		ret = stage_layer_state(j, s, err);
	rl_wanted_slots(e, l, j->sel, want);
	for (size_t k = 0; k < (size_t)R * S && !ret; k++) {
		uint32_t x = want[k];

		if (!x--)
			continue;
		ret = upload_from(e, j->nm, (uint32_t)(k / S), &s->slots[k],
				  &j->nm->layers[l].experts[x], j->nm->layers[l].index, x, err);
		if (!ret)
			s->bytes += s->slots[k].bytes, ret = rl_pace(j, s->slots[k].bytes);
	}
	free(want);
	if (ret == -ECANCELED)
		moe_err(err, ret, "cancelled while staging layer %u", j->nm->layers[l].index);
	if (ret) {
		rl_staged_free(e, s);
		return ret;
	}
	*out = s;
	return 0;
}

/* ---- the switch --------------------------------------------------------- */

/* Whether the staged layer still covers every replica of its experts in
 * the current placement (fwd_lock and publish_lock held). */
static bool covers(struct moe_engine *e, const struct rl_staged *s, const struct moe_placement *p)
{
	for (uint32_t x = 0; x < e->m->n_experts; x++) {
		uint32_t n;
		const struct moe_replica *rp = moe_place_get(p, s->l, x, &n);

		for (uint32_t i = 0; s->sel[x] && i < n; i++)
			if (!s->slots[(size_t)rp[i].rank * e->stride + rp[i].slot].mem)
				return false;
	}
	return true;
}

/* Saves layer s->l's entries into a snapshot and installs s (slot_lock
 * held); the new version record from `rec` with the replaced parts set to
 * source `src` (or, rollback, to s->from's version's). */
static int install(struct rl_job *j, struct rl_staged *s, uint32_t *version, struct layer_old **out)
{
	struct moe_engine *e = j->e;
	uint32_t R = e->n_ranks, S = e->stride, L = e->m->n_moe_layers, E = e->m->n_experts;
	uint32_t l = s->l;
	struct layer_vers *lv = &e->lv[l];
	const struct ver_rec *cur = eng_ver_rec(e, l, lv->cur), *prev = NULL;
	struct layer_old *o = calloc(1, sizeof(*o));
	struct ver_rec *rec;
	uint32_t v;

	if (o) {
		o->slots = malloc((size_t)R * S * sizeof(*o->slots));
		o->expert = malloc((size_t)R * S * sizeof(*o->expert));
		o->own = calloc((size_t)R * S, sizeof(bool));
		o->ls = malloc(R * sizeof(*o->ls));
	}
	if (!o || !o->slots || !o->expert || !o->own || !o->ls || eng_add_ver(e, l, cur, &v)) {
		if (o) {
			free(o->slots);
			free(o->expert);
			free(o->own);
			free(o->ls);
		}
		free(o);
		return -ENOMEM;
	}
	if (s->from)
		prev = eng_ver_rec(e, l, s->from->version);
	rec = &lv->hist[lv->n_hist - 1];
	for (uint32_t r = 0; r < R; r++) {
		memcpy(&o->slots[(size_t)r * S], slot_at(e, r, l, 0), S * sizeof(*o->slots));
		memcpy(&o->expert[(size_t)r * S], &e->slot_expert[slot_index(e, r, l, 0)],
		       S * sizeof(*o->expert));
		o->ls[r] = e->ls[(size_t)r * L + l];
	}
	o->version = lv->cur;
	o->refs = lv->cur_refs;
	for (size_t k = 0; k < (size_t)R * S; k++) {
		struct moe_slot *t = slot_at(e, (uint32_t)(k / S), l, (uint32_t)(k % S));

		if (!s->slots[k].mem)
			continue;
		if (atomic_load(&e->dead[k / S])) /* (lost since staged: freed with s) */
			continue;
		o->own[k] = t->mem != NULL;
		o->bytes += o->own[k] ? t->bytes : 0;
		*t = s->slots[k];
		s->slots[k] = (struct moe_slot){0};
		if (s->from && s->borrowed[k])
			s->from->own[k] = false, s->from->bytes -= t->bytes,
				e->kept_bytes -= s->from->kept ? t->bytes : 0;
	}
	if (s->whole) {
		o->own_layer = true;
		o->lh = e->lh[l];
		o->bytes += (uint64_t)E * e->m->hidden * sizeof(float);
		for (uint32_t r = 0; r < R; r++) {
			struct moe_layer_state *t = &e->ls[(size_t)r * L + l];

			o->bytes += t->shared.bytes;
			if (atomic_load(&e->dead[r]))
				continue;
			t->router = s->lh.router;
			t->bias = s->lh.bias;
			t->shared_gate = s->lh.shared_gate;
			t->router_dev = s->ls[r].router_dev;
			t->shared = s->ls[r].shared;
			s->ls[r].router_dev = NULL;
			s->ls[r].shared = (struct moe_slot){0};
		}
		e->lh[l] = s->lh;
		s->lh = (struct layer_host){0};
		if (s->from && s->ls_borrowed) {
			/* the kept snapshot's router and shared experts are the
			 * tables' now; a dead rank's it still owned go */
			for (uint32_t r = 0; r < R; r++) {
				struct moe_layer_state *t = &s->from->ls[r];

				if (!atomic_load(&e->dead[r]))
					continue;
				if (t->router_dev)
					e->ranks[r].ops->layer_fini(&e->ranks[r], t);
				if (t->shared.mem) {
					atomic_fetch_sub(&e->weight_bytes, t->shared.bytes);
					e->ranks[r].ops->slot_free(&e->ranks[r], &t->shared);
				}
			}
			s->from->own_layer = false;
			s->ls_borrowed = false;
		}
	}
	/* the new version's record */
	if (s->whole) {
		rec->router_ver = prev ? prev->router_ver : v;
		rec->router_src = prev ? prev->router_src : j->src;
	}
	for (uint32_t x = 0; x < E; x++)
		if (s->sel[x]) {
			rec->ever[x] = prev ? prev->ever[x] : v;
			rec->esrc[x] = prev ? prev->esrc[x] : j->src;
		}
	rec->rollback = s->from != NULL;
	if (s->from) { /* what it still owns goes once no epoch names it */
		eng_unkeep(e, l);
		s->from = NULL;
	}
	lv->cur = v;
	lv->cur_refs = 0;
	o->next = lv->old;
	lv->old = o;
	*version = v;
	*out = o;
	return 0;
}

/* Switches n staged layers in one epoch. */
int rl_switch(struct rl_job *j, struct rl_staged **st, uint32_t n, char *err)
{
	struct moe_engine *e = j->e;
	const struct moe_reload_opts *o = j->o;
	uint32_t L = e->m->n_moe_layers, id = 0;
	uint32_t *versions = malloc(L * sizeof(uint32_t));
	struct layer_old **olds = calloc(n, sizeof(*olds));
	struct moe_epoch *cur;
	int ret = 0;

	if (!versions || !olds) {
		free(versions);
		free(olds);
		return moe_err(err, -ENOMEM, "out of memory");
	}
	pthread_mutex_lock(&e->fwd_lock);
	pthread_mutex_lock(&e->publish_lock);
	cur = moe_epoch_acquire(e);
	for (uint32_t i = 0; i < n && !ret; i++)
		if (!covers(e, st[i], cur->placement))
			ret = -EAGAIN;
	memcpy(versions, cur->weights_version, L * sizeof(uint32_t));
	moe_epoch_release(cur);
	if (!ret && atomic_load(&e->lost))
		ret = moe_err(err, -ENOTRECOVERABLE, "the device was lost");
	if (!ret) {
		pthread_mutex_lock(&e->slot_lock);
		/* the previous reload's kept weights go at this reload's first
		 * switch (rollback keeps its own: they toggle) */
		if (!j->unkept && !st[0]->from) {
			for (uint32_t l = 0; l < L; l++)
				eng_unkeep(e, l);
			memset(e->last_reload, 0, L);
			j->unkept = true;
		}
		for (uint32_t i = 0; i < n && !ret; i++)
			ret = install(j, st[i], &versions[st[i]->l], &olds[i]);
		/* what a switch replaces: kept for rollback while it fits
		 * (decided before the publish, which may retire the old
		 * version at once) */
		for (uint32_t i = 0; i < n && olds[i]; i++) {
			struct layer_old *x = olds[i];

			j->r->layers++;
			e->last_reload[st[i]->l] = 1;
			if (o->keep_previous && (!o->max_staging_bytes ||
						 e->kept_bytes + x->bytes <= o->max_staging_bytes)) {
				x->kept = true;
				e->kept_bytes += x->bytes;
			} else if (o->keep_previous) {
				j->r->not_kept++;
				e->last_reload[st[i]->l] = 2; /* changed, previous not kept */
			}
		}
		pthread_mutex_unlock(&e->slot_lock);
		if (ret)
			ret = moe_err(err, ret, "out of memory");
	}
	/* (an install that failed midway: the earlier ones are published, as
	 * their tables already changed) */
	if (!ret || olds[0]) {
		int r2 = eng_publish_locked(e, NULL, versions, &id, err);

		ret = ret ? ret : r2;
	}
	pthread_mutex_unlock(&e->publish_lock);
	pthread_mutex_unlock(&e->fwd_lock);
	if (id) {
		if (!j->r->first_epoch)
			j->r->first_epoch = id;
		j->r->last_epoch = id;
		j->r->steps++;
	}
	free(versions);
	free(olds);
	return ret;
}
