/* daemon/engine/backend_cpu.c — the CPU backend: slots in host memory holding each
 * expert packed into panels (kernels/cpu/panel.h), the runtime-chosen
 * kernels (scalar, AVX2, AVX-512) spread over the rank's thread pool. The
 * stages over the exchange buffers are in backend_cpu_stages.c.
 *
 * On the bf16 paths (avx512bf16, amx) a bf16 model's experts are packed in
 * pairs along K (kernels/cpu/pairs.h) and computed with bf16 activations:
 * the FFN passes read x as a bf16 copy (exact: x was rounded to the model
 * dtype on arrival) and keep h in bf16. On one rank dispatch writes the
 * routed rows' copy itself (and no fp32 send rows); otherwise, and for
 * the shared expert, a first pass makes it from the fp32 rows.
 * cpu.precision fp32, or an f32/f16 model, runs the avx512 kernels there
 * instead, which the rank's description says.
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
#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "daemon/engine/backend_cpu.h"
#include "daemon/engine/log.h"
#include "daemon/engine/threadpool.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/route.h"

/* Tile shape, chosen by measurement with moe-bench (bench/RESULTS.md):
 * TOK_BLOCK tokens share one pass over PANELS_PER_TILE panels. */
#define TOK_BLOCK	48
#define PANELS_PER_TILE 4
#define ROUTE_BLOCK	16
/* The bf16 kernels' tiles: up to PAIRS_TOK tokens (a task streams its
 * weights once, then reuses them from L2) x PAIRS_GU 16-column blocks of
 * gate/up or PAIRS_DOWN 16-column panels of down. */
#define PAIRS_TOK  256
#define PAIRS_GU   2
#define PAIRS_DOWN 4
#define CONV_ROWS  64 /* rows per task of the bf16 copy of x */
#define MAX_BLOCK  256 /* the largest of the token blocks above */
_Static_assert(TOK_BLOCK <= MAX_BLOCK && PAIRS_TOK <= MAX_BLOCK && CONV_ROWS <= MAX_BLOCK,
	       "make_tiles sorts blocks by height up to MAX_BLOCK");
/* A round whose groups' weights are at most this many bytes (and tokens x
 * bytes at most 4 times it) runs on the calling thread (cpu_run_groups). */
#define INLINE_BYTES (2u << 20)

/* Which kernels a rank runs for this model and tuning: isa resolved (and
 * amx's permission asked), kb set for the bf16 paths on a bf16 model at
 * bf16 precision; kernels names what runs the experts (a bf16 path without
 * kb runs avx512's); note: why a bf16 path does not run its own (or ""). */
struct cpu_choice {
	enum moe_cpu_isa isa;
	const struct moe_pairs_kernels *kb;
	const char *kernels;
	bool round_h;
	char note[MOE_ERRLEN];
};

static int cpu_choose(const struct moe_model *m, const struct moe_backend_tuning *t,
		      struct cpu_choice *ch, char *err)
{
	const char *prec = t && t->precision ? t->precision : "auto";
	bool bf16;
	int ret;

	*ch = (struct cpu_choice){0};
	ret = moe_cpu_isa_resolve(t ? t->isa : NULL, t ? t->isa_from : NULL, &ch->isa, err,
				  MOE_ERRLEN);
	if (ret)
		return ret;
	if (err[0]) /* auto, amx refused: taken the next path */
		snprintf(ch->note, sizeof(ch->note), "%s", err);
	err[0] = 0;
	if (strcmp(prec, "auto") == 0)
		bf16 = m->dtype == MOE_DT_BF16;
	else if (strcmp(prec, "bf16") == 0)
		bf16 = true;
	else if (strcmp(prec, "fp32") == 0)
		bf16 = false;
	else
		return moe_err(err, -EINVAL, "cpu.precision=%s: unknown (auto, bf16, fp32)", prec);
	if (moe_cpu_isa_bf16(ch->isa)) {
		if (m->dtype == MOE_DT_BF16 && bf16)
			ch->kb = moe_pairs_kernels_for(ch->isa);
		else if (!ch->note[0])
			snprintf(ch->note, sizeof(ch->note),
				 "%s kernels run bf16 models at bf16 precision; this %s model at "
				 "%s precision runs the avx512 kernels",
				 moe_cpu_isa_name(ch->isa), moe_dtype_name(m->dtype),
				 bf16 ? "bf16" : "fp32");
	}
	ch->round_h = bf16 && !ch->kb;
	ch->kernels = moe_cpu_isa_name(ch->kb ? ch->isa : moe_cpu_kernels_for(ch->isa)->isa);
	return 0;
}

