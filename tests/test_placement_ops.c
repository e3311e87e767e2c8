/* tests/test_placement_ops.c — the operator's placement commands against a
 * real moed (CPU ranks, the qwen2_moe fixture):
 *
 *  - refusals: every bad replicate / unreplicate / rebalance (unknown layer,
 *    expert or rank; a replica present or absent; no free slot; an expert's
 *    last replica; dry-run on another op; a bad mode or reserved field;
 *    nothing in the load window; another change running) is refused with a
 *    message naming the problem, and the placement is unchanged;
 *  - changes_under_load: on cpu:2 with 2 spare slots, four client
 *    processes send requests continuously while a fifth process runs
 *    replicate / unreplicate / rebalance in a loop (>= 50 placement changes,
 *    weight copies paced by placement.copy_bytes_per_s) and then drops every
 *    extra replica: zero failed requests, every output bit for bit the
 *    in-process reference, the daemon's slot bytes back to what was loaded;
 *    in the Release build its RSS does not grow from the second cycle of
 *    changes to the last (LeakSanitizer checks the exit under ASan);
 *  - lost_rank_under_load: on cpu:3, MOED_TEST_RANK_FAULT=1:N takes rank 1
 *    out while four client processes run and the changer makes >= 50
 *    changes: zero failed requests, outputs bit-identical, status
 *    "degraded" with rank 1 lost, changes naming rank 1 refused, and the
 *    slot bytes, every extra replica dropped, those loaded less the lost
 *    rank's shared-expert copies;
 *  - auto_rebalance: with placement.auto_rebalance on (threshold 1.01, the
 *    window and interval short), moed plans and moves on its own under
 *    load, while a slow manual change runs it waits, and it logs the
 *    measured figure before, the predicted one and the measured one after.
 *
 * Every wait is bounded; no assertion is on wall time.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/daemon_harness.h"
#include "tools/synth.h"

#define READY_MS 30000

/* ---- helpers -------------------------------------------------------------- */

/* The placement of every layer as a JSON string (for "unchanged"). */
static char *placement_of(moe_client *c)
{
	cJSON *j = dh_status(c, true), *out = cJSON_CreateArray(), *l;
	char *s;

	cJSON_ArrayForEach(l, dh_jget(j, "layers", cJSON_Array))
		cJSON_AddItemToArray(out, cJSON_Duplicate(dh_jget(l, "placement", cJSON_Array), 1));
	s = cJSON_PrintUnformatted(out);
	cJSON_Delete(out);
	cJSON_Delete(j);
	return s;
}

static double weight_bytes(moe_client *c)
{
	cJSON *j = dh_status(c, true);
	double v = dh_jnum(dh_jget(j, "backend", cJSON_Object), "weight_bytes");

	cJSON_Delete(j);
	return v;
}

static int call(moe_client *c, uint32_t op, uint32_t flags, const void *p, uint32_t len,
		int wait, moe_admin_res *res)
{
	moe_admin_req q = {.op = op, .flags = flags, .payload = p, .payload_len = len,
			   .timeout_ms = DH_WAIT_MS, .wait_job = (uint32_t)wait};

	return moe_admin_call(c, &q, res);
}

static void refused(moe_client *c, uint32_t op, uint32_t flags, const void *p, uint32_t len,
		    int want, const char *says)
{
	moe_admin_res *res = malloc(sizeof(*res));
	int r;

	assert_non_null(res);
	r = call(c, op, flags, p, len, 0, res);
	printf("%s: %s: %s\n", moe_admin_op_name(op), moe_strerror(r), res->message);
	assert_int_equal(r, want);
	if (!strstr(res->message, says))
		fail_msg("refusal \"%s\" does not say \"%s\"", res->message, says);
	free(res);
}

/* ---- refusals --------------------------------------------------------------- */

