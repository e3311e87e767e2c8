/* daemon/engine/backend_cpu.c — the CPU backend: slots in host memory holding each
 * expert packed into panels (kernels/cpu/panel.h), the runtime-chosen
 * kernels (scalar, AVX2, AVX-512) spread over the rank's thread pool.
 *
 * The expert FFNs run in two passes so that every task writes rows nobody
 * else writes: pass 1 computes h = silu(x Wgᵀ) * (x Wuᵀ) in tiles of
 * (token block x 8 intermediate rows x PB panels), pass 2 computes
 * y = scale * (h Wdᵀ) in tiles of (token block x 16 hidden rows x PB panels).
 * Tiles, not experts, are the unit of work, so a skewed routing (one hot
 * expert) still spreads over every core. Each output element is one fp32
 * sum in k order, so a token's result does not depend on its batch.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/backend.h"
#include "daemon/engine/threadpool.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/route.h"

/* Tile shape, chosen by measurement with moe-bench (bench/RESULTS.md):
 * TOK_BLOCK tokens share one pass over PANELS_PER_TILE panels. */
#define TOK_BLOCK	48
#define PANELS_PER_TILE 4
#define ROUTE_BLOCK	16

struct cpu_rank {
	const struct moe_cpu_kernels *k;
	uint32_t n_workers;
	float *logits;	      /* [max_tokens, E] */
	float *route_scratch; /* per worker MOE_ROUTE_SCRATCH(E) */
	uint32_t max_tokens;
	struct tile *tiles;   /* reused by every batch */
	uint32_t tiles_cap;
};

struct tile {
	uint32_t group, t0, p0;
};

/* The CPU rank's workspaces: logits [max_tokens, E], route scratch per
 * worker, and the most tiles a chunk can make, so that `experts` never
 * allocates (and never fails halfway through a batch whose outputs are
 * being written): per group ceil(rows / TOK_BLOCK) token blocks, rows
 * summing to chunk * K routed + chunk shared. */
struct cpu_sizes {
	size_t logits, scratch, tiles; /* bytes */
	uint32_t tiles_cap;
};

static struct cpu_sizes cpu_sizes(const struct moe_model *m, uint32_t max_tokens,
				  uint32_t n_workers)
{
	uint64_t ck = max_tokens < MOE_CHUNK_TOKENS ? max_tokens : MOE_CHUNK_TOKENS;
	uint64_t imax = m->inter > m->shared_inter ? m->inter : m->shared_inter;
	uint64_t pb_gu = ((imax + 7) / 8 + PANELS_PER_TILE - 1) / PANELS_PER_TILE;
	uint64_t pb_d = ((m->hidden + MOE_PANEL - 1) / MOE_PANEL + PANELS_PER_TILE - 1) /
			PANELS_PER_TILE;
	uint64_t blocks = (ck * m->top_k + TOK_BLOCK - 1) / TOK_BLOCK + m->n_experts +
			  (ck + TOK_BLOCK - 1) / TOK_BLOCK + 1;
	struct cpu_sizes z;

	z.tiles_cap = (uint32_t)(blocks * (pb_gu > pb_d ? pb_gu : pb_d));
	z.logits = (size_t)max_tokens * m->n_experts * sizeof(float);
	z.scratch = (size_t)n_workers * MOE_ROUTE_SCRATCH(m->n_experts) * sizeof(float);
	z.tiles = (size_t)z.tiles_cap * sizeof(struct tile);
	return z;
}

static uint64_t cpu_workspace_bytes(const struct moe_model *m, uint32_t max_tokens,
				    uint32_t threads)
{
	struct cpu_sizes z = cpu_sizes(m, max_tokens, threads);

	return z.logits + z.scratch + z.tiles;
}