const char *moe_backend_cpu_kernels(const struct moe_model *m, const struct moe_backend_tuning *t,
				    char *note, size_t n, char *err)
{
	struct cpu_choice ch;

	if (cpu_choose(m, t, &ch, err))
		return NULL;
	snprintf(note, n, "%s", ch.note);
	return ch.kernels;
}

/* The rank's workspaces, one list for sizing (moed -t) and allocating, so
 * that the stages never allocate (and never fail halfway through a batch
 * whose outputs are being written). */
struct cpu_list {
	bool alloc, failed;
	uint64_t bytes;
};

static void *buf(struct cpu_list *L, size_t bytes)
{
	void *p;

	L->bytes += bytes;
	if (!L->alloc)
		return NULL;
	p = malloc(bytes ? bytes : 1);
	L->failed |= !p;
	return p;
}

/* 64-byte aligned (the rows the bf16 kernels stream their results to). */
static void *abuf(struct cpu_list *L, size_t bytes)
{
	void *p;

	bytes = (bytes + 63) & ~(size_t)63;
	L->bytes += bytes;
	if (!L->alloc)
		return NULL;
	p = aligned_alloc(64, bytes ? bytes : 64);
	L->failed |= !p;
	return p;
}

/* Zeroed and 64-byte aligned (the bf16 copies: their pad columns stay 0). */
static void *zbuf(struct cpu_list *L, size_t bytes)
{
	void *p;

	bytes = (bytes + 63) & ~(size_t)63;
	L->bytes += bytes;
	if (!L->alloc)
		return NULL;
	p = aligned_alloc(64, bytes ? bytes : 64);
	if (p)
		memset(p, 0, bytes ? bytes : 64);
	L->failed |= !p;
	return p;
}

/* Per round a rank routes at most share_cap = ceil(chunk / R) tokens and
 * receives at most recv_cap rows: every (token, k) row of the chunk when
 * several ranks send, its own share's otherwise. The most tiles: per group
 * ceil(rows / TOK_BLOCK) token blocks, groups one per slot plus shared. */
