/* daemon/engine/replicas.c — which slot holds what, and changing it while
 * serving: publishing a placement (every replica it names must hold its
 * expert and not be on its way out), copying an expert into an empty slot
 * (paced, cancellable; nothing published names the slot meanwhile), and
 * dropping a replica (its slot freed when no live epoch names it: each
 * slot counts the live epochs whose placement names it, released by the
 * epochs' retire hook, and the copies reading it: a copy pins its source
 * so that a drop meanwhile frees it only when the copy is done). Publish
 * and drop are serialized by publish_lock, which a copy holds only to
 * choose and mark its slots, not while it copies (a paced copy may take
 * seconds, and a lost rank's recovery, inside a batch, takes that lock);
 * slot_lock guards the counts and states and is never held during a copy,
 * so a batch retiring an epoch never waits for one.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "daemon/engine/engine_internal.h"

/* Frees a replica's slot (slot_lock held; no live epoch names it). */
void eng_free_slot(struct moe_engine *e, size_t i, uint32_t rank)
{
	struct moe_slot *s = &e->slots[i];

	atomic_fetch_sub(&e->weight_bytes, s->bytes);
	e->ranks[rank].ops->slot_free(&e->ranks[rank], s);
	*s = (struct moe_slot){0};
	e->slot_expert[i] = -1;
	e->slot_drop[i] = false;
}

/* Adds `delta` to the reference count of every slot p names; a dropped
 * slot no epoch names any more is freed. slot_lock held. */
void eng_count_slots(struct moe_engine *e, const struct moe_placement *p, int delta)
{
	for (uint32_t l = 0; l < p->n_layers; l++) {
		for (uint32_t x = 0; x < p->n_experts; x++) {
			uint32_t n;
			const struct moe_replica *r = moe_place_get(p, l, x, &n);

			for (uint32_t i = 0; i < n; i++) {
				size_t k = slot_index(e, r[i].rank, l, r[i].slot);

				e->slot_refs[k] += (uint32_t)delta;
				if (eng_slot_unused(e, k))
					eng_free_slot(e, k, r[i].rank);
			}
		}
	}
}

/* The epochs' retire hook: the slots only that epoch named are released. */
void eng_retire_epoch(void *arg, const struct moe_epoch *ep)
{
	struct moe_engine *e = arg;

	pthread_mutex_lock(&e->slot_lock);
	eng_count_slots(e, ep->placement, -1);
	if (e->lv_ready)
		eng_count_versions(e, ep->weights_version, -1);
	pthread_mutex_unlock(&e->slot_lock);
}


/* A placement may only point at slots that hold the expert it names: the
 * weights are loaded into a slot before a placement using it is published
 * (replication, rebalance), never after. */
/* publish_lock held. */
int eng_publish_locked(struct moe_engine *e, struct moe_placement *p, const uint32_t *versions,
			  uint32_t *id, char *err)
{
	const struct moe_model *m = e->m;
	struct moe_epoch *ep;
	int ret = 0;

	if (p && (p->n_layers != m->n_moe_layers || p->n_experts != m->n_experts ||
		  p->n_ranks != e->n_ranks || p->slots_per_rank != e->slots_per_rank ||
		  moe_place_validate(p))) {
		moe_place_free(p);
		return moe_err(err, -EINVAL, "the placement does not fit this engine's slots");
	}
	pthread_mutex_lock(&e->slot_lock);
	for (uint32_t l = 0; p && l < m->n_moe_layers && !ret; l++) {
		for (uint32_t x = 0; x < m->n_experts && !ret; x++) {
			uint32_t n;
			const struct moe_replica *r = moe_place_get(p, l, x, &n);

			for (uint32_t i = 0; i < n && !ret; i++) {
				size_t k = slot_index(e, r[i].rank, l, r[i].slot);

				/* (the message first: r points into p) */
				if (atomic_load(&e->dead[r[i].rank]))
					ret = moe_err(err, -ENODEV, "rank %u is lost", r[i].rank);
				else if (e->slot_expert[k] != (int32_t)x)
					ret = moe_err(err, -EINVAL, "MoE layer %u: rank %u slot %u "
						      "does not hold expert %u", l, r[i].rank,
						      r[i].slot, x);
				else if (e->slot_drop[k])
					ret = moe_err(err, -EINVAL, "MoE layer %u: rank %u slot %u "
						      "is being dropped", l, r[i].rank, r[i].slot);
			}
		}
	}
	pthread_mutex_unlock(&e->slot_lock);
	if (ret) {
		moe_place_free(p);
		return ret;
	}
	/* (may retire the previous epoch: its hook takes slot_lock) */
	ret = moe_epochs_publish(e->epochs, p, versions, id);
	if (ret)
		return moe_err(err, ret, "out of memory");
	/* The new epoch's slots are counted now; none of them is dropped
	 * (checked above, and drops wait for publish_lock), so the previous
	 * epoch retiring in between frees none of them. */
	ep = moe_epoch_acquire(e);
	pthread_mutex_lock(&e->slot_lock);
	eng_count_slots(e, ep->placement, 1);
	eng_count_versions(e, ep->weights_version, 1);
	pthread_mutex_unlock(&e->slot_lock);
	moe_epoch_release(ep);
	return 0;
}

