/* daemon/engine/backend_cpu_stages.c — the CPU rank's stages over its
 * exchange buffers (backend.h): dispatch, experts, combine.
 *
 * Exactness: every row's result is computed by the same kernels whatever
 * group, rank or round it lands in (the kernels are batch-invariant), and
 * combine adds a token's K rows in k order and the shared expert last, in
 * fp32, as one rank does. So for any number of ranks, placement and
 * replica choice the outputs are bit-identical to one rank's.
 *
 * Replica choice (dispatch): the rows of an expert with several replicas
 * are given one at a time to the replica whose rank this rank has given
 * the fewest rows in this round so far (ties: the replica on this rank,
 * which costs no transfer, then the first listed). Each replica takes a
 * contiguous run of the expert's rows in token order.
 */
#include <errno.h>
#include <math.h>
#include <string.h>
#include <time.h>

#include "daemon/engine/backend_cpu.h"
#include "daemon/engine/threadpool.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/matmul.h"

/* The segment holding batch token t, and t's index inside it. */
static uint32_t seg_of(const struct moe_stage *st, uint32_t t, uint32_t *at)
{
	uint32_t si = 0, s0 = 0;

	while (t >= s0 + st->segs[si].n_tokens)
		s0 += st->segs[si++].n_tokens;
	*at = t - s0;
	return si;
}

/* The row stages (convert, the dispatch copy, combine) move bytes, not
 * math: a large round spreads them over the rank's pool in blocks of
 * ROW_BLOCK tokens (one thread streams ~7 GB/s; the helpers are awake from
 * the router's run just before). A small one (decode) stays on the calling
 * thread: a wake-up would cost more than the copy. Each token's arithmetic
 * is the same either way, so the results are too, bit for bit. */
#define ROW_BLOCK 32
#define ROW_POOL  64 /* tokens from which the pool is used */

static void row_blocks(struct moe_rank *r, uint32_t n, moe_task_fn fn, void *arg)
{
	cpu_tasks(r, (n + ROW_BLOCK - 1) / ROW_BLOCK, fn, arg, n < ROW_POOL);
}

struct rows_ctx {
	struct cpu_rank *c;
	const struct moe_model *m;
	const struct moe_stage *st;
	float *send;	    /* dispatch: the send buffer */
	const float *back; /* combine: the rows back */
};

/* Tokens [b * ROW_BLOCK, ..) of the share, clipped to n. */
static uint32_t block_end(uint32_t b, uint32_t n)
{
	return (b + 1) * ROW_BLOCK < n ? (b + 1) * ROW_BLOCK : n;
}

/* This rank's tokens in fp32, rounded to the model dtype (a no-op when
 * they come in it: bf16 and f16 widen to fp32 exactly). */
static void convert_task(void *arg, uint32_t b, uint32_t worker)
{
	const struct rows_ctx *rc = arg;
	const struct moe_stage *st = rc->st;
	size_t H = rc->m->hidden;
	uint32_t t = b * ROW_BLOCK, end = block_end(b, st->n), at, si;

	(void)worker;
	si = seg_of(st, st->t0 + t, &at);
	while (t < end) {
		const struct moe_seg *sg = &st->segs[si++];
		uint32_t k = sg->n_tokens - at < end - t ? sg->n_tokens - at : end - t;
		float *x = rc->c->x + (size_t)t * H;

		moe_cpu_to_f32(sg->dtype, (const char *)sg->in + (size_t)at * H *
						moe_dtype_size(sg->dtype), x, (size_t)k * H);
		if (sg->dtype != rc->m->dtype)
			moe_cpu_round(rc->m->dtype, x, (size_t)k * H);
		t += k;
		at = 0;
	}
}

/* Splits each expert's rows over its replicas (see the top of the file):
 * rkey/rtake per (expert, replica), send_counts per (dest rank, slot). */
