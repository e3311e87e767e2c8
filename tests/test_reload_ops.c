/* tests/test_reload_ops.c — `moectl reload` against a real moed under load.
 *
 *  - rolling: checkpoints A and B (different seeds), B' (A's routers and
 *    shared experts, B's experts) and M (what experts steps from A to B'
 *    serve: A with the experts of LIST from B'), written by tools/synth.
 *    moed serves A on 2 CPU ranks; 4 client processes send requests
 *    without pause while moed rolls A -> B -> A -> B by layer, A -> B' by
 *    experts steps, then B atomically. Zero failed requests; every output
 *    is bit-identical to the in-process engine of the checkpoint that the
 *    versions of its completion's epoch name (epoch-info, then
 *    version-info per layer, sources mapped to A, B, B', M through
 *    status); at the end every layer and expert reports the last version.
 *  - failures: one per cause (a missing directory, a missing tensor, a
 *    NaN, a checksum mismatch, staging memory, cancel): the job fails with
 *    the reason (moectl's exit code and message), status counts it, the
 *    weight bytes and versions are back to the baseline and A is served.
 *  - busy: a reload and a placement change never run together.
 *  - cycles: in the Release build RSS does not grow from the second
 *    A -> B -> A cycle to the last.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon/engine/engine.h"
#include "ipc/moe_admin.h"
#include "tests/daemon_harness.h"
#include "tools/synth.h"

#define READY_MS 30000
#define LIST_N	 3
static const uint32_t LIST[LIST_N] = {1, 4, 6};

enum { CK_A, CK_B, CK_BP, CK_M, N_CK };
static char *g_tmp;
static char g_dir[N_CK][512];
static struct moe_model *g_rm[N_CK];
static struct moe_engine *g_ref[N_CK];

static bool in_list(void *arg, uint32_t l, uint32_t x)
{
	(void)arg, (void)l;
	for (int i = 0; i < LIST_N; i++)
		if (LIST[i] == x)
			return true;
	return false;
}

static bool always(void *arg, uint32_t l, uint32_t x)
{
	(void)arg, (void)l, (void)x;
	return true;
}

static void synth_opts(struct moe_synth_opts *o, int which)
{
	moe_synth_defaults(o, MOE_FAM_DEEPSEEK_V3);
	o->hidden = 256, o->inter = 96, o->shared_inter = 96;
	o->experts = 8, o->top_k = 2, o->layers = 3, o->dense_first = 0;
	o->n_group = 2, o->topk_group = 1;
	o->shards = 2;
	o->seed = which == CK_B ? 2 : 1;
	o->expert_seed = which == CK_B || which == CK_BP ? 22 : 11;
	o->expert_seed_alt = 22;
	o->alt = which == CK_BP ? always : which == CK_M ? in_list : NULL;
}

static int group_setup(void **state)
{
	struct moe_engine_opts eo = {.threads = 1, .max_batch_tokens = 4096};
	char err[MOE_ERRLEN];

	(void)state;
	moe_engine_opts_from_env(&eo);
	g_tmp = tu_tmpdir();
	for (int i = 0; i < N_CK; i++) {
		struct moe_synth_opts o;

		synth_opts(&o, i);
		snprintf(g_dir[i], sizeof(g_dir[i]), "%s/ck%d", g_tmp, i);
		if (moe_synth_write(g_dir[i], &o, err) ||
		    moe_model_open(g_dir[i], NULL, &g_rm[i], err) ||
		    moe_engine_create(g_rm[i], &eo, &g_ref[i], err)) {
			fprintf(stderr, "%s\n", err);
			return -1;
		}
	}
	/* the harness' reference and inputs: A's */
	g_model = g_rm[CK_A];
	g_eng = g_ref[CK_A];
	g_H = g_model->hidden;
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	for (int i = 0; i < N_CK; i++) {
		moe_engine_destroy(g_ref[i]);
		moe_model_free(g_rm[i]);
	}
	g_model = NULL;
	g_eng = NULL;
	tu_rmtree(g_tmp);
	free(g_tmp);
	return 0;
}

