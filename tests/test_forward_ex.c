/* tests/test_forward_ex.c — what a real client tripped on (issue 13),
 * against a real moed on the qwen2_moe_bf16 fixture:
 *
 *  - split: requests larger than scheduler.max_batch_tokens (64 here) are
 *    split by the daemon; outputs are bit for bit the in-process engine's
 *    unsplit run (the CPU engine is batch-invariant), in f32 and bf16,
 *    through moe_forward, moe_forward_ex and a zero-copy moe_submit with
 *    in == out; one larger than max_inflight_tokens is MOE_E2BIG.
 *  - routing: moe_forward_ex with MOE_FWD_ROUTING returns each token's
 *    top-k expert ids and weights, equal to the engine's own, and the
 *    epoch id; bad arguments are MOE_EINVAL; a raw SQE whose routing span
 *    leaves the data area is MOE_ERANGE.
 *  - connect_race: moed started 20 times; a client that connects the
 *    moment the socket file appears is never refused (the file appears
 *    only once moed listens), and a client with connect_timeout_ms that
 *    starts before moed connects once it is up. (With moed renaming its
 *    socket into place 2 ms before it listens, 10 of the 20 starts were
 *    refused: the test sees the race when there is one.)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "tests/daemon_harness.h"

#define READY_MS 30000

static struct daemon *start(const char *cfg_extra)
{
	return dh_fixture_daemon(cfg_extra, NULL, READY_MS);
}

static moe_client *cl_open(struct daemon *d)
{
	return dh_cl_open_named(d, NULL);
}

/* The engine's own routing of n tokens (the in-process reference). */
static void ref_routing(uint32_t layer, int dt, const void *in, uint32_t n, uint32_t *ids,
			float *w)
{
	struct moe_epoch *ep = moe_epoch_acquire(g_eng);
	void *out = malloc((size_t)n * g_H * dh_dt_size(dt));
	struct moe_batch b = {layer, n, (enum moe_dtype)dt, in, out, ids, w, 0, NULL, NULL};
	char err[MOE_ERRLEN];
	int r;

	assert_non_null(out);
	r = moe_engine_forward(g_eng, ep, &b, err);
	moe_epoch_release(ep);
	free(out);
	if (r)
		fail_msg("reference forward: %s", err);
}

static void test_split(void **state)
{
	static const uint32_t sizes[] = {65, 128, 200, 1000};
	struct daemon *d = start("scheduler:\n  max_batch_tokens: 64\nserver:\n"
				 "  max_inflight_tokens: 2048\n");
	moe_client *c = cl_open(d);
	moe_model_info mi;

	(void)state;
	assert_int_equal(moe_get_model_info(c, &mi), 0);
	assert_int_equal(mi.max_batch_tokens, 64);
	for (int dt = MOE_DTYPE_F32; dt <= MOE_DTYPE_BF16; dt++) {
		for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			uint32_t n = sizes[i], layer = i % 2 ? 2 : 0, epoch = 0;
			size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
			void *in = dh_make_input(dt, n, 100 + i + 10 * (size_t)dt);
			void *want = malloc(bytes), *got = malloc(bytes), *zc;
			moe_forward_args a = {.size = sizeof(a), .layer = layer, .dtype = (uint32_t)dt,
					      .in = in, .out = got, .n_tokens = n, .epoch = &epoch};
			uint64_t tag;
			int st;

			assert_non_null(want);
			assert_non_null(got);
			dh_ref_forward(layer, dt, in, want, n);
			memset(got, 0x55, bytes);
			assert_int_equal(moe_forward(c, layer, (moe_dtype)dt, in, got, n), 0);
			assert_memory_equal(got, want, bytes);
			memset(got, 0x55, bytes);
			assert_int_equal(moe_forward_ex(c, &a), 0);
			assert_memory_equal(got, want, bytes);
			assert_true(epoch >= 1);
			/* zero-copy, in place */
			zc = moe_buf_alloc(c, bytes);
			assert_non_null(zc);
			memcpy(zc, in, bytes);
			assert_int_equal(moe_submit(c, layer, (moe_dtype)dt, zc, zc, n, 0, &tag), 0);
			assert_int_equal(moe_wait(c, tag, 60000, &st), 0);
			assert_int_equal(st, 0);
			assert_memory_equal(zc, want, bytes);
			moe_buf_free(c, zc);
			printf("split: %u %s tokens in batches of 64: identical to the unsplit run "
			       "(epoch %u)\n", n, dt ? "bf16" : "f32", epoch);
			free(in);
			free(want);
			free(got);
		}
	}
	{
		void *in = dh_make_input(MOE_DTYPE_BF16, 2049, 7);

		assert_int_equal(moe_forward(c, 0, MOE_DTYPE_BF16, in, in, 2049), MOE_E2BIG);
		free(in);
	}
	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

