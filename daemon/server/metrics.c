/* daemon/server/metrics.c — the metrics' registry and their Prometheus text
 * exposition (see metrics.h; every metric is documented in docs/metrics.md,
 * and tests/metrics_test.sh checks the two lists against each other).
 */
#include "daemon/server/metrics.h"

#include <stdarg.h>
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
/* Tokens per batch: powers of two to 64 Ki. */
static const uint64_t tok_bounds[] = {1,   2,	 4,    8,    16,   32,	  64,	 128,  256,
				      512, 1024, 2048, 4096, 8192, 16384, 32768, 65536};

#define N(a) ((uint32_t)(sizeof(a) / sizeof((a)[0])))
_Static_assert(N(lat_bounds) <= MET_BOUNDS_MAX && N(tok_bounds) <= MET_BOUNDS_MAX,
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

static void hist_init(struct met_hist *h, const uint64_t *bounds, uint32_t n)
{
	h->bounds = bounds;
	h->n = n;
}

void met_init(struct srv_metrics *m, struct moe_engine *e, bool per_expert, uint32_t slo_ms)
{
	const struct moe_model *md = moe_engine_model(e);
	struct timespec ts;

	memset(m, 0, sizeof(*m));
	m->e = e;
	hist_init(&m->latency, lat_bounds, N(lat_bounds));
	for (int i = 0; i < MET_STAGES; i++)
		hist_init(&m->stage[i], lat_bounds, N(lat_bounds));
	hist_init(&m->batch_tokens, tok_bounds, N(tok_bounds));
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
	clock_gettime(CLOCK_REALTIME, &ts);
	m->start_time = (double)ts.tv_sec + ts.tv_nsec / 1e9;
	snprintf(m->build, sizeof(m->build),
		 "version=\"%s\",backend=\"%s\",kernels=\"%s\",family=\"%s\",dtype=\"%s\"",
		 MOE_VERSION_STRING, moe_engine_backend(e), moe_engine_kernels(e),
		 moe_family_name(md->family), moe_dtype_name(md->dtype));
}

void met_observe(struct met_hist *h, uint64_t v)
{
	uint32_t i = 0;

	while (i < h->n && v > h->bounds[i])
		i++;
	met_add(&h->bucket[i], 1);
	met_add(&h->sum, v);
}

/* ---- the text ------------------------------------------------------------ */

struct buf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void put(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->oom)
		return;
	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->oom = true;
			return;
		}
		if ((size_t)n < b->cap - b->len) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = b->cap * 2 > b->len + (size_t)n + 1 ? b->cap * 2 : b->len + (size_t)n + 1;
		char *p = realloc(b->p, cap);

		if (!p) {
			b->oom = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
}

static uint64_t ld(const _Atomic uint64_t *c)
{
	return atomic_load_explicit(c, memory_order_relaxed);
}

static void head(struct buf *b, const char *name, const char *type, const char *help)
{
	put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A histogram series: labels "" or `k="v"`; scale: 1e-9 for ns -> s. */
static void hist(struct buf *b, const char *name, const char *labels, const struct met_hist *h,
		 double scale)
{
	uint64_t cum = 0;
	const char *sep = labels[0] ? "," : "";

	for (uint32_t i = 0; i <= h->n; i++) {
		cum += ld(&h->bucket[i]);
		if (i < h->n)
			put(b, "%s_bucket{%s%sle=\"%.9g\"} %llu\n", name, labels, sep,
			    (double)h->bounds[i] * scale, (unsigned long long)cum);
		else
			put(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
			    (unsigned long long)cum);
	}
	if (labels[0]) {
		put(b, "%s_sum{%s} %.9g\n", name, labels, (double)ld(&h->sum) * scale);
		put(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)cum);
	} else {
		put(b, "%s_sum %.9g\n", name, (double)ld(&h->sum) * scale);
		put(b, "%s_count %llu\n", name, (unsigned long long)cum);
	}
}

/* Per status: every status that ever happened, and always "ok". */
static void by_status(struct buf *b, const char *name, const _Atomic uint64_t *v,
		      const char *label)
{
	for (uint32_t i = 0; i < MET_STATUS_N; i++) {
		uint64_t x = ld(&v[i]);

		if (x || i == 0)
			put(b, "%s{%s=\"%s\"} %llu\n", name, label, status_names[i],
			    (unsigned long long)x);
	}
}

static void gauge1(struct buf *b, const char *name, const char *help, double v)
{
	head(b, name, "gauge", help);
	put(b, "%s %.17g\n", name, v);
}

static void counter1(struct buf *b, const char *name, const char *help, uint64_t v)
{
	head(b, name, "counter", help);
	put(b, "%s %llu\n", name, (unsigned long long)v);
}

