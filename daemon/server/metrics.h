/* daemon/server/metrics.h — moed's Prometheus metrics: the counters and
 * histograms the serving path updates, and their text exposition.
 *
 * Writers never lock and never use a locked instruction: every counter and
 * histogram here has exactly one writing thread (the loop, or the engine
 * worker; said per field), which adds with a relaxed load + store, and
 * readers (the HTTP endpoint's thread, the loop answering `moectl
 * metrics`) load relaxed. A scrape is a snapshot of monotone counters
 * taken while they move: a histogram's _count is the sum of the bucket
 * values it read, so that `le="+Inf"` and `_count` always agree.
 *
 * What the render reads besides these: the engine's load statistics
 * (stats.h, readable from any thread), the current epoch (pinned for the
 * render), the engine's rank-lost flags and weight bytes (atomics). It
 * never touches the loop's own structures, so the endpoint's thread can
 * render while the loop serves. docs/metrics.md lists every metric.
 */
#ifndef MOE_SERVER_METRICS_H
#define MOE_SERVER_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "daemon/engine/engine.h"

/* Request statuses as label values: index = -MOE_E* code (0: "ok"). */
#define MET_STATUS_N 19
/* Histogram bounds, at most. */
#define MET_BOUNDS_MAX 24

struct met_hist {
	const uint64_t *bounds; /* ascending, n of them (ns or tokens) */
	uint32_t n;
	_Atomic uint64_t bucket[MET_BOUNDS_MAX + 1]; /* not cumulative; [n]: above all */
	_Atomic uint64_t sum;
	char le[MET_BOUNDS_MAX + 1][16]; /* the bounds' `le` labels, "+Inf" last */
	/* what the exposition writes before each bucket's value, _sum's and
	 * _count's (met_init: a scrape copies them whole) */
	char *line[MET_BOUNDS_MAX + 3];
	uint16_t line_len[MET_BOUNDS_MAX + 3];
};

/* Stages of moed_stage_duration_seconds: queue_wait, then the engine's
 * (enum moe_stage_id) shifted by one. */
#define MET_STAGE_QUEUE 0
#define MET_STAGES	(1 + MOE_STAGE_COUNT)

enum met_job_result { MET_JOB_DONE, MET_JOB_FAILED, MET_JOB_CANCELLED, MET_JOB_RESULTS };

struct srv_metrics {
	/* loop-written */
	_Atomic uint64_t requests[MET_STATUS_N], tokens[MET_STATUS_N];
	_Atomic uint64_t errors[MET_STATUS_N]; /* requests and control replies */
	_Atomic uint64_t clients, queue_requests, pending_requests, pending_tokens, draining;
	_Atomic uint64_t clients_refused, auth_refusals;
	_Atomic uint64_t placement_changes[MET_JOB_RESULTS], reloads[MET_JOB_RESULTS];
	_Atomic uint64_t config_reloads, config_reloads_failed;
	_Atomic uint64_t scrapes_socket;
	_Atomic uint64_t tracers, trace_records, trace_lost;
	/* worker-written */
	struct met_hist latency;	   /* requests that ran: taken from the ring to posted */
	struct met_hist stage[MET_STAGES]; /* queue_wait per request; the rest per batch */
	struct met_hist batch_tokens;
	_Atomic uint64_t batches;
	/* the HTTP thread's */
	_Atomic uint64_t scrapes_http;
	/* set at start, and by a configuration reload (loop) */
	atomic_bool per_expert;
	_Atomic uint64_t slo_ns;
	double start_time; /* unix seconds */
	uint32_t stages;   /* bit i: stage i applies to this backend (exported) */
	char stage_label[MET_STAGES][32]; /* stage="..." */
	char build[160];   /* build_info's labels, rendered */
	struct moe_engine *e;
};

/* One relaxed add by the field's only writer. */
static inline void met_add(_Atomic uint64_t *c, uint64_t v)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
			      memory_order_relaxed);
}

static inline void met_set(_Atomic uint64_t *c, uint64_t v)
{
	atomic_store_explicit(c, v, memory_order_relaxed);
}

/* 0, or -ENOMEM; met_free releases what it took (also after a failure). */
int met_init(struct srv_metrics *m, struct moe_engine *e, bool per_expert, uint32_t slo_ms);
void met_free(struct srv_metrics *m);
/* The histogram's only writer: one observation (ns, or tokens). */
void met_observe(struct met_hist *h, uint64_t v);
/* A MOE_E* status (0 included) -> its label index, and the label. */
uint32_t met_status_index(int status);
const char *met_status_name(uint32_t index);

/* The whole exposition (Prometheus text format 0.0.4), malloc'ed and
 * NUL-terminated, *len its length; NULL when out of memory. Any thread. */
char *met_render(struct srv_metrics *m, size_t *len);

/* The HTTP endpoint (metrics_http.c): serves GET /metrics on `listen`
 * ("host:port", port 0: any free one) from libmicrohttpd's own thread,
 * started with every signal blocked. 0 and the bound address in `bound`,
 * or -1 with the reason in err. */
struct met_http;
int met_http_start(struct srv_metrics *m, const char *listen, struct met_http **out,
		   char *bound, size_t bound_len, char *err, size_t err_len);
void met_http_stop(struct met_http *h);

#endif