static int split_replicas(struct moe_rank *r, struct cpu_rank *c, const struct moe_model *m,
			  const struct moe_stage *st)
{
	uint32_t E = m->n_experts, R = r->shape.n_ranks, S = r->shape.slots_per_rank;
	struct moe_xbuf *xb = &r->xb;

	memset(c->to_rank, 0, R * sizeof(*c->to_rank));
	memset(xb->send_counts, 0, (size_t)R * S * sizeof(*xb->send_counts));
	for (uint32_t x = 0; x < E; x++) {
		uint32_t n, take[MOE_MAX_REPLICAS] = {0};
		const struct moe_replica *rep;

		if (!c->ecount[x])
			continue;
		rep = moe_place_get(st->place, st->layer, x, &n);
		if (!n || n > MOE_MAX_REPLICAS)
			return -EINVAL;
		for (uint32_t i = 0; i < n; i++)
			if (rep[i].rank >= R || rep[i].slot >= S)
				return -EINVAL;
		for (uint32_t row = 0; row < c->ecount[x]; row++) {
			uint32_t best = 0;

			for (uint32_t i = 1; i < n; i++) {
				uint32_t li = c->to_rank[rep[i].rank] + take[i];
				uint32_t lb = c->to_rank[rep[best].rank] + take[best];

				if (li < lb || (li == lb && rep[i].rank == r->id &&
						rep[best].rank != r->id))
					best = i;
			}
			take[best]++;
		}
		for (uint32_t i = 0; i < MOE_MAX_REPLICAS; i++) {
			uint32_t key = i < n ? rep[i].rank * S + rep[i].slot : 0;

			c->rkey[x * MOE_MAX_REPLICAS + i] = key;
			c->rtake[x * MOE_MAX_REPLICAS + i] = take[i];
			if (take[i]) {
				xb->send_counts[key] += take[i];
				c->to_rank[rep[i].rank] += take[i];
			}
		}
	}
	return 0;
}

/* One rank on the bf16 kernels: the experts read the routed rows only as
 * their bf16 copy, in send's order (one sender: arrival order is slot
 * order), so dispatch writes that copy itself (half the bytes of fp32
 * rows, and no conversion pass over them after): each token converted
 * once (exact: x holds bf16 values), then copied to its K places. */
static void send_bf16_task(void *arg, uint32_t b, uint32_t worker)
{
	const struct rows_ctx *rc = arg;
	struct cpu_rank *c = rc->c;
	size_t H = rc->m->hidden, K = rc->m->top_k, ld = c->ldxb;

	(void)worker;
	for (size_t t = (size_t)b * ROW_BLOCK; t < block_end(b, rc->st->n); t++) {
		uint16_t *first = c->xb16 + (size_t)c->pos[t * K] * ld;

		moe_cpu_from_f32(MOE_DT_BF16, c->x + t * H, first, H);
		for (size_t k = 1; k < K; k++)
			memcpy(c->xb16 + (size_t)c->pos[t * K + k] * ld, first, H * 2);
	}
}

/* Each (t, k) row of the share to its place in send (pos). */
static void send_task(void *arg, uint32_t b, uint32_t worker)
{
	const struct rows_ctx *rc = arg;
	struct cpu_rank *c = rc->c;
	float *send = rc->send;
	size_t H = rc->m->hidden, K = rc->m->top_k;

	(void)worker;
	for (size_t t = (size_t)b * ROW_BLOCK; t < block_end(b, rc->st->n); t++)
		for (size_t k = 0; k < K; k++)
			memcpy(send + (size_t)c->pos[t * K + k] * H, c->x + t * H, H * sizeof(float));
}

