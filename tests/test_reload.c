/* tests/test_reload.c — moe_engine_reload and moe_engine_rollback while
 * batches run.
 *
 * Checkpoints (tools/synth.h, experts from their own generators): A, B (a
 * different seed for everything), B' (A's routers and shared experts, B's
 * routed experts) and M (A with the experts of LIST taken from B': what an
 * experts step from A to B' serves). Three threads forward random batches
 * on random layers without pause while the main thread rolls A -> B -> A
 * -> B by layer, back to A atomically, A -> B' by experts steps, then to B
 * atomically, on 2 CPU ranks with replicas. Every batch's output must be
 * bit-identical to the single-rank engine of the checkpoint its epoch's
 * version names (versions looked up per layer and per expert, their
 * sources mapped to A, B, B' or the mix M); at the end every layer and
 * expert reports the expected version. One case per failure cause (a
 * missing file, a missing tensor, a mis-shaped model, a NaN, a checksum
 * mismatch, a shard modified while read, staging memory, cancel): serving
 * stays on the old weights, versions do not move, weight bytes go back.
 * Rollback returns the weights bit for bit. No timing asserted.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#ifdef MOE_TEST_HAVE_OPENSSL
#include <openssl/sha.h>
#endif

#include "daemon/engine/engine.h"
#include "daemon/engine/migrate.h"
#include "daemon/engine/reload.h"
#include "tests/testutil.h"
#include "tools/synth.h"

#define LIST_N 3
static const uint32_t LIST[LIST_N] = {1, 4, 6};

static bool in_list(void *arg, uint32_t l, uint32_t x)
{
	(void)arg;
	(void)l;
	for (int i = 0; i < LIST_N; i++)
		if (LIST[i] == x)
			return true;
	return false;
}

static bool always(void *arg, uint32_t l, uint32_t x)
{
	(void)arg;
	(void)l;
	(void)x;
	return true;
}

enum { CK_A, CK_B, CK_BP, CK_M, N_CK };

struct world {
	enum moe_family fam;
	char *tmp;
	char dir[N_CK][512];
	struct moe_model *rm[N_CK];
	struct moe_engine *ref[N_CK]; /* single rank, one per checkpoint */
	struct moe_model *m;
	struct moe_engine *e;	      /* 2 ranks, replicas */
};

static void synth(struct world *w, int which)
{
	struct moe_synth_opts o;
	char err[MOE_ERRLEN];

	moe_synth_defaults(&o, w->fam);
	o.hidden = 128, o.inter = 48, o.shared_inter = w->fam == MOE_FAM_QWEN2_MOE ? 96 : 48;
	o.experts = 8, o.top_k = 2, o.layers = 3, o.dense_first = 0;
	o.n_group = 2, o.topk_group = 1;
	o.shards = 2;
	o.seed = which == CK_B ? 2 : 1;
	o.expert_seed = which == CK_B ? 22 : 11;
	o.expert_seed_alt = 22;
	o.alt = which == CK_BP ? always : which == CK_M ? in_list : NULL;
	if (which == CK_BP)
		o.expert_seed = 22;
	if (moe_synth_write(w->dir[which], &o, err))
		fail_msg("synth: %s", err);
}

static struct moe_engine *engine(const char *dir, uint32_t ranks, uint32_t spare,
				 struct moe_model **m)
{
	struct moe_engine_opts o = {.threads = 2, .max_batch_tokens = 64, .n_ranks = ranks,
				    .spare_slots = spare};
	char err[MOE_ERRLEN];
	struct moe_engine *e;

	if (moe_model_open(dir, NULL, m, err) || moe_engine_create(*m, &o, &e, err))
		fail_msg("%s: %s", dir, err);
	return e;
}

