/* tests/test_daemon.c — integration tests: a real moed process, real clients.
 *
 * Every test starts its own moed (MOE_BIN_DIR/moed) on a socket in a fresh
 * temporary directory, with its stderr in a file there (printed when the
 * test fails), and stops it with SIGTERM, checking exit code 0. Clients are
 * libmoeclient clients, and hand-written "raw" clients that speak the wire
 * (ipc/moe_proto.h, ipc/moe_ring.h) directly, to lie and misbehave in ways
 * the library never would.
 *
 * Outputs are compared bit for bit with the in-process engine on the same
 * fixture (the daemon computes in fp32 whatever the request dtype, and the
 * engine is batch-invariant, so a token's result does not depend on what it
 * was batched with).
 *
 * Timing: no assertion is on wall time. Where an ordering matters, the test
 * freezes the daemon with SIGSTOP (waitpid(WUNTRACED) proves it stopped),
 * queues work, and lets it go with SIGCONT, so the daemon finds everything at
 * once. Every wait is bounded; a bound that passes is a failure, never a hang.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/daemon_harness.h"
#include "tests/testutil.h"
#include "tests/wire.h"

#include "client/include/moeclient.h"
#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"
#include "kernels/cpu/convert.h"
#include "tools/synth.h"

#define MOED	DH_MOED
#define FIXTURE DH_FIXTURE

/* Bounds for waits that must not hang (generous: sanitizer builds are slow). */
#define READY_MS 10000
#define EXIT_MS	 DH_EXIT_MS
#define WAIT_MS	 DH_WAIT_MS

/* ------------------------------------------------------------------------ */
/* Daemons                                                                  */

static char *g_tmpdir; /* a test's own temporary directory, removed by teardown */

/* A daemon on `model`, with `cfg_extra` (YAML sections other than model:)
 * in a configuration file, or none (NULL: --model). Not started yet. */
static struct daemon *daemon_new(const char *model, const char *cfg_extra)
{
	struct daemon *d = dh_daemon_new(model, false, READY_MS);

	d->socket_arg = true;
	if (cfg_extra)
		dh_daemon_write_cfg(d, cfg_extra);
	return d;
}

static struct daemon *daemon_run(const char *model, const char *cfg_extra)
{
	struct daemon *d = daemon_new(model, cfg_extra);

	dh_daemon_start(d);
	return d;
}

static int count_memfd_maps(pid_t pid)
{
	char path[64], line[1024];
	FILE *f;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f))
		if (strstr(line, "/memfd:"))
			n++;
	fclose(f);
	return n;
}

/* ------------------------------------------------------------------------ */
/* libmoeclient clients                                                     */

static moe_client *cl_open_opts(struct daemon *d, size_t region, uint32_t depth, int autorc)
{
	moe_connect_options o = {.region_bytes = region, .queue_depth = depth,
				 .name = "test_daemon", .auto_reconnect = (uint32_t)autorc};

	return dh_cl_open_with(d, &o);
}

static moe_client *cl_open(struct daemon *d)
{
	return cl_open_opts(d, 0, 0, 0);
}

/* moe_forward of fresh random tokens, checked against the reference. */
static void forward_ok(moe_client *c, uint32_t layer, int dt, uint32_t n, uint64_t seed,
		       const char *what)
{
	void *in = dh_make_input(dt, n, seed);
	void *out = malloc((size_t)n * g_H * dh_dt_size(dt));
	int r;

	assert_non_null(out);
	r = moe_forward(c, layer, (moe_dtype)dt, in, out, n);
	if (r)
		fail_msg("%s: moe_forward(layer %u, %s, %u tokens): %s", what, layer, dt_name(dt),
			 n, moe_strerror(r));
	check_output(layer, dt, in, out, n, what);
	free(in);
	free(out);
}

/* The well-behaved client still gets exact results, and moed lives. */
static void good_still_works(struct daemon *d, moe_client *good, const char *after)
{
	static uint64_t seed = 1000;
	char what[160];

	dh_expect_alive(d, after);
	snprintf(what, sizeof(what), "well-behaved client after %s", after);
	forward_ok(good, 0, MOE_DTYPE_F32, 7, seed++, what);
	forward_ok(good, 2, MOE_DTYPE_BF16, 3, seed++, what);
	dh_expect_alive(d, after);
}

/* Waits (bounded) for q; returns its completion status. */
static int req_wait(moe_client *c, struct req *q)
{
	int st = 12345, r = moe_wait(c, q->tag, WAIT_MS, &st);

	if (r)
		fail_msg("moe_wait(tag %llu): %s", (unsigned long long)q->tag, moe_strerror(r));
	return st;
}

/* ------------------------------------------------------------------------ */
/* JSON                                                                     */

/* The status JSON, its length checked. */
static cJSON *status(moe_client *c)
{
	return dh_status(c, true);
}

/* ------------------------------------------------------------------------ */
/* Setup / teardown of each test                                            */

static int test_teardown(void **state)
{
	(void)state;
	dh_close_clients();
	wire_close_all();
	if (g_tmpdir) {
		tu_rmtree(g_tmpdir);
		free(g_tmpdir);
		g_tmpdir = NULL;
	}
	dh_reap_daemons();
	return 0;
}

/* ------------------------------------------------------------------------ */
/* 1. Basic                                                                 */

