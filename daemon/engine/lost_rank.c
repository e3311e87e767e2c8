/* daemon/engine/lost_rank.c — taking a failed rank out while serving (see
 * engine.c's header for when; here how): the experts only it held are read
 * again from the checkpoint into empty slots of the survivors, a placement
 * without it is published, and its memory freed.
 */
#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "daemon/engine/engine_internal.h"
#include "daemon/engine/log.h"

/* An empty slot of `rank` for layer l (slot_lock held): the in-use range
 * first (spare slots), then the room beyond it; -1 if none. */
static int empty_slot(struct moe_engine *e, uint32_t rank, uint32_t l)
{
	for (uint32_t s = 0; s < e->stride; s++)
		if (e->slot_expert[slot_index(e, rank, l, s)] == -1)
			return (int)s;
	return -1;
}

/* The surviving rank with the most empty slots for layer l, or -1. */
static int roomiest_rank(struct moe_engine *e, uint32_t l)
{
	int best = -1;
	uint32_t best_n = 0;

	for (uint32_t r = 0; r < e->n_ranks; r++) {
		uint32_t n = 0;

		if (atomic_load(&e->dead[r]))
			continue;
		for (uint32_t s = 0; s < e->stride; s++)
			n += e->slot_expert[slot_index(e, r, l, s)] == -1;
		if (n > best_n)
			best = (int)r, best_n = n;
	}
	return best;
}

/* The checkpoint the current version of layer l's expert x came from,
 * open for reading: the loaded one reopened, another opened anew (a
 * reload may be reading its own object) and checked unchanged. *opened
 * ([n_src]) keeps what was opened. */
static struct moe_model *open_source(struct moe_engine *e, uint32_t l, uint32_t x,
				     struct moe_model **opened, char *err)
{
	const struct ver_rec *rec;
	uint32_t i;
	char path[4096];
	uint64_t ident;
	struct moe_model_opts mo = {.family = moe_family_name(e->m->family)};

	pthread_mutex_lock(&e->slot_lock);
	rec = eng_ver_rec(e, l, e->lv[l].cur);
	i = rec ? rec->esrc[x] : 0;
	snprintf(path, sizeof(path), "%s", e->src[i].path);
	ident = e->src[i].identity;
	pthread_mutex_unlock(&e->slot_lock);
	if (opened[i])
		return opened[i];
	if (i == 0) {
		if (moe_model_reopen_files(e->m, err))
			return NULL;
		return opened[0] = e->m;
	}
	if (moe_model_open(path, &mo, &opened[i], err))
		return NULL;
	if (opened[i]->identity != ident) {
		moe_err(err, -ESTALE, "%s changed on disk since it was read", path);
		moe_model_free(opened[i]);
		return opened[i] = NULL;
	}
	return opened[i];
}

/* Takes rank `dead` out (see the top of the file): its experts that no
 * other rank holds are read from the checkpoint into surviving ranks'
 * empty slots, and the current placement without it is published. 0, or
 * -ENOTRECOVERABLE with err. fwd_lock held. */