static void world_init(struct world *w, enum moe_family fam)
{
	char err[MOE_ERRLEN];

	memset(w, 0, sizeof(*w));
	w->fam = fam;
	w->tmp = tu_tmpdir();
	for (int i = 0; i < N_CK; i++) {
		snprintf(w->dir[i], sizeof(w->dir[i]), "%s/ck%d", w->tmp, i);
		synth(w, i);
		w->ref[i] = engine(w->dir[i], 1, 0, &w->rm[i]);
	}
	w->e = engine(w->dir[CK_A], 2, 1, &w->m);
	/* replicas: expert 1 and 4 of the first MoE layer on both ranks */
	for (uint32_t x = 1; x <= 4; x += 3) {
		uint64_t *want = malloc(sizeof(uint64_t) * w->m->n_moe_layers * w->m->n_experts);
		struct moe_migrate_result res;

		assert_non_null(want);
		moe_engine_placement_masks(w->e, want);
		want[x] = 3;
		if (moe_engine_migrate(w->e, want, NULL, &res, err))
			fail_msg("replicate: %s", err);
		free(want);
	}
}

static void world_free(struct world *w)
{
	moe_engine_destroy(w->e);
	moe_model_free(w->m);
	for (int i = 0; i < N_CK; i++) {
		moe_engine_destroy(w->ref[i]);
		moe_model_free(w->rm[i]);
	}
	tu_rmtree(w->tmp);
	free(w->tmp);
}

/* Which checkpoint a version of layer pos is: from its sources. */
static int which_ck(struct world *w, uint32_t pos, uint32_t version)
{
	struct moe_layer_version info;
	uint32_t ev[64], es[64], E = w->m->n_experts;
	char path[512];
	int ck[64], rck = -1;

	assert_int_equal(moe_engine_version_info(w->e, pos, version, &info, ev, es), 0);
	for (uint32_t x = 0; x <= E; x++) {
		uint32_t src = x < E ? es[x] : info.router_source;
		int *c = x < E ? &ck[x] : &rck;

		assert_int_equal(moe_engine_source(w->e, src, path, sizeof(path), NULL), 0);
		*c = -1;
		for (int i = 0; i < N_CK; i++)
			if (!strcmp(path, w->dir[i]))
				*c = i;
		assert_true(*c >= 0);
	}
	/* all from one checkpoint, or A's router with LIST from B' (= M) */
	{
		bool one = true, mix = rck == CK_A;

		for (uint32_t x = 0; x < E; x++) {
			one &= ck[x] == rck;
			mix &= ck[x] == (in_list(NULL, 0, x) ? CK_BP : CK_A);
		}
		if (one)
			return rck;
		if (rck == CK_BP) {
			for (uint32_t x = 0; x < E; x++)
				if (ck[x] != CK_BP)
					fail_msg("layer %u version %u: B' router with other experts",
						 pos, version);
			return CK_BP;
		}
		if (mix)
			return CK_M;
		fail_msg("layer %u version %u: an unexpected mix of checkpoints", pos, version);
	}
	return -1;
}

/* ---- the threads that serve meanwhile --------------------------------- */

#define MAX_REC 6000
struct rec {
	uint32_t pos, epoch, version, n;
	float *in, *out;
};

struct server {
	struct world *w;
	atomic_bool stop;
	pthread_mutex_t lock;
	struct rec *recs;
	uint32_t n_rec;
	uint64_t batches;
	uint32_t seed;
};

static void *serve(void *arg)
{
	struct server *s = arg;
	struct world *w = s->w;
	struct moe_rng rng;
	uint32_t H = w->m->hidden;
	char err[MOE_ERRLEN];

	pthread_mutex_lock(&s->lock);
	rng.s = ++s->seed * 7777;
	pthread_mutex_unlock(&s->lock);
	while (!atomic_load(&s->stop)) {
		uint32_t pos = (uint32_t)(moe_rng_next(&rng) % w->m->n_moe_layers);
		uint32_t n = 1 + (uint32_t)(moe_rng_next(&rng) % 90); /* > 64: in pieces */
		float *in = malloc(sizeof(float) * n * H), *out = malloc(sizeof(float) * n * H);
		struct moe_epoch *ep;
		struct rec *r;

		assert_true(in && out);
		for (size_t i = 0; i < (size_t)n * H; i++)
			in[i] = (float)moe_rng_normal(&rng);
		ep = moe_epoch_acquire(w->e);
		for (uint32_t t0 = 0; t0 < n; t0 += 64) { /* (as moed's worker splits) */
			uint32_t k = n - t0 < 64 ? n - t0 : 64;
			struct moe_batch b = {w->m->layers[pos].index, k, MOE_DT_F32, in + (size_t)t0 * H,
					      out + (size_t)t0 * H, NULL, NULL, 0, NULL, NULL};

			if (moe_engine_forward(w->e, ep, &b, err))
				fail_msg("forward: %s", err);
		}
		pthread_mutex_lock(&s->lock);
		s->batches++;
		if (s->n_rec < MAX_REC) {
			r = &s->recs[s->n_rec++];
			*r = (struct rec){pos, ep->id, ep->weights_version[pos], n, in, out};
			in = out = NULL;
		}
		pthread_mutex_unlock(&s->lock);
		moe_epoch_release(ep);
		free(in);
		free(out);
	}
	return NULL;
}

