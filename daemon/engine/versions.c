/* daemon/engine/versions.c — weights versions: what each layer serves, what
 * it served before, and which batch reads which.
 *
 * The engine's tables (e->slots, e->ls, e->lh) always hold the *current*
 * version of every layer: replication, rebalancing and a lost rank work on
 * them alone. A reload (reload.c) that switches layer l to new weights
 * first saves the layer's entries as they were in a snapshot (struct
 * layer_old: the slot descriptors of every rank, the layer state of every
 * rank, the host arrays), which takes over the memory the switch replaces,
 * then installs the staged memory in the tables and publishes an epoch
 * naming the new version. A batch whose epoch names an older version of
 * its layer reads that version's snapshot (eng_view): a request sees its
 * layer all-old or all-new, whichever its epoch says.
 *
 * Lifetime: every layer version counts the live epochs that name it
 * (eng_count_versions, next to the slots' counts: +1 at publish, -1 in the
 * retire hook). A snapshot whose count reaches 0 is freed, unless it is
 * *kept* (reload.keep_previous: the weights the last reload replaced, for
 * rollback). A snapshot shares the memory of the entries the switch did
 * not replace with the tables; it frees only what it owns. Shared memory
 * is safe: the tables free a slot only when no live epoch names it
 * (slot_refs counts epochs of every version), and a snapshot is used only
 * by live epochs.
 *
 * History: every version of a layer has a record (struct ver_rec): which
 * source checkpoint its router and shared experts came from, and each
 * expert's version and source (an expert keeps its number until a step
 * replaces it). An epoch's per-layer versions thus tell every expert's
 * version (moe_engine_version_info).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/engine_internal.h"
#include "daemon/engine/reload.h"

int eng_versions_init(struct moe_engine *e)
{
	const struct moe_model *m = e->m;
	uint32_t L = m->n_moe_layers, E = m->n_experts;

	e->lv = calloc(L, sizeof(*e->lv));
	e->src = calloc(4, sizeof(*e->src));
	e->last_reload = calloc(L, 1);
	if (!e->lv || !e->src || !e->last_reload)
		return -ENOMEM;
	e->cap_src = 4;
	e->n_src = 1;
	e->src[0] = (struct wsource){.path = strdup(m->dir), .identity = m->identity, .m = e->m};
	if (!e->src[0].path)
		return -ENOMEM;
	for (uint32_t l = 0; l < L; l++) {
		struct layer_vers *v = &e->lv[l];

		v->cur = 1;
		v->hist = calloc(4, sizeof(*v->hist));
		if (!v->hist)
			return -ENOMEM;
		v->cap_hist = 4;
		v->n_hist = 1;
		v->hist[0] = (struct ver_rec){.version = 1, .router_ver = 1,
					      .ever = calloc(E, sizeof(uint32_t)),
					      .esrc = calloc(E, sizeof(uint32_t))};
		if (!v->hist[0].ever || !v->hist[0].esrc)
			return -ENOMEM;
		for (uint32_t x = 0; x < E; x++)
			v->hist[0].ever[x] = 1;
	}
	return 0;
}

/* Frees what a snapshot owns (and the snapshot). */
void eng_free_old(struct moe_engine *e, struct layer_old *o)
{
	uint32_t R = e->n_ranks, S = e->stride;

	if (!o)
		return;
	for (size_t k = 0; o->own && k < (size_t)R * S; k++)
		if (o->own[k] && o->slots[k].mem) {
			uint32_t r = (uint32_t)(k / S);

			atomic_fetch_sub(&e->weight_bytes, o->slots[k].bytes);
			e->ranks[r].ops->slot_free(&e->ranks[r], &o->slots[k]);
		}
	if (o->own_layer) {
		for (uint32_t r = 0; r < R; r++) {
			struct moe_layer_state *ls = &o->ls[r];

			if (ls->router_dev)
				e->ranks[r].ops->layer_fini(&e->ranks[r], ls);
			if (ls->shared.mem) {
				atomic_fetch_sub(&e->weight_bytes, ls->shared.bytes);
				e->ranks[r].ops->slot_free(&e->ranks[r], &ls->shared);
			}
		}
		if (o->lh.router)
			atomic_fetch_sub(&e->weight_bytes,
					 (uint64_t)e->m->n_experts * e->m->hidden * sizeof(float));
		free(o->lh.router);
		free(o->lh.bias);
		free(o->lh.shared_gate);
	}
	if (o->kept)
		e->kept_bytes -= o->bytes;
	free(o->slots);
	free(o->expert);
	free(o->own);
	free(o->ls);
	free(o);
}