int cpu_dispatch(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st)
{
	struct cpu_rank *c = r->priv;
	struct moe_xbuf *xb = &r->xb;
	uint32_t K = m->top_k, E = m->n_experts;
	uint32_t R = r->shape.n_ranks, S = r->shape.slots_per_rank, at = 0;
	struct rows_ctx rx = {c, m, st, r->xb.send, NULL};
	uint64_t t0, t1;
	int ret;

	if (st->n > c->share_cap)
		return -E2BIG;
	if (!st->n) {
		memset(xb->send_counts, 0, (size_t)R * S * sizeof(*xb->send_counts));
		return 0;
	}
	t0 = cpu_mono_ns();
	row_blocks(r, st->n, convert_task, &rx);
	t1 = cpu_mono_ns();
	ret = cpu_route(r, m, st->ls, c->x, st->n, st->ids, st->w);
	if (ret)
		return ret;
	st->convert_ns = t1 - t0;
	st->route_ns = cpu_mono_ns() - t1;
	memset(c->ecount, 0, E * sizeof(*c->ecount));
	for (size_t i = 0; i < (size_t)st->n * K; i++)
		c->ecount[st->ids[i]]++;
	ret = split_replicas(r, c, m, st);
	if (ret)
		return ret;
	for (uint32_t k = 0; k < R * S; k++) {
		c->kpos[k] = at;
		at += xb->send_counts[k];
	}
	memset(c->eseen, 0, E * sizeof(*c->eseen));
	for (uint32_t t = 0; t < st->n; t++) {
		for (uint32_t k = 0; k < K; k++) {
			size_t i = (size_t)t * K + k;
			uint32_t x = st->ids[i], j = c->eseen[x]++, q = 0, p;
			const uint32_t *take = c->rtake + (size_t)x * MOE_MAX_REPLICAS;

			while (j >= take[q]) /* the replica whose run holds row j */
				j -= take[q++];
			p = c->kpos[c->rkey[(size_t)x * MOE_MAX_REPLICAS + q]]++;
			c->pos[i] = p;
			xb->send_scale[p] = st->w[i];
		}
	}
	c->sent_bf16 = c->kb && R == 1;
	row_blocks(r, st->n, c->sent_bf16 ? send_bf16_task : send_task, &rx);
	return 0;
}

/* Qwen2-MoE: shared output scaled by sigmoid(x · w_sg), in fp32. (Unlike
 * the router logits, which decide a discrete choice and are rounded to the
 * model dtype as transformers does, this gate is a smooth scale: it keeps
 * fp32 like the rest of the math.) */
static void shared_gate(struct cpu_rank *c, const struct moe_model *m, const float *wg,
			uint32_t n)
{
	for (uint32_t t = 0; t < n; t++) {
		float z = moe_cpu_dot(c->x + (size_t)t * m->hidden, wg, m->hidden);

		c->sh_sc[t] = 1.0f / (1.0f + expf(-z));
	}
}

/* Copies blocks between arrival order (by source, then slot) and slot order
 * (by slot, then source); to_slot_order picks the direction. */
static void reorder(const uint32_t *counts, uint32_t R, uint32_t S, size_t elem,
		    const void *from, void *to, bool to_slot_order)
{
	size_t slot_at = 0;

	for (uint32_t s = 0; s < S; s++) {
		for (uint32_t p = 0; p < R; p++) {
			size_t n = counts[p * S + s], arr_at = 0;

			if (!n)
				continue;
			for (uint32_t q = 0; q < p; q++) /* (block p's start in arrival order) */
				for (uint32_t u = 0; u < S; u++)
					arr_at += counts[q * S + u];
			for (uint32_t u = 0; u < s; u++)
				arr_at += counts[p * S + u];
			if (to_slot_order)
				memcpy((char *)to + slot_at * elem, (const char *)from + arr_at * elem,
				       n * elem);
			else
				memcpy((char *)to + arr_at * elem, (const char *)from + slot_at * elem,
				       n * elem);
			slot_at += n;
		}
	}
}