static void check_recs(struct server *s, uint32_t *seen)
{
	struct world *w = s->w;
	uint32_t H = w->m->hidden;
	char err[MOE_ERRLEN];

	for (uint32_t i = 0; i < s->n_rec; i++) {
		struct rec *r = &s->recs[i];
		int ck = which_ck(w, r->pos, r->version);
		float *want = malloc(sizeof(float) * r->n * H);
		struct moe_epoch *ep = moe_epoch_acquire(w->ref[ck]);
		struct moe_batch b = {w->m->layers[r->pos].index, r->n, MOE_DT_F32, r->in, want,
				      NULL, NULL, 0, NULL, NULL};

		assert_non_null(want);
		for (uint32_t t0 = 0; t0 < r->n; t0 += 64) {
			b.n_tokens = r->n - t0 < 64 ? r->n - t0 : 64;
			b.in = r->in + (size_t)t0 * H;
			b.out = want + (size_t)t0 * H;
			if (moe_engine_forward(w->ref[ck], ep, &b, err))
				fail_msg("reference: %s", err);
		}
		moe_epoch_release(ep);
		if (memcmp(want, r->out, sizeof(float) * r->n * H))
			fail_msg("batch %u (layer %u, epoch %u, version %u = checkpoint %d, %u "
				 "tokens): not bit-identical to its reference", i, r->pos, r->epoch,
				 r->version, ck, r->n);
		seen[ck]++;
		free(want);
		free(r->in);
		free(r->out);
	}
	s->n_rec = 0;
}

static void do_reload(struct world *w, int ck, const uint32_t *experts, uint32_t n_experts,
		      bool atomic, uint32_t *steps)
{
	struct moe_reload_opts o = {.dir = w->dir[ck], .experts = experts, .n_experts = n_experts,
				    .atomic = atomic, .keep_previous = true, .max_parallel = 2};
	struct moe_reload_result r;
	char err[MOE_ERRLEN];

	if (moe_engine_reload(w->e, &o, &r, err))
		fail_msg("reload to checkpoint %d: %s", ck, err);
	assert_int_equal(r.layers, w->m->n_moe_layers);
	assert_int_equal(r.steps, atomic ? 1 : w->m->n_moe_layers);
	assert_int_equal(r.not_kept, 0);
	*steps += r.steps;
	usleep(20000);
}

