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
 */
#include "daemon/engine/reload.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef MOE_HAVE_OPENSSL
#include <openssl/evp.h>
#endif

#include "daemon/engine/engine_internal.h"
#include "daemon/engine/log.h"

/* One layer's staged weights. */
struct staged {
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

struct job {
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

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static bool cancelled(const struct job *j)
{
	return j->o->cancel && atomic_load(j->o->cancel);
}

/* Sleeps so that staging stays under bytes_per_s (in naps of at most
 * 20 ms, looking at the cancel flag). */
static int pace(struct job *j, uint64_t bytes)
{
	j->paced_bytes += bytes;
	if (j->o->progress)
		atomic_fetch_add(&j->o->progress->bytes, bytes);
	if (!j->o->bytes_per_s)
		return cancelled(j) ? -ECANCELED : 0;
	for (;;) {
		uint64_t due = j->t0_ns + (uint64_t)((double)j->paced_bytes * 1e9 /
						     (double)j->o->bytes_per_s);
		uint64_t now = mono_ns();

		if (cancelled(j))
			return -ECANCELED;
		if (now >= due)
			return 0;
		usleep((useconds_t)((due - now) / 1000 < 20000 ? (due - now) / 1000 : 20000));
	}
}

/* ---- architecture ------------------------------------------------------- */

static int same_arch(const struct moe_model *a, const struct moe_model *b, char *err)
{
	const struct moe_route_params *ra = &a->route, *rb = &b->route;

#define DIFF(what, x, y)                                                                        \
	if ((x) != (y))                                                                         \
		return moe_err(err, -EINVAL, "%s: %s is %llu, the served model's %llu: not the " \
			       "same architecture", b->dir, what, (unsigned long long)(y),      \
			       (unsigned long long)(x))
	DIFF("the family", a->family, b->family);
	DIFF("the weights' dtype", a->dtype, b->dtype);
	DIFF("hidden_size", a->hidden, b->hidden);
	DIFF("the experts' intermediate size", a->inter, b->inter);
	DIFF("the shared experts' intermediate size", a->shared_inter, b->shared_inter);
	DIFF("the number of experts", a->n_experts, b->n_experts);
	DIFF("top_k", a->top_k, b->top_k);
	DIFF("the number of layers", a->n_layers, b->n_layers);
	DIFF("the number of MoE layers", a->n_moe_layers, b->n_moe_layers);
	DIFF("the scoring function", ra->score, rb->score);
	DIFF("the group selection", ra->group, rb->group);
	DIFF("n_group", ra->n_group, rb->n_group);
	DIFF("topk_group", ra->topk_group, rb->topk_group);
	DIFF("norm_topk_prob", ra->renormalize, rb->renormalize);
	if (ra->scale != rb->scale || ra->renorm_eps != rb->renorm_eps)
		return moe_err(err, -EINVAL, "%s: routed_scaling_factor %g, the served model's %g: "
			       "not the same architecture", b->dir, rb->scale, ra->scale);
	for (uint32_t l = 0; l < a->n_moe_layers; l++) {
		const struct moe_layer_desc *x = &a->layers[l], *y = &b->layers[l];

		DIFF("an MoE layer's index", x->index, y->index);
		if (x->router.dtype != y->router.dtype)
			return moe_err(err, -EINVAL, "%s: layer %u's router '%s' is %s, the served "
				       "one %s", b->dir, y->index, y->router.at.t->name,
				       moe_dtype_name(y->router.dtype),
				       moe_dtype_name(x->router.dtype));
		if (x->has_bias != y->has_bias || x->has_shared != y->has_shared ||
		    x->has_shared_gate != y->has_shared_gate)
			return moe_err(err, -EINVAL, "%s: layer %u %s a %s the served model %s",
				       b->dir, y->index,
				       (x->has_bias != y->has_bias ? y->has_bias
					: x->has_shared != y->has_shared ? y->has_shared
									 : y->has_shared_gate)
					       ? "has" : "lacks",
				       x->has_bias != y->has_bias	    ? "correction bias"
				       : x->has_shared != y->has_shared ? "shared expert"
									 : "shared expert gate",
				       (x->has_bias != y->has_bias ? x->has_bias
					: x->has_shared != y->has_shared ? x->has_shared
									 : x->has_shared_gate)
					       ? "has" : "lacks");
	}
#undef DIFF
	return 0;
}

/* ---- checks on the new checkpoint --------------------------------------- */

/* Whether two matrices hold the same bytes (chunked reads). */
static int same_mat(struct moe_model *ma, const struct moe_mat_src *a, struct moe_model *mb,
		    const struct moe_mat_src *b, bool *same, char *err)
{
	enum { CHUNK = 1 << 20 };
	uint64_t len = (uint64_t)a->rows * a->cols * moe_dtype_size(a->dtype);
	char *x, *y;
	int ret = 0;

	*same = a->rows == b->rows && a->cols == b->cols && a->dtype == b->dtype;
	if (!*same)
		return 0;
	x = malloc(CHUNK);
	y = malloc(CHUNK);
	if (!x || !y)
		ret = moe_err(err, -ENOMEM, "out of memory");
	for (uint64_t o = 0; !ret && *same && o < len; o += CHUNK) {
		uint64_t n = len - o < CHUNK ? len - o : CHUNK;

		ret = moe_ckpt_read(ma->ckpt, &a->at, a->off + o, n, x, err);
		if (!ret)
			ret = moe_ckpt_read(mb->ckpt, &b->at, b->off + o, n, y, err);
		if (!ret)
			*same = !memcmp(x, y, n);
	}
	free(x);
	free(y);
	return ret;
}

/* Experts steps: the layer's router and shared tensors in the new
 * checkpoint are those served (read from the checkpoint they came from,
 * opened anew). */
static int check_shared_same(struct job *j, uint32_t l, char *err)
{
	struct moe_engine *e = j->e;
	const struct ver_rec *rec;
	struct moe_model *old = NULL;
	struct moe_model_opts mo = {.family = moe_family_name(e->m->family)};
	const struct moe_layer_desc *a, *b = &j->nm->layers[l];
	char path[4096];
	uint64_t ident;
	bool same = true;
	int ret;

	pthread_mutex_lock(&e->slot_lock);
	rec = eng_ver_rec(e, l, e->lv[l].cur);
	snprintf(path, sizeof(path), "%s", e->src[rec->router_src].path);
	ident = e->src[rec->router_src].identity;
	pthread_mutex_unlock(&e->slot_lock);
	ret = moe_model_open(path, &mo, &old, err);
	if (!ret && old->identity != ident)
		ret = moe_err(err, -ESTALE, "layer %u's router and shared experts came from %s, "
			      "which changed on disk since: cannot check they equal the new "
			      "ones (reload whole layers instead)", b->index, path);
	a = ret ? NULL : &old->layers[l];
#define SAME(field)                                                                        \
	if (!ret && same) {                                                                     \
		ret = same_mat(old, &a->field, j->nm, &b->field, &same, err);                  \
		if (!ret && !same)                                                              \
			ret = moe_err(err, -EINVAL, "layer %u: '%s' differs from the served one: " \
				      "experts steps need the router and shared tensors unchanged " \
				      "(reload whole layers instead)", b->index,               \
				      b->field.at.t->name);                                     \
	}
	SAME(router);
	if (b->has_bias)
		SAME(bias);
	if (b->has_shared) {
		SAME(shared.gate);
		SAME(shared.up);
		SAME(shared.down);
	}
	if (b->has_shared_gate)
		SAME(shared_gate);
#undef SAME
	moe_model_free(old);
	return ret;
}

#ifdef MOE_HAVE_OPENSSL
static int sha256_tensor(struct moe_model *m, const struct moe_ckpt_tensor *t, char *hex,
			 char *err)
{
	enum { CHUNK = 1 << 20 };
	uint64_t len = t->t->end - t->t->begin;
	unsigned char md[32];
	unsigned int mdlen = 0;
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	char *buf = malloc(CHUNK);
	int ret = 0;

	if (!c || !buf || !EVP_DigestInit_ex(c, EVP_sha256(), NULL))
		ret = moe_err(err, -ENOMEM, "out of memory");
	for (uint64_t o = 0; !ret && o < len; o += CHUNK) {
		uint64_t n = len - o < CHUNK ? len - o : CHUNK;

		ret = moe_ckpt_read(m->ckpt, t, o, n, buf, err);
		if (!ret && !EVP_DigestUpdate(c, buf, n))
			ret = moe_err(err, -EIO, "SHA-256 failed");
	}
	if (!ret && !EVP_DigestFinal_ex(c, md, &mdlen))
		ret = moe_err(err, -EIO, "SHA-256 failed");
	for (unsigned i = 0; !ret && i < mdlen; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
	EVP_MD_CTX_free(c);
	free(buf);
	return ret;
}
#endif

/* A tensor's checksum, when its shard's __metadata__ has one. */
static int check_sum(struct moe_model *m, const struct moe_ckpt_tensor *t, char *err)
{
	const struct moe_st_header *h = &m->ckpt->shards[t->shard]->hdr;
	char key[320];
	const char *want;

	snprintf(key, sizeof(key), "moed.sha256.%s", t->t->name);
	want = moe_st_meta(h, key);
	if (!want)
		return 0;
#ifdef MOE_HAVE_OPENSSL
	{
		char got[65] = "";
		int ret = sha256_tensor(m, t, got, err);

		if (ret)
			return ret;
		if (strcasecmp(got, want))
			return moe_err(err, -EBADMSG, "%s: tensor '%s': SHA-256 %s, its __metadata__ "
				       "says %.64s", m->ckpt->shards[t->shard]->path, t->t->name,
				       got, want);
		return 0;
	}
#else
	return moe_err(err, -ENOTSUP, "%s: tensor '%s' has a checksum, and this moed was built "
		       "without OpenSSL to verify it", m->ckpt->shards[t->shard]->path,
		       t->t->name);
#endif
}

/* The checksums of every tensor a step of layer l reads (each once). */
static int check_sums(struct job *j, uint32_t l, char *err)
{
	const struct moe_layer_desc *d = &j->nm->layers[l];
	const struct moe_st_tensor *seen[8];
	uint32_t n_seen = 0;
	int ret = 0;

#define CHECK(src)                                                                               \
	do {                                                                                    \
		bool dup = false;                                                               \
		for (uint32_t i = 0; i < n_seen; i++)                                           \
			dup |= seen[i] == (src).at.t;                                           \
		if (!dup && !ret) {                                                             \
			ret = check_sum(j->nm, &(src).at, err);                                 \
			if (n_seen < 8)                                                         \
				seen[n_seen++] = (src).at.t;                                    \
		}                                                                               \
	} while (0)
	if (j->whole) {
		CHECK(d->router);
		if (d->has_bias)
			CHECK(d->bias);
		if (d->has_shared) {
			CHECK(d->shared.gate);
			CHECK(d->shared.up);
			CHECK(d->shared.down);
		}
		if (d->has_shared_gate)
			CHECK(d->shared_gate);
	}
	for (uint32_t x = 0; x < j->nm->n_experts && !ret; x++) {
		if (!j->sel[x])
			continue;
		/* (fused layouts: one tensor for all experts, checked once) */
		if (d->layout == MOE_LAYOUT_FUSED && n_seen >= 8)
			break;
		CHECK(d->experts[x].gate);
		CHECK(d->experts[x].up);
		CHECK(d->experts[x].down);
		if (d->layout != MOE_LAYOUT_FUSED)
			n_seen = j->whole ? n_seen : 0; /* per-expert tensors never repeat */
	}
#undef CHECK
	return ret;
}

/* ---- staging ------------------------------------------------------------ */

static void staged_free(struct moe_engine *e, struct staged *s)
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

static struct staged *staged_new(struct moe_engine *e, uint32_t l, bool whole, const bool *sel)
{
	uint32_t R = e->n_ranks, S = e->stride, E = e->m->n_experts;
	struct staged *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->l = l;
	s->whole = whole;
	s->sel = malloc(E * sizeof(bool));
	s->slots = calloc((size_t)R * S, sizeof(*s->slots));
	s->borrowed = calloc((size_t)R * S, sizeof(bool));
	s->ls = calloc(R, sizeof(*s->ls));
	if (!s->sel || !s->slots || !s->borrowed || !s->ls) {
		staged_free(e, s);
		return NULL;
	}
	memcpy(s->sel, sel, E * sizeof(bool));
	return s;
}

/* Which (rank, slot) of layer l the current placement fills with a
 * selected expert: want[k] = expert + 1, 0 for the others. */
static void wanted_slots(struct moe_engine *e, uint32_t l, const bool *sel, uint32_t *want)
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
static int stage_layer_state(struct job *j, struct staged *s, char *err)
{
	struct moe_engine *e = j->e;
	struct moe_model *m = j->nm;
	const struct moe_layer_desc *d = &m->layers[s->l];
	uint64_t host = (uint64_t)m->n_experts * m->hidden * sizeof(float);
	int ret = eng_read_host(e, m, s->l, &s->lh, err);

	if (!ret)
		s->bytes += host, ret = pace(j, host);
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
			s->bytes += ls->shared.bytes, ret = pace(j, ls->shared.bytes);
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

static int stage(struct job *j, uint32_t l, struct staged **out, char *err)
{
	struct moe_engine *e = j->e;
	uint32_t R = e->n_ranks, S = e->stride;
	uint32_t *want = malloc((size_t)R * S * sizeof(uint32_t));
	struct staged *s = staged_new(e, l, j->whole, j->sel);
	int ret = 0;

	*out = NULL;
	if (!want || !s) {
		free(want);
		staged_free(e, s);
		return moe_err(err, -ENOMEM, "out of memory");
	}
	if (j->whole)
		ret = stage_layer_state(j, s, err);
	wanted_slots(e, l, j->sel, want);
	for (size_t k = 0; k < (size_t)R * S && !ret; k++) {
		uint32_t x = want[k];

		if (!x--)
			continue;
		ret = upload_from(e, j->nm, (uint32_t)(k / S), &s->slots[k],
				  &j->nm->layers[l].experts[x], j->nm->layers[l].index, x, err);
		if (!ret)
			s->bytes += s->slots[k].bytes, ret = pace(j, s->slots[k].bytes);
	}
	free(want);
	if (ret == -ECANCELED)
		moe_err(err, ret, "cancelled while staging layer %u", j->nm->layers[l].index);
	if (ret) {
		staged_free(e, s);
		return ret;
	}
	*out = s;
	return 0;
}

/* ---- the switch --------------------------------------------------------- */

/* Whether the staged layer still covers every replica of its experts in
 * the current placement (fwd_lock and publish_lock held). */
static bool covers(struct moe_engine *e, const struct staged *s, const struct moe_placement *p)
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
static int install(struct job *j, struct staged *s, uint32_t *version, struct layer_old **out)
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
static int switch_layers(struct job *j, struct staged **st, uint32_t n, char *err)
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

/* ---- the driver --------------------------------------------------------- */

/* Bytes a step of layer l stages (the slots it replaces, as served). */
static uint64_t stage_estimate(struct moe_engine *e, uint32_t l, const bool *sel, bool whole)
{
	uint32_t R = e->n_ranks, S = e->stride, L = e->m->n_moe_layers;
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
	(void)S;
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
static int add_source(struct job *j, char *err)
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

static int open_new(struct job *j, const struct moe_reload_opts *o, char *err)
{
	struct moe_engine *e = j->e;
	struct moe_model_opts mo = {.family = moe_family_name(e->m->family), .hook = o->hook,
				    .hook_arg = o->hook_arg};
	int ret = moe_model_open(o->dir ? o->dir : e->m->dir, &mo, &j->nm, err);

	if (ret)
		return ret;
	j->nm->check_finite = true;
	return same_arch(e->m, j->nm, err);
}

/* Stages and switches layers pos[0..n) (one group). */
static int run_group(struct job *j, const uint32_t *pos, uint32_t n, char *err)
{
	struct moe_engine *e = j->e;
	struct staged **st = calloc(n, sizeof(*st));
	int ret = 0;

	if (!st)
		return moe_err(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < n && !ret; i++)
		ret = stage(j, pos[i], &st[i], err);
	if (!ret)
		ret = moe_ckpt_verify(j->nm->ckpt, err);
	if (!ret && j->src == UINT32_MAX)
		ret = add_source(j, err);
	if (!ret && j->o->atomic) {
		ret = switch_layers(j, st, n, err);
		if (ret == -EAGAIN)
			ret = moe_err(err, -EAGAIN, "a rank was lost while staging: nothing changed, "
				      "try again");
	}
	for (uint32_t i = 0; i < n && !ret && !j->o->atomic; i++) {
		ret = switch_layers(j, &st[i], 1, err);
		if (ret == -EAGAIN) { /* a lost rank moved an expert: stage again */
			staged_free(e, st[i]);
			st[i] = NULL;
			ret = stage(j, pos[i], &st[i], err);
			if (!ret)
				ret = moe_ckpt_verify(j->nm->ckpt, err);
			if (!ret)
				ret = switch_layers(j, &st[i], 1, err);
			if (ret == -EAGAIN)
				ret = moe_err(err, -EAGAIN, "ranks keep being lost: stopped");
		}
		if (!ret && j->o->progress)
			atomic_fetch_add(&j->o->progress->steps_done, 1);
	}
	if (!ret && j->o->atomic && j->o->progress)
		atomic_fetch_add(&j->o->progress->steps_done, 1);
	for (uint32_t i = 0; i < n; i++)
		staged_free(e, st[i]);
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
	struct job j = {.e = e, .o = o, .src = UINT32_MAX, .t0_ns = mono_ns(),
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
		ret = check_shared_same(&j, pos[i], err);
	for (uint32_t i = 0; !ret && i < n; i++)
		ret = check_sums(&j, pos[i], err);
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
			if (cancelled(&j)) {
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
static int stage_from_kept(struct job *j, uint32_t l, struct staged **out, char *err)
{
	struct moe_engine *e = j->e;
	uint32_t R = e->n_ranks, S = e->stride, E = e->m->n_experts;
	uint32_t *want = malloc((size_t)R * S * sizeof(uint32_t));
	bool *sel = calloc(E, sizeof(bool));
	struct layer_old *from;
	struct staged *s = NULL;
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
	s = staged_new(e, l, from->own_layer, sel);
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
	wanted_slots(e, l, sel, want);
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
		ret = pace(j, s->slots[k].bytes);
	}
out:
	free(want);
	free(sel);
	if (ret)
		staged_free(e, s);
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
	struct job j = {.e = e, .o = &ro, .src = UINT32_MAX, .t0_ns = mono_ns(),
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
		struct staged *s;

		if (!e->last_reload[l])
			continue;
		if (cancelled(&j)) {
			ret = moe_err(err, -ECANCELED, "rollback cancelled after %u layers",
				      j.r->layers);
			break;
		}
		ret = stage_from_kept(&j, l, &s, err);
		if (!ret) {
			ret = switch_layers(&j, &s, 1, err);
			if (ret == -EAGAIN)
				ret = moe_err(err, -EAGAIN, "a rank was lost: rollback stopped, "
					      "try again");
			staged_free(e, s);
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