static void requests(struct buf *b, struct srv_metrics *m)
{
	head(b, "moed_requests_total", "counter",
	     "Requests answered, by status (ok, or the error's name).");
	by_status(b, "moed_requests_total", m->requests, "status");
	head(b, "moed_tokens_total", "counter", "Tokens of the requests answered, by status.");
	by_status(b, "moed_tokens_total", m->tokens, "status");
	head(b, "moed_errors_total", "counter",
	     "Error statuses moed returned, to requests and to control messages, by code.");
	for (uint32_t i = 1; i < MET_STATUS_N; i++) {
		uint64_t x = ld(&m->errors[i]);

		if (x)
			put(b, "moed_errors_total{code=\"%s\"} %llu\n", status_names[i],
			    (unsigned long long)x);
	}
	head(b, "moed_request_duration_seconds", "histogram",
	     "Requests that ran: from taken off the submission ring to completion posted.");
	hist(b, "moed_request_duration_seconds", "", &m->latency, 1e-9);
	head(b, "moed_stage_duration_seconds", "histogram",
	     "Time per stage: queue_wait per request, the engine's stages per batch.");
	for (int i = 0; i < MET_STAGES; i++) {
		char l[40];

		if (!(m->stages & (1u << i)))
			continue;
		snprintf(l, sizeof(l), "stage=\"%s\"", stage_names[i]);
		hist(b, "moed_stage_duration_seconds", l, &m->stage[i], 1e-9);
	}
	head(b, "moed_batch_tokens", "histogram", "Tokens per batch the engine ran.");
	hist(b, "moed_batch_tokens", "", &m->batch_tokens, 1.0);
	counter1(b, "moed_batches_total", "Batches the engine ran.", ld(&m->batches));
	gauge1(b, "moed_queue_requests", "Requests queued, not yet in a batch on the engine.",
	       (double)ld(&m->queue_requests));
	gauge1(b, "moed_pending_requests",
	       "Requests taken from the rings and not yet answered (queued or on the engine).",
	       (double)ld(&m->pending_requests));
	gauge1(b, "moed_pending_tokens", "Tokens of the pending requests.",
	       (double)ld(&m->pending_tokens));
	gauge1(b, "moed_clients", "Client sessions connected.", (double)ld(&m->clients));
	counter1(b, "moed_clients_refused_total",
		 "Connections refused by a limit (max_clients, shared memory).",
		 ld(&m->clients_refused));
	counter1(b, "moed_auth_refusals_total",
		 "Peers or commands refused for lack of permission.", ld(&m->auth_refusals));
	gauge1(b, "moed_draining", "1 while draining (new requests refused).",
	       (double)ld(&m->draining));
}