int cpu_experts(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st)
{
	struct cpu_rank *c = r->priv;
	struct moe_xbuf *xb = &r->xb;
	const struct moe_layer_state *ls = st->ls;
	uint32_t R = r->shape.n_ranks, S = r->shape.slots_per_rank, H = m->hidden, I = m->inter;
	uint32_t senders = 0, ng = 0, rows = 0;
	const float *x, *sc;
	float *y;
	int ret;

	for (uint32_t p = 0; p < R; p++) {
		uint32_t n = 0;

		for (uint32_t s = 0; s < S; s++)
			n += xb->recv_counts[p * S + s];
		senders += n > 0;
		rows += n;
	}
	if (rows > xb->recv_cap)
		return -EOVERFLOW;
	/* One sender: its rows already come by slot. Several: to slot order
	 * in xs, the results into recv (read already), back after. */
	c->permuted = senders > 1;
	if (c->permuted) {
		reorder(xb->recv_counts, R, S, H * sizeof(float), xb->recv, c->xs, true);
		reorder(xb->recv_counts, R, S, sizeof(float), xb->recv_scale, c->xs_scale, true);
		x = c->xs, sc = c->xs_scale, y = xb->recv;
	} else {
		x = xb->recv, sc = xb->recv_scale, y = xb->ret;
	}
	rows = 0;
	for (uint32_t s = 0; s < S; s++) {
		uint32_t n = 0;

		for (uint32_t p = 0; p < R; p++)
			n += xb->recv_counts[p * S + s];
		if (!n)
			continue;
		if (!st->slots[s].mem || st->slots[s].inter != I)
			return -EINVAL; /* a placement naming an empty slot */
		c->groups[ng] = (struct cpu_group){
			.slot = &st->slots[s],
			.n = n,
			.x = c->sent_bf16 ? NULL : x + (size_t)rows * H,
			.y = y + (size_t)rows * H,
			.scale = sc + rows,
		};
		if (c->kb) {
			c->groups[ng].xb = c->xb16 + (size_t)rows * c->ldxb;
			c->groups[ng].hb = c->hb16 + (size_t)rows * c->ldhb;
			c->groups[ng].ldxb = c->ldxb;
			c->groups[ng].ldhb = c->ldhb;
			c->groups[ng].xb_ready = c->sent_bf16;
		} else {
			c->groups[ng].h = c->hs + (size_t)rows * I;
		}
		ng++;
		rows += n;
	}
	if (ls->shared.mem && st->n) {
		if (ls->shared_gate)
			shared_gate(c, m, ls->shared_gate, st->n);
		c->groups[ng] = (struct cpu_group){
			.slot = &ls->shared,
			.n = st->n,
			.x = c->x,
			.h = c->sh_h,
			.y = c->sh_y,
			.scale = ls->shared_gate ? c->sh_sc : NULL,
		};
		if (c->kb) { /* its x after the routed rows' (recv_cap of them) */
			c->groups[ng].xb = c->xb16 + (size_t)c->recv_cap * c->ldxb;
			c->groups[ng].hb = c->shb16;
			c->groups[ng].ldxb = c->ldxb;
			c->groups[ng].ldhb = c->ldshb;
		}
		ng++;
	}
	ret = ng ? cpu_run_groups(r, m->dtype, H, c->groups, ng) : 0;
	if (!ret && c->permuted)
		reorder(xb->recv_counts, R, S, H * sizeof(float), xb->recv, xb->ret, false);
	return ret;
}

/* A token's K rows in k order, the shared expert last, in fp32; then to
 * the segment's dtype (see the top of the file). */
static void combine_task(void *arg, uint32_t b, uint32_t worker)
{
	const struct rows_ctx *rc = arg;
	const struct moe_stage *st = rc->st;
	struct cpu_rank *c = rc->c;
	uint32_t H = rc->m->hidden, K = rc->m->top_k, at, si;
	uint32_t t = b * ROW_BLOCK, end = block_end(b, st->n);
	bool shared = st->ls->shared.mem != NULL;
	float *acc = c->acc + (size_t)worker * H;

	si = seg_of(st, st->t0 + t, &at);
	for (; t < end; t++, at++) {
		const struct moe_seg *sg;

		if (at == st->segs[si].n_tokens)
			si++, at = 0;
		sg = &st->segs[si];
		memcpy(acc, rc->back + (size_t)c->pos[(size_t)t * K] * H, H * sizeof(float));
		for (uint32_t k = 1; k < K; k++) {
			const float *y = rc->back + (size_t)c->pos[(size_t)t * K + k] * H;

			for (uint32_t j = 0; j < H; j++)
				acc[j] += y[j];
		}
		if (shared)
			for (uint32_t j = 0; j < H; j++)
				acc[j] += c->sh_y[(size_t)t * H + j];
		moe_cpu_from_f32(sg->dtype, acc,
				 (char *)sg->out + (size_t)at * H * moe_dtype_size(sg->dtype), H);
	}
}

void cpu_combine(struct moe_rank *r, const struct moe_model *m, struct moe_stage *st)
{
	struct rows_ctx rx = {r->priv, m, st, NULL, r->xb.back};

	if (st->n)
		row_blocks(r, st->n, combine_task, &rx);
}