static void test_basic(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *c = cl_open(d);
	moe_model_info mi;
	uint64_t rtt = 0, tokens[3] = {0}, n_req = 0;
	struct req q[3];
	cJSON *j, *o, *a;

	(void)state;
	assert_int_equal(moe_get_model_info(c, &mi), 0);
	assert_string_equal(mi.family, "qwen2_moe");
	assert_int_equal(mi.hidden, 88);
	assert_int_equal(mi.hidden, g_model->hidden);
	assert_int_equal(mi.n_experts, g_model->n_experts);
	assert_int_equal(mi.top_k, g_model->top_k);
	assert_int_equal(mi.n_layers, 3);
	assert_int_equal(mi.n_moe_layers, 2);
	assert_int_equal(mi.moe_layers[0], 0);
	assert_int_equal(mi.moe_layers[1], 2);
	for (uint32_t i = 0; i < g_model->n_moe_layers; i++)
		assert_int_equal(mi.moe_layers[i], g_model->layers[i].index);
	assert_int_equal(mi.dtype, MOE_DTYPE_BF16);
	assert_int_equal(mi.max_batch_tokens, 4096);
	assert_true(mi.data_bytes > 0);

	assert_int_equal(moe_ping(c, &rtt), 0);
	assert_true(rtt > 0);

	/* moe_forward in every dtype, on both MoE layers, odd sizes */
	static const struct {
		uint32_t layer, n;
		int dt;
	} cases[] = {
		{0, 24, MOE_DTYPE_F32}, {2, 24, MOE_DTYPE_F32}, {0, 17, MOE_DTYPE_BF16},
		{2, 1, MOE_DTYPE_BF16}, {0, 5, MOE_DTYPE_F16}, {2, 1000, MOE_DTYPE_F32},
		{0, 4096, MOE_DTYPE_BF16},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		forward_ok(c, cases[i].layer, cases[i].dt, cases[i].n, 10 + i, "moe_forward");
		tokens[cases[i].layer] += cases[i].n;
		n_req++;
	}

	/* zero-copy requests, several in flight at once (one batch or more) */
	dh_req_submit(c, &q[0], 0, MOE_DTYPE_F32, 9, 31, 0);
	dh_req_submit(c, &q[1], 2, MOE_DTYPE_BF16, 33, 32, 0);
	dh_req_submit(c, &q[2], 0, MOE_DTYPE_F16, 2, 33, 0);
	for (int i = 2; i >= 0; i--) {
		assert_int_equal(req_wait(c, &q[i]), 0);
		check_output(q[i].layer, q[i].dt, q[i].copy, q[i].out, q[i].n, "moe_submit");
		tokens[q[i].layer] += q[i].n;
		n_req++;
		dh_req_free(c, &q[i]);
	}
	assert_int_equal(moe_ping(c, NULL), 0);

	/* one batch of three dtypes, each request in place (out == in): every
	 * request is a segment with its own dtype, and the daemon reads every
	 * input before it writes any output */
	{
		static const int dts[] = {MOE_DTYPE_BF16, MOE_DTYPE_F32, MOE_DTYPE_F16};
		static const uint32_t ns[] = {3, 11, 6};
		void *buf[3], *copy[3];
		uint64_t tag[3];
		int st;

		dh_daemon_freeze(d);
		for (int i = 0; i < 3; i++) {
			size_t bytes = (size_t)ns[i] * g_H * dh_dt_size(dts[i]);

			copy[i] = dh_make_input(dts[i], ns[i], 40 + (uint64_t)i);
			buf[i] = moe_buf_alloc(c, bytes);
			assert_non_null(buf[i]);
			memcpy(buf[i], copy[i], bytes);
			assert_int_equal(moe_submit(c, 0, (moe_dtype)dts[i], buf[i], buf[i], ns[i], 0,
						    &tag[i]),
					 0);
		}
		dh_daemon_thaw(d);
		for (int i = 0; i < 3; i++) {
			assert_int_equal(moe_wait(c, tag[i], DH_WAIT_MS, &st), 0);
			assert_int_equal(st, 0);
			check_output(0, dts[i], copy[i], buf[i], ns[i], "in place, mixed dtypes");
			tokens[0] += ns[i];
			n_req++;
			moe_buf_free(c, buf[i]);
			free(copy[i]);
		}
	}

	/* status */
	j = status(c);
	assert_true(dh_jnum(j, "version") >= 1);
	assert_true(dh_jnum(j, "uptime_s") >= 0);
	assert_string_equal(dh_jget(j, "state", cJSON_String)->valuestring, "serving");
	o = dh_jget(j, "model", cJSON_Object);
	assert_string_equal(dh_jget(o, "family", cJSON_String)->valuestring, "qwen2_moe");
	assert_int_equal(dh_jnum(o, "hidden"), 88);
	assert_int_equal(dh_jnum(o, "experts"), g_model->n_experts);
	assert_int_equal(dh_jnum(o, "top_k"), g_model->top_k);
	a = dh_jget(o, "moe_layers", cJSON_Array);
	assert_int_equal(cJSON_GetArraySize(a), 2);
	assert_int_equal(cJSON_GetArrayItem(a, 0)->valuedouble, 0);
	assert_int_equal(cJSON_GetArrayItem(a, 1)->valuedouble, 2);
	o = dh_jget(j, "backend", cJSON_Object);
	assert_true(strlen(dh_jget(o, "name", cJSON_String)->valuestring) > 0);
	assert_true(strlen(dh_jget(o, "kernels", cJSON_String)->valuestring) > 0);
	assert_true(dh_jnum(o, "threads") >= 1);
	a = dh_jget(j, "clients", cJSON_Array);
	assert_int_equal(cJSON_GetArraySize(a), 1); /* the readiness probe is gone */
	assert_string_equal(dh_jget(cJSON_GetArrayItem(a, 0), "name", cJSON_String)->valuestring,
			    "test_daemon");
	o = dh_jget(j, "queue", cJSON_Object);
	assert_int_equal(dh_jnum(o, "pending_requests"), 0);
	assert_int_equal(dh_jnum(o, "pending_tokens"), 0);
	o = dh_jget(j, "requests", cJSON_Object);
	assert_int_equal(dh_jnum(o, "completed"), n_req);
	assert_int_equal(dh_jnum(o, "errors"), 0);
	assert_int_equal(dh_jnum(o, "timeouts"), 0);
	assert_int_equal(dh_jnum(o, "cancelled"), 0);
	assert_int_equal(dh_jnum(o, "tokens"), tokens[0] + tokens[2]);
	assert_true(dh_jnum(o, "batches") >= 1 && dh_jnum(o, "batches") <= n_req);
	a = dh_jget(j, "layers", cJSON_Array);
	assert_int_equal(cJSON_GetArraySize(a), 2);
	for (int i = 0; i < 2; i++) {
		cJSON *l = cJSON_GetArrayItem(a, i), *e, *x;
		uint32_t layer = (uint32_t)dh_jnum(l, "layer");
		double sum = 0;

		assert_true(layer == 0 || layer == 2);
		e = dh_jget(l, "expert_tokens", cJSON_Array);
		assert_int_equal(cJSON_GetArraySize(e), g_model->n_experts);
		cJSON_ArrayForEach(x, e) {
			assert_true(cJSON_IsNumber(x) && x->valuedouble >= 0);
			sum += x->valuedouble;
		}
		if (sum != (double)g_model->top_k * (double)tokens[layer])
			fail_msg("layer %u: experts got %.0f tokens, expected top_k %u x %llu", layer,
				 sum, g_model->top_k, (unsigned long long)tokens[layer]);
	}
	cJSON_Delete(j);

	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* moe_wait with timeout 0 on a request that has finished must say so (it
 * has to look at the completion ring, not only at what other calls reaped). */
static void test_wait_nonblocking(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *c = cl_open(d), *c2 = cl_open(d);
	struct req q;
	int st = 1, r;

	(void)state;
	/* X is queued before Y (another client's, same layer), so once Y's
	 * moe_forward returns, X's completion is in c's completion ring */
	dh_req_submit(c, &q, 0, MOE_DTYPE_F32, 3, 34, 0);
	forward_ok(c2, 0, MOE_DTYPE_F32, 2, 35, "second client");
	r = moe_wait(c, q.tag, 0, &st);
	if (r == MOE_ETIMEDOUT) {
		/* collect it anyway, then fail */
		assert_int_equal(moe_wait(c, q.tag, WAIT_MS, &st), 0);
		dh_req_free(c, &q);
		fail_msg("moe_wait(tag, timeout 0) returned MOE_ETIMEDOUT for a request whose "
			 "completion was already in the completion ring");
	}
	assert_int_equal(r, 0);
	assert_int_equal(st, 0);
	check_output(0, MOE_DTYPE_F32, q.copy, q.out, 3, "moe_submit");
	dh_req_free(c, &q);
	/* and moe_poll sees a finished request without any other call */
	dh_req_submit(c, &q, 2, MOE_DTYPE_BF16, 4, 36, 0);
	forward_ok(c2, 2, MOE_DTYPE_F32, 1, 37, "second client");
	{
		moe_completion comp[2];
		int n = moe_poll(c, comp, 2);

		assert_int_equal(n, 1);
		assert_int_equal(comp[0].tag, q.tag);
		assert_int_equal(comp[0].status, 0);
	}
	check_output(2, MOE_DTYPE_BF16, q.copy, q.out, 4, "moe_submit + moe_poll");
	dh_req_free(c, &q);
	dh_cl_close(c);
	dh_cl_close(c2);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 2. Errors come back as codes                                             */

static void test_errors(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *c = cl_open(d);
	struct raw *r;
	char in[88 * 4], out[88 * 4], *buf;
	uint64_t tag;
	struct {
		struct moe_sqe q;
		int want;
		const char *what;
	} cases[24];
	struct moe_cqe cq[24];
	int n = 0;

	(void)state;
	memset(in, 0, sizeof(in));
	/* the library's own checks */
	assert_int_equal(moe_forward(c, 1, MOE_DTYPE_F32, in, out, 1), MOE_ENOLAYER);
	assert_int_equal(moe_forward(c, 3, MOE_DTYPE_F32, in, out, 1), MOE_ENOLAYER);
	assert_int_equal(moe_forward(c, 0, (moe_dtype)7, in, out, 1), MOE_EDTYPE);
	assert_int_equal(moe_forward(c, 0, MOE_DTYPE_F32, in, out, 65537), MOE_E2BIG);
	assert_int_equal(moe_forward(c, 0, MOE_DTYPE_F32, in, out, 0), 0);
	buf = moe_buf_alloc(c, 88 * 4);
	assert_non_null(buf);
	assert_int_equal(moe_submit(c, 0, MOE_DTYPE_F32, in, buf, 1, 0, &tag), MOE_ERANGE);
	assert_int_equal(moe_submit(c, 0, MOE_DTYPE_F32, buf, out, 1, 0, &tag), MOE_ERANGE);
	/* a buffer that starts inside the data area and runs off its end */
	{
		moe_client *small = cl_open_opts(d, 1u << 20, 0, 0);
		char *sb = moe_buf_alloc(small, 64);

		assert_non_null(sb);
		assert_int_equal(moe_submit(small, 0, MOE_DTYPE_F32, sb, sb, 4096, 0, &tag),
				 MOE_ERANGE);
		assert_int_equal(moe_forward(small, 0, MOE_DTYPE_F32, in, out, 4096) == MOE_ENOMEM,
				 1);
		moe_buf_free(small, sb);
		dh_cl_close(small);
	}
	moe_buf_free(c, buf);

	/* the daemon's checks, through a raw client (the library would refuse) */
	r = raw_attach(d, 1 << 20, 32);
#define CASE(tag_, layer_, n_, in_, out_, dt_, flags_, res_, want_, what_)                       \
	do {                                                                                     \
		cases[n].q = sqe(tag_, layer_, n_, in_, out_, dt_);                              \
		cases[n].q.flags = flags_;                                                       \
		cases[n].q.route_off = res_;                                                      \
		cases[n].want = want_;                                                           \
		cases[n].what = what_;                                                           \
		n++;                                                                             \
	} while (0)
	CASE(100, 1, 1, 0, 4096, 0, 0, 0, MOE_ENOLAYER, "dense layer 1");
	CASE(101, 3, 1, 0, 4096, 0, 0, 0, MOE_ENOLAYER, "layer 3 (past the model)");
	CASE(102, 0xffffffffu, 1, 0, 4096, 0, 0, 0, MOE_ENOLAYER, "layer 2^32-1");
	CASE(103, 0, 65537, 0, 0, 0, 0, 0, MOE_E2BIG, "65537 tokens (max_inflight_tokens 65536)");
	CASE(104, 0, 0xffffffffu, 0, 0, 0, 0, 0, MOE_E2BIG, "2^32-1 tokens");
	CASE(105, 0, 0, 0, 4096, 0, 0, 0, MOE_EINVAL, "0 tokens");
	CASE(106, 0, 1, r->data_bytes - 64, 0, 0, 0, 0, MOE_ERANGE, "input past the area");
	CASE(107, 0, 1, 0, r->data_bytes, 0, 0, 0, MOE_ERANGE, "output at the area's end");
	CASE(108, 0, 1, UINT64_MAX - 8, 0, 0, 0, 0, MOE_ERANGE, "offset that overflows");
	CASE(109, 0, 4000, 0, 0, 0, 0, 0, MOE_ERANGE, "4000 tokens: more than the area");
	CASE(110, 0, 1, 0, 4096, 3, 0, 0, MOE_EDTYPE, "dtype 3");
	CASE(111, 0, 1, 0, 4096, 0xffff, 0, 0, MOE_EDTYPE, "dtype 0xffff");
	CASE(112, 0, 1, 0, 4096, 0, 0x4, 0, MOE_EINVAL, "unknown flag");
	CASE(113, 0, 1, 0, 4096, 0, 0, 1, MOE_EINVAL, "route_off without MOE_SQE_ROUTING");
	CASE(116, 0, 1, 0, 4096, 0, MOE_SQE_ROUTING, r->data_bytes - 8, MOE_ERANGE,
	     "routing span past the area");
	CASE(117, 0, 1, 0, 4096, 0, MOE_SQE_ROUTING, UINT64_MAX - 4, MOE_ERANGE,
	     "routing offset that overflows");
	CASE(118, 0, 1, 0, 4096, 0, MOE_SQE_ROUTING, 8194, MOE_EINVAL, "misaligned routing span");
	CASE(114, 0, 1, 0, 4096, 0, MOE_SQE_NOP | 0x8000, 0, MOE_EINVAL, "NOP + unknown flag");
	CASE(115, 12345, 0, 0, 0, 77, MOE_SQE_NOP, 0, 0, "NOP (other fields ignored)");
#undef CASE
	for (int i = 0; i < n; i++)
		raw_push(r, &cases[i].q);
	raw_doorbell(r);
	raw_wait(r, cq, (uint32_t)n, false);
	for (int i = 0; i < n; i++) {
		/* completions come in order here: each is answered on the spot */
		assert_int_equal(cq[i].tag, cases[i].q.tag);
		if (cq[i].status != cases[i].want)
			fail_msg("%s: status %d (%s), expected %d (%s)", cases[i].what, cq[i].status,
				 moe_strerror(cq[i].status), cases[i].want,
				 moe_strerror(cases[i].want));
	}
	/* the raw client is still served, and so is the library client */
	raw_forward_ok(r, 0, MOE_DTYPE_F32, 3, 1);
	raw_forward_ok(r, 2, MOE_DTYPE_BF16, 4, 2);
	good_still_works(d, c, "bad requests");
	raw_close(r);
	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 3. Deadlines                                                             */

static void test_deadline(void **state)
{
	char *dir = g_tmpdir = tu_tmpdir(), err[MOE_ERRLEN];
	struct moe_synth_opts o;
	struct daemon *d;
	moe_client *c;
	moe_model_info mi;
	struct {
		uint64_t tag;
		void *in, *out;
		int st;
	} big[3], small[4];
	int timeouts = 0;
	cJSON *j;

	(void)state;
	/* a model where a batch of 2048 tokens is several GFLOP: no CPU
	 * finishes it within the small requests' 1 ms deadline (theirs, or
	 * scheduler.request_timeout_ms) */
	moe_synth_defaults(&o, MOE_FAM_MIXTRAL);
	o.dtype = MOE_DT_F32;
	o.hidden = 256;
	o.inter = 512;
	o.experts = 16;
	o.top_k = 4;
	o.layers = 2;
	o.seed = 7;
	if (moe_synth_write(dir, &o, err))
		fail_msg("synth: %s", err);
	d = daemon_run(dir, "scheduler:\n  request_timeout_ms: 1\n  max_batch_tokens: 2048\n");
	c = cl_open(d);
	assert_int_equal(moe_get_model_info(c, &mi), 0);
	assert_int_equal(mi.n_moe_layers, 2);
	assert_int_equal(mi.hidden, 256);

	/* Everything reaches the daemon at once: it takes all seven entries,
	 * starting their deadlines, and hands the engine worker two batches
	 * of layer A (2048 tokens, then 1024: the one it runs and the one
	 * waiting, which is all it holds); layer B's requests stay queued, and
	 * once the first batch is back their deadlines are long gone. (A
	 * request handed to the worker runs whatever its deadline.) */
	dh_daemon_freeze(d);
	for (int i = 0; i < 3; i++) {
		size_t bytes = (size_t)1024 * 256 * 4;

		big[i].in = moe_buf_alloc(c, bytes);
		big[i].out = moe_buf_alloc(c, bytes);
		assert_non_null(big[i].in);
		assert_non_null(big[i].out);
		for (size_t k = 0; k < bytes / 4; k++)
			((float *)big[i].in)[k] = (float)((k * 2654435761u + (size_t)i) % 1000) / 500.f - 1.f;
		assert_int_equal(moe_submit(c, mi.moe_layers[0], MOE_DTYPE_F32, big[i].in,
					    big[i].out, 1024, 60000, &big[i].tag),
				 0);
	}
	for (int i = 0; i < 4; i++) {
		small[i].in = moe_buf_alloc(c, 256 * 4);
		small[i].out = moe_buf_alloc(c, 256 * 4);
		assert_non_null(small[i].in);
		assert_non_null(small[i].out);
		memset(small[i].in, 0, 256 * 4);
		/* 1 ms: its own (i odd) or the daemon's default (i even) */
		assert_int_equal(moe_submit(c, mi.moe_layers[1], MOE_DTYPE_F32, small[i].in,
					    small[i].out, 1, (uint32_t)(i % 2), &small[i].tag),
				 0);
	}
	dh_daemon_thaw(d);
	for (int i = 0; i < 4; i++) {
		assert_int_equal(moe_wait(c, small[i].tag, WAIT_MS, &small[i].st), 0);
		if (small[i].st != 0 && small[i].st != MOE_ETIMEDOUT)
			fail_msg("small request %d: %s", i, moe_strerror(small[i].st));
		timeouts += small[i].st == MOE_ETIMEDOUT;
	}
	for (int i = 0; i < 3; i++) {
		assert_int_equal(moe_wait(c, big[i].tag, WAIT_MS, &big[i].st), 0);
		if (big[i].st)
			fail_msg("big request %d: %s", i, moe_strerror(big[i].st));
	}
	if (small[0].st != MOE_ETIMEDOUT && small[2].st != MOE_ETIMEDOUT)
		fail_msg("no small request with the default deadline (request_timeout_ms 1) "
			 "timed out behind a 2048-token batch");
	if (small[1].st != MOE_ETIMEDOUT && small[3].st != MOE_ETIMEDOUT)
		fail_msg("no small request with timeout_ms 1 timed out behind a 2048-token batch");
	j = status(c);
	assert_int_equal(dh_jnum(dh_jget(j, "requests", cJSON_Object), "timeouts"), timeouts);
	assert_int_equal(dh_jnum(dh_jget(j, "queue", cJSON_Object), "pending_requests"), 0);
	cJSON_Delete(j);
	/* with a long deadline the same small request runs */
	assert_int_equal(moe_submit(c, mi.moe_layers[1], MOE_DTYPE_F32, small[0].in, small[0].out,
				    1, 60000, &small[0].tag),
			 0);
	assert_int_equal(moe_wait(c, small[0].tag, WAIT_MS, &small[0].st), 0);
	assert_int_equal(small[0].st, 0);
	for (int i = 0; i < 3; i++) {
		moe_buf_free(c, big[i].in);
		moe_buf_free(c, big[i].out);
	}
	for (int i = 0; i < 4; i++) {
		moe_buf_free(c, small[i].in);
		moe_buf_free(c, small[i].out);
	}
	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 4. Cancel                                                                */

static void test_cancel(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *c = cl_open(d);
	struct req q[4];
	cJSON *j;

	(void)state;
	/* Frozen, the daemon gets a request X on layer 0, then Y on layer 2,
	 * then CANCEL(Y). Thawed, it either reads the CANCEL first (taking the
	 * ring's entries before handling it), or — epoll_wait fails with EINTR
	 * after SIGCONT — takes both entries and runs one batch, of X's layer
	 * (the oldest), and reads the CANCEL before the next: Y never runs. */
	dh_daemon_freeze(d);
	dh_req_submit(c, &q[0], 0, MOE_DTYPE_F32, 16, 41, 0);
	dh_req_submit(c, &q[1], 2, MOE_DTYPE_F32, 4, 42, 0);
	assert_int_equal(moe_cancel(c, q[1].tag), 0);
	dh_daemon_thaw(d);
	assert_int_equal(req_wait(c, &q[1]), MOE_ECANCELED);
	assert_int_equal(req_wait(c, &q[0]), 0);
	check_output(0, MOE_DTYPE_F32, q[0].copy, q[0].out, 16, "beside a cancelled request");
	assert_int_equal(moe_cancel(c, q[1].tag), MOE_ENOENT); /* delivered: forgotten */
	assert_int_equal(moe_wait(c, q[1].tag, 0, NULL), MOE_ENOENT);
	dh_req_free(c, &q[0]);
	dh_req_free(c, &q[1]);

	/* the middle one of four; the others run */
	dh_daemon_freeze(d);
	dh_req_submit(c, &q[0], 0, MOE_DTYPE_F32, 5, 43, 0);
	dh_req_submit(c, &q[1], 2, MOE_DTYPE_BF16, 6, 44, 0);
	dh_req_submit(c, &q[2], 2, MOE_DTYPE_F32, 3, 45, 0);
	dh_req_submit(c, &q[3], 0, MOE_DTYPE_F32, 7, 46, 0);
	assert_int_equal(moe_cancel(c, q[1].tag), 0);
	dh_daemon_thaw(d);
	assert_int_equal(req_wait(c, &q[3]), 0);
	assert_int_equal(req_wait(c, &q[1]), MOE_ECANCELED);
	assert_int_equal(req_wait(c, &q[2]), 0);
	assert_int_equal(req_wait(c, &q[0]), 0);
	check_output(0, MOE_DTYPE_F32, q[0].copy, q[0].out, 5, "before the cancelled one");
	check_output(2, MOE_DTYPE_F32, q[2].copy, q[2].out, 3, "after the cancelled one");
	check_output(0, MOE_DTYPE_F32, q[3].copy, q[3].out, 7, "after the cancelled one");
	/* cancelling what has finished: harmless, and it is still delivered */
	for (int i = 0; i < 4; i++)
		dh_req_free(c, &q[i]);
	dh_req_submit(c, &q[0], 0, MOE_DTYPE_F32, 2, 47, 0);
	{
		int st = 1;

		assert_int_equal(moe_wait(c, q[0].tag, WAIT_MS, &st), 0);
		assert_int_equal(st, 0);
	}
	dh_req_free(c, &q[0]);

	/* unknown tags */
	assert_int_equal(moe_cancel(c, 0), MOE_ENOENT);
	assert_int_equal(moe_cancel(c, 12345), MOE_ENOENT);
	assert_int_equal(moe_cancel(c, UINT64_MAX), MOE_ENOENT);

	j = status(c);
	assert_int_equal(dh_jnum(dh_jget(j, "requests", cJSON_Object), "cancelled"), 2);
	cJSON_Delete(j);
	good_still_works(d, c, "cancels");
	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 5. Shutdown under load                                                   */

#define SHUT_N 16

static void collect_shutdown(moe_client *c, struct req *q, int n, int *counts)
{
	for (int i = 0; i < n; i++) {
		int st = req_wait(c, &q[i]);

		if (st == 0) {
			check_output(q[i].layer, q[i].dt, q[i].copy, q[i].out, q[i].n,
				     "completed during shutdown");
			counts[0]++;
		} else if (st == MOE_ESHUTDOWN) {
			counts[1]++;
		} else if (st == MOE_EDAEMON) {
			counts[2]++;
		} else {
			fail_msg("request %d during shutdown: %s", i, moe_strerror(st));
		}
		dh_req_free(c, &q[i]);
	}
}

static void test_shutdown(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *c1 = cl_open(d), *c2 = cl_open(d);
	static struct req q1[SHUT_N], q2[SHUT_N];
	int counts[3] = {0}, st;
	char in[88 * 4], out[88 * 4];
	moe_completion comp[4];

	(void)state;
	/* live load: two clients, requests in every state when SIGTERM lands */
	for (int i = 0; i < SHUT_N; i++) {
		dh_req_submit(c1, &q1[i], i % 2 ? 2 : 0, MOE_DTYPE_F32, 200 + (uint32_t)i, 500 + i,
			      0);
		dh_req_submit(c2, &q2[i], i % 2 ? 0 : 2, MOE_DTYPE_BF16, 150 + (uint32_t)i, 600 + i,
			      0);
	}
	assert_int_equal(kill(d->pid, SIGTERM), 0);
	collect_shutdown(c1, q1, SHUT_N, counts);
	collect_shutdown(c2, q2, SHUT_N, counts);
	st = dh_daemon_wait_exit(d, EXIT_MS);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		fail_msg("moed exited with wait status 0x%x after SIGTERM under load", st);
	printf("shutdown under load: %d completed, %d ESHUTDOWN, %d EDAEMON\n", counts[0],
	       counts[1], counts[2]);
	/* afterwards every call says the daemon is gone, and nothing hangs */
	memset(in, 0, sizeof(in));
	assert_int_equal(moe_forward(c1, 0, MOE_DTYPE_F32, in, out, 1), MOE_EDAEMON);
	assert_int_equal(moe_ping(c2, NULL), MOE_EDAEMON);
	assert_int_equal(moe_poll(c1, comp, 4), MOE_EDAEMON);
	dh_cl_close(c1);
	dh_cl_close(c2);

	/* Frozen, the daemon gets 8 requests on alternating layers and then
	 * SIGTERM. Thawed, it reads the signal at once (everything answered
	 * MOE_ESHUTDOWN) or, epoll_wait failing with EINTR after SIGCONT, takes
	 * the entries and runs one batch (one layer) first: either way the
	 * other layer's requests are answered MOE_ESHUTDOWN, not run. */
	dh_daemon_start(d);
	c1 = cl_open(d);
	dh_daemon_freeze(d);
	for (int i = 0; i < 8; i++)
		dh_req_submit(c1, &q1[i], i % 2 ? 2 : 0, MOE_DTYPE_F32, 32, 700 + i, 0);
	assert_int_equal(kill(d->pid, SIGTERM), 0);
	dh_daemon_thaw(d);
	memset(counts, 0, sizeof(counts));
	collect_shutdown(c1, q1, 8, counts);
	st = dh_daemon_wait_exit(d, EXIT_MS);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		fail_msg("moed exited with wait status 0x%x after SIGTERM", st);
	printf("shutdown with queued requests: %d completed, %d ESHUTDOWN, %d EDAEMON\n",
	       counts[0], counts[1], counts[2]);
	if (counts[1] < 4)
		fail_msg("queued requests were not answered with MOE_ESHUTDOWN at shutdown");
	dh_cl_close(c1);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 6. A killed daemon, and a new one on the same path                       */

struct waiter {
	moe_client *c;
	uint64_t tag;
	int r, st;
};

static void *wait_thread(void *p)
{
	struct waiter *w = p;

	w->r = moe_wait(w->c, w->tag, WAIT_MS, &w->st);
	return NULL;
}

static void test_killed(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *c1 = cl_open_opts(d, 0, 0, 1), *c2 = cl_open(d);
	struct waiter w = {0};
	pthread_t th;
	struct req q;
	unsigned char *keep;
	char in[88 * 4], out[88 * 4];
	uint64_t tag;
	int st;

	(void)state;
	keep = moe_buf_alloc(c2, 1000);
	assert_non_null(keep);
	for (int i = 0; i < 1000; i++)
		keep[i] = (unsigned char)(i * 7);
	forward_ok(c1, 0, MOE_DTYPE_F32, 4, 51, "before the kill");

	/* c1 waits for a request the daemon will never run */
	dh_daemon_freeze(d);
	dh_req_submit(c1, &q, 0, MOE_DTYPE_F32, 8, 52, 0);
	w.c = c1;
	w.tag = q.tag;
	assert_int_equal(pthread_create(&th, NULL, wait_thread, &w), 0);
	dh_nap_ms(20); /* let it go to sleep in moe_wait (not required) */
	assert_int_equal(kill(d->pid, SIGKILL), 0);
	st = dh_daemon_wait_exit(d, EXIT_MS);
	assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(w.r, 0);
	assert_int_equal(w.st, MOE_EDAEMON);
	dh_req_free(c1, &q);

	/* c2 had not noticed: its next calls fail, without SIGPIPE */
	memset(in, 0, sizeof(in));
	assert_int_equal(moe_forward(c2, 0, MOE_DTYPE_F32, in, out, 1), MOE_EDAEMON);
	assert_int_equal(moe_ping(c2, NULL), MOE_EDAEMON);
	assert_int_equal(moe_submit(c2, 0, MOE_DTYPE_F32, keep, keep, 1, 0, &tag), MOE_EDAEMON);
	assert_int_equal(moe_reconnect(c2), MOE_EDAEMON); /* nobody there yet */

	/* a new daemon on the same path (the old socket file is stale) */
	dh_daemon_start(d);
	forward_ok(c1, 2, MOE_DTYPE_BF16, 6, 53, "auto_reconnect after a restart");
	assert_int_equal(moe_reconnect(c2), 0);
	assert_int_equal(moe_reconnect(c2), 0); /* alive: a no-op */
	for (int i = 0; i < 1000; i++)
		if (keep[i] != (unsigned char)(i * 7))
			fail_msg("buffer byte %d changed across the reconnection", i);
	forward_ok(c2, 0, MOE_DTYPE_F32, 9, 54, "moe_reconnect after a restart");
	assert_int_equal(moe_ping(c2, NULL), 0);
	moe_buf_free(c2, keep);
	dh_cl_close(c1);
	dh_cl_close(c2);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 7. Hostile clients                                                       */

#define GOOD_REGION (4u << 20)

static void test_hostile_handshake(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, "server:\n  max_client_shm_bytes: 16M\n");
	moe_client *good = cl_open_opts(d, GOOD_REGION, 0, 0);
	const uint64_t MB = 1 << 20;
	int fds0, maps0, fd, s, st, pfd[2], many[12];
	char *path, junk[200];
	struct raw *r;
	struct moe_msg_hello h;

	(void)state;
	good_still_works(d, good, "connecting");
	fds0 = dh_count_fds(d->pid);
	maps0 = count_memfd_maps(d->pid);

	/* unsealed, or not sealed enough */
	hello_refused(d, make_memfd(MB, 0, 16), 16, MB, "unsealed memfd");
	good_still_works(d, good, "an unsealed memfd");
	hello_refused(d, make_memfd(MB, F_SEAL_SHRINK | F_SEAL_SEAL, 16), 16, MB,
		      "memfd not sealed against growing");
	hello_refused(d, make_memfd(MB, F_SEAL_SHRINK | F_SEAL_GROW, 16), 16, MB,
		      "memfd open to more seals");
	good_still_works(d, good, "partly sealed memfds");
	/* write-sealed: the daemon cannot map it writable */
	hello_refused(d, make_memfd(MB, SEALS | F_SEAL_WRITE, 16), 16, MB, "write-sealed memfd");
	/* lying sizes */
	hello_refused(d, make_memfd(MB, SEALS, 16), 16, 2 * MB, "memfd smaller than claimed");
	hello_refused(d, make_memfd(2 * MB, SEALS, 16), 16, MB, "memfd larger than claimed");
	st = hello_refused(d, make_memfd(32 * MB, SEALS, 16), 16, 32 * MB,
			   "region over max_client_shm_bytes");
	assert_int_equal(st, MOE_ELIMIT);
	hello_refused(d, make_memfd(32 * 1024, SEALS, 1), 1, 32 * 1024, "region under 64 KiB");
	good_still_works(d, good, "lying sizes");
	/* not a memfd at all */
	path = tu_write_file(d->dir, "region", "", 0);
	fd = open(path, O_RDWR | O_CLOEXEC);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)MB), 0);
	{
		struct moe_shm_hdr hh = {.magic = MOE_SHM_MAGIC, .version = MOE_SHM_VERSION,
					 .sq_entries = 16, .cq_entries = 16, .region_bytes = MB};

		assert_true(pwrite(fd, &hh, sizeof(hh), 0) == (ssize_t)sizeof(hh));
	}
	hello_refused(d, fd, 16, MB, "a regular file");
	free(path);
	assert_int_equal(pipe2(pfd, O_CLOEXEC), 0);
	close(pfd[1]);
	hello_refused(d, pfd[0], 16, MB, "a pipe");
	hello_refused(d, raw_connect(d), 16, MB, "a socket");
	good_still_works(d, good, "fds that are not memfds");
	/* a region whose header disagrees with the HELLO */
	fd = make_memfd(MB, 0, 16);
	{
		uint32_t bad = 0xdeadbeef;

		assert_int_equal(pwrite(fd, &bad, 4, 0), 4);
		assert_int_equal(fcntl(fd, F_ADD_SEALS, SEALS), 0);
	}
	hello_refused(d, fd, 16, MB, "region header with a bad magic");
	hello_refused(d, make_memfd(MB, SEALS, 32), 16, MB, "ring sizes unlike the header's");
	hello_refused(d, make_memfd(MB, SEALS, 16), 12, MB, "ring size not a power of two");
	hello_refused(d, make_memfd(MB, SEALS, 16), 8192, MB, "ring size over MOE_RING_MAX");
	/* HELLO without an fd, with two, with too many to receive */
	st = hello_refused(d, -1, 16, MB, "HELLO without an fd");
	s = raw_connect(d);
	fill_hello(&h, 16, MB);
	many[0] = make_memfd(MB, SEALS, 16);
	many[1] = make_memfd(MB, SEALS, 16);
	assert_int_equal(raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), many, 2), 0);
	close(many[0]);
	close(many[1]);
	expect_refused(s, "HELLO with two fds");
	s = raw_connect(d);
	for (int i = 0; i < 12; i++)
		many[i] = make_memfd(MB, SEALS, 16);
	assert_int_equal(raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), many, 12), 0);
	for (int i = 0; i < 12; i++)
		close(many[i]);
	expect_refused(s, "HELLO with twelve fds");
	good_still_works(d, good, "HELLOs with the wrong number of fds");

	/* malformed messages */
	for (size_t i = 0; i < sizeof(junk); i++)
		junk[i] = (char)(i * 37 + 11);
	s = raw_connect(d);
	assert_int_equal(raw_sendmsg(s, junk, sizeof(junk), NULL, 0), 0);
	expect_refused(s, "garbage bytes");
	{
		struct moe_msg_hdr bad = {0x12345678, MOE_PROTO_VERSION, MOE_MSG_HELLO, 0, 0};
		char b[sizeof(bad) + sizeof(h)];

		/* wrong magic, right length */
		bad.len = sizeof(h);
		memcpy(b, &bad, sizeof(bad));
		memcpy(b + sizeof(bad), &h, sizeof(h));
		s = raw_connect(d);
		fd = make_memfd(MB, SEALS, 16);
		assert_int_equal(raw_sendmsg(s, b, sizeof(b), &fd, 1), 0);
		close(fd);
		expect_refused(s, "wrong magic");
		/* wrong version */
		bad.magic = MOE_PROTO_MAGIC;
		bad.version = 99;
		memcpy(b, &bad, sizeof(bad));
		s = raw_connect(d);
		assert_int_equal(raw_sendmsg(s, b, sizeof(b), NULL, 0), 0);
		expect_refused(s, "wrong version");
		/* truncated: the header claims more payload than came */
		bad.version = MOE_PROTO_VERSION;
		memcpy(b, &bad, sizeof(bad));
		s = raw_connect(d);
		fd = make_memfd(MB, SEALS, 16);
		assert_int_equal(raw_sendmsg(s, b, sizeof(bad) + 10, &fd, 1), 0);
		close(fd);
		expect_refused(s, "truncated HELLO");
		/* a header alone */
		s = raw_connect(d);
		assert_int_equal(raw_sendmsg(s, b, sizeof(bad) - 3, NULL, 0), 0);
		expect_refused(s, "truncated header");
		/* a HELLO with trailing bytes (len covers them) */
		{
			char big[sizeof(bad) + sizeof(h) + 16];

			memset(big, 0, sizeof(big));
			bad.len = sizeof(h) + 16;
			memcpy(big, &bad, sizeof(bad));
			memcpy(big + sizeof(bad), &h, sizeof(h));
			s = raw_connect(d);
			fd = make_memfd(MB, SEALS, 16);
			assert_int_equal(raw_sendmsg(s, big, sizeof(big), &fd, 1), 0);
			close(fd);
			expect_refused(s, "HELLO with a payload too long");
		}
	}
	{
		/* a datagram larger than MOE_MSG_MAX */
		size_t n = 3 * MOE_MSG_MAX;
		char *b = calloc(1, n);
		struct moe_msg_hdr hh = {MOE_PROTO_MAGIC, MOE_PROTO_VERSION, MOE_MSG_HELLO,
					 (uint32_t)(n - sizeof(hh)), 0};

		assert_non_null(b);
		memcpy(b, &hh, sizeof(hh));
		s = raw_connect(d);
		assert_int_equal(raw_sendmsg(s, b, n, NULL, 0), 0);
		free(b);
		expect_refused(s, "oversized datagram");
	}
	/* the right messages at the wrong time */
	s = raw_connect(d);
	assert_int_equal(raw_send(s, MOE_MSG_DOORBELL, NULL, 0, NULL, 0), 0);
	expect_refused(s, "DOORBELL before HELLO");
	s = raw_connect(d);
	assert_int_equal(raw_send(s, MOE_MSG_STATUS, NULL, 0, NULL, 0), 0);
	expect_refused(s, "STATUS before HELLO");
	s = raw_connect(d);
	assert_int_equal(raw_send(s, MOE_MSG_HELLO_REPLY, junk, 64, NULL, 0), 0);
	expect_refused(s, "a daemon's message from a client");
	s = raw_connect(d);
	assert_int_equal(raw_sendmsg(s, junk, 0, NULL, 0), 0); /* an empty datagram */
	assert_true(dh_raw_hangup(s, READY_MS, NULL));
	close(s);
	s = raw_connect(d);
	close(s); /* connects and leaves at once */
	good_still_works(d, good, "malformed messages");

	/* attached clients that then misbehave on the socket */
	r = raw_attach(d, MB, 16);
	raw_forward_ok(r, 0, MOE_DTYPE_F32, 2, 61);
	fd = make_memfd(MB, SEALS, 16);
	fill_hello(&h, 16, MB);
	assert_int_equal(raw_send(r->sock, MOE_MSG_HELLO, &h, sizeof(h), &fd, 1), 0);
	close(fd);
	assert_true(dh_raw_hangup(r->sock, READY_MS, &st));
	assert_true(st < 0);
	raw_close(r);
	good_still_works(d, good, "a second HELLO");
	r = raw_attach(d, MB, 16);
	assert_int_equal(raw_sendmsg(r->sock, junk, 50, NULL, 0), 0);
	assert_true(dh_raw_hangup(r->sock, READY_MS, &st));
	assert_true(st < 0);
	raw_close(r);
	r = raw_attach(d, MB, 16);
	{
		struct moe_msg_cancel m = {1};

		/* CANCEL with a short payload, STATUS with one */
		assert_int_equal(raw_send(r->sock, MOE_MSG_CANCEL, &m, 4, NULL, 0), 0);
		assert_true(dh_raw_hangup(r->sock, READY_MS, NULL));
		raw_close(r);
		r = raw_attach(d, MB, 16);
		assert_int_equal(raw_send(r->sock, MOE_MSG_STATUS, &m, sizeof(m), NULL, 0), 0);
		assert_true(dh_raw_hangup(r->sock, READY_MS, NULL));
		raw_close(r);
		/* a DOORBELL carrying an fd: the fd must not leak */
		r = raw_attach(d, MB, 16);
		fd = make_memfd(MB, SEALS, 16);
		assert_int_equal(raw_send(r->sock, MOE_MSG_DOORBELL, NULL, 0, &fd, 1), 0);
		close(fd);
		raw_forward_ok(r, 2, MOE_DTYPE_F32, 1, 62);
		raw_close(r);
	}
	good_still_works(d, good, "attached clients that break the protocol");

	/* nothing leaked: the daemon holds the same fds and regions as before
	 * (dropped clients are gone once we saw them hang up; the last one
	 * closed its own end, so wait for the daemon to notice) */
	{
		uint64_t deadline = dh_now_ms() + READY_MS;

		while ((dh_count_fds(d->pid) != fds0 || count_memfd_maps(d->pid) != maps0) &&
		       dh_now_ms() < deadline)
			dh_nap_ms(5);
		if (dh_count_fds(d->pid) != fds0)
			fail_msg("moed holds %d fds, %d before the hostile clients",
				 dh_count_fds(d->pid), fds0);
		if (count_memfd_maps(d->pid) != maps0)
			fail_msg("moed maps %d memfds, %d before the hostile clients",
				 count_memfd_maps(d->pid), maps0);
	}
	dh_cl_close(good);
	dh_daemon_stop(d);
	g_passed = true;
}

