/* tests/test_trace.c — request tracing (MOE_ADMIN_TRACE, moe_trace_*) against a
 * real moed.
 *
 *  - records: 40 requests of random layers, dtypes and sizes, half of them
 *    asking for their routing (the worker then copies the client's routing
 *    instead of having the engine write its scratch); each one's record
 *    must name this process, the client's name, the layer, tokens, dtype,
 *    status, the epoch the completion reported and weights version 1, and
 *    carry exactly the expert counts of the in-process engine's routing on
 *    the same input; its stage times add up to no more than its latency,
 *    seq increases, nothing is lost.
 *  - filters: a layer filter, a pid filter with a count (exactly `count`
 *    records, then MOE_ENOENT and the tracer detached), a pid that sends
 *    nothing (no record); an unknown layer (MOE_ENOLAYER), a ninth tracer
 *    (MOE_EBUSY), a stop without a trace (MOE_ENOENT), a stop; status and
 *    metrics count the tracers.
 *  - slow_tracer: with a 64-record ring (MOED_TEST_TRACE_RING), tracers
 *    that read nothing while 3000 requests run: every request succeeds,
 *    the lost counts in status and metrics are above 0, and once they read,
 *    records received + lost == requests made (nothing vanishes uncounted),
 *    in ascending seq, for a tracer of every request and for one of a
 *    layer's; a third one's STOP is answered although its socket is full
 *    of records. (moed keeps room for replies in a tracer's socket; this
 *    test cannot show that room is needed: the client drains its socket
 *    while it waits for the reply, usually before moed answers.)
 *
 * No assertion is on wall time (an absence of records is checked by a
 * bounded wait after every request has been answered).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/epoch.h"
#include "daemon/engine/model.h"
#include "tests/daemon_harness.h"
#include "tools/synth.h"

#define READY_MS 30000
#define NEXT_MS	 DH_WAIT_MS

static uint32_t moe_layer(uint32_t i)
{
	return g_model->layers[i % g_model->n_moe_layers].index;
}

static struct moe_admin_trace filter(uint32_t layer, int32_t pid, uint64_t count)
{
	return (struct moe_admin_trace){.layer = layer, .pid = pid, .count = count};
}

static uint64_t realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The in-process engine's routing of `in`: counts per expert. */
static void ref_counts(uint32_t layer, int dt, const void *in, uint32_t n, uint32_t *count)
{
	uint32_t K = g_model->top_k;
	uint32_t *ids = malloc((size_t)n * K * sizeof(*ids));
	void *out = malloc((size_t)n * g_H * dh_dt_size(dt));
	struct moe_epoch *ep = moe_epoch_acquire(g_eng);
	struct moe_batch b = {layer, n, (enum moe_dtype)dt, in, out, ids, NULL, 0, NULL, NULL};
	char err[MOE_ERRLEN];
	int r;

	assert_non_null(ids);
	assert_non_null(out);
	r = moe_engine_forward(g_eng, ep, &b, err);
	moe_epoch_release(ep);
	if (r)
		fail_msg("reference forward: %s", err);
	memset(count, 0, g_model->n_experts * sizeof(*count));
	for (size_t i = 0; i < (size_t)n * K; i++) {
		assert_true(ids[i] < g_model->n_experts);
		count[ids[i]]++;
	}
	free(ids);
	free(out);
}

static void check_times(const struct moe_trace_record *r)
{
	uint64_t sum = 0;

	for (int i = 0; i < MOE_TRACE_STAGES; i++)
		sum += r->stage_ns[i];
	if (sum > r->latency_ns)
		fail_msg("record %llu: stages add up to %llu ns, latency %llu ns",
			 (unsigned long long)r->seq, (unsigned long long)sum,
			 (unsigned long long)r->latency_ns);
	assert_true(r->latency_ns > 0);
	assert_true(r->stage_ns[MOE_TRACE_EXPERTS] > 0); /* the CPU backend */
	assert_int_equal(r->stage_ns[MOE_TRACE_DEVICE], 0);
}

