/* daemon/server/metrics.c — the metrics' registry and their Prometheus text
 * exposition (see metrics.h; every metric is documented in docs/metrics.md,
 * and tests/metrics_test.sh checks the two lists against each other).
 */
#include "daemon/server/metrics.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/engine/epoch.h"
#include "daemon/engine/model.h"
#include "daemon/engine/stats.h"
#include "ipc/moe_errors.h"

#ifndef MOE_VERSION_STRING
#define MOE_VERSION_STRING "unknown"
#endif

/* Latency: 10 µs .. 10 s (ns). */
static const uint64_t lat_bounds[] = {
	10000,	   25000,     50000,	 100000,     250000,	 500000,     1000000,
	2500000,   5000000,   10000000,	 25000000,   50000000,	 100000000,  250000000,
	500000000, 1000000000, 2500000000, 5000000000, 10000000000,
};
/* Stages: half decades, 10 µs .. 10 s (ns). */
static const uint64_t stage_bounds[] = {
	10000,	  31623,    100000,    316228,	  1000000,    3162278,	  10000000,
	31622777, 100000000, 316227766, 1000000000, 3162277660, 10000000000,
};
/* Tokens per batch: powers of two to 64 Ki. */
static const uint64_t tok_bounds[] = {1,   2,	 4,    8,    16,   32,	  64,	 128,  256,
				      512, 1024, 2048, 4096, 8192, 16384, 32768, 65536};

#define N(a) ((uint32_t)(sizeof(a) / sizeof((a)[0])))
_Static_assert(N(lat_bounds) <= MET_BOUNDS_MAX && N(tok_bounds) <= MET_BOUNDS_MAX &&
		       N(stage_bounds) <= MET_BOUNDS_MAX,
	       "MET_BOUNDS_MAX");

static const char *const status_names[MET_STATUS_N] = {
	"ok",	     "invalid",	  "no_layer", "too_big",  "out_of_range", "timeout", "cancelled",
	"shutdown",  "daemon",	  "protocol", "no_memory", "busy",	  "not_allowed",
	"internal",  "again",	  "dtype",    "not_found", "limit",	  "device",
};

static const char *const stage_names[MET_STAGES] = {
	"queue_wait", "convert", "router", "dispatch", "exchange", "experts", "combine", "device",
};
_Static_assert(MOE_STAGE_COUNT == 7, "stage_names follows enum moe_stage_id");

static const char *const job_results[MET_JOB_RESULTS] = {"done", "failed", "cancelled"};

uint32_t met_status_index(int status)
{
	return status <= 0 && -status < MET_STATUS_N ? (uint32_t)-status : (uint32_t)-MOE_EINTERNAL;
}

const char *met_status_name(uint32_t index)
{
	return index < MET_STATUS_N ? status_names[index] : "unknown";
}

/* scale: of a bound's `le` label (1e-9: ns -> s). The lines' prefixes
 * are made once the histogram's name and labels are known (hist_lines). */
static void hist_init(struct met_hist *h, const uint64_t *bounds, uint32_t n, double scale)
{
	h->bounds = bounds;
	h->n = n;
	for (uint32_t i = 0; i < n; i++)
		snprintf(h->le[i], sizeof(h->le[i]), "%.9g", (double)bounds[i] * scale);
	snprintf(h->le[n], sizeof(h->le[n]), "+Inf");
}

/* The strings in order (NULL ends them), in one malloc'ed line. */
static char *join(uint16_t *len, const char *const *parts)
{
	char t[256];
	size_t n = 0;

	for (; *parts; parts++) {
		size_t k = strlen(*parts);

		if (n + k >= sizeof(t))
			return NULL;
		memcpy(t + n, *parts, k);
		n += k;
	}
	t[n] = '\0';
	*len = (uint16_t)n;
	return strdup(t);
}