static void test_hostile_rings(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *good = cl_open_opts(d, GOOD_REGION, 0, 0);
	const uint64_t MB = 1 << 20;
	struct moe_cqe cq[128];
	struct moe_sqe nop = {.flags = MOE_SQE_NOP};
	struct raw *r;
	int st;
	uint32_t head;

	(void)state;
	/* a submission tail far past the head */
	r = raw_attach(d, MB, 16);
	raw_forward_ok(r, 0, MOE_DTYPE_F32, 1, 71);
	atomic_store(&r->hdr->sq_tail, r->sq_tail + 100000);
	raw_doorbell(r);
	assert_true(dh_raw_hangup(r->sock, READY_MS, &st));
	assert_int_equal(st, MOE_EPROTO);
	raw_close(r);
	good_still_works(d, good, "a corrupt sq_tail");
	/* a tail behind the head (wraps to a huge count) */
	r = raw_attach(d, MB, 16);
	raw_forward_ok(r, 0, MOE_DTYPE_F32, 1, 72);
	atomic_store(&r->hdr->sq_tail, r->sq_tail - 1);
	raw_doorbell(r);
	assert_true(dh_raw_hangup(r->sock, READY_MS, NULL));
	raw_close(r);
	good_still_works(d, good, "an sq_tail behind the head");
	/* a completion head past the tail */
	r = raw_attach(d, MB, 16);
	raw_forward_ok(r, 2, MOE_DTYPE_F32, 1, 73);
	atomic_store(&r->hdr->cq_head, r->cq_head + 100000);
	nop.tag = 1;
	raw_push(r, &nop);
	raw_doorbell(r);
	assert_true(dh_raw_hangup(r->sock, READY_MS, NULL));
	raw_close(r);
	good_still_works(d, good, "a corrupt cq_head");
	/* sq_head written by the client (it is the daemon's): ignored */
	r = raw_attach(d, MB, 16);
	atomic_store(&r->hdr->sq_head, 12345);
	nop.tag = 2;
	r->sq[0] = nop;
	r->sq_tail = 1;
	atomic_store(&r->hdr->sq_tail, 1);
	raw_doorbell(r);
	raw_wait(r, cq, 1, false);
	assert_int_equal(cq[0].tag, 2);
	assert_int_equal(cq[0].status, 0);
	assert_int_equal(atomic_load(&r->hdr->sq_head), 1);
	raw_close(r);

	/* a client that never reads its socket: 8192 NOPs make the daemon
	 * try to send far more doorbells than the socket holds; it must not
	 * block on them */
	r = raw_attach(d, MB, 64);
	for (int round = 0; round < 128; round++) {
		for (int i = 0; i < 64; i++) {
			nop.tag = (uint64_t)round * 64 + (uint64_t)i;
			raw_push(r, &nop);
		}
		raw_doorbell(r);
		raw_wait(r, cq, 64, true);
		for (int i = 0; i < 64; i++) {
			assert_int_equal(cq[i].tag, (uint64_t)round * 64 + (uint64_t)i);
			assert_int_equal(cq[i].status, 0);
		}
		if (round % 32 == 0)
			good_still_works(d, good, "a client that does not read its socket");
	}
	raw_drain(r);
	raw_forward_ok(r, 0, MOE_DTYPE_BF16, 5, 74);
	raw_close(r);

	/* a client that does not collect its completions: once its completion
	 * ring is full the daemon must stop taking its entries (backpressure),
	 * not queue completions without bound */
	r = raw_attach(d, MB, 64);
	for (int i = 0; i < 64; i++) {
		nop.tag = 5000 + (uint64_t)i;
		raw_push(r, &nop);
	}
	raw_doorbell(r);
	{
		uint64_t deadline = dh_now_ms() + READY_MS;

		while (atomic_load(&r->hdr->cq_tail) != 64 && dh_now_ms() < deadline)
			dh_nap_ms(1);
		assert_int_equal(atomic_load(&r->hdr->cq_tail), 64);
	}
	for (int i = 0; i < 64; i++) {
		nop.tag = 6000 + (uint64_t)i;
		raw_push(r, &nop);
	}
	raw_doorbell(r);
	/* two full round trips of another client: the daemon has looked at
	 * this ring since */
	good_still_works(d, good, "a full completion ring");
	head = atomic_load(&r->hdr->sq_head);
	printf("completion ring full: the daemon took %u of 128 entries\n", head);
	/* it may have taken some into its own queue, but not all */
	if (head >= 128)
		fail_msg("the daemon took every entry of a client whose completion ring is "
			 "full: its completion backlog grows without bound");
	/* collecting the completions lets everything through, in order */
	raw_wait(r, cq, 128, false);
	for (int i = 0; i < 128; i++) {
		assert_int_equal(cq[i].tag, (uint64_t)(i < 64 ? 5000 + i : 6000 + i - 64));
		assert_int_equal(cq[i].status, 0);
	}
	raw_forward_ok(r, 2, MOE_DTYPE_F32, 3, 75);
	raw_close(r);
	good_still_works(d, good, "hostile rings");
	dh_cl_close(good);
	dh_daemon_stop(d);
	g_passed = true;
}