static void test_refusals(void **state)
{
	struct daemon *d = dh_fixture_daemon("devices: cpu:2\nplacement:\n  spare_slots: 1\n"
					     "  copy_bytes_per_s: 64K\n", NULL, READY_MS);
	moe_client *c = dh_cl_open_named(d, "refusals");
	uint32_t L0 = g_model->layers[0].index, E = g_model->n_experts, P = (E + 1) / 2;
	char *before = placement_of(c), *after;
	moe_admin_res *res = malloc(sizeof(*res));
	struct moe_admin_rebalance rb = {MOE_ADMIN_ALL_LAYERS, MOE_PLAN_KIND_KEEP};

	(void)state;
	assert_non_null(res);
	refused(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0 + 1000, 0, 1, 0}, 16,
		MOE_EINVAL, "not an MoE layer");
	refused(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0, E, 1, 0}, 16,
		MOE_EINVAL, "experts");
	refused(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0, 0, 2, 0}, 16,
		MOE_EINVAL, "moed runs 2 ranks");
	refused(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0, 0, 0, 0}, 16,
		MOE_EINVAL, "already holds expert 0");
	refused(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0, 0, 1, 9}, 16,
		MOE_EINVAL, "reserved");
	refused(c, MOE_ADMIN_UNREPLICATE, 0, &(struct moe_admin_replica){L0, 0, 1, 0}, 16,
		MOE_ENOENT, "holds no replica of expert 0");
	refused(c, MOE_ADMIN_UNREPLICATE, 0, &(struct moe_admin_replica){L0, 0, 0, 0}, 16,
		MOE_EINVAL, "last replica");
	refused(c, MOE_ADMIN_REPLICATE, MOE_ADMIN_DRY_RUN,
		&(struct moe_admin_replica){L0, 0, 1, 0}, 16, MOE_EINVAL, "dry-run");
	refused(c, MOE_ADMIN_REBALANCE, 0, &(struct moe_admin_rebalance){MOE_ADMIN_ALL_LAYERS, 7},
		8, MOE_EINVAL, "mode");
	refused(c, MOE_ADMIN_REBALANCE, MOE_ADMIN_DRY_RUN, &rb, 8, MOE_EAGAIN, "no tokens");
	/* one spare slot: the first replica on rank 1 fits, a second does not */
	assert_int_equal(call(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0, 0, 1, 0},
			      16, 1, res), 0);
	assert_int_equal(res->job.state, MOE_JOB_DONE);
	refused(c, MOE_ADMIN_REPLICATE, 0, &(struct moe_admin_replica){L0, 1, 1, 0}, 16,
		MOE_ELIMIT, "no free slot");
	/* a change while another runs: the copy is paced at 64 KiB/s */
	assert_int_equal(call(c, MOE_ADMIN_REPLICATE, 0,
			      &(struct moe_admin_replica){L0, P, 0, 0}, 16, 0, res), 0);
	refused(c, MOE_ADMIN_UNREPLICATE, 0, &(struct moe_admin_replica){L0, 0, 1, 0}, 16,
		MOE_EBUSY, "busy: replicate runs");
	{
		uint32_t job = res->job.job;
		struct moe_admin_job jd;

		assert_int_equal(moe_job(c, job, 1, &jd), 0); /* cancelled */
		for (uint64_t until = dh_now_ms() + DH_WAIT_MS; dh_now_ms() < until;) {
			assert_int_equal(moe_job(c, job, 0, &jd), 0);
			if (jd.state != MOE_JOB_RUNNING)
				break;
			dh_nap_ms(5);
		}
		printf("job %u: %s: %s\n", job, moe_job_state_name(jd.state), jd.message);
		assert_int_equal(jd.state, MOE_JOB_CANCELLED);
	}
	/* and back: every refusal changed nothing, the one replica goes */
	assert_int_equal(call(c, MOE_ADMIN_UNREPLICATE, 0,
			      &(struct moe_admin_replica){L0, 0, 1, 0}, 16, 1, res), 0);
	assert_int_equal(res->job.state, MOE_JOB_DONE);
	after = placement_of(c);
	assert_string_equal(after, before);
	free(before);
	free(after);
	free(res);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- changes under load ------------------------------------------------------ */

struct changer {
	int changes, refusals, failed, cycles;
	long rss_kib[64]; /* moed's after each cycle */
	char why[200];
};

/* One random change: replicate (a random expert to a random rank), or
 * unreplicate (a random extra replica), or rebalance; 1 if done. */