static void cpu_buffers(struct cpu_rank *c, struct moe_xbuf *xb, const struct moe_model *m,
			const struct moe_rank_shape *s, bool pairs, struct cpu_list *L)
{
	size_t H = m->hidden, K = m->top_k, E = m->n_experts, R = s->n_ranks;
	size_t S = s->slots_per_rank, MR = MOE_MAX_REPLICAS;
	size_t sc = (s->chunk + R - 1) / R, rc = R > 1 ? (size_t)s->chunk * K : sc * K;
	uint64_t imax = m->inter > m->shared_inter ? m->inter : m->shared_inter;
	uint64_t pb_gu = ((imax + 7) / 8 + PANELS_PER_TILE - 1) / PANELS_PER_TILE;
	uint64_t pb_d = ((m->hidden + MOE_PANEL - 1) / MOE_PANEL + PANELS_PER_TILE - 1) /
			PANELS_PER_TILE;
	uint64_t blocks = (rc + TOK_BLOCK - 1) / TOK_BLOCK + S + (sc + TOK_BLOCK - 1) / TOK_BLOCK + 1;

	c->share_cap = (uint32_t)sc;
	c->recv_cap = (uint32_t)rc;
	c->tiles_cap = (uint32_t)(blocks * (pb_gu > pb_d ? pb_gu : pb_d));
	c->logits = buf(L, sc * E * sizeof(float));
	c->route_scratch = buf(L, (size_t)s->threads * MOE_ROUTE_SCRATCH(E) * sizeof(float));
	c->x = buf(L, sc * H * sizeof(float));
	c->pos = buf(L, sc * K * sizeof(uint32_t));
	c->ecount = buf(L, E * sizeof(uint32_t));
	c->eseen = buf(L, E * sizeof(uint32_t));
	c->rkey = buf(L, E * MR * sizeof(uint32_t));
	c->rtake = buf(L, E * MR * sizeof(uint32_t));
	c->kpos = buf(L, R * S * sizeof(uint32_t));
	c->to_rank = buf(L, R * sizeof(uint32_t));
	if (R > 1) {
		c->xs = buf(L, rc * H * sizeof(float));
		c->xs_scale = buf(L, rc * sizeof(float));
	}
	if (pairs) {
		size_t slack = MOE_PAIRS_SLACK_ROWS;

		/* rows padded by 64 bytes: a 16-row tile of rows 4 KiB apart
		 * would fall in one L1 set (measured 3x slower) */
		c->ldxb = moe_pairs_kp(m->hidden) + MOE_PAIRS_K;
		c->ldhb = moe_pairs_kp(m->inter) + MOE_PAIRS_K;
		c->ldshb = moe_pairs_kp(m->shared_inter ? m->shared_inter : 1) + MOE_PAIRS_K;
		c->xb16 = zbuf(L, (rc + sc + slack) * c->ldxb * 2);
		c->hb16 = zbuf(L, (rc + slack) * c->ldhb * 2);
		if (m->shared_inter)
			c->shb16 = zbuf(L, (sc + slack) * c->ldshb * 2);
	} else {
		c->hs = buf(L, rc * m->inter * sizeof(float));
	}
	if (m->shared_inter) {
		if (!pairs)
			c->sh_h = buf(L, sc * m->shared_inter * sizeof(float));
		c->sh_y = buf(L, sc * H * sizeof(float));
		c->sh_sc = buf(L, sc * sizeof(float));
	}
	c->groups = buf(L, (S + 1) * sizeof(*c->groups));
	c->gorder = buf(L, (S + 1) * sizeof(*c->gorder));
	c->acc = buf(L, (size_t)s->threads * H * sizeof(float));
	c->tiles = buf(L, (size_t)c->tiles_cap * sizeof(*c->tiles));

	xb->send_cap = (uint32_t)(sc * K);
	xb->recv_cap = (uint32_t)rc;
	/* one rank on the bf16 kernels: dispatch writes xb16 instead */
	xb->send = pairs && R == 1 ? NULL : buf(L, sc * K * H * sizeof(float));
	xb->send_scale = buf(L, sc * K * sizeof(float));
	if (R > 1) {
		xb->recv = abuf(L, rc * H * sizeof(float));
		xb->recv_scale = buf(L, rc * sizeof(float));
	} else {
		xb->recv = xb->send;
		xb->recv_scale = xb->send_scale;
	}
	xb->ret = abuf(L, rc * H * sizeof(float));
	xb->back = R > 1 ? xb->send : xb->ret;
	xb->send_counts = buf(L, R * S * sizeof(uint32_t));
	xb->recv_counts = buf(L, R * S * sizeof(uint32_t));
	xb->send_rows = buf(L, R * sizeof(uint32_t));
	xb->recv_rows = buf(L, R * sizeof(uint32_t));
}

static uint64_t cpu_workspace_bytes(const struct moe_model *m, const struct moe_rank_shape *s,
				    const struct moe_backend_tuning *t)
{
	struct cpu_rank c;
	struct moe_xbuf xb;
	struct cpu_list L = {0};
	struct cpu_choice ch;
	char err[MOE_ERRLEN];

	cpu_choose(m, t, &ch, err); /* refused: kb NULL (rank_init says why) */
	cpu_buffers(&c, &xb, m, s, ch.kb != NULL, &L);
	return L.bytes;
}

static void cpu_rank_fini(struct moe_rank *r)
{
	struct cpu_rank *c = r->priv;
	struct moe_xbuf *xb = &r->xb;

	if (!c)
		return;
	free(c->logits);
	free(c->route_scratch);
	free(c->x);
	free(c->pos);
	free(c->ecount);
	free(c->eseen);
	free(c->rkey);
	free(c->rtake);
	free(c->kpos);
	free(c->to_rank);
	free(c->xs);
	free(c->xs_scale);
	free(c->hs);
	free(c->xb16);
	free(c->hb16);
	free(c->shb16);
	free(c->sh_h);
	free(c->sh_y);
	free(c->sh_sc);
	free(c->groups);
	free(c->gorder);
	free(c->acc);
	free(c->tiles);
	if (xb->recv != xb->send) {
		free(xb->recv);
		free(xb->recv_scale);
	}
	free(xb->send);
	free(xb->send_scale);
	free(xb->ret);
	free(xb->send_counts);
	free(xb->recv_counts);
	free(xb->send_rows);
	free(xb->recv_rows);
	*xb = (struct moe_xbuf){0};
	free(c);
	r->priv = NULL;
}