/* labels: "" or `k="v"` */
static int hist_lines(struct met_hist *h, const char *name, const char *labels)
{
	const char *sep = labels[0] ? "," : "", *open = labels[0] ? "{" : "",
		   *close = labels[0] ? "}" : "";

	for (uint32_t i = 0; i <= h->n; i++)
		if (!(h->line[i] = join(&h->line_len[i],
					(const char *const[]){name, "_bucket{", labels, sep, "le=\"",
							      h->le[i], "\"} ", NULL})))
			return -ENOMEM;
	h->line[h->n + 1] = join(&h->line_len[h->n + 1],
				 (const char *const[]){name, "_sum", open, labels, close, " ", NULL});
	h->line[h->n + 2] = join(&h->line_len[h->n + 2],
				 (const char *const[]){name, "_count", open, labels, close, " ", NULL});
	return h->line[h->n + 1] && h->line[h->n + 2] ? 0 : -ENOMEM;
}

static void hist_free(struct met_hist *h)
{
	for (uint32_t i = 0; i < h->n + 3; i++) {
		free(h->line[i]);
		h->line[i] = NULL;
	}
}

int met_init(struct srv_metrics *m, struct moe_engine *e, bool per_expert, uint32_t slo_ms)
{
	const struct moe_model *md = moe_engine_model(e);
	struct timespec ts;

	memset(m, 0, sizeof(*m));
	m->e = e;
	hist_init(&m->latency, lat_bounds, N(lat_bounds), 1e-9);
	for (int i = 0; i < MET_STAGES; i++)
		hist_init(&m->stage[i], stage_bounds, N(stage_bounds), 1e-9);
	hist_init(&m->batch_tokens, tok_bounds, N(tok_bounds), 1.0);
	atomic_store(&m->per_expert, per_expert);
	met_set(&m->slo_ns, (uint64_t)slo_ms * 1000000u);
	/* the stages this backend has: a device backend measures only its
	 * whole batch; the exchange exists only between ranks */
	m->stages = 1u << MET_STAGE_QUEUE;
	if (strcmp(moe_engine_backend(e), "cpu")) {
		m->stages |= 1u << (1 + MOE_STAGE_DEVICE);
	} else {
		for (int i = 0; i < MOE_STAGE_COUNT; i++)
			if (i != MOE_STAGE_DEVICE && (i != MOE_STAGE_EXCHANGE || moe_engine_ranks(e) > 1))
				m->stages |= 1u << (1 + i);
	}
	for (int i = 0; i < MET_STAGES; i++)
		snprintf(m->stage_label[i], sizeof(m->stage_label[i]), "stage=\"%s\"", stage_names[i]);
	clock_gettime(CLOCK_REALTIME, &ts);
	m->start_time = (double)ts.tv_sec + ts.tv_nsec / 1e9;
	snprintf(m->build, sizeof(m->build),
		 "version=\"%s\",backend=\"%s\",kernels=\"%s\",family=\"%s\",dtype=\"%s\"",
		 MOE_VERSION_STRING, moe_engine_backend(e), moe_engine_kernels(e),
		 moe_family_name(md->family), moe_dtype_name(md->dtype));
	if (hist_lines(&m->latency, "moed_request_duration_seconds", "") ||
	    hist_lines(&m->batch_tokens, "moed_batch_tokens", ""))
		return -ENOMEM;
	for (int i = 0; i < MET_STAGES; i++)
		if (hist_lines(&m->stage[i], "moed_stage_duration_seconds", m->stage_label[i]))
			return -ENOMEM;
	return 0;
}

void met_free(struct srv_metrics *m)
{
	hist_free(&m->latency);
	hist_free(&m->batch_tokens);
	for (int i = 0; i < MET_STAGES; i++)
		hist_free(&m->stage[i]);
}

void met_observe(struct met_hist *h, uint64_t v)
{
	uint32_t i = 0;

	while (i < h->n && v > h->bounds[i])
		i++;
	met_add(&h->bucket[i], 1);
	met_add(&h->sum, v);
}

/* ---- the text ------------------------------------------------------------
 *
 * Written without printf: a scrape every 100 ms must cost the daemon next
 * to nothing (bench/metrics_overhead.sh counts it), and glibc's printf of
 * a double alone costs more than a whole line here. Counters print as
 * integers, seconds from integer nanoseconds, ratios with fixed decimals.
 */

struct buf {
	char *p;
	size_t len, cap;
	bool oom;
};

static bool room(struct buf *b, size_t n)
{
	size_t cap;
	char *p;

	if (b->oom)
		return false;
	if (b->len + n + 1 <= b->cap)
		return true;
	cap = b->cap * 2 > b->len + n + 1 ? b->cap * 2 : b->len + n + 1;
	p = realloc(b->p, cap);
	if (!p) {
		b->oom = true;
		return false;
	}
	b->p = p;
	b->cap = cap;
	return true;
}