static int cpu_rank_init(struct moe_rank *r, const struct moe_model *m, uint32_t max_tokens,
			 const struct moe_backend_tuning *t, char *err)
{
	struct cpu_rank *c = calloc(1, sizeof(*c));
	enum moe_cpu_isa chosen;
	int ret;

	if (!c)
		return moe_err(err, -ENOMEM, "cpu rank: out of memory");
	r->priv = c;
	ret = moe_cpu_isa_resolve(t->isa, t->isa_from, &chosen, err, MOE_ERRLEN);
	if (ret) {
		r->ops->rank_fini(r);
		return ret;
	}
	c->k = moe_cpu_kernels_for(chosen);
	r->kernels = moe_cpu_isa_name(chosen);
	snprintf(r->desc, sizeof(r->desc), "the host CPU, %s kernels", r->kernels);
	c->n_workers = moe_pool_threads(r->pool);
	c->max_tokens = max_tokens;
	{
		struct cpu_sizes z = cpu_sizes(m, max_tokens, c->n_workers);

		c->logits = malloc(z.logits);
		c->route_scratch = malloc(z.scratch);
		c->tiles_cap = z.tiles_cap;
		c->tiles = malloc(z.tiles);
	}
	if (!c->logits || !c->route_scratch || !c->tiles) {
		r->ops->rank_fini(r);
		return moe_err(err, -ENOMEM, "cpu rank: out of memory for %u-token workspaces",
			       max_tokens);
	}
	return 0;
}

static void cpu_rank_fini(struct moe_rank *r)
{
	struct cpu_rank *c = r->priv;

	if (!c)
		return;
	free(c->logits);
	free(c->route_scratch);
	free(c->tiles);
	free(c);
	r->priv = NULL;
}

static int cpu_layer_init(struct moe_rank *r, const struct moe_model *m, struct moe_layer_state *ls)
{
	ls->router_dev = aligned_alloc(64, moe_pack_rows_bytes(m->n_experts, m->hidden,
							      MOE_DT_F32));
	if (!ls->router_dev)
		return -ENOMEM;
	moe_pack_rows(ls->router, m->n_experts, m->hidden, MOE_DT_F32, ls->router_dev);
	return 0;
}

static void cpu_layer_fini(struct moe_rank *r, struct moe_layer_state *ls)
{
	free(ls->router_dev);
	ls->router_dev = NULL;
}

/* The down panels follow the gate/up panels, 64-byte aligned. */
static size_t gate_up_bytes_dt(enum moe_dtype dt, uint32_t hidden, uint32_t inter)
{
	return (moe_pack_gate_up_bytes(inter, hidden, dt) + 63) & ~(size_t)63;
}

static size_t gate_up_bytes(const struct moe_model *m, uint32_t inter)
{
	return gate_up_bytes_dt(m->dtype, m->hidden, inter);
}

static int cpu_slot_alloc(struct moe_rank *r, const struct moe_model *m, uint32_t inter,
			  struct moe_slot *s, char *err)
{
	size_t bytes = gate_up_bytes(m, inter) + moe_pack_rows_bytes(m->hidden, inter, m->dtype);

	s->mem = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
	s->bytes = bytes;
	s->inter = inter;
	if (!s->mem)
		return moe_err(err, -ENOMEM, "out of host memory (%.1f MiB)",
			       (double)bytes / (1 << 20));
	return 0;
}

static void cpu_slot_free(struct moe_rank *r, struct moe_slot *s)
{
	free(s->mem);
	s->mem = NULL;
	s->bytes = 0;
}

/* Reads the three matrices into a staging buffer, then packs them. */
static int cpu_slot_upload(struct moe_rank *r, struct moe_slot *s, struct moe_model *m,
			   const struct moe_expert_src *src, char *err)
{
	uint32_t I = src->gate.rows, H = m->hidden;
	size_t mat = (size_t)I * H * moe_dtype_size(m->dtype);
	char *stage = malloc(3 * mat);
	int ret;

	if (!stage)
		return moe_err(err, -ENOMEM, "out of memory staging an expert");
	if (I != s->inter)
		ret = moe_err(err, -EINVAL, "slot for inter %u given an expert of %u", s->inter, I);
	else
		ret = moe_model_read(m, &src->gate, stage, err);
	if (!ret)
		ret = moe_model_read(m, &src->up, stage + mat, err);
	if (!ret)
		ret = moe_model_read(m, &src->down, stage + 2 * mat, err);
	if (!ret) {
		moe_pack_gate_up(stage, stage + mat, I, H, m->dtype, s->mem);
		moe_pack_rows(stage + 2 * mat, H, I, m->dtype, (char *)s->mem + gate_up_bytes(m, I));
	}
	free(stage);
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
	uint32_t t0 = task * ROUTE_BLOCK, nt = rc->n - t0 < ROUTE_BLOCK ? rc->n - t0 : ROUTE_BLOCK;
	float *logits = rc->c->logits + (size_t)t0 * E;
	struct moe_route_params p = m->route;

	rc->c->k->rows(rc->x + (size_t)t0 * H, H, nt, rc->ls->router_dev, MOE_DT_F32, H, E,
		       logits, E, NULL);
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
	moe_pool_run(r->pool, (n + ROUTE_BLOCK - 1) / ROUTE_BLOCK, route_task, &rc);
	return 0;
}