static int one_change(moe_client *c, struct moe_rng *rng, uint32_t R, struct changer *ch,
		      moe_admin_res *res)
{
	uint32_t l = g_model->layers[moe_rng_next(rng) % g_model->n_moe_layers].index;
	uint32_t x = (uint32_t)(moe_rng_next(rng) % g_model->n_experts);
	uint32_t r = (uint32_t)(moe_rng_next(rng) % R), op;
	int ret, kind = (int)(moe_rng_next(rng) % 5);

	if (kind == 4) {
		struct moe_admin_rebalance rb = {MOE_ADMIN_ALL_LAYERS,
						 (uint32_t)(moe_rng_next(rng) % 2)};

		op = MOE_ADMIN_REBALANCE;
		ret = call(c, op, 0, &rb, sizeof(rb), 1, res);
	} else {
		struct moe_admin_replica rp = {l, x, r, 0};

		op = kind < 2 ? MOE_ADMIN_REPLICATE : MOE_ADMIN_UNREPLICATE;
		ret = call(c, op, 0, &rp, sizeof(rp), 1, res);
	}
	if (ret == MOE_EINVAL || ret == MOE_ENOENT || ret == MOE_ELIMIT || ret == MOE_EAGAIN ||
	    /* a rank lost between the plan and the job: to be planned again;
	     * or its experts, moved onto the spare slots meanwhile, took the
	     * room the plan counted on (seen under ASan) */
	    (!ret && res->result_len == sizeof(struct moe_admin_job) &&
	     (res->job.result == MOE_EAGAIN || res->job.result == MOE_ELIMIT))) {
		ch->refusals++;
		return 0;
	}
	if (ret || (res->result_len == sizeof(struct moe_admin_job) &&
		    res->job.state != MOE_JOB_DONE)) {
		snprintf(ch->why, sizeof(ch->why), "%s: %s: %.80s / %.80s", moe_admin_op_name(op),
			 moe_strerror(ret), res->message, res->job.message);
		ch->failed++;
		return 0;
	}
	return res->result_len == sizeof(struct moe_admin_job); /* (else: nothing to change) */
}

/* Unreplicates until every expert has one replica. */
static void drop_extras(moe_client *c, struct changer *ch, moe_admin_res *res)
{
	cJSON *j = dh_status(c, true), *l;

	cJSON_ArrayForEach(l, dh_jget(j, "layers", cJSON_Array))
	{
		cJSON *x;
		uint32_t e = 0;

		cJSON_ArrayForEach(x, dh_jget(l, "placement", cJSON_Array))
		{
			int n = cJSON_GetArraySize(x);

			for (int i = 1; i < n; i++) {
				struct moe_admin_replica rp = {
					(uint32_t)dh_jnum(l, "layer"), e,
					(uint32_t)cJSON_GetArrayItem(cJSON_GetArrayItem(x, i), 0)
						->valuedouble, 0};
				int ret = call(c, MOE_ADMIN_UNREPLICATE, 0, &rp, sizeof(rp), 1, res);

				if (ret || res->job.state != MOE_JOB_DONE) {
					snprintf(ch->why, sizeof(ch->why), "dropping: %s: %.120s",
						 moe_strerror(ret), res->message);
					ch->failed++;
				}
			}
			e++;
		}
	}
	cJSON_Delete(j);
}

static void run_changer(struct daemon *d, uint32_t R, int min_changes, struct changer *ch)
{
	moe_connect_options o = {.name = "changer"};
	struct moe_rng rng = {4242 + R};
	moe_admin_res *res = malloc(sizeof(*res));
	moe_client *c;

	if (!res || moe_connect_opts(d->sock, &o, &c)) {
		snprintf(ch->why, sizeof(ch->why), "cannot connect");
		ch->failed++;
		return;
	}
	for (int tries = 0; ch->changes < min_changes && tries < 20 * min_changes && !ch->failed;
	     tries++) {
		ch->changes += one_change(c, &rng, R, ch, res);
		if (ch->changes && ch->changes % 10 == 0 && ch->changes / 10 > ch->cycles) {
			if (ch->cycles < 64)
				ch->rss_kib[ch->cycles] = dh_rss_kib(d->pid);
			ch->cycles++;
		}
	}
	drop_extras(c, ch, res);
	moe_disconnect(c);
	free(res);
}