static void test_hostile_dying(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *good = cl_open_opts(d, GOOD_REGION, 0, 0), *c;
	const uint64_t MB = 1 << 20;
	struct req q[8];
	struct raw *r;
	int fds0;

	(void)state;
	good_still_works(d, good, "connecting");
	fds0 = dh_count_fds(d->pid);
	/* a raw client that leaves with requests queued, its region unmapped */
	for (int k = 0; k < 3; k++) {
		size_t bytes = (size_t)512 * g_H * 4;

		r = raw_attach(d, 8 * MB, 16);
		if (k == 0)
			dh_daemon_freeze(d);
		for (int i = 0; i < 8; i++) {
			struct moe_sqe q1 = sqe((uint64_t)i, i % 2 ? 2 : 0, 512,
						(uint64_t)i * bytes, (uint64_t)i * bytes, 0);

			raw_push(r, &q1);
		}
		raw_doorbell(r);
		raw_close(r); /* socket closed, nothing read, region unmapped */
		if (k == 0)
			dh_daemon_thaw(d);
		good_still_works(d, good, "a client that died mid-request");
	}
	/* library clients that disconnect with requests outstanding */
	for (int k = 0; k < 2; k++) {
		c = cl_open(d);
		if (k == 0)
			dh_daemon_freeze(d);
		for (int i = 0; i < 8; i++)
			dh_req_submit(c, &q[i], i % 2 ? 0 : 2, MOE_DTYPE_F32, 300, 80 + (uint64_t)i,
				      0);
		for (int i = 0; i < 8; i++)
			free(q[i].copy);
		dh_cl_close(c);
		if (k == 0)
			dh_daemon_thaw(d);
		good_still_works(d, good, "a library client that left mid-request");
	}
	/* a child process killed mid-request */
	{
		int pfd[2], st;
		pid_t pid;
		char b;

		assert_int_equal(pipe(pfd), 0);
		fflush(stdout);
		pid = fork();
		assert_true(pid >= 0);
		if (pid == 0) {
			moe_client *cc;
			void *in, *out;
			uint64_t tag;

			close(pfd[0]);
			if (moe_connect(d->sock, &cc))
				_exit(2);
			in = moe_buf_alloc(cc, (size_t)1024 * 88 * 4);
			out = moe_buf_alloc(cc, (size_t)1024 * 88 * 4);
			if (!in || !out)
				_exit(3);
			memset(in, 0x3f, (size_t)1024 * 88 * 4);
			for (int i = 0; i < 16; i++)
				if (moe_submit(cc, i % 2 ? 0 : 2, MOE_DTYPE_F32, in, out, 1024, 0, &tag))
					_exit(4);
			if (write(pfd[1], "x", 1) != 1)
				_exit(5);
			for (;;)
				pause();
		}
		close(pfd[1]);
		assert_int_equal(read(pfd[0], &b, 1), 1);
		close(pfd[0]);
		kill(pid, SIGKILL);
		assert_int_equal(waitpid(pid, &st, 0), pid);
		assert_true(WIFSIGNALED(st));
		good_still_works(d, good, "a client process killed mid-request");
	}
	{
		uint64_t deadline = dh_now_ms() + READY_MS;
		cJSON *j;

		while (dh_count_fds(d->pid) != fds0 && dh_now_ms() < deadline)
			dh_nap_ms(5);
		assert_int_equal(dh_count_fds(d->pid), fds0);
		j = status(good);
		assert_int_equal(cJSON_GetArraySize(dh_jget(j, "clients", cJSON_Array)), 1);
		assert_int_equal(dh_jnum(dh_jget(j, "queue", cJSON_Object), "pending_requests"), 0);
		assert_int_equal(dh_jnum(dh_jget(j, "queue", cJSON_Object), "pending_tokens"), 0);
		cJSON_Delete(j);
	}
	dh_cl_close(good);
	dh_daemon_stop(d);
	g_passed = true;
}

