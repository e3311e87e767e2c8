/* daemon/server/trace.c — request tracing (`moectl trace`, MOE_ADMIN_TRACE).
 *
 * One record per request that ran (struct moe_trace_record: who, which
 * layer, how many tokens, the experts its tokens were routed to, where its
 * time went, the epoch and weights version it ran on) goes into a bounded
 * ring the loop owns; each tracer (a session that sent MOE_ADMIN_TRACE, at
 * most TRACE_MAX) has a cursor into it and gets the records its filters
 * match as TRACE messages, as many as its socket takes without blocking.
 *
 * What it costs:
 *  - no tracer: nothing on the worker (the batch's `trace` flag is false,
 *    no routing is copied), and one test of s->trace.n per collected batch
 *    and per loop iteration on the loop;
 *  - tracers: the worker has the engine write each request's routing into
 *    scratch (or copies the routing a client asked for) before it posts the
 *    completions, then counts the hits per request after posting them; the
 *    loop writes one record per request into the ring when it collects the
 *    batch, and sends.
 *
 * A slow tracer never slows serving: sends never block (MSG_DONTWAIT); a
 * tracer whose socket holds `room` bytes already (its send buffer less
 * TRACE_HEADROOM, kept for the session's other messages: admin replies,
 * doorbells of its own requests, which must not be lost to a backlog of
 * records) is left alone until the next tick (10 ms) and its cursor stays
 * put; when the ring wraps over a record the cursor
 * has not passed, that record is lost to the tracer — counted if it
 * matched the tracer's filters (the record is still in its slot at that
 * moment) — and the cursor moves on. Every TRACE message carries the
 * tracer's lost count so far; status and metrics carry the totals.
 *
 * Requests answered without running (refused, cancelled, expired in the
 * queue, shut down) have no record: they have no routing or stages; the
 * metrics count them by status.
 */
#include "daemon/server/internal.h"

#include <linux/sockios.h>
#include <sys/ioctl.h>

#include "daemon/engine/model.h"

#define TRACE_RING_BYTES (4u << 20) /* the ring: about this many bytes */
#define TRACE_RING_MIN	 64u
#define TRACE_RING_MAX	 65536u
#define TRACE_SENDS	 16u /* messages to one tracer per loop iteration, at most */
#define TRACE_HEADROOM	 (64u << 10) /* of a tracer's send buffer, kept for replies */

static size_t slot_bytes(uint32_t max_hits)
{
	return sizeof(struct moe_trace_record) + (size_t)max_hits * sizeof(struct moe_trace_hit);
}

static struct moe_trace_record *slot_at(struct trace *t, uint64_t seq)
{
	return (struct moe_trace_record *)(void *)(t->ring +
						   (size_t)(seq & (t->cap - 1)) * t->slot);
}

static bool matches(const struct tracer *tr, const struct moe_trace_record *r)
{
	return (tr->layer == MOE_ADMIN_ALL_LAYERS || tr->layer == r->layer) &&
	       (!tr->pid || tr->pid == r->pid);
}

static struct tracer *find(struct trace *t, const struct client *c)
{
	for (uint32_t i = 0; i < t->n; i++)
		if (t->t[i].c == c)
			return &t->t[i];
	return NULL;
}

static void detach(struct trace *t, struct tracer *tr)
{
	tr->c->tracing = false;
	*tr = t->t[--t->n];
}

/* The ring, at the first tracer: sized by the model's expert count (a
 * record carries up to min(E, MOE_TRACE_MAX_HITS) hits). */
static int ring_alloc(struct server *s)
{
	struct trace *t = &s->trace;
	uint32_t hits = s->m->n_experts < MOE_TRACE_MAX_HITS ? s->m->n_experts
							     : MOE_TRACE_MAX_HITS;
	size_t slot = (slot_bytes(hits) + 7) & ~(size_t)7;
	uint32_t cap = TRACE_RING_MIN;

	if (t->ring)
		return 0;
	if (s->o.test_trace_ring)
		while (cap < TRACE_RING_MAX && cap < s->o.test_trace_ring)
			cap *= 2;
	else
		while (cap < TRACE_RING_MAX && (size_t)cap * 2 * slot <= TRACE_RING_BYTES)
			cap *= 2;
	t->ring = malloc((size_t)cap * slot);
	if (!t->ring)
		return -1;
	t->cap = cap;
	t->slot = (uint32_t)slot;
	t->max_hits = hits;
	return 0;
}

/* What of the session's send buffer records may fill: all but
 * TRACE_HEADROOM (half of a small buffer). The kernel counts a datagram's
 * overhead too, so the figure is compared with what SIOCOUTQ reports. */
static uint32_t trace_room(int fd)
{
	int sndbuf = 0;
	socklen_t len = sizeof(sndbuf);

	if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) || sndbuf <= 0)
		sndbuf = 212992; /* Linux's default */
	return (uint32_t)sndbuf > 2 * TRACE_HEADROOM ? (uint32_t)sndbuf - TRACE_HEADROOM
						     : (uint32_t)sndbuf / 2;
}

