/* daemon/engine/epoch.c — epochs: publish, pin, retire, look up (see epoch.h).
 *
 * `current` and the history ring are guarded by one mutex, held for a few
 * instructions by acquire and publish; a batch's reference is an atomic
 * count, so release never takes the lock unless it retires the epoch.
 */
#include "daemon/engine/epoch.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct moe_epochs {
	pthread_mutex_t lock;
	struct moe_epoch *current;
	uint32_t n_layers, next_id;
	uint64_t next_gen;
	moe_epoch_retire_fn *retire;
	void *arg;
	atomic_uint_fast64_t published, retired;
	/* the descriptions of the last MOE_EPOCH_HISTORY epochs, by id % size */
	struct hist {
		uint32_t id; /* 0: empty */
		bool retired;
		uint64_t placement_gen;
	} hist[MOE_EPOCH_HISTORY];
	uint32_t *hist_versions; /* [MOE_EPOCH_HISTORY][n_layers] */
};

static struct moe_epoch *epoch_new(struct moe_epochs *t, struct moe_placement *p,
				   const uint32_t *versions, uint64_t gen)
{
	struct moe_epoch *ep = calloc(1, sizeof(*ep));
	uint32_t *v = malloc((size_t)t->n_layers * sizeof(*v));

	if (!ep || !v) {
		free(ep);
		free(v);
		return NULL;
	}
	for (uint32_t l = 0; l < t->n_layers; l++)
		v[l] = versions ? versions[l] : 1;
	ep->table = t;
	ep->placement = p;
	ep->placement_gen = gen;
	ep->weights_version = v;
	atomic_init(&ep->refs, 1); /* the table's own reference */
	return ep;
}

/* Under the lock: gives ep its id and records it in the history. */
static void install(struct moe_epochs *t, struct moe_epoch *ep)
{
	struct hist *h;

	ep->id = ++t->next_id;
	h = &t->hist[ep->id % MOE_EPOCH_HISTORY];
	*h = (struct hist){ep->id, false, ep->placement_gen};
	memcpy(t->hist_versions + (size_t)(ep->id % MOE_EPOCH_HISTORY) * t->n_layers,
	       ep->weights_version, (size_t)t->n_layers * sizeof(uint32_t));
	t->current = ep;
	atomic_fetch_add(&t->published, 1);
}

int moe_epochs_create(struct moe_placement *initial, uint32_t n_layers,
		      moe_epoch_retire_fn *retire, void *arg, struct moe_epochs **out)
{
	struct moe_epochs *t = calloc(1, sizeof(*t));
	struct moe_epoch *ep;

	if (!t || !(t->hist_versions = calloc((size_t)MOE_EPOCH_HISTORY * (n_layers ? n_layers : 1),
					      sizeof(uint32_t)))) {
		free(t);
		moe_place_free(initial);
		return -ENOMEM;
	}
	t->n_layers = n_layers;
	t->retire = retire;
	t->arg = arg;
	t->next_gen = 1;
	ep = epoch_new(t, initial, NULL, t->next_gen);
	if (!ep) {
		free(t->hist_versions);
		free(t);
		moe_place_free(initial);
		return -ENOMEM;
	}
	pthread_mutex_init(&t->lock, NULL);
	install(t, ep);
	*out = t;
	return 0;
}

void moe_epochs_destroy(struct moe_epochs *t)
{
	if (!t)
		return;
	if (t->current)
		moe_epoch_release(t->current);
	pthread_mutex_destroy(&t->lock);
	free(t->hist_versions);
	free(t);
}

struct moe_epoch *moe_epochs_acquire(struct moe_epochs *t)
{
	struct moe_epoch *ep;

	/* Taking the reference under the lock that guards `current` closes
	 * the window in which a publisher could retire the epoch between our
	 * load of the pointer and the increment. */
	pthread_mutex_lock(&t->lock);
	ep = t->current;
	atomic_fetch_add_explicit(&ep->refs, 1, memory_order_relaxed);
	pthread_mutex_unlock(&t->lock);
	return ep;
}

void moe_epoch_release(struct moe_epoch *ep)
{
	struct moe_epochs *t = ep->table;
	struct hist *h;

	if (atomic_fetch_sub_explicit(&ep->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (t->retire)
		t->retire(t->arg, ep);
	pthread_mutex_lock(&t->lock);
	h = &t->hist[ep->id % MOE_EPOCH_HISTORY];
	if (h->id == ep->id)
		h->retired = true;
	pthread_mutex_unlock(&t->lock);
	atomic_fetch_add(&t->retired, 1);
	moe_place_free((struct moe_placement *)ep->placement);
	free((void *)ep->weights_version);
	free(ep);
}

int moe_epochs_publish(struct moe_epochs *t, struct moe_placement *p, const uint32_t *versions,
		       uint32_t *id)
{
	struct moe_epoch *ep, *old;
	uint64_t gen;
	int ret;

	/* What a NULL asks to keep is read under the lock (another publisher
	 * may be changing it), then the new epoch is built outside it. */
	pthread_mutex_lock(&t->lock);
	old = t->current;
	atomic_fetch_add_explicit(&old->refs, 1, memory_order_relaxed);
	pthread_mutex_unlock(&t->lock);
	gen = p ? 0 : old->placement_gen;
	ret = p ? 0 : moe_place_copy(old->placement, &p);
	ep = ret ? NULL : epoch_new(t, p, versions ? versions : old->weights_version, gen);
	moe_epoch_release(old);
	if (!ep) {
		moe_place_free(p);
		return -ENOMEM;
	}
	pthread_mutex_lock(&t->lock);
	if (!ep->placement_gen)
		ep->placement_gen = ++t->next_gen;
	old = t->current;
	install(t, ep);
	*id = ep->id;
	pthread_mutex_unlock(&t->lock);
	moe_epoch_release(old); /* the table's reference: retires it if no batch holds it */
	return 0;
}

int moe_epochs_info(struct moe_epochs *t, uint32_t id, struct moe_epoch_info *info,
		    uint32_t *versions, uint32_t cap)
{
	const struct hist *h;
	int ret = -ENOENT;

	pthread_mutex_lock(&t->lock);
	h = &t->hist[id % MOE_EPOCH_HISTORY];
	if (id && h->id == id) {
		*info = (struct moe_epoch_info){id, t->n_layers, h->placement_gen,
						t->current->id == id, h->retired};
		if (versions)
			memcpy(versions,
			       t->hist_versions + (size_t)(id % MOE_EPOCH_HISTORY) * t->n_layers,
			       (size_t)(cap < t->n_layers ? cap : t->n_layers) * sizeof(uint32_t));
		ret = 0;
	}
	pthread_mutex_unlock(&t->lock);
	return ret;
}

void moe_epochs_counts(struct moe_epochs *t, uint64_t *published, uint64_t *retired,
		       uint32_t *current_id)
{
	pthread_mutex_lock(&t->lock);
	*current_id = t->current->id;
	pthread_mutex_unlock(&t->lock);
	*published = atomic_load(&t->published);
	*retired = atomic_load(&t->retired);
}