/* A client flooding doorbells with blocking sends, never reading. */
struct flood {
	int sock;
	long sent, failed;
	int err;
};

static void *flood_thread(void *arg)
{
	struct flood *f = arg;
	char buf[MOE_MSG_MAX];
	size_t n = moe_msg_encode(buf, MOE_MSG_DOORBELL, 1, NULL, 0);

	for (int i = 0; i < 100000; i++) {
		if (send(f->sock, buf, n, MSG_NOSIGNAL) == (ssize_t)n) {
			f->sent++;
		} else {
			f->failed++;
			f->err = errno;
			if (errno != EAGAIN && errno != EINTR)
				break; /* dropped by the daemon */
		}
	}
	return NULL;
}

/* Rewrites the fields of every submission entry but the tag, as fast as it
 * can, while the daemon may be copying them. */
struct hammer {
	struct raw *r;
	atomic_int stop;
	uint64_t writes;
};

static void *hammer_thread(void *arg)
{
	struct hammer *h = arg;
	struct raw *r = h->r;
	uint64_t x = 0x243f6a8885a308d3ull;
	uint64_t area = r->data_bytes;

	while (!atomic_load_explicit(&h->stop, memory_order_relaxed)) {
		for (uint32_t i = 0; i < r->entries; i++) {
			struct moe_sqe *q = &r->sq[i];
			static const uint32_t layers[] = {0, 2, 1, 7, 0xffffffffu};

			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			__atomic_store_n(&q->layer, layers[x % 5], __ATOMIC_RELAXED);
			__atomic_store_n(&q->n_tokens, (uint32_t)(x >> 8) % 80, __ATOMIC_RELAXED);
			__atomic_store_n(&q->in_off, (x >> 16) % (area + 4096), __ATOMIC_RELAXED);
			__atomic_store_n(&q->out_off, (x >> 24) % (area + 4096), __ATOMIC_RELAXED);
			__atomic_store_n(&q->dtype, (uint16_t)((x >> 32) % 4), __ATOMIC_RELAXED);
			__atomic_store_n(&q->flags, (uint16_t)((x >> 40) % 8 == 0 ? 0xffff
							: (x >> 40) % 8 == 1 ? MOE_SQE_NOP : 0),
					 __ATOMIC_RELAXED);
			__atomic_store_n(&q->timeout_ms, (uint32_t)((x >> 48) % 3), __ATOMIC_RELAXED);
			h->writes++;
		}
	}
	return NULL;
}