void eng_versions_free(struct moe_engine *e)
{
	for (uint32_t l = 0; e->lv && l < e->m->n_moe_layers; l++) {
		struct layer_vers *v = &e->lv[l];

		while (v->old) {
			struct layer_old *o = v->old;

			v->old = o->next;
			eng_free_old(e, o);
		}
		for (uint32_t i = 0; i < v->n_hist; i++) {
			free(v->hist[i].ever);
			free(v->hist[i].esrc);
		}
		free(v->hist);
	}
	free(e->lv);
	e->lv = NULL;
	for (uint32_t i = 0; e->src && i < e->n_src; i++) {
		free(e->src[i].path);
		if (e->src[i].m != e->m)
			moe_model_free(e->src[i].m);
	}
	free(e->src);
	e->src = NULL;
	free(e->last_reload);
	e->last_reload = NULL;
}

/* Unlinks and frees o (slot_lock held). */
static void drop_old(struct moe_engine *e, struct layer_vers *v, struct layer_old *o)
{
	for (struct layer_old **p = &v->old; *p; p = &(*p)->next)
		if (*p == o) {
			*p = o->next;
			break;
		}
	eng_free_old(e, o);
}

void eng_count_versions(struct moe_engine *e, const uint32_t *versions, int delta)
{
	for (uint32_t l = 0; l < e->m->n_moe_layers; l++) {
		struct layer_vers *v = &e->lv[l];

		if (versions[l] == v->cur) {
			v->cur_refs += (uint32_t)delta;
			continue;
		}
		for (struct layer_old *o = v->old; o; o = o->next)
			if (o->version == versions[l]) {
				o->refs += (uint32_t)delta;
				if (!o->refs && !o->kept)
					drop_old(e, v, o);
				break;
			}
	}
}

void eng_unkeep(struct moe_engine *e, uint32_t l)
{
	struct layer_vers *v = &e->lv[l];

	for (struct layer_old *o = v->old, *next; o; o = next) {
		next = o->next;
		if (!o->kept)
			continue;
		o->kept = false;
		e->kept_bytes -= o->bytes;
		if (!o->refs)
			drop_old(e, v, o);
	}
}

struct layer_old *eng_kept(struct moe_engine *e, uint32_t l)
{
	for (struct layer_old *o = e->lv[l].old; o; o = o->next)
		if (o->kept)
			return o;
	return NULL;
}

void eng_view(struct moe_engine *e, const struct moe_epoch *ep, uint32_t l, struct layer_view *w)
{
	uint32_t R = e->n_ranks, L = e->m->n_moe_layers;
	const struct layer_old *o = NULL;

	if (ep->weights_version[l] != e->lv[l].cur) {
		pthread_mutex_lock(&e->slot_lock);
		for (o = e->lv[l].old; o && o->version != ep->weights_version[l]; o = o->next)
			;
		pthread_mutex_unlock(&e->slot_lock);
	}
	/* (o NULL with an old version cannot happen: the epoch is pinned, so
	 * its version's snapshot is alive; the tables are the safe default) */
	for (uint32_t r = 0; r < R; r++) {
		w->slots[r] = o ? &o->slots[(size_t)r * e->stride] : slot_at(e, r, l, 0);
		w->ls[r] = o ? &o->ls[r] : &e->ls[(size_t)r * L + l];
	}
}