static void roll_family(enum moe_family fam)
{
	struct world w;
	struct server s = {.w = &w};
	pthread_t th[3];
	uint32_t seen[N_CK] = {0}, steps = 0, E;
	struct moe_layer_version info;
	uint32_t ev[64], es[64], v1;

	world_init(&w, fam);
	E = w.m->n_experts;
	s.recs = calloc(MAX_REC, sizeof(*s.recs));
	pthread_mutex_init(&s.lock, NULL);
	for (int i = 0; i < 3; i++)
		pthread_create(&th[i], NULL, serve, &s);
	usleep(20000);
	do_reload(&w, CK_B, NULL, 0, false, &steps);
	do_reload(&w, CK_A, NULL, 0, false, &steps);
	do_reload(&w, CK_B, NULL, 0, false, &steps);
	do_reload(&w, CK_A, NULL, 0, true, &steps);
	v1 = moe_engine_layer_version(w.e, 0);
	do_reload(&w, CK_BP, LIST, LIST_N, false, &steps);
	/* experts steps: only LIST changed version, the router kept its */
	assert_int_equal(moe_engine_version_info(w.e, 0, moe_engine_layer_version(w.e, 0), &info,
						 ev, es), 0);
	assert_int_equal(info.router_version, v1);
	for (uint32_t x = 0; x < E; x++)
		assert_int_equal(ev[x], in_list(NULL, 0, x) ? v1 + 1 : v1);
	do_reload(&w, CK_B, NULL, 0, true, &steps);
	atomic_store(&s.stop, true);
	for (int i = 0; i < 3; i++)
		pthread_join(th[i], NULL);
	check_recs(&s, seen);
	/* the end: every layer's and expert's version is the last atomic one */
	for (uint32_t l = 0; l < w.m->n_moe_layers; l++) {
		uint32_t v = moe_engine_layer_version(w.e, l);

		assert_int_equal(v, 1 + 3 + 1 + 1 + 1); /* three by layer, atomic, experts, atomic */
		assert_int_equal(moe_engine_version_info(w.e, l, v, &info, ev, es), 0);
		assert_int_equal(info.router_version, v);
		for (uint32_t x = 0; x < E; x++)
			assert_int_equal(ev[x], v);
		assert_int_equal(which_ck(&w, l, v), CK_B);
	}
	print_message("%s: %llu batches during %u switches; checked: A %u, B %u, B' %u, mix %u\n",
		      moe_family_name(fam), (unsigned long long)s.batches, steps, seen[CK_A],
		      seen[CK_B], seen[CK_BP], seen[CK_M]);
	assert_true(seen[CK_A] && seen[CK_B]);
	free(s.recs);
	pthread_mutex_destroy(&s.lock);
	world_free(&w);
}

static void roll_deepseek(void **state)
{
	(void)state;
	roll_family(MOE_FAM_DEEPSEEK_V3);
}

static void roll_qwen2(void **state)
{
	(void)state;
	roll_family(MOE_FAM_QWEN2_MOE);
}

/* ---- failures --------------------------------------------------------- */

/* One layer's output on the engine equals the reference's. */
static void check_serves(struct world *w, int ck)
{
	uint32_t H = w->m->hidden, n = 5;
	float in[5 * 256], a[5 * 256], b[5 * 256];
	struct moe_rng rng = {99};
	char err[MOE_ERRLEN];

	assert_true(H <= 256);
	for (size_t i = 0; i < (size_t)n * H; i++)
		in[i] = (float)moe_rng_normal(&rng);
	for (uint32_t l = 0; l < w->m->n_moe_layers; l++) {
		struct moe_batch bt = {w->m->layers[l].index, n, MOE_DT_F32, in, a, NULL, NULL, 0,
				       NULL, NULL};
		struct moe_epoch *ep = moe_epoch_acquire(w->e);

		if (moe_engine_forward(w->e, ep, &bt, err))
			fail_msg("%s", err);
		moe_epoch_release(ep);
		ep = moe_epoch_acquire(w->ref[ck]);
		bt.out = b;
		if (moe_engine_forward(w->ref[ck], ep, &bt, err))
			fail_msg("%s", err);
		moe_epoch_release(ep);
		assert_memory_equal(a, b, sizeof(float) * n * H);
	}
}

/* Rewrites a shard's header with one more __metadata__ entry. */
static void add_meta(const char *path, const char *key, const char *val)
{
	FILE *f = fopen(path, "rb");
	uint64_t hl, nl;
	char *hdr, *rest, *js;
	long size;
	cJSON *j, *meta;

	assert_non_null(f);
	fseek(f, 0, SEEK_END);
	size = ftell(f);
	fseek(f, 0, SEEK_SET);
	assert_int_equal(fread(&hl, 8, 1, f), 1);
	hdr = calloc(1, hl + 1);
	rest = malloc((size_t)size - 8 - hl);
	assert_int_equal(fread(hdr, 1, hl, f), hl);
	assert_int_equal(fread(rest, 1, (size_t)size - 8 - hl, f), (size_t)size - 8 - hl);
	fclose(f);
	j = cJSON_Parse(hdr);
	assert_non_null(j);
	meta = cJSON_GetObjectItem(j, "__metadata__");
	if (!meta)
		meta = cJSON_AddObjectToObject(j, "__metadata__");
	cJSON_AddStringToObject(meta, key, val);
	js = cJSON_PrintUnformatted(j);
	nl = (strlen(js) + 7) / 8 * 8;
	f = fopen(path, "wb");
	fwrite(&nl, 8, 1, f);
	fwrite(js, 1, strlen(js), f);
	for (size_t i = strlen(js); i < nl; i++)
		fputc(' ', f);
	fwrite(rest, 1, (size_t)size - 8 - hl, f);
	fclose(f);
	cJSON_free(js);
	cJSON_Delete(j);
	free(hdr);
	free(rest);
}