static int cpu_rank_init(struct moe_rank *r, const struct moe_model *m,
			 const struct moe_backend_tuning *t, char *err)
{
	struct cpu_rank *c = calloc(1, sizeof(*c));
	struct cpu_list L = {.alloc = true};
	struct moe_rank_shape s = r->shape;
	struct cpu_choice ch;
	int ret;

	if (!c)
		return moe_err(err, -ENOMEM, "cpu rank: out of memory");
	r->priv = c;
	ret = cpu_choose(m, t, &ch, err);
	if (ret) {
		cpu_rank_fini(r);
		return ret;
	}
	c->k = moe_cpu_kernels_for(ch.isa);
	c->kb = ch.kb;
	c->round_h = ch.round_h;
	r->kernels = ch.kernels;
	if (ch.note[0]) {
		moe_log(LOG_WARNING, "cpu rank %u: %s", r->id, ch.note);
		snprintf(r->desc, sizeof(r->desc), "the host CPU, %s kernels (%.140s)", r->kernels,
			 ch.note);
	} else {
		snprintf(r->desc, sizeof(r->desc), "the host CPU, %s kernels, %s activations",
			 r->kernels, c->kb || c->round_h ? "bf16" : "fp32");
	}
	c->n_workers = moe_pool_threads(r->pool);
	s.threads = c->n_workers;
	cpu_buffers(c, &r->xb, m, &s, c->kb != NULL, &L);
	if (L.failed) {
		cpu_rank_fini(r);
		return moe_err(err, -ENOMEM, "cpu rank %u: out of memory for its %.1f MiB of "
			       "workspaces", r->id, (double)L.bytes / (1 << 20));
	}
	return 0;
}

/* The router's panels, in the model's dtype when every weight is one of
 * its values (always, except a DeepSeek router stored in F32): half the
 * bytes of fp32 panels, which a decode call reads from DRAM like the
 * experts' (an OLMoE layer's 512 KiB took 30-90 µs of a 1-token call on
 * one thread). The kernels widen bf16/f16 exactly and sum in the same
 * order whatever the dtype, so the logits are the same bits. */
struct cpu_router {
	enum moe_dtype dt;
	alignas(64) unsigned char panels[];
};

static int cpu_layer_init(struct moe_rank *r, const struct moe_model *m, struct moe_layer_state *ls)
{
	size_t EH = (size_t)m->n_experts * m->hidden;
	enum moe_dtype dt = m->dtype;
	struct cpu_router *cr;
	void *tmp = NULL;

	if (dt != MOE_DT_F32 && !moe_cpu_representable(dt, ls->router, EH))
		dt = MOE_DT_F32;
	cr = aligned_alloc(64, offsetof(struct cpu_router, panels) +
				       (moe_pack_rows_bytes(m->n_experts, m->hidden, dt) + 63) / 64 * 64);
	if (dt != MOE_DT_F32)
		tmp = malloc(EH * moe_dtype_size(dt));
	if (!cr || (dt != MOE_DT_F32 && !tmp)) {
		free(cr);
		free(tmp);
		return -ENOMEM;
	}
	cr->dt = dt;
	if (tmp)
		moe_cpu_from_f32(dt, ls->router, tmp, EH);
	moe_pack_rows(tmp ? tmp : ls->router, m->n_experts, m->hidden, dt, cr->panels);
	free(tmp);
	ls->router_dev = cr;
	return 0;
}

static void cpu_layer_fini(struct moe_rank *r, struct moe_layer_state *ls)
{
	free(ls->router_dev);
	ls->router_dev = NULL;
}