void srv_op_trace(const struct admin_call *a)
{
	const struct moe_admin_trace *p = a->payload;
	struct server *s = a->s;
	struct trace *t = &s->trace;
	struct tracer *tr = find(t, a->c);
	char msg[200];

	if (p->flags & MOE_TRACE_STOP) {
		if (!tr) {
			srv_admin_reply(a->c, a->seq, MOE_ENOENT, "trace: this session is not tracing");
			return;
		}
		snprintf(msg, sizeof(msg), "trace stopped: %llu records sent, %llu lost",
			 (unsigned long long)tr->sent, (unsigned long long)tr->lost);
		detach(t, tr);
		srv_admin_reply(a->c, a->seq, 0, msg);
		return;
	}
	if (p->layer != MOE_ADMIN_ALL_LAYERS &&
	    (p->layer >= s->m->n_layers || !s->is_moe[p->layer])) {
		snprintf(msg, sizeof(msg), "trace: layer %u is not an MoE layer of this model",
			 p->layer);
		srv_admin_reply(a->c, a->seq, MOE_ENOLAYER, msg);
		return;
	}
	if (!tr && t->n == TRACE_MAX) {
		snprintf(msg, sizeof(msg), "trace: %u tracers attached already", TRACE_MAX);
		srv_admin_reply(a->c, a->seq, MOE_EBUSY, msg);
		return;
	}
	if (ring_alloc(s)) {
		srv_admin_reply(a->c, a->seq, MOE_ENOMEM, "trace: no memory for the ring");
		return;
	}
	/* (a second TRACE from the same session replaces its filters) */
	if (!tr)
		tr = &t->t[t->n++];
	*tr = (struct tracer){.c = a->c, .layer = p->layer, .pid = p->pid, .want = p->count,
			      .next = t->head, .room = trace_room(a->c->fd)};
	a->c->tracing = true;
	moe_log(LOG_INFO, "client %u (pid %d) traces requests: layer %d, pid %d, %llu records "
		"(-1, 0: any)", a->c->id, (int)a->c->pid,
		p->layer == MOE_ADMIN_ALL_LAYERS ? -1 : (int)p->layer, (int)p->pid,
		(unsigned long long)p->count);
	snprintf(msg, sizeof(msg), "tracing: a ring of %u records, %u tracer%s", t->cap, t->n,
		 t->n == 1 ? "" : "s");
	srv_admin_reply(a->c, a->seq, 0, msg);
}

const char *srv_check_trace(const void *payload)
{
	const struct moe_admin_trace *p = payload;

	if (p->flags & ~(uint32_t)MOE_TRACE_STOP)
		return "unknown flags";
	if (p->reserved)
		return "reserved field not 0";
	if (p->pid < 0)
		return "negative pid";
	return NULL;
}

void srv_trace_drop(struct server *s, struct client *c)
{
	struct tracer *tr = find(&s->trace, c);

	if (tr)
		detach(&s->trace, tr);
}

/* One record into the ring: the slot it takes is lost to every tracer
 * that has not read it yet. */
static struct moe_trace_record *push(struct trace *t)
{
	struct moe_trace_record *r = slot_at(t, t->head);

	if (t->head >= t->cap) {
		uint64_t old = t->head - t->cap;

		for (uint32_t i = 0; i < t->n; i++) {
			struct tracer *tr = &t->t[i];

			if (tr->next > old)
				continue;
			if (matches(tr, r)) {
				tr->lost++;
				t->lost++;
			}
			tr->next = old + 1;
		}
	}
	t->head++;
	t->records++;
	return r;
}

void srv_trace_batch(struct server *s, const struct work *b)
{
	struct trace *t = &s->trace;
	int status = srv_batch_status(b->ret);
	struct timespec rt;
	uint64_t unix_end;

	/* formed before the first tracer came: not recorded (a tracer sees
	 * the requests from the next batch on) */
	if (!b->trace)
		return;
	clock_gettime(CLOCK_REALTIME, &rt);
	unix_end = (uint64_t)rt.tv_sec * 1000000000ull + (uint64_t)rt.tv_nsec -
		   (srv_now_ns() - b->end_ns);
	for (uint32_t i = 0; i < b->n; i++) {
		const struct request *q = b->reqs[i];
		const struct client *c = q->c;
		struct moe_trace_record *r = push(t);
		uint32_t nh = b->routed ? b->hit_off[i + 1] - b->hit_off[i] : 0;

		*r = (struct moe_trace_record){
			.seq = t->head - 1, .tag = q->tag, .unix_ns = unix_end,
			.latency_ns = b->end_ns - q->queued_ns, .pid = c->pid, .client = c->id,
			.layer = q->layer, .tokens = q->n_tokens, .dtype = (uint32_t)q->dtype,
			.status = status, .epoch = b->epoch, .weights_version = b->wversion,
			.batch_requests = b->n, .batch_tokens = b->tokens};
		memcpy(r->client_name, c->name, sizeof(r->client_name));
		r->client_name[sizeof(r->client_name) - 1] = '\0';
		r->stage_ns[MOE_TRACE_QUEUE] = b->start_ns - q->queued_ns;
		for (int k = 0; k < MOE_STAGE_COUNT; k++)
			r->stage_ns[1 + k] = b->times.ns[k];
		if (nh > t->max_hits) {
			nh = t->max_hits;
			r->flags |= MOE_TRACE_TRUNCATED;
		}
		r->n_hits = nh;
		if (nh)
			memcpy(r + 1, b->hits + b->hit_off[i], nh * sizeof(struct moe_trace_hit));
	}
}