/* The changer in its own process; its counts in shared memory. */
static struct changer *changer_run(struct daemon *d, uint32_t R, int min_changes)
{
	struct changer *ch = mmap(NULL, sizeof(*ch), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pid_t pid;
	int ws;

	assert_true(ch != MAP_FAILED);
	memset(ch, 0, sizeof(*ch));
	fflush(stdout);
	pid = fork();
	assert_true(pid >= 0);
	if (!pid) {
		run_changer(d, R, min_changes, ch);
		_exit(0);
	}
	assert_int_equal(waitpid(pid, &ws, 0), pid);
	assert_true(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
	printf("changer process: %d placement changes, %d refused (as they should be), %d failed"
	       "%s%s\n", ch->changes, ch->refusals, ch->failed, ch->why[0] ? ": " : "", ch->why);
	return ch;
}

static void test_changes_under_load(void **state)
{
	struct daemon *d = dh_fixture_daemon("devices: cpu:2\nplacement:\n  spare_slots: 2\n"
					     "  copy_bytes_per_s: 4M\n", NULL, READY_MS);
	moe_client *c = dh_cl_open_named(d, "accounting");
	double base = weight_bytes(c), now = 0;
	struct dh_loaders *lp;
	struct changer *ch;
	uint64_t total;

	(void)state;
	lp = dh_loaders_start(d, 4, 20);
	dh_nap_ms(100); /* load in the window for rebalance */
	ch = changer_run(d, 2, 60);
	total = dh_loaders_stop(lp);
	assert_int_equal(ch->failed, 0);
	assert_true(ch->changes >= 50);
	for (uint64_t until = dh_now_ms() + DH_WAIT_MS; dh_now_ms() < until; dh_nap_ms(10))
		if ((now = weight_bytes(c)) == base)
			break;
	printf("%llu requests under %d changes; slot bytes %.0f, loaded %.0f; moed RSS %ld KiB "
	       "after cycle 2, %ld KiB after cycle %d\n", (unsigned long long)total, ch->changes,
	       now, base, ch->rss_kib[1], ch->rss_kib[ch->cycles - 1], ch->cycles);
	assert_true(now == base);
	assert_true(ch->cycles >= 5);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
	/* RSS: no growth from the second cycle to the last. A sample is taken
	 * whatever replicas exist at that moment, so the two may differ by the
	 * spare slots' contents (2 ranks x 2 spare x layers), and a page of
	 * allocator noise; a leak of anything per change would exceed it
	 * (before expert slots were pages of their own, the heap's
	 * fragmentation grew it by 480 KiB over 15 cycles). */
	{
		long allow = (long)(4 * g_model->n_moe_layers * g_model->expert_bytes / 1024) + 64;

		printf("RSS allowance %ld KiB\n", allow);
		assert_true(ch->rss_kib[ch->cycles - 1] <= ch->rss_kib[1] + allow);
	}
#endif
	munmap(ch, sizeof(*ch));
	dh_daemon_stop(d);
	g_passed = true;
}

static void test_lost_rank_under_load(void **state)
{
	struct daemon *d = dh_fixture_daemon("devices: cpu:3\nplacement:\n  spare_slots: 2\n",
					     "MOED_TEST_RANK_FAULT=1:200", READY_MS);
	moe_client *c = dh_cl_open_named(d, "lost-rank");
	uint32_t L = g_model->n_moe_layers, E = g_model->n_experts, R = 3;
	double base = weight_bytes(c), slot, shared_per_rank, want, now = 0;
	moe_admin_res *res = malloc(sizeof(*res));
	struct dh_loaders *lp;
	struct changer *ch;
	uint64_t total;
	cJSON *j = NULL;

	(void)state;
	assert_non_null(res);
	/* what one expert slot holds, measured: a replica and back */
	{
		struct moe_admin_replica rp = {g_model->layers[0].index, 0, 1, 0};

		assert_int_equal(call(c, MOE_ADMIN_REPLICATE, 0, &rp, sizeof(rp), 1, res), 0);
		slot = weight_bytes(c) - base;
		assert_int_equal(call(c, MOE_ADMIN_UNREPLICATE, 0, &rp, sizeof(rp), 1, res), 0);
		assert_true(slot > 0 && weight_bytes(c) == base);
	}
	/* base = routers (fp32, once) + every rank's shared-expert copies + E x L
	 * slots: a lost rank takes its shared copies with it */
	shared_per_rank = (base - (double)L * E * g_model->hidden * 4 - (double)L * E * slot) / R;
	want = base - shared_per_rank;
	lp = dh_loaders_start(d, 4, 40);
	dh_nap_ms(100);
	ch = changer_run(d, R, 50); /* (drops every extra replica at its end) */
	/* the fault comes with the 200th batch: wait for it if not yet */
	for (uint64_t until = dh_now_ms() + DH_WAIT_MS; dh_now_ms() < until; dh_nap_ms(10)) {
		j = dh_status(c, true);
		if (!strcmp(dh_jget(j, "state", cJSON_String)->valuestring, "degraded"))
			break;
		cJSON_Delete(j);
		j = NULL;
	}
	assert_non_null(j);
	total = dh_loaders_stop(lp);
	printf("%llu requests; state %s, ranks lost %.0f\n", (unsigned long long)total,
	       dh_jget(j, "state", cJSON_String)->valuestring,
	       dh_jnum(dh_jget(j, "backend", cJSON_Object), "ranks_lost"));
	assert_int_equal((int)dh_jnum(dh_jget(j, "backend", cJSON_Object), "ranks_lost"), 1);
	assert_true(cJSON_IsTrue(
		dh_jget(cJSON_GetArrayItem(dh_jget(dh_jget(j, "load", cJSON_Object), "ranks",
						   cJSON_Array), 1), "lost", -1)));
	cJSON_Delete(j);
	assert_int_equal(ch->failed, 0);
	assert_true(ch->changes >= 50);
	/* every expert back to one replica: the slot bytes are the load's,
	 * less the lost rank's shared copies */
	for (uint64_t until = dh_now_ms() + DH_WAIT_MS; dh_now_ms() < until; dh_nap_ms(10))
		if ((now = weight_bytes(c)) == want)
			break;
	printf("slot bytes %.0f after %d changes and a lost rank; loaded %.0f, less the lost "
	       "rank's shared copies %.0f = %.0f\n", now, ch->changes, base, shared_per_rank, want);
	assert_true(now == want);
	/* after it: naming rank 1 is refused, the others still work */
	{
		uint32_t L0 = g_model->layers[0].index;
		struct moe_admin_replica rp = {L0, 0, 1, 0};
		int r = call(c, MOE_ADMIN_REPLICATE, 0, &rp, sizeof(rp), 1, res);

		printf("replicate onto the lost rank: %s: %s\n", moe_strerror(r), res->message);
		assert_int_equal(r, MOE_EINVAL);
		assert_non_null(strstr(res->message, "lost"));
	}
	free(res);
	munmap(ch, sizeof(*ch));
	dh_daemon_stop(d);
	g_passed = true;
}

static void test_auto_rebalance(void **state)
{
	struct daemon *d = dh_fixture_daemon("devices: cpu:2\nplacement:\n  spare_slots: 2\n"
					     "  auto_rebalance: true\n  rebalance_threshold: 1.01\n"
					     "  rebalance_interval_s: 1\n  stats_window_s: 1\n",
					     NULL, READY_MS);
	moe_client *c = dh_cl_open_named(d, "auto");
	struct dh_loaders *lp;
	double runs = 0;
	cJSON *j = NULL;
	FILE *f;
	char line[512];
	int logged_before = 0, logged_after = 0;

	(void)state;
	lp = dh_loaders_start(d, 4, 60);
	for (uint64_t until = dh_now_ms() + DH_WAIT_MS; dh_now_ms() < until; dh_nap_ms(50)) {
		cJSON_Delete(j);
		j = dh_status(c, true);
		runs = dh_jnum(dh_jget(j, "placement", cJSON_Object), "auto_runs");
		if (runs >= 1 && cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(
					 dh_jget(j, "placement", cJSON_Object),
					 "last_measured_after")))
			break;
	}
	dh_loaders_stop(lp);
	printf("auto-rebalance: %.0f runs; last: measured %.3f before, predicted %.3f, measured "
	       "%.3f a window after\n", runs,
	       dh_jnum(dh_jget(j, "placement", cJSON_Object), "last_measured_before"),
	       dh_jnum(dh_jget(j, "placement", cJSON_Object), "last_predicted_after"),
	       dh_jnum(dh_jget(j, "placement", cJSON_Object), "last_measured_after"));
	assert_true(runs >= 1);
	cJSON_Delete(j);
	f = fopen(d->log, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f)) {
		logged_before += strstr(line, "auto-rebalance 1 (job") != NULL &&
				 strstr(line, "predicted max/mean") != NULL;
		logged_after += strstr(line, "auto-rebalance 1: measured rank max/mean") != NULL;
	}
	fclose(f);
	assert_int_equal(logged_before, 1);
	assert_int_equal(logged_after, 1);
	dh_daemon_stop(d);
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_refusals, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_changes_under_load, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_lost_rank_under_load, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_auto_rebalance, dh_setup, dh_teardown),
	};

	return cmocka_run_group_tests(tests, dh_group_setup, dh_group_teardown);
}