static struct daemon *reload_daemon(const char *placement, const char *extra)
{
	struct daemon *d = dh_daemon_new(g_dir[CK_A], false, READY_MS);
	char cfg[1024];

	d->socket_arg = true;
	snprintf(cfg, sizeof(cfg), "devices: cpu:2\nplacement:\n  spare_slots: 1\n%s%s",
		 placement ? placement : "", extra ? extra : "");
	dh_daemon_write_cfg(d, cfg);
	dh_daemon_start(d);
	return d;
}

/* A reload (payload built from the arguments); returns moe_admin_call's
 * result, the job's in res. */
static int reload(moe_client *c, const char *dir, const uint32_t *experts, uint32_t n_experts,
		  uint32_t flags, int wait, moe_admin_res *res)
{
	struct moe_admin_reload x = {.flags = flags};
	moe_admin_req q = {.op = MOE_ADMIN_RELOAD, .payload = &x, .payload_len = sizeof(x),
			   .timeout_ms = DH_WAIT_MS, .wait_job = (uint32_t)wait};

	if (dir)
		snprintf(x.model, sizeof(x.model), "%.1000s", dir);
	for (uint32_t i = 0; i < n_experts; i++)
		x.experts[experts[i] / 64] |= 1ull << (experts[i] % 64);
	return moe_admin_call(c, &q, res);
}

static void reload_ok(moe_client *c, int ck, const uint32_t *experts, uint32_t n,
		      uint32_t flags, moe_admin_res *res)
{
	int r = reload(c, g_dir[ck], experts, n, flags, 1, res);

	if (r || res->job.state != MOE_JOB_DONE)
		fail_msg("reload to %d: %s: %s / %s", ck, moe_strerror(r), res->message,
			 res->job.message);
	printf("reload to checkpoint %d: %s\n", ck, res->job.message);
}

static cJSON *weights(moe_client *c, cJSON **root)
{
	*root = dh_status(c, true);
	return dh_jget(*root, "weights", cJSON_Object);
}

/* ---- the check of every output ------------------------------------------ */

#define MAX_REC 40000
struct rec {
	uint32_t layer, n, epoch, dt;
	uint64_t seed, hash;
};

struct loads {
	atomic_bool stop;
	_Atomic uint32_t n_rec;
	_Atomic uint64_t failed;
	pid_t pid[4];
	struct rec rec[MAX_REC];
};

static uint64_t fnv(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t h = 1469598103934665603ull;

	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 1099511628211ull;
	return h;
}

static void load_loop(struct loads *L, struct daemon *d, int id)
{
	struct moe_rng rng = {5000 + (uint64_t)id};
	moe_client *c;

	if (moe_connect(d->sock, &c)) {
		atomic_fetch_add(&L->failed, 1);
		return;
	}
	while (!atomic_load(&L->stop)) {
		uint32_t n = 1 + (uint32_t)(moe_rng_next(&rng) % 12), k;
		uint32_t layer = g_model->layers[moe_rng_next(&rng) % g_model->n_moe_layers].index;
		int dt = moe_rng_next(&rng) % 2 ? MOE_DTYPE_F32 : MOE_DTYPE_BF16;
		uint64_t seed = moe_rng_next(&rng);
		size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
		void *in = dh_make_input(dt, n, seed), *bi = moe_buf_alloc(c, bytes),
		     *bo = moe_buf_alloc(c, bytes);
		moe_completion done;
		uint64_t tag;
		int got = 0;

		if (!bi || !bo || moe_submit(c, layer, (moe_dtype)dt, memcpy(bi, in, bytes), bo, n,
					     0, &tag)) {
			atomic_fetch_add(&L->failed, 1);
			break;
		}
		for (uint64_t t0 = dh_now_ms(); !got && dh_now_ms() - t0 < DH_WAIT_MS;)
			if (!(got = moe_poll(c, &done, 1) == 1))
				usleep(50);
		if (!got || done.tag != tag || done.status)
			atomic_fetch_add(&L->failed, 1);
		else if ((k = atomic_fetch_add(&L->n_rec, 1)) < MAX_REC)
			L->rec[k] = (struct rec){layer, n, done.epoch, (uint32_t)dt, seed,
						 fnv(bo, bytes)};
		moe_buf_free(c, bi);
		moe_buf_free(c, bo);
		free(in);
	}
	moe_disconnect(c);
}