int moe_engine_publish(struct moe_engine *e, struct moe_placement *p, const uint32_t *versions,
		       uint32_t *id, char *err)
{
	int ret;

	pthread_mutex_lock(&e->publish_lock);
	ret = eng_publish_locked(e, p, versions, id, err);
	pthread_mutex_unlock(&e->publish_lock);
	return ret;
}

int moe_engine_drop_replica(struct moe_engine *e, uint32_t l, uint32_t rank, uint32_t slot,
			    char *err)
{
	size_t k;
	int ret = 0;

	if (l >= e->m->n_moe_layers || rank >= e->n_ranks || slot >= e->slots_per_rank)
		return moe_err(err, -EINVAL, "no MoE layer %u, rank %u or slot %u", l, rank, slot);
	k = slot_index(e, rank, l, slot);
	pthread_mutex_lock(&e->publish_lock);
	pthread_mutex_lock(&e->slot_lock);
	if (e->slot_expert[k] < 0)
		ret = moe_err(err, -ENOENT, "MoE layer %u: rank %u slot %u holds no expert", l,
			      rank, slot);
	else if (!e->slot_drop[k]) {
		e->slot_drop[k] = true;
		if (eng_slot_unused(e, k))
			eng_free_slot(e, k, rank);
	}
	pthread_mutex_unlock(&e->slot_lock);
	pthread_mutex_unlock(&e->publish_lock);
	return ret;
}

/* Copies src into dst at most pace->bytes_per_s (0: at once), in pieces
 * between which it sleeps and looks at the cancel flag. */
static int paced_copy(void *dst, const void *src, size_t bytes, const struct moe_copy_pace *pace)
{
	size_t piece = 1 << 20, done = 0;
	uint64_t t0 = now_ns();

	if (!pace || !pace->bytes_per_s) {
		memcpy(dst, src, bytes);
		if (pace && pace->copied)
			atomic_fetch_add(pace->copied, bytes);
		return 0;
	}
	if (pace->bytes_per_s / 50 < piece) /* (at least 50 pieces a second) */
		piece = pace->bytes_per_s / 50 > 4096 ? pace->bytes_per_s / 50 : 4096;
	while (done < bytes) {
		size_t n = bytes - done < piece ? bytes - done : piece;
		uint64_t due, now;

		if (pace->cancel && atomic_load(pace->cancel))
			return -ECANCELED;
		memcpy((char *)dst + done, (const char *)src + done, n);
		done += n;
		if (pace->copied)
			atomic_fetch_add(pace->copied, n);
		due = t0 + (uint64_t)((double)done * 1e9 / (double)pace->bytes_per_s);
		/* naps of at most 20 ms, the cancel flag looked at after each:
		 * a very low rate still stops at once */
		while ((now = now_ns()) < due) {
			uint64_t d = due - now < 20000000u ? due - now : 20000000u;
			struct timespec ts = {0, (long)d};

			nanosleep(&ts, NULL);
			if (pace->cancel && atomic_load(pace->cancel))
				return -ECANCELED;
		}
	}
	return 0;
}

int moe_engine_replicate(struct moe_engine *e, uint32_t l, uint32_t x, uint32_t rank,
			 uint32_t slot, char *err)
{
	return moe_engine_replicate_paced(e, l, x, rank, slot, NULL, err);
}

