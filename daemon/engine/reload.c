/* daemon/engine/reload.c — rolling reload and rollback (reload.h says what;
 * here how).
 *
 *   open     the new checkpoint, as the served family; its architecture
 *            compared with the served one (family, shapes, dtypes, routing,
 *            which layers are MoE, which tensors exist) before anything is
 *            staged; every value it yields checked finite (model.c)
 *   check    experts steps: the layer's router and shared tensors equal,
 *            byte for byte, to those of the checkpoint they were served
 *            from (opened anew: its identity must not have changed);
 *            checksums (moed.sha256.<tensor> in a shard's __metadata__)
 *   stage    a group of up to max_parallel layers (atomic: all): for each
 *            alive rank, a fresh slot for every slot of the current
 *            placement holding a selected expert, filled by the backend's
 *            upload (pread); whole layers also their host arrays, each
 *            rank's router layout and shared expert. Paced, cancellable.
 *   verify   no shard changed during the reads
 *   switch   per layer (atomic: all at once), under the forward lock: the
 *            old entries saved in a snapshot (versions.c), the staged
 *            memory installed, the layer's new version recorded, an epoch
 *            naming it published
 *
 * A placement that changed under a staged layer (a lost rank moved an
 * expert to a new slot) is noticed at the switch: that layer is staged
 * again, once.
 *
 * Here the driver and rollback; the checks are reload_checks.c, staging
 * and the switch reload_stage.c (sharing reload_internal.h).
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/log.h"
#include "daemon/engine/reload_internal.h"

/* ---- the driver --------------------------------------------------------- */

/* Bytes a step of layer l stages (the slots it replaces, as served). */
static uint64_t stage_estimate(struct moe_engine *e, uint32_t l, const bool *sel, bool whole)
{
	uint32_t R = e->n_ranks, L = e->m->n_moe_layers;
	uint64_t b = whole ? (uint64_t)e->m->n_experts * e->m->hidden * sizeof(float) : 0;
	struct moe_epoch *ep = moe_epoch_acquire(e);

	pthread_mutex_lock(&e->slot_lock);
	for (uint32_t x = 0; x < e->m->n_experts; x++) {
		uint32_t n;
		const struct moe_replica *rp = moe_place_get(ep->placement, l, x, &n);

		for (uint32_t i = 0; sel[x] && i < n; i++)
			b += e->slots[slot_index(e, rp[i].rank, l, rp[i].slot)].bytes;
	}
	for (uint32_t r = 0; whole && r < R; r++)
		b += e->ls[(size_t)r * L + l].shared.bytes;
	pthread_mutex_unlock(&e->slot_lock);
	moe_epoch_release(ep);
	return b;
}

/* The MoE layer positions selected, ascending, without repeats. */
static int select_layers(struct moe_engine *e, const struct moe_reload_opts *o, uint32_t *pos,
			 uint32_t *n, char *err)
{
	const struct moe_model *m = e->m;
	bool *on = calloc(m->n_moe_layers, sizeof(bool));

	if (!on)
		return moe_err(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < (o->layers ? o->n_layers : m->n_moe_layers); i++) {
		int p = o->layers ? moe_model_layer_pos(m, o->layers[i]) : (int)i;

		if (p < 0) {
			free(on);
			return moe_err(err, -EINVAL, "layer %u is not an MoE layer of this model "
				       "(MoE layers %u..%u)", o->layers[i], m->layers[0].index,
				       m->layers[m->n_moe_layers - 1].index);
		}
		on[p] = true;
	}
	*n = 0;
	for (uint32_t l = 0; l < m->n_moe_layers; l++)
		if (on[l])
			pos[(*n)++] = l;
	free(on);
	return *n ? 0 : moe_err(err, -EINVAL, "no layer selected");
}

/* Registers the new checkpoint as a source (before its first switch). */
static int add_source(struct rl_job *j, char *err)
{
	struct moe_engine *e = j->e;
	int ret = 0;

	pthread_mutex_lock(&e->slot_lock);
	if (e->n_src == e->cap_src) {
		struct wsource *w = realloc(e->src, 2 * e->cap_src * sizeof(*w));

		if (w)
			e->src = w, e->cap_src *= 2;
		else
			ret = -ENOMEM;
	}
	if (!ret) {
		char *p = strdup(j->nm->dir);

		if (p) {
			e->src[e->n_src] = (struct wsource){p, j->nm->identity, j->nm};
			j->src = e->n_src++;
		} else {
			ret = -ENOMEM;
		}
	}
	pthread_mutex_unlock(&e->slot_lock);
	return ret ? moe_err(err, ret, "out of memory") : 0;
}

