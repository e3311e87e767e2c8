/* daemon/engine/reload_checks.c — the new checkpoint, checked before
 * anything is staged: the same architecture as served, for experts steps
 * the same routers and shared experts as served, and the SHA-256 of every
 * tensor whose shard's __metadata__ has a moed.sha256.<tensor> entry.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_HAVE_OPENSSL
#include <openssl/evp.h>
#endif

#include "daemon/engine/reload_internal.h"

/* ---- architecture ------------------------------------------------------- */

int rl_same_arch(const struct moe_model *a, const struct moe_model *b, char *err)
{
	const struct moe_route_params *ra = &a->route, *rb = &b->route;

#define DIFF(what, x, y)                                                                        \
	if ((x) != (y))                                                                         \
		return moe_err(err, -EINVAL, "%s: %s is %llu, the served model's %llu: not the " \
			       "same architecture", b->dir, what, (unsigned long long)(y),      \
			       (unsigned long long)(x))
	if (a->family != b->family)
		return moe_err(err, -EINVAL, "%s: a %s model, the served one is %s: not the same "
			       "architecture", b->dir, moe_family_name(b->family),
			       moe_family_name(a->family));
	if (a->dtype != b->dtype)
		return moe_err(err, -EINVAL, "%s: %s weights, the served ones are %s: not the same "
			       "architecture", b->dir, moe_dtype_name(b->dtype),
			       moe_dtype_name(a->dtype));
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
int rl_check_shared_same(struct rl_job *j, uint32_t l, char *err)
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
			ret = moe_err(err, -EINVAL, "layer %u: '%s' differs from the served " \
				      "one (experts steps keep routers: reload whole layers)",   \
				      b->index, b->field.at.t->name);                           \
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

/* A matrix's tensor's checksum, unless seen[] has that tensor already (fused
 * layouts hold every expert's matrices in one tensor); seen may be NULL for
 * tensors that cannot repeat. */
static int check_once(struct rl_job *j, const struct moe_mat_src *s,
		      const struct moe_st_tensor **seen, uint32_t *n_seen, char *err)
{
	for (uint32_t i = 0; seen && i < *n_seen; i++)
		if (seen[i] == s->at.t)
			return 0;
	if (seen)
		seen[(*n_seen)++] = s->at.t;
	return check_sum(j->nm, &s->at, err);
}

/* The checksums of every tensor a step of layer l reads (each once). */
int rl_check_sums(struct rl_job *j, uint32_t l, char *err)
{
	const struct moe_layer_desc *d = &j->nm->layers[l];
	/* router, bias, 3 shared, shared gate, fused gate_up and down */
	const struct moe_st_tensor *seen[8];
	uint32_t n = 0;
	bool fused = d->layout == MOE_LAYOUT_FUSED;
	int ret = 0;

	if (j->whole) {
		ret = check_once(j, &d->router, seen, &n, err);
		if (!ret && d->has_bias)
			ret = check_once(j, &d->bias, seen, &n, err);
		if (!ret && d->has_shared)
			ret = check_once(j, &d->shared.gate, seen, &n, err);
		if (!ret && d->has_shared)
			ret = check_once(j, &d->shared.up, seen, &n, err);
		if (!ret && d->has_shared)
			ret = check_once(j, &d->shared.down, seen, &n, err);
		if (!ret && d->has_shared_gate)
			ret = check_once(j, &d->shared_gate, seen, &n, err);
	}
	for (uint32_t x = 0; x < j->nm->n_experts && !ret; x++) {
		if (!j->sel[x])
			continue;
		ret = check_once(j, &d->experts[x].gate, fused ? seen : NULL, &n, err);
		if (!ret)
			ret = check_once(j, &d->experts[x].up, fused ? seen : NULL, &n, err);
		if (!ret)
			ret = check_once(j, &d->experts[x].down, fused ? seen : NULL, &n, err);
	}
	return ret;
}