/* The shard holding `tensor`, from the index. */
static void shard_of(const char *dir, const char *tensor, char *out, size_t n)
{
	char p[600], *js;
	size_t len;
	cJSON *j;
	char err[MOE_ERRLEN];

	snprintf(p, sizeof(p), "%s/model.safetensors.index.json", dir);
	assert_int_equal(moe_read_small_file(p, 1 << 24, &js, &len, err), 0);
	j = cJSON_Parse(js);
	snprintf(out, n, "%s/%s", dir,
		 cJSON_GetObjectItem(cJSON_GetObjectItem(j, "weight_map"), tensor)->valuestring);
	cJSON_Delete(j);
	free(js);
}

struct hook_arg {
	int reads, at;
	const char *touch; /* a file to modify at read `at` */
	atomic_bool *cancel;
};

static void hook(void *arg, const char *shard, const char *tensor)
{
	struct hook_arg *h = arg;

	(void)tensor;
	if (++h->reads != h->at)
		return;
	if (h->touch) {
		FILE *f = fopen(shard, "ab"); /* grows it: size and mtime change */

		fputc(0, f);
		fclose(f);
	}
	if (h->cancel)
		atomic_store(h->cancel, true);
}

static void expect_failure(struct world *w, struct moe_reload_opts *o, int want_err,
			   const char *want_msg)
{
	uint32_t v[16], L = w->m->n_moe_layers;
	uint64_t bytes = moe_engine_weight_bytes(w->e);
	char err[MOE_ERRLEN] = "";
	struct moe_reload_result r;
	int ret;

	for (uint32_t l = 0; l < L; l++)
		v[l] = moe_engine_layer_version(w->e, l);
	ret = moe_engine_reload(w->e, o, &r, err);
	print_message("refused (%d): %s\n", ret, err);
	assert_int_equal(ret, want_err);
	assert_non_null(strstr(err, want_msg));
	assert_int_equal(r.steps, 0);
	for (uint32_t l = 0; l < L; l++)
		assert_int_equal(moe_engine_layer_version(w->e, l), v[l]);
	assert_int_equal(moe_engine_weight_bytes(w->e), bytes);
	check_serves(w, CK_A);
}