static struct loads *loads_start(struct daemon *d)
{
	struct loads *L = mmap(NULL, sizeof(*L), PROT_READ | PROT_WRITE,
			       MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	assert_true(L != MAP_FAILED);
	fflush(stdout);
	fflush(stderr);
	for (int i = 0; i < 4; i++) {
		pid_t pid = fork();

		assert_true(pid >= 0);
		if (!pid) {
			load_loop(L, d, i);
			_exit(0);
		}
		L->pid[i] = pid;
	}
	return L;
}

static void loads_stop(struct loads *L)
{
	atomic_store(&L->stop, true);
	for (int i = 0; i < 4; i++) {
		int ws;

		assert_int_equal(waitpid(L->pid[i], &ws, 0), L->pid[i]);
		assert_true(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
	}
}

/* Which checkpoint (layer, version) serves: its sources, mapped by path. */
static int version_ck(moe_client *c, uint32_t layer, uint32_t version, const cJSON *sources,
		      moe_admin_res *res)
{
	struct moe_admin_version_ref x = {layer, version, 0, 0};
	moe_admin_req q = {.op = MOE_ADMIN_VERSION_INFO, .payload = &x, .payload_len = sizeof(x),
			   .timeout_ms = DH_WAIT_MS};
	struct moe_admin_version v;
	const uint32_t *ev, *es;
	int ck[64], rck = -1;
	bool one = true, mix;

	if (moe_admin_call(c, &q, res))
		fail_msg("version-info %u/%u: %s", layer, version, res->message);
	memcpy(&v, res->result, sizeof(v));
	assert_int_equal(v.n_experts, g_model->n_experts);
	ev = (const uint32_t *)(res->result + sizeof(v));
	es = ev + v.n_experts;
	(void)ev;
	for (uint32_t x2 = 0; x2 <= v.n_experts; x2++) {
		uint32_t src = x2 < v.n_experts ? es[x2] : v.router_source;
		int *p = x2 < v.n_experts ? &ck[x2] : &rck;
		const cJSON *s;

		*p = -1;
		cJSON_ArrayForEach(s, sources)
			if ((uint32_t)dh_jnum(s, "id") == src)
				for (int i = 0; i < N_CK; i++)
					if (!strcmp(dh_jget(s, "path", cJSON_String)->valuestring,
						    g_dir[i]))
						*p = i;
		assert_true(*p >= 0);
	}
	mix = rck == CK_A;
	for (uint32_t x2 = 0; x2 < v.n_experts; x2++) {
		one &= ck[x2] == rck;
		mix &= ck[x2] == (in_list(NULL, 0, x2) ? CK_BP : CK_A);
	}
	if (one)
		return rck;
	if (mix)
		return CK_M;
	fail_msg("layer %u version %u: an unexpected mix", layer, version);
	return -1;
}

static void check_records(moe_client *c, struct loads *L, uint32_t *seen)
{
	uint32_t n = atomic_load(&L->n_rec), LN = g_model->n_moe_layers;
	uint32_t cache_epoch[512] = {0}, cache_ck[512][8];
	moe_admin_res *res = malloc(sizeof(*res));
	cJSON *root, *w = weights(c, &root);
	const cJSON *sources = dh_jget(w, "sources", cJSON_Array);
	uint64_t wrong = 0;

	assert_non_null(res);
	n = n < MAX_REC ? n : MAX_REC;
	for (uint32_t i = 0; i < n; i++) {
		struct rec *r = &L->rec[i];
		uint32_t slot = r->epoch % 512, pos = (uint32_t)moe_model_layer_pos(g_model, r->layer);
		size_t bytes = (size_t)r->n * g_H * dh_dt_size((int)r->dt);
		void *in, *out;
		int ck;

		if (cache_epoch[slot] != r->epoch) {
			struct moe_admin_epoch_info info;
			uint32_t v[8];

			if (moe_epoch_info(c, r->epoch, &info, v, 8))
				fail_msg("epoch %u: unknown", r->epoch);
			for (uint32_t l = 0; l < LN; l++)
				cache_ck[slot][l] = (uint32_t)version_ck(c, g_model->layers[l].index,
									 v[l], sources, res);
			cache_epoch[slot] = r->epoch;
		}
		ck = (int)cache_ck[slot][pos];
		in = dh_make_input((int)r->dt, r->n, r->seed);
		out = malloc(bytes);
		{
			struct moe_epoch *ep = moe_epoch_acquire(g_ref[ck]);
			struct moe_batch b = {r->layer, r->n, (enum moe_dtype)r->dt, in, out,
					      NULL, NULL, 0, NULL, NULL};
			char err[MOE_ERRLEN];

			if (moe_engine_forward(g_ref[ck], ep, &b, err))
				fail_msg("reference: %s", err);
			moe_epoch_release(ep);
		}
		if (fnv(out, bytes) != r->hash) {
			if (!wrong)
				printf("first wrong: request %u, layer %u, epoch %u, checkpoint %d\n",
				       i, r->layer, r->epoch, ck);
			wrong++;
		}
		seen[ck]++;
		free(in);
		free(out);
	}
	cJSON_Delete(root);
	free(res);
	printf("%u requests checked: A %u, B %u, B' %u, mix %u; %llu wrong\n", n, seen[CK_A],
	       seen[CK_B], seen[CK_BP], seen[CK_M], (unsigned long long)wrong);
	assert_int_equal(wrong, 0);
}

static void test_rolling(void **state)
{
	struct daemon *d = reload_daemon(NULL, NULL);
	moe_client *c = dh_cl_open_named(d, "reloader");
	moe_admin_res *res = malloc(sizeof(*res));
	uint32_t seen[N_CK] = {0};
	struct loads *L;
	cJSON *root, *w, *l;

	(void)state;
	assert_non_null(res);
	L = loads_start(d);
	dh_nap_ms(100);
	reload_ok(c, CK_B, NULL, 0, 0, res);
	reload_ok(c, CK_A, NULL, 0, 0, res);
	reload_ok(c, CK_B, NULL, 0, 0, res);
	reload_ok(c, CK_A, NULL, 0, MOE_RELOAD_ATOMIC, res);
	reload_ok(c, CK_BP, LIST, LIST_N, 0, res);
	reload_ok(c, CK_B, NULL, 0, MOE_RELOAD_ATOMIC, res);
	dh_nap_ms(100);
	loads_stop(L);
	printf("%u requests during 6 reloads, %llu failed\n", atomic_load(&L->n_rec),
	       (unsigned long long)atomic_load(&L->failed));
	assert_int_equal(atomic_load(&L->failed), 0);
	assert_true(atomic_load(&L->n_rec) > 100);
	check_records(c, L, seen);
	assert_true(seen[CK_A] && seen[CK_B]);
	/* the end: every layer (and expert) on the last atomic reload's version */
	w = weights(c, &root);
	cJSON_ArrayForEach(l, dh_jget(w, "layers", cJSON_Array)) {
		assert_int_equal(dh_jnum(l, "version"), 7);
		assert_int_equal(dh_jnum(l, "router_version"), 7);
		assert_int_equal(dh_jnum(l, "experts_other"), 0);
	}
	assert_int_equal(dh_jnum(w, "reloads_done"), 6);
	cJSON_Delete(root);
	munmap(L, sizeof(*L));
	free(res);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- failures ------------------------------------------------------------- */

/* The reload fails with `says` in the job's message; nothing changed. */
static void fails(moe_client *c, const char *dir, uint32_t flags, const char *says,
		  double base_bytes)
{
	moe_admin_res *res = malloc(sizeof(*res));
	cJSON *root, *w, *l;
	double failed;
	int r;

	assert_non_null(res);
	w = weights(c, &root);
	failed = dh_jnum(w, "reloads_failed") + dh_jnum(w, "reloads_cancelled");
	cJSON_Delete(root);
	r = reload(c, dir, NULL, 0, flags, 1, res);
	printf("reload %s: %s; job: %s\n", dir, moe_strerror(r), res->job.message);
	assert_int_equal(r, 0);
	assert_true(res->job.state == MOE_JOB_FAILED || res->job.state == MOE_JOB_CANCELLED);
	if (!strstr(res->job.message, says))
		fail_msg("the failure \"%s\" does not say \"%s\"", res->job.message, says);
	w = weights(c, &root);
	assert_int_equal(dh_jnum(w, "reloads_failed") + dh_jnum(w, "reloads_cancelled"),
			 failed + 1);
	assert_non_null(strstr(dh_jget(w, "last_reload", cJSON_String)->valuestring, says));
	cJSON_ArrayForEach(l, dh_jget(w, "layers", cJSON_Array))
		assert_int_equal(dh_jnum(l, "version"), 1);
	assert_int_equal(dh_jnum(dh_jget(root, "backend", cJSON_Object), "weight_bytes"),
			 base_bytes);
	cJSON_Delete(root);
	free(res);
}

static void serves_a(moe_client *c)
{
	for (uint32_t l = 0; l < g_model->n_moe_layers; l++) {
		uint32_t layer = g_model->layers[l].index, n = 7;
		size_t bytes = (size_t)n * g_H * 4;
		float *in = dh_make_input(MOE_DTYPE_F32, n, 77 + l), *out = malloc(bytes),
		      *ref = malloc(bytes);

		assert_int_equal(moe_forward(c, layer, MOE_DTYPE_F32, in, out, n), 0);
		dh_ref_forward(layer, MOE_DTYPE_F32, in, ref, n);
		assert_memory_equal(out, ref, bytes);
		free(in);
		free(out);
		free(ref);
	}
}

static void test_failures(void **state)
{
	struct daemon *d = reload_daemon(NULL, "reload:\n  max_staging_bytes: 2M\n");
	moe_client *c = dh_cl_open_named(d, "failures");
	char bad[600], name[256];
	uint16_t nan = 0x7fc0;
	double base;
	cJSON *root;

	(void)state;
	root = dh_status(c, true);
	base = dh_jnum(dh_jget(root, "backend", cJSON_Object), "weight_bytes");
	cJSON_Delete(root);
	snprintf(bad, sizeof(bad), "%s/bad", g_tmp);
	fails(c, bad, 0, "No such file", base);
	tu_copy_dir(g_dir[CK_B], bad);
	moe_model_tensor_name(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_DOWN, 5, name,
			      sizeof(name));
	tu_poke_tensor(bad, name, 2 * 33, &nan, 2);
	fails(c, bad, 0, "NaN", base);
	/* a staged second copy larger than reload.max_staging_bytes: --atomic */
	tu_copy_dir(g_dir[CK_B], bad);
	fails(c, bad, MOE_RELOAD_ATOMIC, "max_staging_bytes", base);
	serves_a(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* A reload and a placement change never run together; cancel. */
static void test_busy(void **state)
{
	/* staging at 256 KiB/s: a whole reload takes seconds */
	struct daemon *d = reload_daemon("  copy_bytes_per_s: 16K\n",
					 "reload:\n  bytes_per_s: 256K\n");
	moe_client *c = dh_cl_open_named(d, "busy");
	moe_admin_res *res = malloc(sizeof(*res));
	struct moe_admin_replica rp = {g_model->layers[0].index, 0, 1, 0};
	moe_admin_req q = {.op = MOE_ADMIN_REPLICATE, .payload = &rp, .payload_len = sizeof(rp),
			   .timeout_ms = DH_WAIT_MS};
	uint32_t job;
	int r;

	(void)state;
	assert_non_null(res);
	assert_int_equal(reload(c, g_dir[CK_B], NULL, 0, 0, 0, res), 0);
	job = res->job.job;
	r = moe_admin_call(c, &q, res);
	printf("replicate during a reload: %s: %s\n", moe_strerror(r), res->message);
	assert_int_equal(r, MOE_EBUSY);
	assert_non_null(strstr(res->message, "busy: reload runs"));
	r = reload(c, g_dir[CK_A], NULL, 0, 0, 0, res);
	assert_int_equal(r, MOE_EBUSY);
	assert_non_null(strstr(res->message, "busy: reload"));
	/* cancelled: what was switched stays, the rest keeps A */
	assert_int_equal(reload(c, NULL, NULL, 0, MOE_RELOAD_CANCEL, 0, res), 0);
	for (uint64_t t0 = dh_now_ms(); dh_now_ms() - t0 < DH_WAIT_MS; dh_nap_ms(20)) {
		struct moe_admin_job jd;

		assert_int_equal(moe_job(c, job, 0, &jd), 0);
		if (jd.state != MOE_JOB_RUNNING) {
			printf("cancelled: %s\n", jd.message);
			assert_int_equal(jd.state, MOE_JOB_CANCELLED);
			break;
		}
	}
	/* now a placement change runs (paced at 16 KiB/s): a reload is refused */
	assert_int_equal(moe_admin_call(c, &q, res), 0);
	job = res->job.job;
	r = reload(c, g_dir[CK_B], NULL, 0, 0, 0, res);
	printf("reload during a replicate: %s: %s\n", moe_strerror(r), res->message);
	assert_int_equal(r, MOE_EBUSY);
	assert_non_null(strstr(res->message, "busy: replicate runs"));
	{
		struct moe_admin_job jd;

		assert_int_equal(moe_job(c, job, 1, &jd), 0);
	}
	free(res);
	dh_daemon_stop(d);
	g_passed = true;
}

/* RSS over A -> B -> A cycles (Release only). */
static void test_cycles(void **state)
{
	struct daemon *d = reload_daemon(NULL, "reload:\n  keep_previous: false\n");
	moe_client *c = dh_cl_open_named(d, "cycles");
	moe_admin_res *res = malloc(sizeof(*res));
	long rss[8] = {0};
	int cycles = 6;

	(void)state;
	assert_non_null(res);
	for (int i = 0; i < cycles; i++) {
		reload_ok(c, CK_B, NULL, 0, 0, res);
		reload_ok(c, CK_A, NULL, 0, i % 2 ? MOE_RELOAD_ATOMIC : 0, res);
		serves_a(c);
		rss[i] = dh_rss_kib(d->pid);
	}
	printf("moed RSS after cycle 2: %ld KiB, after cycle %d: %ld KiB\n", rss[1], cycles,
	       rss[cycles - 1]);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
	/* one layer's staging of allocator noise at most */
	assert_true(rss[cycles - 1] <= rss[1] + (long)(g_model->n_experts * g_model->expert_bytes *
						       2 / 1024) + 256);
#endif
	free(res);
	dh_daemon_stop(d);
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_rolling, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_failures, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_busy, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_cycles, dh_setup, dh_teardown),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
