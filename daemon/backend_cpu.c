/* daemon/backend_cpu.c — the CPU backend: slots in host memory, the math of
 * kernels/cpu/ spread over the rank's thread pool.
 *
 * The expert FFNs run in two passes so that every task writes rows nobody
 * else writes: pass 1 computes h = silu(x Wgᵀ) * (x Wuᵀ) in tiles of
 * (token block x intermediate rows), pass 2 computes y = scale * (h Wdᵀ) in
 * tiles of (token block x hidden rows). Each output element is one dot
 * product in a fixed order, so a token's result does not depend on which
 * other tokens share its batch.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/backend.h"
#include "daemon/threadpool.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/route.h"
#include "kernels/cpu/swiglu.h"

#define TOK_BLOCK 16 /* token rows per tile */
#define ROW_BLOCK 64 /* weight rows per tile */

struct cpu_scratch {
	float *w;   /* MOE_MATMUL_WBLOCK * max(H, I) widened weight rows */
	float *tmp; /* TOK_BLOCK * ROW_BLOCK */
};

struct cpu_rank {
	uint32_t n_workers;
	struct cpu_scratch *s;
	float *logits; /* [max_tokens, E] */
	float *route_scratch; /* per worker MOE_ROUTE_SCRATCH(E) */
	uint32_t max_tokens;
};

static int cpu_rank_init(struct moe_rank *r, const struct moe_model *m, uint32_t max_tokens,
			 char *err)
{
	struct cpu_rank *c = calloc(1, sizeof(*c));
	uint32_t kmax = m->hidden;

	if (!c)
		return moe_err(err, -ENOMEM, "cpu rank: out of memory");
	if (m->inter > kmax)
		kmax = m->inter;
	if (m->shared_inter > kmax)
		kmax = m->shared_inter;
	c->n_workers = moe_pool_threads(r->pool);
	c->max_tokens = max_tokens;
	c->s = calloc(c->n_workers, sizeof(*c->s));
	c->logits = malloc((size_t)max_tokens * m->n_experts * sizeof(float));
	c->route_scratch = malloc(c->n_workers * MOE_ROUTE_SCRATCH(m->n_experts) * sizeof(float));
	r->priv = c;
	if (!c->s || !c->logits || !c->route_scratch)
		goto err_nomem;
	for (uint32_t i = 0; i < c->n_workers; i++) {
		c->s[i].w = malloc((size_t)MOE_MATMUL_WBLOCK * kmax * sizeof(float));
		c->s[i].tmp = malloc((size_t)TOK_BLOCK * ROW_BLOCK * sizeof(float));
		if (!c->s[i].w || !c->s[i].tmp)
			goto err_nomem;
	}
	return 0;

err_nomem:
	r->ops->rank_fini(r);
	return moe_err(err, -ENOMEM, "cpu rank: out of memory for %u-token workspaces",
		       max_tokens);
}

static void cpu_rank_fini(struct moe_rank *r)
{
	struct cpu_rank *c = r->priv;

	if (!c)
		return;
	for (uint32_t i = 0; c->s && i < c->n_workers; i++) {
		free(c->s[i].w);
		free(c->s[i].tmp);
	}
	free(c->s);
	free(c->logits);
	free(c->route_scratch);
	free(c);
	r->priv = NULL;
}

static int cpu_slot_alloc(struct moe_rank *r, size_t bytes, struct moe_slot *s)
{
	/* 64-byte aligned for the SIMD kernels */
	s->mem = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
	s->bytes = bytes;
	return s->mem ? 0 : -ENOMEM;
}

static void cpu_slot_free(struct moe_rank *r, struct moe_slot *s)
{
	free(s->mem);
	s->mem = NULL;
	s->bytes = 0;
}

static int cpu_slot_upload(struct moe_rank *r, struct moe_slot *s, struct moe_model *m,
			   const struct moe_expert_src *src, char *err)
{
	size_t esz = moe_dtype_size(m->dtype);
	size_t mat = (size_t)src->gate.rows * src->gate.cols * esz;
	char *p = s->mem;
	int ret;

	if (s->bytes < 3 * mat)
		return moe_err(err, -EINVAL, "slot of %zu bytes is too small for %zu", s->bytes,
			       3 * mat);
	s->inter = src->gate.rows;
	ret = moe_model_read(m, &src->gate, p, err);
	if (!ret)
		ret = moe_model_read(m, &src->up, p + mat, err);
	if (!ret)
		ret = moe_model_read(m, &src->down, p + 2 * mat, err);
	return ret;
}

/* ---- routing ---------------------------------------------------------- */

struct route_ctx {
	struct cpu_rank *c;
	const struct moe_model *m;
	const struct moe_layer_state *ls;
	const float *x;
	uint32_t n;
	uint32_t *ids;
	float *w;
};