/* The down panels follow the gate/up panels, 64-byte aligned. */
static size_t gate_up_bytes(const struct cpu_rank *c, enum moe_dtype dt, uint32_t hidden,
			    uint32_t inter)
{
	if (c->kb)
		return moe_pairs_gate_up_bytes(inter, hidden); /* (a multiple of 1 KiB) */
	return (moe_pack_gate_up_bytes(inter, hidden, dt) + 63) & ~(size_t)63;
}

static size_t slot_bytes(const struct cpu_rank *c, const struct moe_model *m, uint32_t inter)
{
	return gate_up_bytes(c, m->dtype, m->hidden, inter) +
	       (c->kb ? moe_pairs_rows_bytes(m->hidden, inter)
		      : moe_pack_rows_bytes(m->hidden, inter, m->dtype));
}

/* Slots are pages of their own (mmap): long-lived, large, and freed whole
 * when a replica is dropped, so that replicas coming and going never
 * fragment the heap (the daemon's memory returns to what it was), and a
 * rank's slots can later be bound to its NUMA node page by page.
 *
 * A slot of 2 MiB or more is placed on a 2 MiB boundary and asked to be
 * backed by transparent huge pages (MADV_HUGEPAGE: Debian's default THP
 * mode is "madvise", which gives none otherwise). Decode streams each
 * expert once from memory; on 4 KiB pages the Zen 3 VM of bench/RESULTS.md
 * read 26-27 GB/s in the 1-2 token tiles, on 2 MiB pages 31-32. Where the
 * kernel has THP off (or no huge page is free) the advice is a no-op and
 * the slot is on 4 KiB pages, as before. */
#define SLOT_HUGE (2u << 20)

static void *slot_map(size_t bytes)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE), extra = bytes >= SLOT_HUGE ? SLOT_HUGE : 0;
	char *p;
	uintptr_t a;

	bytes = (bytes + pg - 1) & ~(pg - 1); /* (munmap takes whole pages) */
	p = mmap(NULL, bytes + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		 -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	if (!extra)
		return p;
	a = ((uintptr_t)p + SLOT_HUGE - 1) & ~(uintptr_t)(SLOT_HUGE - 1);
	if (a > (uintptr_t)p)
		munmap(p, a - (uintptr_t)p);
	munmap((char *)a + bytes, (uintptr_t)p + extra - a); /* (a < p + extra) */
#ifdef MADV_HUGEPAGE
	madvise((void *)a, bytes, MADV_HUGEPAGE); /* advice: refused is fine */
#endif
	return (void *)a;
}

static int cpu_slot_alloc(struct moe_rank *r, const struct moe_model *m, uint32_t inter,
			  struct moe_slot *s, char *err)
{
	size_t bytes = slot_bytes(r->priv, m, inter);

	s->mem = slot_map(bytes);
	s->bytes = bytes;
	s->inter = inter;
	if (!s->mem)
		return moe_err(err, -ENOMEM, "out of host memory (%.1f MiB)",
			       (double)bytes / (1 << 20));
	return 0;
}

static void cpu_slot_free(struct moe_rank *r, struct moe_slot *s)
{
	(void)r;
	if (s->mem)
		munmap(s->mem, s->bytes);
	s->mem = NULL;
	s->bytes = 0;
}