/* ---- expert FFNs ------------------------------------------------------ */

struct ffn_ctx {
	struct cpu_rank *c;
	const struct moe_rank_work *w;
	enum moe_dtype dt;
};

static uint32_t min_u32(uint32_t a, uint32_t b)
{
	return a < b ? a : b;
}

static void gate_up_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct tile *t = &fc->c->tiles[task];
	const struct moe_ffn_group *g = &fc->w->groups[t->group];
	uint32_t H = fc->w->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(TOK_BLOCK, g->n - t->t0);
	uint32_t n_inter = min_u32(PANELS_PER_TILE * 8, I - t->p0 * 8);
	size_t panel = moe_pack_gate_up_bytes(8, H, fc->dt);

	fc->c->k->gate_up(g->x + (size_t)t->t0 * H, H, nt,
			  (const char *)g->slot->mem + (size_t)t->p0 * panel, fc->dt, H, n_inter,
			  g->h + (size_t)t->t0 * I + (size_t)t->p0 * 8, I);
}

static void down_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct tile *t = &fc->c->tiles[task];
	const struct moe_ffn_group *g = &fc->w->groups[t->group];
	uint32_t H = fc->w->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(TOK_BLOCK, g->n - t->t0);
	uint32_t n_rows = min_u32(PANELS_PER_TILE * MOE_PANEL, H - t->p0 * MOE_PANEL);
	size_t panel = moe_pack_rows_bytes(MOE_PANEL, I, fc->dt);
	const char *down = (const char *)g->slot->mem + gate_up_bytes_dt(fc->dt, H, I);

	fc->c->k->rows(g->h + (size_t)t->t0 * I, I, nt, down + (size_t)t->p0 * panel, fc->dt, I,
		       n_rows, g->y + (size_t)t->t0 * H + (size_t)t->p0 * MOE_PANEL, H,
		       g->scale ? g->scale + t->t0 : NULL);
}

/* Tiles of every group: token blocks x blocks of PANELS_PER_TILE panels. */
static uint32_t make_tiles(const struct moe_rank_work *w, bool down, struct tile *out)
{
	uint32_t n = 0;

	for (uint32_t gi = 0; gi < w->n_groups; gi++) {
		const struct moe_ffn_group *g = &w->groups[gi];
		uint32_t np = down ? (w->hidden + MOE_PANEL - 1) / MOE_PANEL
				   : (g->slot->inter + 7) / 8;

		for (uint32_t t0 = 0; t0 < g->n; t0 += TOK_BLOCK)
			for (uint32_t p0 = 0; p0 < np; p0 += PANELS_PER_TILE) {
				if (out)
					out[n] = (struct tile){gi, t0, p0};
				n++;
			}
	}
	return n;
}

static int cpu_experts(struct moe_rank *r, const struct moe_rank_work *w)
{
	struct cpu_rank *c = r->priv;
	struct ffn_ctx fc = {c, w, w->wdt};
	uint32_t n1 = make_tiles(w, false, NULL), n2 = make_tiles(w, true, NULL);
	uint32_t need = n1 > n2 ? n1 : n2;

	if (need > c->tiles_cap) /* cannot happen: rank_init sized it for a chunk */
		return -EOVERFLOW;
	make_tiles(w, false, c->tiles);
	moe_pool_run(r->pool, n1, gate_up_task, &fc);
	make_tiles(w, true, c->tiles);
	moe_pool_run(r->pool, n2, down_task, &fc);
	return 0;
}

const struct moe_backend_ops moe_backend_cpu = {
	.name = "cpu",
	.rank_init = cpu_rank_init,
	.rank_fini = cpu_rank_fini,
	.workspace_bytes = cpu_workspace_bytes,
	.layer_init = cpu_layer_init,
	.layer_fini = cpu_layer_fini,
	.slot_alloc = cpu_slot_alloc,
	.slot_upload = cpu_slot_upload,
	.slot_free = cpu_slot_free,
	.route = cpu_route,
	.experts = cpu_experts,
};