const struct ver_rec *eng_ver_rec(const struct moe_engine *e, uint32_t l, uint32_t version)
{
	const struct layer_vers *v = &e->lv[l];

	for (uint32_t i = v->n_hist; i-- > 0;)
		if (v->hist[i].version == version)
			return &v->hist[i];
	return NULL;
}

int eng_add_ver(struct moe_engine *e, uint32_t l, const struct ver_rec *from, uint32_t *out)
{
	struct layer_vers *v = &e->lv[l];
	uint32_t E = e->m->n_experts;
	struct ver_rec r = *from; /* (from may point into hist: copied first) */
	const uint32_t *fe = from->ever, *fs = from->esrc;

	if (v->n_hist == v->cap_hist) {
		struct ver_rec *h = realloc(v->hist, 2 * v->cap_hist * sizeof(*h));

		if (!h)
			return -ENOMEM;
		v->hist = h;
		v->cap_hist *= 2;
	}
	r.version = v->hist[v->n_hist - 1].version + 1;
	r.ever = malloc(E * sizeof(uint32_t));
	r.esrc = malloc(E * sizeof(uint32_t));
	if (!r.ever || !r.esrc) {
		free(r.ever);
		free(r.esrc);
		return -ENOMEM;
	}
	memcpy(r.ever, fe, E * sizeof(uint32_t));
	memcpy(r.esrc, fs, E * sizeof(uint32_t));
	v->hist[v->n_hist++] = r;
	*out = r.version;
	return 0;
}

struct moe_model *eng_expert_model(struct moe_engine *e, uint32_t l, uint32_t x)
{
	const struct ver_rec *r = eng_ver_rec(e, l, e->lv[l].cur);

	return r ? e->src[r->esrc[x]].m : e->m;
}

/* ---- the API ------------------------------------------------------------ */

uint32_t moe_engine_layer_version(struct moe_engine *e, uint32_t pos)
{
	uint32_t v;

	if (pos >= e->m->n_moe_layers)
		return 0;
	pthread_mutex_lock(&e->slot_lock);
	v = e->lv[pos].cur;
	pthread_mutex_unlock(&e->slot_lock);
	return v;
}

int moe_engine_version_info(struct moe_engine *e, uint32_t pos, uint32_t version,
			    struct moe_layer_version *info, uint32_t *expert_version,
			    uint32_t *expert_source)
{
	const struct ver_rec *r;
	uint32_t E = e->m->n_experts;
	int ret = -ENOENT;

	if (pos >= e->m->n_moe_layers)
		return -EINVAL;
	pthread_mutex_lock(&e->slot_lock);
	r = eng_ver_rec(e, pos, version);
	if (r) {
		if (info)
			*info = (struct moe_layer_version){r->version, r->router_ver, r->router_src,
							   r->rollback};
		if (expert_version)
			memcpy(expert_version, r->ever, E * sizeof(uint32_t));
		if (expert_source)
			memcpy(expert_source, r->esrc, E * sizeof(uint32_t));
		ret = 0;
	}
	pthread_mutex_unlock(&e->slot_lock);
	return ret;
}

uint32_t moe_engine_sources(struct moe_engine *e)
{
	uint32_t n;

	pthread_mutex_lock(&e->slot_lock);
	n = e->n_src;
	pthread_mutex_unlock(&e->slot_lock);
	return n;
}

int moe_engine_source(struct moe_engine *e, uint32_t i, char *path, size_t n, uint64_t *identity)
{
	int ret = -ENOENT;

	pthread_mutex_lock(&e->slot_lock);
	if (i < e->n_src) {
		if (path)
			snprintf(path, n, "%s", e->src[i].path);
		if (identity)
			*identity = e->src[i].identity;
		ret = 0;
	}
	pthread_mutex_unlock(&e->slot_lock);
	return ret;
}

uint64_t moe_engine_kept_bytes(struct moe_engine *e)
{
	uint64_t b;

	pthread_mutex_lock(&e->slot_lock);
	b = e->kept_bytes;
	pthread_mutex_unlock(&e->slot_lock);
	return b;
}