/* As many records as the tracer's socket takes, TRACE_SENDS messages at
 * most; a full socket: the cursor stays, the tracer waits for the tick. */
static void send_some(struct server *s, struct tracer *tr)
{
	struct trace *t = &s->trace;
	union {
		unsigned char b[MOE_MSG_MAX - sizeof(struct moe_msg_hdr)];
		struct moe_msg_trace m;
	} u;

	for (uint32_t k = 0; k < TRACE_SENDS && tr->next < t->head; k++) {
		uint32_t len = sizeof(u.m), n = 0;
		uint64_t pos = tr->next;
		int r, queued = 0;

		for (; pos < t->head; pos++) {
			const struct moe_trace_record *rec = slot_at(t, pos);
			size_t sz = slot_bytes(rec->n_hits);

			if (!matches(tr, rec))
				continue;
			if (len + sz > sizeof(u.b))
				break;
			memcpy(u.b + len, rec, sz);
			len += (uint32_t)sz;
			n++;
			if (tr->want && tr->sent + n == tr->want) {
				pos++;
				break;
			}
		}
		if (!n) { /* nothing for this tracer: it has read everything */
			tr->next = pos;
			return;
		}
		/* the headroom stays free for the session's other messages */
		if (ioctl(tr->c->fd, SIOCOUTQ, &queued) == 0 && (uint32_t)queued >= tr->room) {
			tr->blocked = true;
			return;
		}
		u.m = (struct moe_msg_trace){.n_records = n, .lost = tr->lost};
		if (tr->want && tr->sent + n == tr->want)
			u.m.flags = MOE_TRACE_MSG_END; /* the last: the client stops there */
		r = srv_send_msg(tr->c->fd, MOE_MSG_TRACE, u.b, len, -1);
		if (r == -EAGAIN || r == -EWOULDBLOCK || r == -ENOBUFS) {
			tr->blocked = true;
			return;
		}
		if (r < 0) {
			tr->c->dead = true;
			return;
		}
		tr->next = pos;
		tr->sent += n;
		t->sent += n;
		if (tr->want && tr->sent == tr->want) {
			moe_log(LOG_INFO, "client %u: trace of %llu records done (%llu lost)",
				tr->c->id, (unsigned long long)tr->sent,
				(unsigned long long)tr->lost);
			detach(t, tr);
			return;
		}
	}
}

void srv_trace_flush(struct server *s, bool tick)
{
	struct trace *t = &s->trace;

	/* backwards: detach() moves the last tracer into the freed place */
	for (uint32_t i = t->n; i-- > 0;) {
		struct tracer *tr = &t->t[i];

		if (tr->c->dead)
			continue;
		if (tr->blocked && !tick)
			continue;
		tr->blocked = false;
		send_some(s, tr);
	}
}

void srv_trace_status(struct server *s, cJSON *root)
{
	struct trace *t = &s->trace;
	cJSON *o = cJSON_AddObjectToObject(root, "trace"), *a;

	if (!o)
		return;
	cJSON_AddNumberToObject(o, "ring_records", t->cap);
	cJSON_AddNumberToObject(o, "records", (double)t->records);
	cJSON_AddNumberToObject(o, "sent", (double)t->sent);
	cJSON_AddNumberToObject(o, "lost", (double)t->lost);
	a = cJSON_AddArrayToObject(o, "tracers");
	for (uint32_t i = 0; a && i < t->n; i++) {
		const struct tracer *tr = &t->t[i];
		cJSON *x = cJSON_CreateObject();

		if (!x)
			break;
		cJSON_AddNumberToObject(x, "client", tr->c->id);
		cJSON_AddNumberToObject(x, "pid", tr->c->pid);
		if (tr->layer != MOE_ADMIN_ALL_LAYERS)
			cJSON_AddNumberToObject(x, "layer", tr->layer);
		if (tr->pid)
			cJSON_AddNumberToObject(x, "for_pid", tr->pid);
		cJSON_AddNumberToObject(x, "count", (double)tr->want);
		cJSON_AddNumberToObject(x, "sent", (double)tr->sent);
		cJSON_AddNumberToObject(x, "lost", (double)tr->lost);
		cJSON_AddNumberToObject(x, "behind", (double)(t->head - tr->next));
		cJSON_AddItemToArray(a, x);
	}
}

void srv_trace_free(struct server *s)
{
	free(s->trace.ring);
	s->trace.ring = NULL;
}