static void failures(void **state)
{
	struct world w;
	char bad[600], name[256], shard[700], hex[80];
	struct moe_reload_opts o = {.keep_previous = true};
	atomic_bool cancel = false;
	struct hook_arg h = {0};
	uint16_t nan = 0x7fc0;

	(void)state;
	world_init(&w, MOE_FAM_DEEPSEEK_V3);
	snprintf(bad, sizeof(bad), "%s/bad", w.tmp);
	o.dir = bad;

	/* a missing checkpoint, a missing shard */
	expect_failure(&w, &o, -ENOENT, "bad");
	tu_copy_dir(w.dir[CK_B], bad);
	moe_model_tensor_name(w.fam, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_UP, 3, name, sizeof(name));
	shard_of(bad, name, shard, sizeof(shard));
	unlink(shard);
	expect_failure(&w, &o, -ENOENT, "safetensors");

	/* a missing tensor: the index does not name it */
	tu_copy_dir(w.dir[CK_B], bad);
	{
		char p[700], *js, err[MOE_ERRLEN];
		size_t len;
		cJSON *j;
		FILE *f;

		snprintf(p, sizeof(p), "%s/model.safetensors.index.json", bad);
		assert_int_equal(moe_read_small_file(p, 1 << 24, &js, &len, err), 0);
		j = cJSON_Parse(js);
		free(js);
		cJSON_DeleteItemFromObject(cJSON_GetObjectItem(j, "weight_map"), name);
		js = cJSON_Print(j);
		f = fopen(p, "w");
		fputs(js, f);
		fclose(f);
		cJSON_free(js);
		cJSON_Delete(j);
	}
	expect_failure(&w, &o, -ENOENT, name);

	/* another shape: the experts' intermediate size */
	{
		struct moe_synth_opts so;
		char err[MOE_ERRLEN];

		moe_synth_defaults(&so, w.fam);
		so.hidden = 128, so.inter = 96, so.shared_inter = 48;
		so.experts = 8, so.top_k = 2, so.layers = 3, so.dense_first = 0;
		so.n_group = 2, so.topk_group = 1;
		snprintf(bad, sizeof(bad), "%s/bad2", w.tmp);
		assert_int_equal(moe_synth_write(bad, &so, err), 0);
		expect_failure(&w, &o, -EINVAL, "intermediate size");
		snprintf(bad, sizeof(bad), "%s/bad", w.tmp);
	}

	/* a NaN in an expert of the last layer: the first layers switch,
	 * the last keeps A */
	tu_copy_dir(w.dir[CK_B], bad);
	moe_model_tensor_name(w.fam, MOE_LAYOUT_PER_EXPERT, 2, MOE_T_DOWN, 5, name, sizeof(name));
	tu_poke_tensor(bad, name, 2 * 17, &nan, 2);
	{
		struct moe_reload_result r;
		char err[MOE_ERRLEN];
		uint64_t bytes = moe_engine_weight_bytes(w.e);

		assert_int_equal(moe_engine_reload(w.e, &o, &r, err), -EDOM);
		print_message("refused: %s\n", err);
		assert_non_null(strstr(err, name));
		assert_int_equal(r.steps, 2);
		assert_int_equal(moe_engine_layer_version(w.e, 2), 1);
		assert_int_equal(moe_engine_layer_version(w.e, 0), 2);
		/* back to A: rollback of the two layers that switched */
		assert_int_equal(moe_engine_rollback(w.e, NULL, &r, err), 0);
		assert_int_equal(r.layers, 2);
		check_serves(&w, CK_A);
		(void)bytes;
	}

	/* a wrong checksum, then a right one (which passes) */
	tu_copy_dir(w.dir[CK_B], bad);
	moe_model_tensor_name(w.fam, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_GATE, 2, name, sizeof(name));
	shard_of(bad, name, shard, sizeof(shard));
	{
		char key[300];

		snprintf(key, sizeof(key), "moed.sha256.%s", name);
		add_meta(shard, key, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
	}
#ifdef MOE_TEST_HAVE_OPENSSL
	expect_failure(&w, &o, -EBADMSG, "SHA-256");
	/* the right one passes (layer 1 only, then back) */
	tu_copy_dir(w.dir[CK_B], bad);
	{
		char key[300], err[MOE_ERRLEN];
		struct moe_ckpt *c;
		struct moe_ckpt_tensor t;
		unsigned char md[32], *buf;
		uint32_t one = w.m->layers[1].index;
		uint64_t len;

		assert_int_equal(moe_ckpt_open(bad, &c, err), 0);
		assert_int_equal(moe_ckpt_find(c, name, &t), 0);
		len = t.t->end - t.t->begin;
		buf = malloc(len);
		assert_int_equal(moe_ckpt_read(c, &t, 0, len, buf, err), 0);
		SHA256(buf, len, md);
		for (int i = 0; i < 32; i++)
			snprintf(hex + 2 * i, 3, "%02x", md[i]);
		free(buf);
		moe_ckpt_close(c);
		snprintf(key, sizeof(key), "moed.sha256.%s", name);
		add_meta(shard, key, hex);
		o.layers = &one;
		o.n_layers = 1;
		assert_int_equal(moe_engine_reload(w.e, &o, NULL, err), 0);
		assert_int_equal(moe_engine_rollback(w.e, NULL, NULL, err), 0);
		o.layers = NULL;
		o.n_layers = 0;
		check_serves(&w, CK_A);
	}
#else
	expect_failure(&w, &o, -ENOTSUP, "OpenSSL");
#endif
	(void)hex;

	/* modified while read */
	tu_copy_dir(w.dir[CK_B], bad);
	h = (struct hook_arg){.at = 3, .touch = "yes"};
	o.hook = hook;
	o.hook_arg = &h;
	expect_failure(&w, &o, -ESTALE, "changed");

	/* staging memory */
	tu_copy_dir(w.dir[CK_B], bad);
	o.hook = NULL;
	o.max_staging_bytes = 4096;
	expect_failure(&w, &o, -ENOSPC, "max_staging_bytes");
	o.atomic = true;
	expect_failure(&w, &o, -ENOSPC, "--atomic");
	o.atomic = false;
	o.max_staging_bytes = 0;

	/* cancel during the first layer's reads */
	h = (struct hook_arg){.at = 2, .cancel = &cancel};
	o.hook = hook;
	o.hook_arg = &h;
	o.cancel = &cancel;
	expect_failure(&w, &o, -ECANCELED, "cancel");
	o.hook = NULL;
	o.cancel = NULL;

	/* experts steps need the same routers: A -> B refused, naming one */
	o.dir = w.dir[CK_B];
	o.experts = LIST;
	o.n_experts = LIST_N;
	expect_failure(&w, &o, -EINVAL, "router");
	o.experts = NULL;

	/* keep_previous off: rollback refused with the reason */
	o.keep_previous = false;
	{
		char err[MOE_ERRLEN];

		assert_int_equal(moe_engine_reload(w.e, &o, NULL, err), 0);
		check_serves(&w, CK_B);
		assert_int_equal(moe_engine_rollback(w.e, NULL, NULL, err), -ENODATA);
		assert_non_null(strstr(err, "not kept"));
		assert_int_equal(moe_engine_kept_bytes(w.e), 0);
	}
	world_free(&w);
}

/* Rollback toggles: A -> B, rollback (A), rollback again (B); weight bytes
 * of the tables back to the loaded ones once nothing is kept. */
static void rollback(void **state)
{
	struct world w;
	struct moe_reload_opts o = {.keep_previous = true};
	char err[MOE_ERRLEN];
	uint64_t base;

	(void)state;
	world_init(&w, MOE_FAM_QWEN2_MOE);
	base = moe_engine_weight_bytes(w.e);
	assert_int_equal(moe_engine_rollback(w.e, NULL, NULL, err), -ENOENT);
	o.dir = w.dir[CK_B];
	assert_int_equal(moe_engine_reload(w.e, &o, NULL, err), 0);
	check_serves(&w, CK_B);
	assert_true(moe_engine_kept_bytes(w.e) > 0);
	assert_int_equal(moe_engine_weight_bytes(w.e), base + moe_engine_kept_bytes(w.e));
	assert_int_equal(moe_engine_rollback(w.e, NULL, NULL, err), 0);
	check_serves(&w, CK_A);
	assert_int_equal(moe_engine_rollback(w.e, NULL, NULL, err), 0);
	check_serves(&w, CK_B);
	for (uint32_t l = 0; l < w.m->n_moe_layers; l++) {
		struct moe_layer_version info;

		assert_int_equal(moe_engine_version_info(w.e, l, moe_engine_layer_version(w.e, l),
							 &info, NULL, NULL), 0);
		assert_true(info.rollback);
		assert_int_equal(info.version, 4);
		assert_int_equal(info.router_version, 2); /* B's weights: version 2's */
	}
	/* a reload without keeping releases what was kept */
	o.keep_previous = false;
	o.dir = w.dir[CK_A];
	assert_int_equal(moe_engine_reload(w.e, &o, NULL, err), 0);
	check_serves(&w, CK_A);
	assert_int_equal(moe_engine_kept_bytes(w.e), 0);
	assert_int_equal(moe_engine_weight_bytes(w.e), base);
	world_free(&w);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(roll_deepseek),
		cmocka_unit_test(roll_qwen2),
		cmocka_unit_test(failures),
		cmocka_unit_test(rollback),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