static int open_new(struct rl_job *j, const struct moe_reload_opts *o, char *err)
{
	struct moe_engine *e = j->e;
	const char *dir = o->dir ? o->dir : e->m->dir;
	struct moe_model_opts mo = {.hook = o->hook, .hook_arg = o->hook_arg};
	char why[MOE_ERRLEN];
	int ret;

	/* its own family first (another family is "not the same
	 * architecture"); the served one's name where config.json needs it */
	ret = moe_model_open(dir, &mo, &j->nm, why);
	if (ret) {
		mo.family = moe_family_name(e->m->family);
		ret = moe_model_open(dir, &mo, &j->nm, err);
	}
	if (ret)
		return ret;
	j->nm->check_finite = true;
	return rl_same_arch(e->m, j->nm, err);
}

/* Stages and switches layers pos[0..n) (one group). */
static int run_group(struct rl_job *j, const uint32_t *pos, uint32_t n, char *err)
{
	struct moe_engine *e = j->e;
	struct rl_staged **st = calloc(n, sizeof(*st));
	int ret = 0;

	if (!st)
		return moe_err(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < n && !ret; i++)
		ret = rl_stage(j, pos[i], &st[i], err);
	if (!ret)
		ret = moe_ckpt_verify(j->nm->ckpt, err);
	if (!ret && j->src == UINT32_MAX)
		ret = add_source(j, err);
	if (!ret && j->o->atomic) {
		ret = rl_switch(j, st, n, err);
		if (ret == -EAGAIN)
			ret = moe_err(err, -EAGAIN, "a rank was lost while staging: nothing changed, "
				      "try again");
	}
	for (uint32_t i = 0; i < n && !ret && !j->o->atomic; i++) {
		ret = rl_switch(j, &st[i], 1, err);
		if (ret == -EAGAIN) { /* a lost rank moved an expert: stage again */
			rl_staged_free(e, st[i]);
			st[i] = NULL;
			ret = rl_stage(j, pos[i], &st[i], err);
			if (!ret)
				ret = moe_ckpt_verify(j->nm->ckpt, err);
			if (!ret)
				ret = rl_switch(j, &st[i], 1, err);
			if (ret == -EAGAIN)
				ret = moe_err(err, -EAGAIN, "ranks keep being lost: stopped");
		}
		if (!ret && j->o->progress)
			atomic_fetch_add(&j->o->progress->steps_done, 1);
	}
	if (!ret && j->o->atomic && j->o->progress)
		atomic_fetch_add(&j->o->progress->steps_done, 1);
	for (uint32_t i = 0; i < n; i++)
		rl_staged_free(e, st[i]);
	free(st);
	return ret;
}

int moe_engine_reload(struct moe_engine *e, const struct moe_reload_opts *o,
		      struct moe_reload_result *r, char *err)
{
	const struct moe_model *m = e->m;
	uint32_t L = m->n_moe_layers, E = m->n_experts, n = 0;
	uint32_t P = o->max_parallel ? o->max_parallel : 1;
	struct moe_reload_result dummy;
	struct rl_job j = {.e = e, .o = o, .src = UINT32_MAX, .t0_ns = rl_now_ns(),
			.r = r ? r : &dummy};
	uint32_t *pos = malloc(L * sizeof(uint32_t));
	uint64_t total = 0, biggest = 0;
	int ret;