static void test_hostile_more(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, NULL);
	moe_client *good = cl_open_opts(d, GOOD_REGION, 0, 0);
	const uint64_t MB = 1 << 20;
	int fds0, maps0;
	struct raw *r;

	(void)state;
	signal(SIGPIPE, SIG_IGN);
	good_still_works(d, good, "connecting");
	fds0 = dh_count_fds(d->pid);
	maps0 = count_memfd_maps(d->pid);

	/* a sealed, sparse 2 TiB memfd: refused by max_client_shm_bytes
	 * before anything is mapped or touched */
	{
		uint64_t big = 2ull << 40;
		long rss0 = dh_rss_kib(d->pid), rss1;
		int st, fd = make_memfd(big, SEALS, 16);

		st = hello_refused(d, fd, 16, big, "a sparse 2 TiB memfd");
		assert_int_equal(st, MOE_ELIMIT);
		/* and one whose HELLO claims a small size */
		hello_refused(d, make_memfd(big, SEALS, 16), 16, MB, "2 TiB claimed as 1 MiB");
		good_still_works(d, good, "a 2 TiB memfd");
		rss1 = dh_rss_kib(d->pid);
		printf("2 TiB memfd: refused (%s); moed RSS %ld -> %ld KiB\n", moe_strerror(st),
		       rss0, rss1);
		if (rss1 > rss0 + 64 * 1024)
			fail_msg("moed's RSS grew from %ld to %ld KiB", rss0, rss1);
	}

	/* a client that makes its socket blocking and floods 100k DOORBELLs,
	 * never reading: others are served meanwhile */
	{
		struct flood f = {0};
		struct timeval tv = {10, 0};
		struct moe_sqe nop = {.flags = MOE_SQE_NOP};
		pthread_t th;
		struct moe_cqe cq[16];

		r = raw_attach(d, MB, 16);
		f.sock = r->sock;
		assert_int_equal(fcntl(r->sock, F_SETFL, fcntl(r->sock, F_GETFL) & ~O_NONBLOCK), 0);
		/* a blocked send gives up after 10 s rather than hang the test */
		assert_int_equal(setsockopt(r->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)), 0);
		/* completions (and so doorbells back) it will not read either */
		for (int i = 0; i < 16; i++) {
			nop.tag = 900 + (uint64_t)i;
			raw_push(r, &nop);
		}
		assert_int_equal(pthread_create(&th, NULL, flood_thread, &f), 0);
		for (int i = 0; i < 5; i++)
			good_still_works(d, good, "a doorbell flood");
		assert_int_equal(pthread_join(th, NULL), 0);
		printf("doorbell flood: %ld sent, %ld failed (%s)\n", f.sent, f.failed,
		       f.failed ? strerror(f.err) : "-");
		assert_int_equal(f.sent, 100000);
		raw_wait(r, cq, 16, false);
		for (int i = 0; i < 16; i++) {
			assert_int_equal(cq[i].tag, 900 + (uint64_t)i);
			assert_int_equal(cq[i].status, 0);
		}
		raw_forward_ok(r, 0, MOE_DTYPE_F32, 3, 401);
		raw_close(r);
		good_still_works(d, good, "a doorbell flood");
	}

	/* offsets that are not a multiple of the element size: refused, never
	 * accessed misaligned (UBSan would abort a sanitized moed) */
	{
		struct moe_cqe cq[4];
		struct moe_sqe q[4] = {
			sqe(700, 0, 2, 1, 4096, MOE_WIRE_BF16),
			sqe(701, 2, 2, 0, 4097, MOE_WIRE_F16),
			sqe(702, 0, 1, 2, 4096, MOE_WIRE_F32),
			sqe(703, 2, 1, 0, 4098, MOE_WIRE_F32),
		};

		r = raw_attach(d, MB, 16);
		for (int i = 0; i < 4; i++)
			raw_push(r, &q[i]);
		raw_doorbell(r);
		raw_wait(r, cq, 4, false);
		for (int i = 0; i < 4; i++) {
			assert_int_equal(cq[i].tag, 700 + (uint64_t)i);
			if (cq[i].status != MOE_EINVAL && cq[i].status != MOE_ERANGE)
				fail_msg("a misaligned buffer offset: status %d (%s)", cq[i].status,
					 moe_strerror(cq[i].status));
		}
		raw_forward_ok(r, 0, MOE_DTYPE_BF16, 3, 400);
		raw_close(r);
		good_still_works(d, good, "misaligned buffer offsets");
	}

	/* a client rewriting its entries while the daemon reads them: each is
	 * answered once, with 0 or an error code */
	{
		struct hammer h = {0};
		pthread_t th;
		struct moe_cqe cq[64];
		const int rounds = 50, per = 32;
		int ok = 0, errs = 0;
		uint8_t *seen = calloc((size_t)rounds * per, 1);

		assert_non_null(seen);
		r = raw_attach(d, MB, 64);
		h.r = r;
		assert_int_equal(pthread_create(&th, NULL, hammer_thread, &h), 0);
		for (int round = 0; round < rounds; round++) {
			for (int i = 0; i < per; i++) {
				struct moe_sqe q = sqe(10000 + (uint64_t)(round * per + i),
						       i % 2 ? 2 : 0, 1 + (uint32_t)i % 8, 0,
						       64 * 1024, 0);

				raw_push(r, &q);
			}
			raw_doorbell(r);
			raw_wait(r, cq, (uint32_t)per, false);
			for (int i = 0; i < per; i++) {
				uint64_t k = cq[i].tag - 10000;

				if (k >= (uint64_t)rounds * per || seen[k])
					fail_msg("completion with tag %llu: unknown or twice",
						 (unsigned long long)cq[i].tag);
				seen[k] = 1;
				if (cq[i].status == 0)
					ok++;
				else if (cq[i].status < 0 && cq[i].status >= MOE_EDEVICE)
					errs++;
				else
					fail_msg("completion status %d is not a MOE_E* code",
						 cq[i].status);
			}
			if (round % 10 == 0)
				good_still_works(d, good, "entries rewritten under the daemon");
		}
		atomic_store(&h.stop, 1);
		assert_int_equal(pthread_join(th, NULL), 0);
		printf("rewritten entries: %d answered 0, %d an error (%llu rewrites)\n", ok, errs,
		       (unsigned long long)h.writes);
		free(seen);
		raw_close(r);
		good_still_works(d, good, "entries rewritten under the daemon");
	}

	/* a DOORBELL carrying fds that are not memfds: a pipe, an eventfd-like
	 * pipe end, a socket: closed, the client kept or dropped */
	{
		int pfd[2], sv[2], fds[3], n = 0;
		ssize_t w = 0;
		uint64_t deadline;
		bool kept;

		assert_int_equal(pipe2(pfd, O_CLOEXEC | O_NONBLOCK), 0);
		assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
		r = raw_attach(d, MB, 16);
		fds[0] = pfd[0];
		fds[1] = pfd[1];
		fds[2] = sv[0];
		assert_int_equal(raw_send(r->sock, MOE_MSG_DOORBELL, NULL, 0, fds, 1), 0);
		assert_int_equal(raw_send(r->sock, MOE_MSG_DOORBELL, NULL, 0, fds + 1, 2), 0);
		close(pfd[0]);
		close(sv[0]);
		/* the daemon closed its copies: the pipe's read end and the
		 * socket's other end are gone once it has */
		deadline = dh_now_ms() + READY_MS;
		for (;;) {
			char b = 'x';
			int e1, e2;

			w = write(pfd[1], &b, 1);
			e1 = errno;
			n = (int)send(sv[1], &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
			e2 = errno;
			if (w < 0 && e1 == EPIPE && n < 0 && e2 == EPIPE)
				break;
			if (dh_now_ms() > deadline)
				fail_msg("moed kept fds passed with a DOORBELL (pipe write %zd, "
					 "socket send %d)", w, n);
			dh_nap_ms(2);
		}
		close(pfd[1]);
		close(sv[1]);
		{
			char buf[MOE_MSG_MAX];
			ssize_t k;

			/* kept (doorbells ignored) or dropped; never anything else */
			kept = true;
			while ((k = dh_raw_recv(r->sock, buf, sizeof(buf), 50)) > 0)
				;
			if (k == 0)
				kept = false;
		}
		printf("DOORBELL with a pipe and a socket: fds closed, client %s\n",
		       kept ? "kept" : "dropped");
		if (kept)
			raw_forward_ok(r, 2, MOE_DTYPE_BF16, 2, 402);
		raw_close(r);
		good_still_works(d, good, "DOORBELLs with the wrong fds");
	}

	{
		uint64_t deadline = dh_now_ms() + READY_MS;

		while ((dh_count_fds(d->pid) != fds0 || count_memfd_maps(d->pid) != maps0) &&
		       dh_now_ms() < deadline)
			dh_nap_ms(5);
		if (dh_count_fds(d->pid) != fds0)
			fail_msg("moed holds %d fds, %d before", dh_count_fds(d->pid), fds0);
		if (count_memfd_maps(d->pid) != maps0)
			fail_msg("moed maps %d memfds, %d before", count_memfd_maps(d->pid), maps0);
	}
	dh_cl_close(good);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 8. Limits                                                                */

static void test_limits(void **state)
{
	struct daemon *d = daemon_run(FIXTURE, "server:\n"
					       "  max_clients: 2\n"
					       "  max_client_shm_bytes: 8M\n"
					       "  max_inflight_requests: 4\n"
					       "  max_inflight_tokens: 100\n");
	moe_client *c1, *c2, *c3 = NULL;
	moe_model_info mi;
	int n_other = 0;
	moe_connect_options o = {.region_bytes = 16u << 20};
	char eb[256] = "";
	struct req q[6];
	struct raw *r;
	struct moe_msg_hello h;
	int rc, s, st, fd;
	cJSON *j;

	(void)state;
	c1 = cl_open_opts(d, 4u << 20, 0, 0);
	assert_int_equal(moe_get_model_info(c1, &mi), 0);
	assert_int_equal(mi.max_inflight_requests, 4);
	assert_int_equal(mi.max_inflight_tokens, 100);
	{
		/* more tokens than may ever be in flight: refused up front */
		char *in = dh_make_input(MOE_DTYPE_F32, 101, 90), *out = malloc(101 * 88 * 4);

		assert_non_null(out);
		rc = moe_forward(c1, 0, MOE_DTYPE_F32, in, out, 101);
		assert_true(rc == MOE_E2BIG || rc == MOE_EBUSY);
		free(in);
		free(out);
	}

	/* a region over max_client_shm_bytes */
	o.errbuf = eb;
	o.errbuf_len = sizeof(eb);
	rc = moe_connect_opts(d->sock, &o, &c3);
	assert_int_equal(rc, MOE_ELIMIT);
	assert_null(c3);
	printf("16 MiB region: %s (%s)\n", moe_strerror(rc), eb);

	/* a third client */
	c2 = cl_open_opts(d, 4u << 20, 0, 0);
	{
		int n_limit = 0, resets = 0;

		for (int i = 0; i < 5; i++) {
			moe_connect_options o3 = {.errbuf = eb, .errbuf_len = sizeof(eb)};

			eb[0] = '\0';
			rc = moe_connect_opts(d->sock, &o3, &c3);
			assert_null(c3);
			assert_true(rc < 0);
			if (rc == MOE_ELIMIT) {
				n_limit++;
			} else {
				n_other++;
				printf("third client: %s (%s)\n", moe_strerror(rc), eb);
			}
		}
		/* by hand, without a word from us first */
		s = raw_connect(d);
		assert_true(dh_raw_hangup(s, READY_MS, &st));
		close(s);
		assert_int_equal(st, MOE_ELIMIT);
		/* by hand, with a HELLO: the daemon may have closed already
		 * (EPIPE), or close with our HELLO unread (the first recv
		 * reports ECONNRESET); either way its ERROR is still there to
		 * read */
		g_resets = &resets;
		fill_hello(&h, 16, 1 << 20);
		fd = make_memfd(1 << 20, SEALS, 16);
		s = raw_connect(d);
		rc = raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), &fd, 1);
		assert_true(rc == 0 || rc == -EPIPE);
		close(fd);
		assert_true(dh_raw_hangup(s, READY_MS, &st));
		close(s);
		g_resets = NULL;
		assert_int_equal(st, MOE_ELIMIT);
		printf("third client: MOE_ELIMIT %d of 5 times; by hand with a HELLO: send %s, "
		       "%d ECONNRESET before the ERROR\n", n_limit, rc ? "EPIPE" : "ok", resets);
	}
	forward_ok(c1, 0, MOE_DTYPE_F32, 11, 91, "first client while a third is refused");
	forward_ok(c2, 2, MOE_DTYPE_BF16, 12, 92, "second client while a third is refused");
	j = status(c1);
	assert_true(dh_jnum(dh_jget(j, "requests", cJSON_Object), "refused_clients") >= 2);
	assert_int_equal(cJSON_GetArraySize(dh_jget(j, "clients", cJSON_Array)), 2);
	cJSON_Delete(j);

	/* max_inflight_requests: the library stops at 4 */
	dh_daemon_freeze(d);
	for (int i = 0; i < 4; i++)
		dh_req_submit(c1, &q[i], 0, MOE_DTYPE_F32, 3, 93 + (uint64_t)i, 0);
	{
		void *b = moe_buf_alloc(c1, 88 * 4);
		uint64_t tag;

		assert_non_null(b);
		assert_int_equal(moe_submit(c1, 0, MOE_DTYPE_F32, b, b, 1, 0, &tag), MOE_EBUSY);
		moe_buf_free(c1, b);
	}
	dh_daemon_thaw(d);
	for (int i = 0; i < 4; i++) {
		assert_int_equal(req_wait(c1, &q[i]), 0);
		check_output(0, MOE_DTYPE_F32, q[i].copy, q[i].out, 3, "at the in-flight limit");
		dh_req_free(c1, &q[i]);
	}

	/* once one leaves, a new one gets in (when the daemon has noticed) */
	dh_cl_close(c2);
	{
		uint64_t deadline = dh_now_ms() + READY_MS;

		r = NULL;
		while (!r) {
			j = status(c1);
			if (cJSON_GetArraySize(dh_jget(j, "clients", cJSON_Array)) == 1)
				r = raw_attach(d, 1 << 20, 16);
			cJSON_Delete(j);
			if (!r && dh_now_ms() > deadline)
				fail_msg("no room for a client after one left");
			if (!r)
				dh_nap_ms(5);
		}
	}
	/* a raw client ignoring max_inflight_requests and max_inflight_tokens:
	 * the daemon takes 2 x 40 tokens at a time, the rest wait in the ring;
	 * all complete, correctly; one larger than the whole token limit is
	 * refused MOE_E2BIG (it could never run) */
	{
		size_t bytes = (size_t)40 * g_H * 4;
		struct moe_cqe cq[13];
		void *in[12];
		struct moe_sqe big = sqe(199, 0, 101, 0, 0, 0);

		raw_push(r, &big);
		for (int i = 0; i < 12; i++) {
			struct moe_sqe q1 = sqe(200 + (uint64_t)i, i % 3 ? 0 : 2, 40,
						(uint64_t)i * 2 * bytes,
						(uint64_t)(i * 2 + 1) * bytes, 0);

			in[i] = dh_make_input(MOE_DTYPE_F32, 40, 300 + (uint64_t)i);
			memcpy(r->data + q1.in_off, in[i], bytes);
			raw_push(r, &q1);
		}
		raw_doorbell(r);
		raw_wait(r, cq, 13, false);
		for (int i = 0; i < 13; i++) {
			int k = (int)(cq[i].tag - 200);

			if (cq[i].tag == 199) {
				assert_int_equal(cq[i].status, MOE_E2BIG);
				continue;
			}
			assert_true(k >= 0 && k < 12);
			assert_int_equal(cq[i].status, 0);
			check_output(k % 3 ? 0 : 2, MOE_DTYPE_F32, in[k],
				     r->data + (size_t)(k * 2 + 1) * bytes, 40,
				     "raw client past the in-flight limits");
		}
		for (int i = 0; i < 12; i++)
			free(in[i]);
	}
	raw_close(r);
	forward_ok(c1, 2, MOE_DTYPE_F32, 13, 95, "after the limits");
	dh_cl_close(c1);
	dh_daemon_stop(d);
	if (n_other)
		fail_msg("a third client with max_clients 2 got something else than MOE_ELIMIT "
			 "%d of 5 times (moeclient.h: \"the daemon's status if it refuses the "
			 "handshake (e.g. MOE_ELIMIT)\")", n_other);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* 9. Fairness                                                              */