int moe_engine_replicate_paced(struct moe_engine *e, uint32_t l, uint32_t x, uint32_t rank,
			       uint32_t slot, const struct moe_copy_pace *pace, char *err)
{
	const struct moe_model *m = e->m;
	struct moe_slot *src = NULL, *dst;
	size_t k, ks = 0;
	uint32_t src_rank = 0;
	int ret = 0;
	bool fresh = false;

	if (l >= m->n_moe_layers || x >= m->n_experts || rank >= e->n_ranks ||
	    slot >= e->slots_per_rank)
		return moe_err(err, -EINVAL, "no MoE layer %u, expert %u, rank %u or slot %u", l,
			       x, rank, slot);
	if (e->device)
		return moe_err(err, -ENOTSUP, "replicas are copied on CPU ranks only for now");
	if (atomic_load(&e->dead[rank]))
		return moe_err(err, -ENODEV, "rank %u is lost", rank);
	k = slot_index(e, rank, l, slot);
	dst = &e->slots[k];
	/* the locks only to choose and mark: the destination "being filled"
	 * (nothing may name or take it), the source pinned (a drop meanwhile
	 * frees it only after the copy) */
	pthread_mutex_lock(&e->publish_lock);
	pthread_mutex_lock(&e->slot_lock);
	if (e->slot_expert[k] != -1)
		ret = moe_err(err, -EBUSY, "MoE layer %u: rank %u slot %u holds expert %d", l,
			      rank, slot, e->slot_expert[k]);
	for (uint32_t r = 0; r < e->n_ranks && !src && !ret; r++) {
		if (atomic_load(&e->dead[r]))
			continue;
		for (uint32_t s = 0; s < e->stride && !src; s++) {
			size_t i = slot_index(e, r, l, s);

			if (e->slot_expert[i] == (int32_t)x && !e->slot_drop[i])
				src = &e->slots[i], ks = i, src_rank = r;
		}
	}
	if (!ret && !src)
		ret = moe_err(err, -ENOENT, "MoE layer %u: no slot holds expert %u", l, x);
	if (!ret) {
		e->slot_expert[k] = -2;
		e->slot_reading[ks]++;
	}
	pthread_mutex_unlock(&e->slot_lock);
	pthread_mutex_unlock(&e->publish_lock);
	if (ret)
		return ret;
	if (!dst->mem) {
		char why[MOE_ERRLEN];

		ret = e->ranks[rank].ops->slot_alloc(&e->ranks[rank], m, src->inter, dst, why);
		if (ret)
			ret = moe_err(err, ret, "rank %u: no room for a replica of layer %u's "
				      "expert %u: %s", rank, l, x, why);
		else
			atomic_fetch_add(&e->weight_bytes, dst->bytes);
		fresh = !ret;
	}
	if (!ret && (dst->bytes != src->bytes || dst->inter != src->inter))
		ret = moe_err(err, -EINVAL, "rank %u slot %u is laid out for another expert size",
			      rank, slot);
	if (!ret && paced_copy(dst->mem, src->mem, src->bytes, pace))
		ret = moe_err(err, -ECANCELED, "the copy of layer %u's expert %u to rank %u was "
			      "cancelled", l, x, rank);
	pthread_mutex_lock(&e->slot_lock);
	if (!ret && atomic_load(&e->dead[rank]))
		ret = moe_err(err, -ENODEV, "rank %u was lost during the copy", rank);
	e->slot_expert[k] = ret ? -1 : (int32_t)x;
	if (ret && dst->mem) /* an empty slot holds no memory */
		eng_free_slot(e, k, rank);
	(void)fresh;
	e->slot_reading[ks]--;
	if (eng_slot_unused(e, ks)) /* dropped while we read it */
		eng_free_slot(e, ks, src_rank);
	pthread_mutex_unlock(&e->slot_lock);
	return ret;
}

int moe_engine_slot_state(struct moe_engine *e, uint32_t l, uint32_t rank, uint32_t slot)
{
	size_t k;
	int v;

	if (l >= e->m->n_moe_layers || rank >= e->n_ranks || slot >= e->slots_per_rank)
		return MOE_SLOT_INVALID;
	k = slot_index(e, rank, l, slot);
	pthread_mutex_lock(&e->slot_lock);
	v = e->slot_drop[k] ? MOE_SLOT_DROPPING : e->slot_expert[k];
	pthread_mutex_unlock(&e->slot_lock);
	return v;
}

uint32_t moe_engine_slots_per_rank(const struct moe_engine *e)
{
	return e->slots_per_rank;
}

struct moe_epochs *moe_engine_epochs(struct moe_engine *e)
{
	return e->epochs;
}