/* Reads the three matrices into a staging buffer, then packs them. */
static int cpu_slot_upload(struct moe_rank *r, struct moe_slot *s, struct moe_model *m,
			   const struct moe_expert_src *src, char *err)
{
	const struct cpu_rank *c = r->priv;
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
	if (!ret && c->kb) {
		moe_pairs_pack_gate_up((const uint16_t *)stage, (const uint16_t *)(stage + mat), I, H,
				       s->mem);
		moe_pairs_pack_rows((const uint16_t *)(stage + 2 * mat), H, I,
				    (char *)s->mem + gate_up_bytes(c, m->dtype, H, I));
	} else if (!ret) {
		moe_pack_gate_up(stage, stage + mat, I, H, m->dtype, s->mem);
		moe_pack_rows(stage + 2 * mat, H, I, m->dtype,
			      (char *)s->mem + gate_up_bytes(c, m->dtype, H, I));
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
	const struct cpu_router *cr = rc->ls->router_dev;

	rc->c->k->rows(rc->x + (size_t)t0 * H, H, nt, cr->panels, cr->dt, H, E, logits, E, NULL);
	/* Outside DeepSeek, the router is an nn.Linear in the model dtype: its
	 * logits are rounded to that dtype before the fp32 softmax. */
	if (!m->router_fp32)
		moe_cpu_round(m->dtype, logits, (size_t)nt * E);
	p.bias = rc->ls->bias;
	moe_cpu_route(&p, logits, nt, rc->ids + (size_t)t0 * K, rc->w + (size_t)t0 * K,
		      rc->c->route_scratch + worker * MOE_ROUTE_SCRATCH(E));
}

int cpu_route(struct moe_rank *r, const struct moe_model *m, const struct moe_layer_state *ls,
	      const float *x, uint32_t n, uint32_t *ids, float *w)
{
	struct route_ctx rc = {r->priv, m, ls, x, n, ids, w};

	if (n > rc.c->share_cap)
		return -E2BIG;
	moe_pool_run(r->pool, (n + ROUTE_BLOCK - 1) / ROUTE_BLOCK, route_task, &rc);
	return 0;
}

/* ---- expert FFNs ------------------------------------------------------ */

struct ffn_ctx {
	struct cpu_rank *c;
	const struct cpu_group *groups;
	uint32_t hidden;
	enum moe_dtype dt;
	bool inline_run;
};

static uint32_t min_u32(uint32_t a, uint32_t b)
{
	return a < b ? a : b;
}

static void gate_up_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct cpu_tile *t = &fc->c->tiles[task];
	const struct cpu_group *g = &fc->groups[t->group];
	uint32_t H = fc->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(TOK_BLOCK, g->n - t->t0);
	uint32_t n_inter = min_u32(PANELS_PER_TILE * 8, I - t->p0 * 8);
	size_t panel = moe_pack_gate_up_bytes(8, H, fc->dt);
	float *h = g->h + (size_t)t->t0 * I + (size_t)t->p0 * 8;

	fc->c->k->gate_up(g->x + (size_t)t->t0 * H, H, nt,
			  (const char *)g->slot->mem + (size_t)t->p0 * panel, fc->dt, H, n_inter,
			  h, I);
	if (fc->c->round_h) /* cpu.precision bf16: as the bf16 kernels store h */
		for (uint32_t r = 0; r < nt; r++)
			moe_cpu_round(MOE_DT_BF16, h + (size_t)r * I, n_inter);
}

static void down_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct cpu_tile *t = &fc->c->tiles[task];
	const struct cpu_group *g = &fc->groups[t->group];
	uint32_t H = fc->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(TOK_BLOCK, g->n - t->t0);
	uint32_t n_rows = min_u32(PANELS_PER_TILE * MOE_PANEL, H - t->p0 * MOE_PANEL);
	size_t panel = moe_pack_rows_bytes(MOE_PANEL, I, fc->dt);
	const char *down = (const char *)g->slot->mem + gate_up_bytes(fc->c, fc->dt, H, I);

	fc->c->k->rows(g->h + (size_t)t->t0 * I, I, nt, down + (size_t)t->p0 * panel, fc->dt, I,
		       n_rows, g->y + (size_t)t->t0 * H + (size_t)t->p0 * MOE_PANEL, H,
		       g->scale ? g->scale + t->t0 : NULL);
}

/* The bf16 kernels: x to bf16, then the same two passes. */
static void conv_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct cpu_tile *t = &fc->c->tiles[task];
	const struct cpu_group *g = &fc->groups[t->group];
	uint32_t H = fc->hidden, nt = min_u32(CONV_ROWS, g->n - t->t0);

	for (uint32_t r = t->t0; r < t->t0 + nt; r++)
		moe_cpu_from_f32(MOE_DT_BF16, g->x + (size_t)r * H, g->xb + (size_t)r * g->ldxb, H);
}

static void pairs_gate_up_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct cpu_tile *t = &fc->c->tiles[task];
	const struct cpu_group *g = &fc->groups[t->group];
	uint32_t H = fc->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(PAIRS_TOK, g->n - t->t0);
	uint32_t n_inter = min_u32(PAIRS_GU * MOE_PAIRS_N, I - t->p0 * MOE_PAIRS_N);
	size_t block = 2 * moe_pairs_panel_bytes(H);

	fc->c->kb->gate_up(g->xb + (size_t)t->t0 * g->ldxb, g->ldxb, nt,
			   (const char *)g->slot->mem + (size_t)t->p0 * block, H, n_inter,
			   g->hb + (size_t)t->t0 * g->ldhb + (size_t)t->p0 * MOE_PAIRS_N, g->ldhb);
}