static void put_n(struct buf *b, const char *s, size_t n)
{
	if (!room(b, n))
		return;
	memcpy(b->p + b->len, s, n);
	b->len += n;
}

static void put_s(struct buf *b, const char *s)
{
	put_n(b, s, strlen(s));
}

static void put_u(struct buf *b, uint64_t v)
{
	char t[24];
	int i = sizeof(t);

	do {
		t[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	put_n(b, t + i, sizeof(t) - (size_t)i);
}

/* v >= 0 with `dec` decimals (rounded); negative and NaN print as 0. */
static void put_fix(struct buf *b, double v, int dec)
{
	uint64_t scale = 1, x, f;
	char t[20];

	for (int i = 0; i < dec; i++)
		scale *= 10;
	if (!(v > 0))
		v = 0;
	if (v > 1e18 / (double)scale) /* (fits in 64 bits) */
		v = 1e18 / (double)scale;
	x = (uint64_t)(v * (double)scale + 0.5);
	put_u(b, x / scale);
	if (!dec)
		return;
	f = x % scale;
	t[0] = '.';
	for (int i = dec; i > 0; i--, f /= 10)
		t[i] = (char)('0' + f % 10);
	put_n(b, t, (size_t)dec + 1);
}

/* ns as seconds, exactly */
static void put_ns(struct buf *b, uint64_t ns)
{
	char t[10];
	uint64_t f = ns % 1000000000u;

	put_u(b, ns / 1000000000u);
	t[0] = '.';
	for (int i = 9; i > 0; i--, f /= 10)
		t[i] = (char)('0' + f % 10);
	put_n(b, t, 10);
}

static uint64_t ld(const _Atomic uint64_t *c)
{
	return atomic_load_explicit(c, memory_order_relaxed);
}

/* HELP and TYPE of a family, from string literals: one copy. */
#define HEAD(b, name, type, help)                                                        \
	put_n(b, "# HELP " name " " help "\n# TYPE " name " " type "\n",                   \
	      sizeof("# HELP " name " " help "\n# TYPE " name " " type "\n") - 1)

/* `name{k="v"} ` (labels: NULL, or k1, v1[, k2, v2]) */
static void series(struct buf *b, const char *name, const char *k1, const char *v1,
		   const char *k2, const char *v2)
{
	put_s(b, name);
	if (k1) {
		put_n(b, "{", 1);
		put_s(b, k1);
		put_s(b, "=\"");
		put_s(b, v1);
		if (k2) {
			put_s(b, "\",");
			put_s(b, k2);
			put_s(b, "=\"");
			put_s(b, v2);
		}
		put_n(b, "\"}", 2);
	}
	put_n(b, " ", 1);
}

static void line_u(struct buf *b, const char *name, const char *k, const char *v, uint64_t x)
{
	series(b, name, k, v, NULL, NULL);
	put_u(b, x);
	put_n(b, "\n", 1);
}

/* Decimal digits of v at p (room for 20); returns their count. */
static size_t digits(char *p, uint64_t v)
{
	char t[20];
	size_t i = sizeof(t), n;

	do {
		t[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	n = sizeof(t) - i;
	memcpy(p, t + i, n);
	return n;
}

/* A histogram (its lines' prefixes made by hist_lines); ns: the values are
 * ns, shown as s. Written in place: room for every line is made first. */
static void hist(struct buf *b, const struct met_hist *h, bool ns)
{
	uint64_t cum = 0;
	size_t need = 0;
	char *p;

	for (uint32_t i = 0; i < h->n + 3; i++)
		need += h->line_len[i] + 32u;
	if (!room(b, need))
		return;
	p = b->p + b->len;
	for (uint32_t i = 0; i <= h->n; i++) {
		cum += ld(&h->bucket[i]);
		memcpy(p, h->line[i], h->line_len[i]);
		p += h->line_len[i];
		p += digits(p, cum);
		*p++ = '\n';
	}
	b->len = (size_t)(p - b->p);
	put_n(b, h->line[h->n + 1], h->line_len[h->n + 1]);
	if (ns)
		put_ns(b, ld(&h->sum));
	else
		put_u(b, ld(&h->sum));
	put_n(b, "\n", 1);
	put_n(b, h->line[h->n + 2], h->line_len[h->n + 2]);
	put_u(b, cum);
	put_n(b, "\n", 1);
}

/* Per status: every status that ever happened, and always "ok". */
static void by_status(struct buf *b, const char *name, const _Atomic uint64_t *v,
		      const char *label, uint32_t from)
{
	for (uint32_t i = from; i < MET_STATUS_N; i++) {
		uint64_t x = ld(&v[i]);

		if (x || i == 0)
			line_u(b, name, label, status_names[i], x);
	}
}

#define GAUGE_U(b, name, help, v)                                                     \
	do {                                                                             \
		HEAD(b, name, "gauge", help);                                            \
		line_u(b, name, NULL, NULL, v);                                          \
	} while (0)
#define COUNTER1(b, name, help, v)                                                    \
	do {                                                                             \
		HEAD(b, name, "counter", help);                                          \
		line_u(b, name, NULL, NULL, v);                                          \
	} while (0)

static void requests(struct buf *b, struct srv_metrics *m)
{
	HEAD(b, "moed_requests_total", "counter",
	     "Requests answered, by status (ok, or the error's name).");
	by_status(b, "moed_requests_total", m->requests, "status", 0);
	HEAD(b, "moed_tokens_total", "counter", "Tokens of the requests answered, by status.");
	by_status(b, "moed_tokens_total", m->tokens, "status", 0);
	HEAD(b, "moed_errors_total", "counter",
	     "Error statuses moed returned, to requests and to control messages, by code.");
	by_status(b, "moed_errors_total", m->errors, "code", 1);
	HEAD(b, "moed_request_duration_seconds", "histogram",
	     "Requests that ran: from taken off the submission ring to completion posted.");
	hist(b, &m->latency, true);
	HEAD(b, "moed_stage_duration_seconds", "histogram",
	     "Time per stage: queue_wait per request, the engine's stages per batch.");
	for (int i = 0; i < MET_STAGES; i++)
		if (m->stages & (1u << i))
			hist(b, &m->stage[i], true);
	HEAD(b, "moed_batch_tokens", "histogram", "Tokens per batch the engine ran.");
	hist(b, &m->batch_tokens, false);
	COUNTER1(b, "moed_batches_total", "Batches the engine ran.", ld(&m->batches));
	GAUGE_U(b, "moed_queue_requests", "Requests queued, not yet in a batch on the engine.",
		ld(&m->queue_requests));
	GAUGE_U(b, "moed_pending_requests",
		"Requests taken from the rings and not yet answered (queued or on the engine).",
		ld(&m->pending_requests));
	GAUGE_U(b, "moed_pending_tokens", "Tokens of the pending requests.",
		ld(&m->pending_tokens));
	GAUGE_U(b, "moed_clients", "Client sessions connected.", ld(&m->clients));
	COUNTER1(b, "moed_clients_refused_total",
		 "Connections refused at accept (server.max_clients reached, or stopping).",
		 ld(&m->clients_refused));
	COUNTER1(b, "moed_auth_refusals_total",
		 "Peers or commands refused for lack of permission.", ld(&m->auth_refusals));
	GAUGE_U(b, "moed_draining", "1 while draining (new requests refused).",
		ld(&m->draining));
}

static void jobs(struct buf *b, struct srv_metrics *m)
{
	HEAD(b, "moed_placement_changes_total", "counter",
	     "Placement changes (replicate, unreplicate, rebalance, placement-cycle jobs) "
	     "ended, by result.");
	for (int i = 0; i < MET_JOB_RESULTS; i++)
		line_u(b, "moed_placement_changes_total", "result", job_results[i],
		       ld(&m->placement_changes[i]));
	HEAD(b, "moed_reloads_total", "counter", "Weight reloads ended, by result.");
	for (int i = 0; i < MET_JOB_RESULTS; i++)
		line_u(b, "moed_reloads_total", "result", job_results[i], ld(&m->reloads[i]));
	HEAD(b, "moed_config_reloads_total", "counter", "Configuration reloads, by result.");
	line_u(b, "moed_config_reloads_total", "result", "done", ld(&m->config_reloads));
	line_u(b, "moed_config_reloads_total", "result", "failed", ld(&m->config_reloads_failed));
}

static const char *num(char *t, size_t n, uint32_t v)
{
	int i = (int)n - 1;

	t[i] = '\0';
	do {
		t[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	return t + i;
}

/* Per layer, per rank and (metrics.per_expert) per expert: the load
 * statistics and the current epoch's placement and versions. */
static void load(struct buf *b, struct srv_metrics *m)
{
	struct moe_engine *e = m->e;
	const struct moe_model *md = moe_engine_model(e);
	const struct moe_stats *st = moe_engine_stats(e);
	uint32_t R = moe_engine_ranks(e), L = md->n_moe_layers, E = md->n_experts;
	struct moe_epoch *ep = moe_epoch_acquire(e);
	const struct moe_placement *pl = ep ? ep->placement : NULL;
	struct timespec ts;
	uint64_t now, lost = 0;
	char t1[12], t2[12];

#define LAYER(l) num(t1, sizeof(t1), md->layers[l].index)
#define RANK(r)	 num(t1, sizeof(t1), r)
	clock_gettime(CLOCK_MONOTONIC, &ts);
	now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
	GAUGE_U(b, "moed_epoch", "Id of the epoch now served (placement and weights versions).",
		ep ? ep->id : 0);
	if (st) {
		HEAD(b, "moed_layer_expert_load_cv", "gauge",
		     "Coefficient of variation of tokens per expert over the load window.");
		for (uint32_t l = 0; l < L; l++) {
			series(b, "moed_layer_expert_load_cv", "layer", LAYER(l), NULL, NULL);
			put_fix(b, moe_stats_expert_cv(st, l, now, 1), 6);
			put_n(b, "\n", 1);
		}
		HEAD(b, "moed_layer_rank_load_max_over_mean", "gauge",
		     "Max over mean of the ranks' rows over the load window (1: even).");
		for (uint32_t l = 0; l < L; l++) {
			series(b, "moed_layer_rank_load_max_over_mean", "layer", LAYER(l), NULL,
			       NULL);
			put_fix(b, moe_stats_rank_imbalance(st, l, now, 1), 6);
			put_n(b, "\n", 1);
		}
	}
	if (pl) {
		HEAD(b, "moed_layer_replicas", "gauge",
		     "Expert replicas the layer's placement holds (experts + extra replicas).");
		for (uint32_t l = 0; l < L; l++) {
			uint64_t n = 0;

			for (uint32_t x = 0; x < E; x++) {
				uint32_t k;

				moe_place_get(pl, l, x, &k);
				n += k;
			}
			line_u(b, "moed_layer_replicas", "layer", LAYER(l), n);
		}
	}
	if (ep && ep->weights_version) {
		HEAD(b, "moed_layer_weights_version", "gauge",
		     "The layer's weights version in the current epoch (1: as loaded).");
		for (uint32_t l = 0; l < L; l++)
			line_u(b, "moed_layer_weights_version", "layer", LAYER(l),
			       ep->weights_version[l]);
	}
	if (st) {
		HEAD(b, "moed_rank_busy_seconds_total", "counter",
		     "Time the rank's expert stage ran.");
		for (uint32_t r = 0; r < R; r++) {
			series(b, "moed_rank_busy_seconds_total", "rank", RANK(r), NULL, NULL);
			put_ns(b, moe_stats_rank_busy_ns(st, r));
			put_n(b, "\n", 1);
		}
		HEAD(b, "moed_rank_tokens_total", "counter",
		     "Token rows (token x routed expert) the rank's experts computed.");
		for (uint32_t r = 0; r < R; r++) {
			uint64_t rows = 0;

			for (uint32_t l = 0; l < L; l++)
				rows += moe_stats_rank_rows(st, l, r, now, 0);
			line_u(b, "moed_rank_tokens_total", "rank", RANK(r), rows);
		}
	}
	if (pl) {
		HEAD(b, "moed_rank_weight_bytes", "gauge",
		     "Weights the rank holds: its expert replicas and its copy of each layer's "
		     "router and shared experts (checkpoint bytes).");
		for (uint32_t r = 0; r < R; r++) {
			uint64_t n = 0;

			for (uint32_t l = 0; l < L; l++)
				for (uint32_t x = 0; x < E; x++) {
					uint32_t k;
					const struct moe_replica *rep = moe_place_get(pl, l, x, &k);

					for (uint32_t i = 0; i < k; i++)
						n += rep[i].rank == r;
				}
			line_u(b, "moed_rank_weight_bytes", "rank", RANK(r),
			       n * md->expert_bytes +
				       (moe_engine_rank_lost(e, r) ? 0
								   : (uint64_t)L * md->layer_fixed_bytes));
		}
	}
	HEAD(b, "moed_rank_lost", "gauge", "1 once the rank was taken out after a failure.");
	for (uint32_t r = 0; r < R; r++) {
		bool x = moe_engine_rank_lost(e, r);

		lost += x;
		line_u(b, "moed_rank_lost", "rank", RANK(r), x);
	}
	GAUGE_U(b, "moed_ranks_lost", "Ranks taken out after a failure.", lost);
	GAUGE_U(b, "moed_device_lost", "1 when a device failed (moed then exits to be restarted).",
		moe_engine_lost(e));
	GAUGE_U(b, "moed_weight_bytes", "Weights the engine holds, every rank and replica.",
		moe_engine_weight_bytes(e));
	if (atomic_load_explicit(&m->per_expert, memory_order_relaxed)) {
		HEAD(b, "moed_expert_tokens_total", "counter",
		     "Tokens routed to the expert (metrics.per_expert).");
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t x = 0; x < E; x++) {
				series(b, "moed_expert_tokens_total", "layer", LAYER(l), "expert",
				       num(t2, sizeof(t2), x));
				put_u(b, moe_engine_expert_tokens(e, l, x));
				put_n(b, "\n", 1);
			}
		if (pl) {
			HEAD(b, "moed_expert_replicas", "gauge",
			     "Replicas of the expert in the current placement (metrics.per_expert).");
			for (uint32_t l = 0; l < L; l++)
				for (uint32_t x = 0; x < E; x++) {
					uint32_t k;

					moe_place_get(pl, l, x, &k);
					series(b, "moed_expert_replicas", "layer", LAYER(l), "expert",
					       num(t2, sizeof(t2), x));
					put_u(b, k);
					put_n(b, "\n", 1);
				}
		}
	}
#undef LAYER
#undef RANK
	if (ep)
		moe_epoch_release(ep);
}

char *met_render(struct srv_metrics *m, size_t *len)
{
	struct buf b = {.cap = 32768};

	b.p = malloc(b.cap);
	if (!b.p)
		return NULL;
	HEAD(&b, "moed_build_info", "gauge", "Always 1; the labels say what runs.");
	put_s(&b, "moed_build_info{");
	put_s(&b, m->build);
	put_s(&b, "} 1\n");
	HEAD(&b, "moed_start_time_seconds", "gauge", "When moed started, in unix seconds.");
	put_s(&b, "moed_start_time_seconds ");
	put_fix(&b, m->start_time, 3);
	put_n(&b, "\n", 1);
	HEAD(&b, "moed_latency_slo_seconds", "gauge",
	     "The p99 latency objective (metrics.slo_p99_ms) the shipped alert compares with.");
	put_s(&b, "moed_latency_slo_seconds ");
	put_ns(&b, ld(&m->slo_ns));
	put_n(&b, "\n", 1);
	requests(&b, m);
	jobs(&b, m);
	load(&b, m);
	COUNTER1(&b, "moed_metrics_scrapes_total", "Metrics renders served (HTTP and socket).",
		 ld(&m->scrapes_http) + ld(&m->scrapes_socket));
	GAUGE_U(&b, "moed_tracers", "Tracers attached (moectl trace).", ld(&m->tracers));
	COUNTER1(&b, "moed_trace_records_total",
		 "Trace records written to the ring while a tracer was attached.",
		 ld(&m->trace_records));
	COUNTER1(&b, "moed_trace_records_lost_total",
		 "Trace records lost to slow tracers (the ring overran them).",
		 ld(&m->trace_lost));
	if (b.oom || !room(&b, 0)) {
		free(b.p);
		return NULL;
	}
	b.p[b.len] = '\0';
	if (len)
		*len = b.len;
	return b.p;
}