	*j.r = (struct moe_reload_result){.source = UINT32_MAX};
	j.sel = calloc(E, sizeof(bool));
	if (!pos || !j.sel) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	ret = select_layers(e, o, pos, &n, err);
	j.whole = !o->experts;
	for (uint32_t i = 0; !ret && i < (o->experts ? o->n_experts : E); i++) {
		if (o->experts && o->experts[i] >= E)
			ret = moe_err(err, -EINVAL, "expert %u: the model has %u experts per layer",
				      o->experts[i], E);
		else
			j.sel[o->experts ? o->experts[i] : i] = true;
	}
	if (!ret && o->experts && !o->n_experts)
		ret = moe_err(err, -EINVAL, "no expert selected");
	if (!ret)
		ret = open_new(&j, o, err);
	for (uint32_t i = 0; !ret && !j.whole && i < n; i++)
		ret = rl_check_shared_same(&j, pos[i], err);
	for (uint32_t i = 0; !ret && i < n; i++)
		ret = rl_check_sums(&j, pos[i], err);
	for (uint32_t i = 0; !ret && i < n; i++) {
		uint64_t b = stage_estimate(e, pos[i], j.sel, j.whole);

		total += b;
		biggest = b > biggest ? b : biggest;
	}
	if (!ret && o->max_staging_bytes && o->atomic && total > o->max_staging_bytes)
		ret = moe_err(err, -ENOSPC, "--atomic stages a second copy of %u layers (%.1f MiB), "
			      "more than reload.max_staging_bytes (%.1f MiB)", n,
			      (double)total / (1 << 20), (double)o->max_staging_bytes / (1 << 20));
	if (!ret && o->max_staging_bytes && biggest * (P < n ? P : n) > o->max_staging_bytes)
		ret = moe_err(err, -ENOSPC, "staging %u layer%s at once takes %.1f MiB, more than "
			      "reload.max_staging_bytes (%.1f MiB)", P < n ? P : n,
			      (P < n ? P : n) == 1 ? "" : "s",
			      (double)biggest * (P < n ? P : n) / (1 << 20),
			      (double)o->max_staging_bytes / (1 << 20));
	if (ret)
		goto out;
	if (o->progress) {
		atomic_store(&o->progress->steps_total, o->atomic ? 1 : n);
		atomic_store(&o->progress->steps_done, 0);
		atomic_store(&o->progress->bytes, 0);
	}
	if (o->atomic) {
		ret = run_group(&j, pos, n, err);
	} else {
		for (uint32_t i = 0; i < n && !ret; i += P) {
			if (rl_cancelled(&j)) {
				ret = moe_err(err, -ECANCELED, "cancelled after %u of %u layers", i, n);
				break;
			}
			ret = run_group(&j, pos + i, n - i < P ? n - i : P, err);
		}
	}
out:
	j.r->bytes = j.paced_bytes;
	j.r->source = j.src;
	if (j.nm) {
		char why[MOE_ERRLEN];
		int r2 = moe_model_close_files(j.nm, why);

		if (!ret && r2)
			ret = moe_err(err, r2, "%s", why);
		if (j.src == UINT32_MAX)
			moe_model_free(j.nm);
	}
	if (j.r->steps)
		moe_log(ret ? LOG_WARNING : LOG_NOTICE, "reload from %s: %u layer%s switched in %u "
			"epoch%s (%u..%u), %.1f MiB staged%s%s", o->dir ? o->dir : m->dir,
			j.r->layers, j.r->layers == 1 ? "" : "s", j.r->steps,
			j.r->steps == 1 ? "" : "s", j.r->first_epoch, j.r->last_epoch,
			(double)j.paced_bytes / (1 << 20), ret ? "; stopped: " : "", ret ? err : "");
	free(pos);
	free(j.sel);
	return ret;
}

/* ---- rollback ----------------------------------------------------------- */

int moe_engine_can_rollback(struct moe_engine *e, char *why, size_t n)
{
	uint32_t L = e->m->n_moe_layers, changed = 0;
	int ret = 0;

	pthread_mutex_lock(&e->slot_lock);
	for (uint32_t l = 0; l < L && !ret; l++) {
		if (!e->last_reload[l])
			continue;
		changed++;
		if (e->last_reload[l] == 2 || !eng_kept(e, l)) {
			snprintf(why, n, "layer %u's previous weights were not kept "
				 "(reload.keep_previous off, or they did not fit "
				 "reload.max_staging_bytes)", e->m->layers[l].index);
			ret = -ENODATA;
		}
	}
	pthread_mutex_unlock(&e->slot_lock);
	if (!ret && !changed) {
		snprintf(why, n, "no reload to roll back");
		ret = -ENOENT;
	}
	return ret;
}

/* A layer staged from its kept snapshot: the memory where the slot is the
 * same, a copy where the placement moved the expert since. */