static void pairs_down_task(void *arg, uint32_t task, uint32_t worker)
{
	struct ffn_ctx *fc = arg;
	const struct cpu_tile *t = &fc->c->tiles[task];
	const struct cpu_group *g = &fc->groups[t->group];
	uint32_t H = fc->hidden, I = g->slot->inter;
	uint32_t nt = min_u32(PAIRS_TOK, g->n - t->t0);
	uint32_t n_rows = min_u32(PAIRS_DOWN * MOE_PAIRS_N, H - t->p0 * MOE_PAIRS_N);
	const char *down = (const char *)g->slot->mem + gate_up_bytes(fc->c, fc->dt, H, I);

	fc->c->kb->rows(g->hb + (size_t)t->t0 * g->ldhb, g->ldhb, nt,
			down + (size_t)t->p0 * moe_pairs_panel_bytes(I), I, n_rows,
			g->y + (size_t)t->t0 * H + (size_t)t->p0 * MOE_PAIRS_N, H,
			g->scale ? g->scale + t->t0 : NULL);
}

void cpu_tasks(struct moe_rank *r, uint32_t n, void (*fn)(void *, uint32_t, uint32_t), void *arg,
	       bool inline_run)
{
	if (inline_run)
		for (uint32_t t = 0; t < n; t++)
			fn(arg, t, 0);
	else
		moe_pool_run(r->pool, n, fn, arg);
}

/* Blocks of `per` panels of `width` columns a group's tiles span, 0 for a
 * group that needs none (cols_h == 1: its bf16 copy is made already). */
static uint32_t group_blocks(const struct cpu_group *g, uint32_t cols_h, uint32_t width,
			     uint32_t per)
{
	uint32_t cols = cols_h ? cols_h : g->slot->inter;

	if (cols_h == 1 && g->xb_ready)
		return 0;
	return ((cols + width - 1) / width + per - 1) / per;
}

/* Tiles of every group: blocks of `tok` tokens x blocks of `per` of the
 * group's np panels (np from the panel width `width` over the columns).
 * cols_h == 1 (the bf16 copy of x): only the groups whose copy is not
 * made yet.
 *
 * The order is for the pool's two ends (threadpool.h): every full block
 * first, then each group's last, partial block by height, tallest first,
 * so even workers start on the tiles with the most arithmetic per byte
 * and odd ones on those that only stream: a shared expert's many rows
 * are computed while the routed experts' few rows stream beside them
 * (1.03-1.19x a 15-token call on the demo's Qwen2-MoE shape; before, both
 * threads ran the shared expert while the memory idled: bench/RESULTS.md).
 * Which thread runs a tile does not change its result. `order`
 * (n_groups entries) is scratch. */
static uint32_t make_tiles(const struct cpu_group *groups, uint32_t n_groups, uint32_t cols_h,
			   uint32_t tok, uint32_t width, uint32_t per, uint32_t *order,
			   struct cpu_tile *out)
{
	uint32_t at[MAX_BLOCK + 1] = {0}, n = 0, n_part = 0, part_tiles = 0;

	for (uint32_t gi = 0; gi < n_groups; gi++) {
		const struct cpu_group *g = &groups[gi];
		uint32_t nb = group_blocks(g, cols_h, width, per);

		for (uint32_t t0 = 0; nb && t0 + tok <= g->n; t0 += tok)
			for (uint32_t b = 0; b < nb; b++) {
				if (out)
					out[n] = (struct cpu_tile){gi, t0, b * per};
				n++;
			}
		if (nb && g->n % tok) {
			at[g->n % tok]++;
			n_part++;
			part_tiles += nb;
		}
	}
	if (!out || !n_part) /* (counting: no order needed) */
		return n + part_tiles;
	/* a counting sort of the partial blocks, tallest first */
	for (uint32_t h = tok - 1, sum = 0; h > 0; h--) {
		uint32_t k = at[h];

		at[h] = sum;
		sum += k;
	}
	for (uint32_t gi = 0; gi < n_groups; gi++)
		if (group_blocks(&groups[gi], cols_h, width, per) && groups[gi].n % tok)
			order[at[groups[gi].n % tok]++] = gi;
	for (uint32_t i = 0; i < n_part; i++) {
		const struct cpu_group *g = &groups[order[i]];
		uint32_t nb = group_blocks(g, cols_h, width, per);

		for (uint32_t b = 0; b < nb; b++)
			out[n++] = (struct cpu_tile){order[i], g->n - g->n % tok, b * per};
	}
	return n;
}