int eng_lose_rank(struct moe_engine *e, uint32_t dead, const char *why, char *err)
{
	struct moe_model *m = e->m;
	uint32_t E = m->n_experts, id, moved = 0, reread = 0;
	struct moe_placement *p = NULL;
	struct moe_epoch *cur;
	char msg[MOE_ERRLEN];
	struct moe_model **opened = NULL; /* [n_src]: checkpoints opened to re-read */
	uint32_t n_src = e->n_src;
	int ret = 0;

	pthread_mutex_lock(&e->publish_lock);
	atomic_store(&e->dead[dead], true);
	e->n_dead++;
	memset(e->ranks[dead].xb.send_counts, 0, (size_t)e->n_ranks * e->stride * sizeof(uint32_t));
	if (e->n_dead == e->n_ranks) {
		ret = moe_err(msg, -ENOTRECOVERABLE, "no rank left");
		goto out;
	}
	cur = moe_epoch_acquire(e);
	ret = moe_place_copy(cur->placement, &p);
	moe_epoch_release(cur);
	if (ret) {
		ret = moe_err(msg, -ENOTRECOVERABLE, "out of memory");
		goto out;
	}
	p->slots_per_rank = e->stride; /* the room kept for this, from now on */
	opened = calloc(n_src, sizeof(*opened));
	for (uint32_t l = 0; l < m->n_moe_layers && !ret; l++) {
		for (uint32_t x = 0; x < E && !ret; x++) {
			size_t k = (size_t)l * E + x;
			struct moe_replica *r = &p->rep[k * MOE_MAX_REPLICAS];
			uint32_t n = 0;
			int rank, slot;
			char what[32];

			for (uint32_t i = 0; i < p->n_replicas[k]; i++)
				if (r[i].rank != dead)
					r[n++] = r[i];
			p->n_replicas[k] = (uint8_t)n;
			if (n)
				continue;
			/* only the lost rank held it: read it again */
			pthread_mutex_lock(&e->slot_lock);
			rank = roomiest_rank(e, l);
			slot = rank < 0 ? -1 : empty_slot(e, (uint32_t)rank, l);
			if (slot >= 0)
				e->slot_expert[slot_index(e, (uint32_t)rank, l, (uint32_t)slot)] = -2;
			pthread_mutex_unlock(&e->slot_lock);
			if (slot < 0) {
				ret = moe_err(msg, -ENOTRECOVERABLE, "no empty slot left on the other "
					      "ranks for layer %u's expert %u", m->layers[l].index, x);
				break;
			}
			snprintf(what, sizeof(what), "expert %u", x);
			{
				struct moe_model *sm = opened ? open_source(e, l, x, opened, msg)
							      : NULL;

				if (!opened)
					moe_err(msg, -ENOMEM, "out of memory");
				ret = !sm ? -ENOTRECOVERABLE
					  : eng_upload_from(e, sm, &e->ranks[rank],
							    slot_at(e, (uint32_t)rank, l,
								    (uint32_t)slot),
							    &sm->layers[l].experts[x],
							    m->layers[l].index, what, msg);
			}
			pthread_mutex_lock(&e->slot_lock);
			e->slot_expert[slot_index(e, (uint32_t)rank, l, (uint32_t)slot)] =
				ret ? -1 : (int32_t)x;
			pthread_mutex_unlock(&e->slot_lock);
			if (ret) {
				ret = -ENOTRECOVERABLE;
				break;
			}
			r[0] = (struct moe_replica){(uint16_t)rank, (uint16_t)slot};
			p->n_replicas[k] = 1;
			reread++;
		}
	}
	for (uint32_t i = 0; opened && i < n_src; i++) {
		if (opened[i])
			moe_model_close_files(opened[i], NULL);
		if (opened[i] && opened[i] != e->m)
			moe_model_free(opened[i]);
	}
	free(opened);
	if (ret)
		goto out;
	e->slots_per_rank = e->stride;
	ret = eng_publish_locked(e, p, NULL, &id, msg);
	if (!ret)
		e->loss_epoch = id;
	p = NULL;
	if (ret) {
		ret = -ENOTRECOVERABLE;
		goto out;
	}
	/* its copies of the routers and shared experts go now (no stage runs
	 * on it any more), its slots once no live epoch names them */
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		struct moe_layer_state *ls = &e->ls[(size_t)dead * m->n_moe_layers + l];

		if (ls->shared.mem) {
			atomic_fetch_sub(&e->weight_bytes, ls->shared.bytes);
			e->ranks[dead].ops->slot_free(&e->ranks[dead], &ls->shared);
			ls->shared = (struct moe_slot){0};
		}
		if (ls->router_dev)
			e->ranks[dead].ops->layer_fini(&e->ranks[dead], ls);
	}
	pthread_mutex_lock(&e->slot_lock);
	for (uint32_t l = 0; l < m->n_moe_layers; l++)
		for (uint32_t s = 0; s < e->stride; s++) {
			size_t k = slot_index(e, dead, l, s);

			if (e->slot_expert[k] < 0 || e->slot_drop[k])
				continue;
			moved++;
			e->slot_drop[k] = true;
			if (eng_slot_unused(e, k))
				eng_free_slot(e, k, dead);
		}
	pthread_mutex_unlock(&e->slot_lock);
	moe_log(LOG_WARNING, "rank %u lost (%s): taken out; %u of its %u experts read again from "
		"the checkpoint onto the other ranks, the rest served by their replicas; epoch %u",
		dead, why, reread, moved, id);
out:
	moe_place_free(p);
	pthread_mutex_unlock(&e->publish_lock);
	if (ret)
		return moe_err(err, ret, "rank %u lost (%s), and it cannot be replaced: %s", dead,
			       why, msg);
	return 0;
}