static void test_routing(void **state)
{
	struct daemon *d = start("scheduler:\n  max_batch_tokens: 64\n");
	moe_client *c = cl_open(d);
	moe_model_info mi;
	uint32_t K, n = 150;

	(void)state;
	assert_int_equal(moe_get_model_info(c, &mi), 0);
	K = mi.top_k;
	for (int dt = MOE_DTYPE_F32; dt <= MOE_DTYPE_BF16; dt++) {
		size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
		void *in = dh_make_input(dt, n, 31 + (uint64_t)dt), *out = malloc(bytes);
		void *want = malloc(bytes);
		uint32_t *ids = calloc((size_t)n * K, 4), *rids = calloc((size_t)n * K, 4);
		float *w = calloc((size_t)n * K, 4), *rw = calloc((size_t)n * K, 4);
		uint32_t epoch = 0;
		moe_forward_args a = {.size = sizeof(a), .flags = MOE_FWD_ROUTING, .layer = 2,
				      .dtype = (uint32_t)dt, .in = in, .out = out, .n_tokens = n,
				      .topk_ids = ids, .topk_weights = w, .epoch = &epoch};
		size_t distinct = 0;

		assert_true(out && want && ids && rids && w && rw);
		ref_routing(2, dt, in, n, rids, rw);
		dh_ref_forward(2, dt, in, want, n);
		assert_int_equal(moe_forward_ex(c, &a), 0);
		assert_memory_equal(out, want, bytes);
		assert_memory_equal(ids, rids, (size_t)n * K * 4);
		assert_memory_equal(w, rw, (size_t)n * K * 4);
		for (size_t t = 0; t < (size_t)n * K; t++) {
			assert_true(ids[t] < mi.n_experts);
			assert_true(w[t] > 0.0f);
			distinct += ids[t] != ids[0];
		}
		assert_true(distinct > 0); /* not all routed to one expert */
		assert_true(epoch >= 1);
		printf("routing: %u %s tokens (split in 64s), top-%u ids and weights equal to "
		       "the engine's; epoch %u\n", n, dt ? "bf16" : "f32", K, epoch);
		/* bad arguments */
		a.size = 8;
		assert_int_equal(moe_forward_ex(c, &a), MOE_EINVAL);
		a.size = sizeof(a);
		a.flags = 0x80;
		assert_int_equal(moe_forward_ex(c, &a), MOE_EINVAL);
		a.flags = MOE_FWD_ROUTING;
		a.topk_weights = NULL;
		assert_int_equal(moe_forward_ex(c, &a), MOE_EINVAL);
		assert_int_equal(moe_forward_ex(c, NULL), MOE_EINVAL);
		free(in);
		free(out);
		free(want);
		free(ids);
		free(rids);
		free(w);
		free(rw);
	}
	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* devices: cpu:R: R CPU ranks in moed, each with its own threads and copy
 * of its experts; outputs bit-identical to the one-rank engine. */
static void test_cpu_ranks(void **state)
{
	(void)state;
	for (uint32_t R = 2; R <= 3; R++) {
		char cfg[128];
		struct daemon *d;
		moe_client *c;

		snprintf(cfg, sizeof(cfg), "devices: cpu:%u\nplacement:\n  spare_slots: 1\n", R);
		d = start(cfg);
		c = cl_open(d);
		for (int dt = MOE_DTYPE_F32; dt <= MOE_DTYPE_BF16; dt++) {
			for (uint32_t layer = 0; layer <= 2; layer += 2) {
				uint32_t n = 97;
				size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
				void *in = dh_make_input(dt, n, 500 + R + layer + (uint64_t)dt);
				void *want = malloc(bytes), *got = malloc(bytes);

				assert_non_null(want);
				assert_non_null(got);
				dh_ref_forward(layer, dt, in, want, n);
				assert_int_equal(moe_forward(c, layer, (moe_dtype)dt, in, got, n), 0);
				assert_memory_equal(got, want, bytes);
				free(in);
				free(want);
				free(got);
			}
		}
		{
			cJSON *j = dh_status(c, true), *l;
			double busy = 0;

			assert_int_equal(dh_jnum(dh_jget(j, "backend", cJSON_Object), "ranks"), R);
			/* every (token, expert) row routed was computed by one rank */
			cJSON_ArrayForEach(l, dh_jget(j, "layers", cJSON_Array))
			{
				cJSON *v, *pl = dh_jget(l, "placement", cJSON_Array);
				double routed = 0, rows = 0, win = 0;

				cJSON_ArrayForEach(v, dh_jget(l, "expert_tokens", cJSON_Array))
					routed += v->valuedouble;
				cJSON_ArrayForEach(v, dh_jget(l, "rank_rows", cJSON_Array))
					rows += v->valuedouble;
				cJSON_ArrayForEach(v, dh_jget(l, "rank_rows_window", cJSON_Array))
					win += v->valuedouble;
				assert_true(routed > 0);
				assert_true(rows == routed);
				assert_true(win == routed); /* all within the 60 s window */
				assert_int_equal(cJSON_GetArraySize(pl), g_model->n_experts);
				assert_true(dh_jnum(dh_jget(l, "imbalance", cJSON_Object),
						    "rank_max_over_mean") >= 1.0);
				assert_true(dh_jnum(dh_jget(l, "imbalance", cJSON_Object),
						    "expert_cv") >= 0.0);
			}
			cJSON_ArrayForEach(l, dh_jget(dh_jget(j, "load", cJSON_Object), "ranks",
						      cJSON_Array))
				busy += dh_jnum(l, "busy_ms");
			assert_true(busy > 0);
			cJSON_Delete(j);
		}
		printf("cpu_ranks: devices cpu:%u: f32 and bf16 on both layers bit-identical to "
		       "one rank\n", R);
		dh_cl_close(c);
		dh_daemon_stop(d);
	}
	g_passed = true;
}

static void test_connect_race(void **state)
{
	int refused = 0;

	(void)state;
	for (int i = 0; i < 20; i++) {
		struct daemon *d = dh_daemon_new(DH_FIXTURE, false, READY_MS);
		uint64_t until;
		struct stat st;
		moe_client *c = NULL;
		int r;

		d->socket_arg = true;
		if (i % 2) {
			/* a client that starts first and retries */
			char eb[256] = "";
			moe_connect_options o = {.errbuf = eb, .errbuf_len = sizeof(eb),
						 .connect_timeout_ms = READY_MS};

			dh_daemon_spawn(d);
			r = moe_connect_opts(d->sock, &o, &c);
			if (r)
				fail_msg("start %d: connect with a timeout: %s (%s)", i,
					 moe_strerror(r), eb);
		} else {
			/* a client that waits for the file, then connects at once */
			dh_daemon_spawn(d);
			for (until = dh_now_ms() + READY_MS; stat(d->sock, &st) != 0;) {
				if (dh_now_ms() > until)
					fail_msg("start %d: no socket file", i);
				usleep(200);
			}
			r = moe_connect(d->sock, &c);
			if (r == MOE_EDAEMON && errno == ECONNREFUSED)
				refused++;
			else if (r)
				fail_msg("start %d: connect: %s", i, moe_strerror(r));
		}
		if (c)
			moe_disconnect(c);
		dh_daemon_stop(d);
		dh_daemon_free(d);
	}
	printf("connect_race: 20 starts, %d refused connections\n", refused);
	assert_int_equal(refused, 0);
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_split, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_routing, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_cpu_ranks, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_connect_race, dh_setup, dh_teardown),
	};

	return cmocka_run_group_tests(tests, dh_group_setup, dh_group_teardown);
}