/* One pass over the tiles of (tok x per panels of width); on the calling
 * thread alone when the round is small (fc->inline_run). */
static int pass(struct moe_rank *r, struct ffn_ctx *fc, uint32_t n_groups, uint32_t cols_h,
		uint32_t tok, uint32_t width, uint32_t per, void (*fn)(void *, uint32_t, uint32_t))
{
	struct cpu_rank *c = r->priv;
	uint32_t n = make_tiles(fc->groups, n_groups, cols_h, tok, width, per, c->gorder, NULL);

	if (n > c->tiles_cap) /* cannot happen: sized for a round */
		return -EOVERFLOW;
	make_tiles(fc->groups, n_groups, cols_h, tok, width, per, c->gorder, c->tiles);
	cpu_tasks(r, n, fn, fc, fc->inline_run);
	return 0;
}

int cpu_run_groups(struct moe_rank *r, enum moe_dtype wdt, uint32_t hidden,
		   const struct cpu_group *g, uint32_t n_groups)
{
	struct cpu_rank *c = r->priv;
	struct ffn_ctx fc = {c, g, hidden, wdt, false};
	uint64_t bytes = 0, work = 0;
	int ret;

	/* On the bf16 paths a small round (decode on a small layer) runs on the
	 * calling thread: waking a sleeping helper costs more than the math
	 * (tens of µs on a VM), and the tokens' weights are read either way.
	 * Unless the calls come back to back (the last one ended within the
	 * helpers' spin, MOE_POOL_SPIN_NS: a chain of layers in one process):
	 * then the helpers are awake and two cores stream the weights, 27-31
	 * against 59-66 µs a 1-token call on the tiny layer (bench/RESULTS.md).
	 * The tiles are the same either way, so are the results, bit for bit.
	 * (The fp32 paths keep the pool: inline measured slower for them, 94
	 * against 63 µs, before their small-batch tiles; not measured since.) */
	for (uint32_t i = 0; i < n_groups; i++) {
		bytes += g[i].slot->bytes;
		work += (uint64_t)g[i].n * g[i].slot->bytes;
	}
	if (c->kb && bytes <= INLINE_BYTES && work <= 4 * INLINE_BYTES)
		fc.inline_run = !c->groups_end_ns ||
				cpu_mono_ns() - c->groups_end_ns >= MOE_POOL_SPIN_NS;

	if (c->kb) {
		struct ffn_ctx conv = fc;
		uint32_t rows = 0;

		/* the bf16 copy of a few rows (decode) is shorter than a wake-up */
		for (uint32_t i = 0; i < n_groups; i++)
			rows += g[i].xb_ready ? 0 : g[i].n;
		conv.inline_run |= rows <= CONV_ROWS;
		ret = rows ? pass(r, &conv, n_groups, 1, CONV_ROWS, 1, 1, conv_task) : 0;
		if (!ret)
			ret = pass(r, &fc, n_groups, 0, PAIRS_TOK, MOE_PAIRS_N, PAIRS_GU,
				   pairs_gate_up_task);
		if (!ret)
			ret = pass(r, &fc, n_groups, hidden, PAIRS_TOK, MOE_PAIRS_N, PAIRS_DOWN,
				   pairs_down_task);
		c->groups_end_ns = cpu_mono_ns();
		return ret;
	}
	ret = pass(r, &fc, n_groups, 0, TOK_BLOCK, 8, PANELS_PER_TILE, gate_up_task);
	if (!ret)
		ret = pass(r, &fc, n_groups, hidden, TOK_BLOCK, MOE_PANEL, PANELS_PER_TILE,
			   down_task);
	return ret;
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
	.dispatch = cpu_dispatch,
	.experts = cpu_experts,
	.combine = cpu_combine,
};