static double metric(moe_client *c, const char *name)
{
	char *text = NULL, *p;
	size_t n = strlen(name);
	double v = -1;

	assert_int_equal(moe_metrics_text(c, &text, NULL), 0);
	for (p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
		if (!strncmp(p, name, n) && p[n] == ' ')
			v = strtod(p + n + 1, NULL);
	free(text);
	return v;
}

static const cJSON *trace_status(moe_client *c, cJSON **root)
{
	*root = dh_status(c, false);
	return dh_jget(*root, "trace", cJSON_Object);
}

static void test_records(void **state)
{
	struct daemon *d = dh_fixture_daemon(NULL, NULL, READY_MS);
	moe_client *t = dh_cl_open_named(d, "tracer"), *f = dh_cl_open_named(d, "traced");
	struct moe_admin_trace fl = filter(MOE_ADMIN_ALL_LAYERS, 0, 0);
	uint32_t K = g_model->top_k, E = g_model->n_experts, *count = calloc(E, sizeof(*count));
	moe_trace_event *ev = malloc(sizeof(*ev));
	uint64_t last_seq = 0, t0 = realtime_ns(), t1;
	struct moe_rng rng = {4242};
	int n = 40;

	(void)state;
	assert_non_null(count);
	assert_non_null(ev);
	assert_int_equal(moe_trace_start(t, &fl), 0);
	for (int i = 0; i < n; i++) {
		uint32_t layer = moe_layer((uint32_t)moe_rng_next(&rng)), tokens = 1 + (uint32_t)moe_rng_next(&rng) % 12;
		int dt = i % 3 ? MOE_DTYPE_BF16 : MOE_DTYPE_F32;
		void *in = dh_make_input(dt, tokens, 100 + (uint64_t)i);
		void *out = malloc((size_t)tokens * g_H * dh_dt_size(dt));
		uint32_t *ids = malloc((size_t)tokens * K * sizeof(*ids)), epoch = 0, sum = 0, nh = 0;
		float *w = malloc((size_t)tokens * K * sizeof(*w));
		moe_forward_args a = {.size = sizeof(a), .flags = i % 2 ? MOE_FWD_ROUTING : 0,
				      .layer = layer, .dtype = (uint32_t)dt, .in = in, .out = out,
				      .n_tokens = tokens, .topk_ids = ids, .topk_weights = w,
				      .epoch = &epoch};
		const struct moe_trace_record *r = &ev->rec;

		assert_int_equal(moe_forward_ex(f, &a), 0);
		ref_counts(layer, dt, in, tokens, count);
		assert_int_equal(moe_trace_next(t, ev, NEXT_MS), 0);
		if (i)
			assert_true(r->seq > last_seq);
		last_seq = r->seq;
		assert_int_equal(r->pid, getpid());
		assert_string_equal(r->client_name, "traced");
		assert_int_equal(r->layer, layer);
		assert_int_equal(r->tokens, tokens);
		assert_int_equal(r->dtype, dt == MOE_DTYPE_F32 ? 0 : 1);
		assert_int_equal(r->status, 0);
		assert_int_equal(r->epoch, epoch);
		assert_int_equal(r->weights_version, 1);
		assert_true(r->batch_requests >= 1);
		assert_true(r->batch_tokens >= tokens);
		assert_int_equal(r->flags, 0);
		assert_int_equal(ev->lost, 0);
		check_times(r);
		/* the experts hit: exactly the reference routing's counts */
		for (uint32_t x = 0; x < E; x++)
			nh += count[x] != 0;
		assert_int_equal(r->n_hits, nh);
		for (uint32_t h = 0; h < r->n_hits; h++) {
			assert_true(ev->hits[h].expert < E);
			assert_int_equal(ev->hits[h].tokens, count[ev->hits[h].expert]);
			sum += ev->hits[h].tokens;
		}
		assert_int_equal(sum, tokens * K);
		t1 = realtime_ns();
		assert_true(r->unix_ns >= t0 && r->unix_ns <= t1);
		free(in);
		free(out);
		free(ids);
		free(w);
	}
	printf("records: %d requests, %d records matched the reference routing\n", n, n);
	free(count);
	free(ev);
	dh_cl_close(t);
	dh_cl_close(f);
	dh_daemon_stop(d);
	g_passed = true;
}

static void forward_n(moe_client *f, int n, uint32_t tokens, uint64_t seed)
{
	float *in = dh_make_input(MOE_DTYPE_F32, tokens, seed);
	float *out = malloc((size_t)tokens * g_H * sizeof(float));

	assert_non_null(out);
	for (int i = 0; i < n; i++)
		assert_int_equal(moe_forward(f, moe_layer((uint32_t)i), MOE_DTYPE_F32, in, out, tokens),
				 0);
	free(in);
	free(out);
}

static void test_filters(void **state)
{
	struct daemon *d = dh_fixture_daemon(NULL, NULL, READY_MS);
	moe_client *f = dh_cl_open_named(d, "traced"), *by_layer, *by_pid, *nobody, *more[6];
	moe_trace_event *ev = malloc(sizeof(*ev));
	struct moe_admin_trace fl;
	const cJSON *tr;
	cJSON *root;
	int got;

	(void)state;
	assert_non_null(ev);
	if (g_model->n_moe_layers < 2) {
		printf("filters: SKIPPED (the fixture has one MoE layer)\n");
		skip();
	}
	by_layer = dh_cl_open_named(d, "by-layer");
	by_pid = dh_cl_open_named(d, "by-pid");
	nobody = dh_cl_open_named(d, "nobody");
	fl = filter(moe_layer(1), 0, 0);
	assert_int_equal(moe_trace_start(by_layer, &fl), 0);
	fl = filter(MOE_ADMIN_ALL_LAYERS, getpid(), 5);
	assert_int_equal(moe_trace_start(by_pid, &fl), 0);
	fl = filter(MOE_ADMIN_ALL_LAYERS, 1, 0); /* init sends nothing */
	assert_int_equal(moe_trace_start(nobody, &fl), 0);
	/* bad ones */
	fl = filter(g_model->n_layers + 5, 0, 0);
	assert_int_equal(moe_trace_start(f, &fl), MOE_ENOLAYER);
	for (uint32_t l = 0; l < g_model->n_layers; l++) {
		bool moe = false;

		for (uint32_t i = 0; i < g_model->n_moe_layers; i++)
			moe |= g_model->layers[i].index == l;
		if (!moe) {
			fl = filter(l, 0, 0);
			assert_int_equal(moe_trace_start(f, &fl), MOE_ENOLAYER);
			break;
		}
	}
	assert_int_equal(moe_trace_stop(f), MOE_ENOENT);

	forward_n(f, 20, 3, 7); /* layers alternate: 10 on moe_layer(1) */

	for (got = 0; got < 10; got++) {
		assert_int_equal(moe_trace_next(by_layer, ev, NEXT_MS), 0);
		assert_int_equal(ev->rec.layer, moe_layer(1));
		check_times(&ev->rec);
	}
	assert_int_equal(moe_trace_next(by_layer, ev, 300), MOE_ETIMEDOUT);
	for (got = 0; got < 6; got++) {
		int r = moe_trace_next(by_pid, ev, NEXT_MS);

		if (got < 5) {
			assert_int_equal(r, 0);
			assert_int_equal(ev->rec.pid, getpid());
		} else {
			assert_int_equal(r, MOE_ENOENT); /* its count: detached */
		}
	}
	assert_int_equal(moe_trace_next(nobody, ev, 300), MOE_ETIMEDOUT);

	/* 2 tracers left (by-layer, nobody): 6 more fit, not 7 */
	fl = filter(MOE_ADMIN_ALL_LAYERS, 0, 0);
	for (int i = 0; i < 6; i++) {
		more[i] = dh_cl_open_named(d, "more");
		assert_int_equal(moe_trace_start(more[i], &fl), 0);
	}
	assert_int_equal(moe_trace_start(f, &fl), MOE_EBUSY);
	tr = trace_status(f, &root);
	assert_int_equal(cJSON_GetArraySize(dh_jget(tr, "tracers", cJSON_Array)), 8);
	assert_int_equal(dh_jnum(tr, "records"), 20);
	assert_int_equal(dh_jnum(tr, "lost"), 0);
	cJSON_Delete(root);
	assert_int_equal(metric(f, "moed_tracers"), 8);
	/* a stop, and a disconnect, detach */
	assert_int_equal(moe_trace_stop(by_layer), 0);
	assert_int_equal(moe_trace_next(by_layer, ev, 0), MOE_ENOENT);
	dh_cl_close(more[0]);
	for (int i = 0; i < 100; i++) { /* (the hang-up is seen on a later loop turn) */
		double n = metric(f, "moed_tracers");

		if (n == 6)
			break;
		dh_nap_ms(20);
	}
	assert_int_equal(metric(f, "moed_tracers"), 6);
	assert_int_equal(metric(f, "moed_trace_records_total"), 20);
	printf("filters: layer 10 of 20, pid 5 of 5 then detached, other pid 0, 9th tracer busy\n");
	free(ev);
	dh_close_clients();
	dh_daemon_stop(d);
	g_passed = true;
}

/* Reads until a bounded wait passes: received + lost must be `want`. */
static void read_all(moe_client *t, int want, const char *what)
{
	moe_trace_event *ev = malloc(sizeof(*ev));
	uint64_t got = 0, lost = 0, last = 0;
	int r;

	assert_non_null(ev);
	while ((r = moe_trace_next(t, ev, 500)) == 0) {
		if (got)
			assert_true(ev->rec.seq > last);
		last = ev->rec.seq;
		lost = ev->lost;
		got++;
	}
	assert_int_equal(r, MOE_ETIMEDOUT);
	printf("slow_tracer: %s: read %llu records, lost %llu: %llu = %d requests\n", what,
	       (unsigned long long)got, (unsigned long long)lost,
	       (unsigned long long)(got + lost), want);
	assert_true(lost > 0);
	assert_int_equal(got + lost, (uint64_t)want);
	free(ev);
}

static void test_slow_tracer(void **state)
{
	struct daemon *d = dh_fixture_daemon(NULL, "MOED_TEST_TRACE_RING=64", READY_MS);
	moe_client *s = dh_cl_open_named(d, "stalled"), *f = dh_cl_open_named(d, "traced");
	moe_client *sl = dh_cl_open_named(d, "stalled-layer"), *ss = dh_cl_open_named(d, "stopped");
	struct moe_admin_trace fl = filter(MOE_ADMIN_ALL_LAYERS, 0, 0);
	uint64_t t0;
	double lost_all = 0, lost_sum = 0;
	const cJSON *tr, *one;
	cJSON *root;
	int n = 3000, on_layer = 0;

	(void)state;
	assert_int_equal(moe_trace_start(s, &fl), 0);
	assert_int_equal(moe_trace_start(ss, &fl), 0);
	fl = filter(moe_layer(1), 0, 0);
	assert_int_equal(moe_trace_start(sl, &fl), 0);
	/* they read nothing: their sockets fill, then the ring overruns them */
	forward_n(f, n, 1, 9);
	for (int i = 0; i < n; i++)
		on_layer += moe_layer((uint32_t)i) == moe_layer(1);
	tr = trace_status(f, &root);
	assert_int_equal(dh_jnum(tr, "ring_records"), 64);
	assert_int_equal(dh_jnum(tr, "records"), n);
	cJSON_ArrayForEach(one, dh_jget(tr, "tracers", cJSON_Array)) {
		printf("slow_tracer: %d requests, all answered; stalled tracer %.0f: %.0f sent, "
		       "%.0f lost\n", n, dh_jnum(one, "client"), dh_jnum(one, "sent"),
		       dh_jnum(one, "lost"));
		assert_true(dh_jnum(one, "lost") > 0);
		lost_sum += dh_jnum(one, "lost");
	}
	lost_all = dh_jnum(tr, "lost");
	assert_true(lost_all == lost_sum);
	cJSON_Delete(root);
	assert_true(metric(f, "moed_trace_records_lost_total") == lost_all);
	/* a session whose socket is full of records still gets its replies */
	t0 = dh_now_ms();
	assert_int_equal(moe_trace_stop(ss), 0);
	printf("slow_tracer: STOP on a full socket answered in %llu ms\n",
	       (unsigned long long)(dh_now_ms() - t0));
	/* now they read: what each gets and what it lost are its requests */
	read_all(s, n, "every request");
	read_all(sl, on_layer, "one layer's");
	dh_cl_close(s);
	dh_cl_close(sl);
	dh_cl_close(ss);
	dh_cl_close(f);
	dh_daemon_stop(d);
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_records, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_filters, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_slow_tracer, dh_setup, dh_teardown),
	};

	return cmocka_run_group_tests(tests, dh_group_setup, dh_group_teardown);
}