static void route_task(void *arg, uint32_t task, uint32_t worker)
{
	struct route_ctx *rc = arg;
	const struct moe_model *m = rc->m;
	uint32_t E = m->n_experts, H = m->hidden, K = m->top_k;
	uint32_t t0 = task * TOK_BLOCK, nt = rc->n - t0 < TOK_BLOCK ? rc->n - t0 : TOK_BLOCK;
	float *logits = rc->c->logits + (size_t)t0 * E;
	struct moe_route_params p = m->route;

	moe_cpu_matmul_nt(rc->x + (size_t)t0 * H, H, nt, H, rc->ls->router, MOE_DT_F32, E, logits,
			  E, rc->c->s[worker].w);
	/* Outside DeepSeek, the router is an nn.Linear in the model dtype: its
	 * logits are rounded to that dtype before the fp32 softmax. */
	if (!m->router_fp32)
		moe_cpu_round(m->dtype, logits, (size_t)nt * E);
	p.bias = rc->ls->bias;
	moe_cpu_route(&p, logits, nt, rc->ids + (size_t)t0 * K, rc->w + (size_t)t0 * K,
		      rc->c->route_scratch + worker * MOE_ROUTE_SCRATCH(E));
}

static int cpu_route(struct moe_rank *r, const struct moe_model *m,
		     const struct moe_layer_state *ls, const float *x, uint32_t n, uint32_t *ids,
		     float *w)
{
	struct route_ctx rc = {r->priv, m, ls, x, n, ids, w};

	if (n > rc.c->max_tokens)
		return -E2BIG;
	moe_pool_run(r->pool, (n + TOK_BLOCK - 1) / TOK_BLOCK, route_task, &rc);
	return 0;
}

/* ---- expert FFNs ------------------------------------------------------ */

struct tile {
	uint32_t group, t0, r0;
};

struct ffn_ctx {
	struct cpu_rank *c;
	const struct moe_rank_work *w;
	struct tile *tiles;
};

static uint32_t min_u32(uint32_t a, uint32_t b)
{
	return a < b ? a : b;
}

static void gate_up_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct tile *t = &fc->tiles[task];
	const struct moe_ffn_group *g = &fc->w->groups[t->group];
	uint32_t H = fc->w->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(TOK_BLOCK, g->n - t->t0), nr = min_u32(ROW_BLOCK, I - t->r0);
	size_t esz = moe_dtype_size(fc->w->wdt), mat = (size_t)I * H * esz;
	const char *gate = (const char *)g->slot->mem + (size_t)t->r0 * H * esz;
	const char *up = gate + mat;
	struct cpu_scratch *s = &fc->c->s[worker];
	const float *x = g->x + (size_t)t->t0 * H;
	float *h = g->h + (size_t)t->t0 * I + t->r0;

	moe_cpu_matmul_nt(x, H, nt, H, gate, fc->w->wdt, nr, h, I, s->w);
	moe_cpu_matmul_nt(x, H, nt, H, up, fc->w->wdt, nr, s->tmp, nr, s->w);
	for (uint32_t i = 0; i < nt; i++)
		moe_cpu_swiglu(h + (size_t)i * I, s->tmp + (size_t)i * nr, h + (size_t)i * I, nr);
}

static void down_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct tile *t = &fc->tiles[task];
	const struct moe_ffn_group *g = &fc->w->groups[t->group];
	uint32_t H = fc->w->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(TOK_BLOCK, g->n - t->t0), nr = min_u32(ROW_BLOCK, H - t->r0);
	size_t esz = moe_dtype_size(fc->w->wdt), mat = (size_t)I * H * esz;
	const char *down = (const char *)g->slot->mem + 2 * mat + (size_t)t->r0 * I * esz;
	float *y = g->y + (size_t)t->t0 * H + t->r0;

	moe_cpu_matmul_nt(g->h + (size_t)t->t0 * I, I, nt, I, down, fc->w->wdt, nr, y, H,
			  fc->c->s[worker].w);
	if (!g->scale)
		return;
	for (uint32_t i = 0; i < nt; i++) {
		float sc = g->scale[t->t0 + i];

		for (uint32_t j = 0; j < nr; j++)
			y[(size_t)i * H + j] *= sc;
	}
}

/* Tiles of every group over (token blocks x row blocks of `rows(g)`). */
static uint32_t make_tiles(const struct moe_rank_work *w, bool down, struct tile *out)
{
	uint32_t n = 0;

	for (uint32_t gi = 0; gi < w->n_groups; gi++) {
		const struct moe_ffn_group *g = &w->groups[gi];
		uint32_t rows = down ? w->hidden : g->slot->inter;

		for (uint32_t t0 = 0; t0 < g->n; t0 += TOK_BLOCK)
			for (uint32_t r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
				if (out)
					out[n] = (struct tile){gi, t0, r0};
				n++;
			}
	}
	return n;
}

static int cpu_experts(struct moe_rank *r, const struct moe_rank_work *w)
{
	struct ffn_ctx fc = {r->priv, w, NULL};
	uint32_t n1 = make_tiles(w, false, NULL), n2 = make_tiles(w, true, NULL);

	fc.tiles = malloc((n1 > n2 ? n1 : n2) * sizeof(*fc.tiles) + 1);
	if (!fc.tiles)
		return -ENOMEM;
	make_tiles(w, false, fc.tiles);
	moe_pool_run(r->pool, n1, gate_up_task, &fc);
	make_tiles(w, true, fc.tiles);
	moe_pool_run(r->pool, n2, down_task, &fc);
	free(fc.tiles);
	return 0;
}

const struct moe_backend_ops moe_backend_cpu = {
	.name = "cpu",
	.rank_init = cpu_rank_init,
	.rank_fini = cpu_rank_fini,
	.slot_alloc = cpu_slot_alloc,
	.slot_upload = cpu_slot_upload,
	.slot_free = cpu_slot_free,
	.route = cpu_route,
	.experts = cpu_experts,
};