static int stage_from_kept(struct rl_job *j, uint32_t l, struct rl_staged **out, char *err)
{
	struct moe_engine *e = j->e;
	uint32_t R = e->n_ranks, S = e->stride, E = e->m->n_experts;
	uint32_t *want = malloc((size_t)R * S * sizeof(uint32_t));
	bool *sel = calloc(E, sizeof(bool));
	struct layer_old *from;
	struct rl_staged *s = NULL;
	int ret = 0;

	*out = NULL;
	if (!want || !sel) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	pthread_mutex_lock(&e->slot_lock);
	from = eng_kept(e, l);
	for (size_t k = 0; from && k < (size_t)R * S; k++)
		if (from->own[k] && from->expert[k] >= 0)
			sel[from->expert[k]] = true;
	pthread_mutex_unlock(&e->slot_lock);
	if (!from) {
		ret = moe_err(err, -ENODATA, "layer %u's previous weights are not kept",
			      e->m->layers[l].index);
		goto out;
	}
	s = rl_staged_new(e, l, from->own_layer, sel);
	if (!s) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	s->from = from;
	if (from->own_layer) {
		s->lh = from->lh;
		for (uint32_t r = 0; r < R; r++)
			s->ls[r] = from->ls[r];
		s->ls_borrowed = true;
	}
	rl_wanted_slots(e, l, sel, want);
	for (size_t k = 0; k < (size_t)R * S && !ret; k++) {
		uint32_t x = want[k], r = (uint32_t)(k / S);
		size_t f = (size_t)R * S;

		if (!x--)
			continue;
		if (from->own[k] && from->expert[k] == (int32_t)x) {
			s->slots[k] = from->slots[k];
			s->borrowed[k] = true;
			continue;
		}
		for (size_t i = 0; i < (size_t)R * S && f == (size_t)R * S; i++)
			if (from->own[i] && from->expert[i] == (int32_t)x)
				f = i;
		if (e->device) {
			ret = moe_err(err, -ENOTSUP, "layer %u: expert %u moved since the reload, "
				      "and device ranks cannot copy it back", e->m->layers[l].index, x);
			break;
		}
		ret = e->ranks[r].ops->slot_alloc(&e->ranks[r], e->m, from->slots[f].inter,
						  &s->slots[k], err);
		if (ret)
			break;
		atomic_fetch_add(&e->weight_bytes, s->slots[k].bytes);
		memcpy(s->slots[k].mem, from->slots[f].mem, from->slots[f].bytes);
		s->bytes += s->slots[k].bytes;
		ret = rl_pace(j, s->slots[k].bytes);
	}
out:
	free(want);
	free(sel);
	if (ret)
		rl_staged_free(e, s);
	else
		*out = s;
	return ret;
}

int moe_engine_rollback(struct moe_engine *e, const struct moe_reload_opts *o,
			struct moe_reload_result *r, char *err)
{
	uint32_t L = e->m->n_moe_layers, n = 0;
	struct moe_reload_result dummy;
	struct moe_reload_opts ro = {.cancel = o ? o->cancel : NULL,
				     .progress = o ? o->progress : NULL, .keep_previous = true};
	struct rl_job j = {.e = e, .o = &ro, .src = UINT32_MAX, .t0_ns = rl_now_ns(),
			.r = r ? r : &dummy, .unkept = true};
	char why[MOE_ERRLEN];
	int ret = moe_engine_can_rollback(e, why, sizeof(why));

	*j.r = (struct moe_reload_result){.source = UINT32_MAX};
	if (ret)
		return moe_err(err, ret, "cannot roll back: %s", why);
	for (uint32_t l = 0; l < L; l++)
		n += e->last_reload[l] != 0;
	if (ro.progress) {
		atomic_store(&ro.progress->steps_total, n);
		atomic_store(&ro.progress->steps_done, 0);
		atomic_store(&ro.progress->bytes, 0);
	}
	for (uint32_t l = 0; l < L && !ret; l++) {
		struct rl_staged *s;

		if (!e->last_reload[l])
			continue;
		if (rl_cancelled(&j)) {
			ret = moe_err(err, -ECANCELED, "rollback cancelled after %u layers",
				      j.r->layers);
			break;
		}
		ret = stage_from_kept(&j, l, &s, err);
		if (!ret) {
			ret = rl_switch(&j, &s, 1, err);
			if (ret == -EAGAIN)
				ret = moe_err(err, -EAGAIN, "a rank was lost: rollback stopped, "
					      "try again");
			rl_staged_free(e, s);
		}
		if (!ret && ro.progress)
			atomic_fetch_add(&ro.progress->steps_done, 1);
	}
	j.r->bytes = j.paced_bytes;
	moe_log(ret ? LOG_WARNING : LOG_NOTICE, "rollback: %u layer%s back to their previous "
		"weights (epochs %u..%u)%s%s", j.r->layers, j.r->layers == 1 ? "" : "s",
		j.r->first_epoch, j.r->last_epoch, ret ? "; stopped: " : "", ret ? err : "");
	return ret;
}