#define FLOOD_DEPTH 64
#define FLOOD_TOKENS 256 /* = scheduler.max_batch_tokens: each fills a batch */

static struct daemon *fairness_daemon(void)
{
	struct daemon *d = daemon_new(FIXTURE, "scheduler:\n  max_batch_tokens: 256\n");

	/* Every batch takes at least 10 ms, so that the test's own scheduling
	 * delay between seeing B's completion and freezing moed (the worker
	 * posts completions the moment a batch ends, and under a parallel
	 * ctest on 2 CPUs that delay reached 13 batches of 1 ms) covers at
	 * most a batch or two: the bound below is on the scheduler's order,
	 * not on this process's luck. */
	dh_daemon_env(d, "MOED_TEST_STALL_MS=10");
	dh_daemon_start(d);
	return d;
}

static void test_fairness(void **state)
{
	struct daemon *d = fairness_daemon();
	/* B first: the daemon then looks at A's ring before B's (newest
	 * client first), so A's requests are always queued before B's */
	moe_client *b = cl_open(d), *a = cl_open_opts(d, 0, FLOOD_DEPTH, 0);
	static struct {
		uint64_t tag;
		void *in, *out;
		bool busy;
	} fa[FLOOD_DEPTH];
	size_t bytes = (size_t)FLOOD_TOKENS * g_H * 4;
	uint32_t worst[2] = {0, 0};

	(void)state;
	for (int i = 0; i < FLOOD_DEPTH; i++) {
		fa[i].in = moe_buf_alloc(a, bytes);
		fa[i].out = moe_buf_alloc(a, bytes);
		assert_non_null(fa[i].in);
		assert_non_null(fa[i].out);
		memset(fa[i].in, 0, bytes);
		for (size_t k = 0; k < bytes / 4; k += 7)
			((float *)fa[i].in)[k] = (float)((int)(k % 13) - 6) / 4.f;
	}
	for (int round = 0; round < 6; round++) {
		uint32_t layer = round % 2 ? 2 : 0, done_before = 0;
		struct req qb;
		int st;

		/* A's ring kept full of max-size requests, B's one token after.
		 * (moe_poll with max 0 reaps A's completion ring: moe_wait with
		 * timeout 0 alone does not, see test_basic.) */
		dh_daemon_freeze(d);
		assert_int_equal(moe_poll(a, NULL, 0), 0);
		for (int i = 0; i < FLOOD_DEPTH; i++) {
			if (fa[i].busy) {
				int r = moe_wait(a, fa[i].tag, 0, &st);

				if (r == MOE_ETIMEDOUT)
					continue;
				assert_int_equal(r, 0);
				assert_int_equal(st, 0);
			}
			fa[i].busy = true;
			assert_int_equal(moe_submit(a, 0, MOE_DTYPE_F32, fa[i].in, fa[i].out,
						    FLOOD_TOKENS, 0, &fa[i].tag),
					 0);
		}
		dh_req_submit(b, &qb, layer, MOE_DTYPE_F32, 1, 900 + (uint64_t)round, 0);
		dh_daemon_thaw(d);
		assert_int_equal(req_wait(b, &qb), 0);
		dh_daemon_freeze(d); /* A's completions as of B's (give or take) */
		assert_int_equal(moe_poll(a, NULL, 0), 0);
		for (int i = 0; i < FLOOD_DEPTH; i++) {
			int r = moe_wait(a, fa[i].tag, 0, &st);

			if (r == MOE_ETIMEDOUT)
				continue;
			assert_int_equal(r, 0);
			assert_int_equal(st, 0);
			fa[i].busy = false;
			done_before++;
		}
		dh_daemon_thaw(d);
		check_output(layer, MOE_DTYPE_F32, qb.copy, qb.out, 1, "the small client's request");
		dh_req_free(b, &qb);
		printf("round %d: B's request on layer %u done after %u of A's %d\n", round, layer,
		       done_before, FLOOD_DEPTH);
		if (done_before > worst[layer ? 1 : 0])
			worst[layer ? 1 : 0] = done_before;
	}
	/* Same layer: round robin puts B's token in within two batches (one
	 * A request each). Other layer: the next batch's layer is that of the
	 * next client with work in round-robin order (next_layer), so B's
	 * layer comes up within two batches as well. The slack covers A's
	 * batches that ran between B's completion and the freeze. (This bound
	 * was FLOOD_DEPTH + 8 for the other layer, which no run could pass.) */
	if (worst[0] > 8)
		fail_msg("a 1-token request waited for %u of a flooding client's %d max-size "
			 "requests on its own layer", worst[0], FLOOD_DEPTH);
	if (worst[1] > 8)
		fail_msg("a 1-token request on another layer waited for %u of a flooding "
			 "client's %d max-size requests", worst[1], FLOOD_DEPTH);
	for (int i = 0; i < FLOOD_DEPTH; i++) {
		int st;

		if (fa[i].busy) {
			assert_int_equal(moe_wait(a, fa[i].tag, WAIT_MS, &st), 0);
			assert_int_equal(st, 0);
		}
		moe_buf_free(a, fa[i].in);
		moe_buf_free(a, fa[i].out);
	}
	dh_cl_close(a);
	dh_cl_close(b);
	dh_daemon_stop(d);
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_basic, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_wait_nonblocking, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_errors, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_deadline, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_cancel, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_shutdown, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_killed, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_hostile_handshake, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_hostile_rings, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_hostile_dying, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_hostile_more, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_limits, dh_setup, test_teardown),
		cmocka_unit_test_setup_teardown(test_fairness, dh_setup, test_teardown),
	};

	if (access(MOED, X_OK)) {
		printf("test_daemon: SKIPPED, %s is not built\n", MOED);
		return 77;
	}
	return cmocka_run_group_tests(tests, dh_group_setup, dh_group_teardown);
}