static void jobs(struct buf *b, struct srv_metrics *m)
{
	head(b, "moed_placement_changes_total", "counter",
	     "Placement changes (replicate, unreplicate, rebalance, placement-cycle jobs) "
	     "ended, by result.");
	for (int i = 0; i < MET_JOB_RESULTS; i++)
		put(b, "moed_placement_changes_total{result=\"%s\"} %llu\n", job_results[i],
		    (unsigned long long)ld(&m->placement_changes[i]));
	head(b, "moed_reloads_total", "counter", "Weight reloads ended, by result.");
	for (int i = 0; i < MET_JOB_RESULTS; i++)
		put(b, "moed_reloads_total{result=\"%s\"} %llu\n", job_results[i],
		    (unsigned long long)ld(&m->reloads[i]));
	head(b, "moed_config_reloads_total", "counter", "Configuration reloads, by result.");
	put(b, "moed_config_reloads_total{result=\"done\"} %llu\n",
	    (unsigned long long)ld(&m->config_reloads));
	put(b, "moed_config_reloads_total{result=\"failed\"} %llu\n",
	    (unsigned long long)ld(&m->config_reloads_failed));
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

	clock_gettime(CLOCK_MONOTONIC, &ts);
	now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
	gauge1(b, "moed_epoch", "Id of the epoch now served (placement and weights versions).",
	       ep ? ep->id : 0);
	if (st) {
		head(b, "moed_layer_expert_load_cv", "gauge",
		     "Coefficient of variation of tokens per expert over the load window.");
		for (uint32_t l = 0; l < L; l++)
			put(b, "moed_layer_expert_load_cv{layer=\"%u\"} %.6g\n",
			    md->layers[l].index, moe_stats_expert_cv(st, l, now, 1));
		head(b, "moed_layer_rank_load_max_over_mean", "gauge",
		     "Max over mean of the ranks' rows over the load window (1: even).");
		for (uint32_t l = 0; l < L; l++)
			put(b, "moed_layer_rank_load_max_over_mean{layer=\"%u\"} %.6g\n",
			    md->layers[l].index, moe_stats_rank_imbalance(st, l, now, 1));
	}
	if (pl) {
		head(b, "moed_layer_replicas", "gauge",
		     "Expert replicas the layer's placement holds (experts + extra replicas).");
		for (uint32_t l = 0; l < L; l++) {
			uint64_t n = 0;

			for (uint32_t x = 0; x < E; x++) {
				uint32_t k;

				moe_place_get(pl, l, x, &k);
				n += k;
			}
			put(b, "moed_layer_replicas{layer=\"%u\"} %llu\n", md->layers[l].index,
			    (unsigned long long)n);
		}
	}
	if (ep && ep->weights_version) {
		head(b, "moed_layer_weights_version", "gauge",
		     "The layer's weights version in the current epoch (1: as loaded).");
		for (uint32_t l = 0; l < L; l++)
			put(b, "moed_layer_weights_version{layer=\"%u\"} %u\n", md->layers[l].index,
			    ep->weights_version[l]);
	}
	if (st) {
		head(b, "moed_rank_busy_seconds_total", "counter",
		     "Time the rank's expert stage ran.");
		for (uint32_t r = 0; r < R; r++)
			put(b, "moed_rank_busy_seconds_total{rank=\"%u\"} %.9g\n", r,
			    moe_stats_rank_busy_ns(st, r) / 1e9);
		head(b, "moed_rank_tokens_total", "counter",
		     "Token rows (token x routed expert) the rank's experts computed.");
		for (uint32_t r = 0; r < R; r++) {
			uint64_t rows = 0;

			for (uint32_t l = 0; l < L; l++)
				rows += moe_stats_rank_rows(st, l, r, now, 0);
			put(b, "moed_rank_tokens_total{rank=\"%u\"} %llu\n", r,
			    (unsigned long long)rows);
		}
	}
	if (pl) {
		head(b, "moed_rank_weight_bytes", "gauge",
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
			put(b, "moed_rank_weight_bytes{rank=\"%u\"} %llu\n", r,
			    (unsigned long long)(n * md->expert_bytes +
						 (moe_engine_rank_lost(e, r)
							  ? 0
							  : (uint64_t)L * md->layer_fixed_bytes)));
		}
	}
	head(b, "moed_rank_lost", "gauge", "1 once the rank was taken out after a failure.");
	for (uint32_t r = 0; r < R; r++) {
		bool x = moe_engine_rank_lost(e, r);

		lost += x;
		put(b, "moed_rank_lost{rank=\"%u\"} %d\n", r, x);
	}
	gauge1(b, "moed_ranks_lost", "Ranks taken out after a failure.", (double)lost);
	gauge1(b, "moed_device_lost", "1 when a device failed (moed then exits to be restarted).",
	       moe_engine_lost(e));
	gauge1(b, "moed_weight_bytes", "Weights the engine holds, every rank and replica.",
	       (double)moe_engine_weight_bytes(e));
	if (atomic_load_explicit(&m->per_expert, memory_order_relaxed)) {
		head(b, "moed_expert_tokens_total", "counter",
		     "Tokens routed to the expert (metrics.per_expert).");
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t x = 0; x < E; x++)
				put(b, "moed_expert_tokens_total{layer=\"%u\",expert=\"%u\"} %llu\n",
				    md->layers[l].index, x,
				    (unsigned long long)moe_engine_expert_tokens(e, l, x));
		if (pl) {
			head(b, "moed_expert_replicas", "gauge",
			     "Replicas of the expert in the current placement (metrics.per_expert).");
			for (uint32_t l = 0; l < L; l++)
				for (uint32_t x = 0; x < E; x++) {
					uint32_t k;

					moe_place_get(pl, l, x, &k);
					put(b, "moed_expert_replicas{layer=\"%u\",expert=\"%u\"} %u\n",
					    md->layers[l].index, x, k);
				}
		}
	}
	if (ep)
		moe_epoch_release(ep);
}

char *met_render(struct srv_metrics *m, size_t *len)
{
	struct buf b = {.cap = 16384};

	b.p = malloc(b.cap);
	if (!b.p)
		return NULL;
	head(&b, "moed_build_info", "gauge", "Always 1; the labels say what runs.");
	put(&b, "moed_build_info{%s} 1\n", m->build);
	gauge1(&b, "moed_start_time_seconds", "When moed started, in unix seconds.",
	       m->start_time);
	gauge1(&b, "moed_latency_slo_seconds",
	       "The p99 latency objective (metrics.slo_p99_ms) the shipped alert compares with.",
	       (double)ld(&m->slo_ns) / 1e9);
	requests(&b, m);
	jobs(&b, m);
	load(&b, m);
	counter1(&b, "moed_metrics_scrapes_total", "Metrics renders served (HTTP and socket).",
		 ld(&m->scrapes_http) + ld(&m->scrapes_socket));
	if (b.oom) {
		free(b.p);
		return NULL;
	}
	if (len)
		*len = b.len;
	return b.p;
}
