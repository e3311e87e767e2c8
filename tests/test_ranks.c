/* tests/test_ranks.c — CPU expert parallelism inside the engine: R ranks,
 * each with its own threads, slots and copies of the weights, and random
 * placements with replicas (copied into spare slots by
 * moe_engine_replicate, then published). For every fixture in
 * tests/fixtures/ (every family), R in {1, 2, 3, 4} and several random
 * placements, every output is bit-identical to the single-rank engine's on
 * the same inputs: the kernels are batch-invariant and the combine sums a
 * token's rows in k order whichever rank computed them. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "daemon/engine/placement.h"
#include "kernels/cpu/convert.h"
#include "tests/testutil.h"
#include "tools/synth.h"

static struct moe_engine *open_engine(const char *dir, uint32_t ranks, uint32_t spare,
				      struct moe_model **m)
{
	struct moe_engine_opts o = {.threads = 2, .max_batch_tokens = 1100, .n_ranks = ranks,
				    .spare_slots = spare};
	struct moe_engine *e;
	char err[MOE_ERRLEN];

	if (moe_model_open(dir, NULL, m, err))
		fail_msg("%s", err);
	if (moe_engine_create(*m, &o, &e, err))
		fail_msg("%s: %u ranks: %s", dir, ranks, err);
	/* what moed -t plans is what the ranks allocate */
	assert_int_equal(moe_engine_workspace_bytes(*m, &o), moe_engine_allocated_workspace_bytes(e));
	return e;
}

static void run(struct moe_engine *e, uint32_t layer, const float *in, float *out, uint32_t n,
		uint32_t *ids)
{
	struct moe_epoch *ep = moe_epoch_acquire(e);
	struct moe_batch b = {layer, n, MOE_DT_F32, in, out, ids, NULL, 0, NULL, NULL};
	char err[MOE_ERRLEN];

	if (moe_engine_forward(e, ep, &b, err))
		fail_msg("forward: %s", err);
	moe_epoch_release(ep);
}

/* Fills every spare slot of every rank with a copy of a random expert that
 * rank does not hold yet; returns the table of what went where. */
static int32_t *fill_spares(struct moe_engine *e, const struct moe_model *m, uint32_t R,
			    struct moe_rng *rng)
{
	uint32_t E = m->n_experts, S = moe_engine_slots_per_rank(e), P = (E + R - 1) / R;
	int32_t *held = malloc(sizeof(int32_t) * m->n_moe_layers * R * S);
	char err[MOE_ERRLEN];

	assert_non_null(held);
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		for (uint32_t r = 0; r < R; r++) {
			for (uint32_t s = 0; s < S; s++) {
				int32_t *h = &held[(l * R + r) * S + s];
				uint32_t x;
				bool dup;

				if (s < P) { /* primary: the initial placement's */
					x = r * P + s;
					*h = x < E ? (int32_t)x : -1;
					continue;
				}
				do {
					x = (uint32_t)(moe_rng_next(rng) % E);
					dup = x / P == r;
					for (uint32_t k = P; k < s; k++)
						dup |= held[(l * R + r) * S + k] == (int32_t)x;
				} while (dup && R > 1);
				if (moe_engine_replicate(e, l, x, r, s, err))
					fail_msg("replicate: %s", err);
				*h = (int32_t)x;
			}
		}
	}
	return held;
}

/* The initial placement plus a random subset of the spare replicas. */
static struct moe_placement *random_placement(const struct moe_model *m, uint32_t R,
					      uint32_t spare, const int32_t *held,
					      struct moe_rng *rng, uint32_t *n_extra)
{
	uint32_t E = m->n_experts, P = (E + R - 1) / R, S = P + spare;
	struct moe_placement *p;

	assert_int_equal(moe_place_initial(m->n_moe_layers, E, R, spare, &p), 0);
	for (uint32_t l = 0; l < m->n_moe_layers; l++)
		for (uint32_t r = 0; r < R; r++)
			for (uint32_t s = P; s < S; s++) {
				int32_t x = held[(l * R + r) * S + s];
				uint8_t *n = &p->n_replicas[l * E + (uint32_t)x];

				if (x < 0 || moe_rng_next(rng) % 3 == 0 || *n >= MOE_MAX_REPLICAS)
					continue;
				p->rep[((size_t)l * E + (uint32_t)x) * MOE_MAX_REPLICAS + *n] =
					(struct moe_replica){(uint16_t)r, (uint16_t)s};
				(*n)++;
				(*n_extra)++;
			}
	assert_int_equal(moe_place_validate(p), 0);
	return p;
}

static void check_fixture(const char *dir)
{
	/* 1100: two rounds (1024 tokens, then 76) */
	static const uint32_t sizes[] = {1, 7, 300, 1100};
	struct moe_model *m1, *m;
	struct moe_engine *e1 = open_engine(dir, 1, 0, &m1);
	uint32_t H = m1->hidden, K = m1->top_k, maxn = 1100;
	float *in = malloc(sizeof(float) * maxn * H), *want = malloc(sizeof(float) * maxn * H);
	float *got = malloc(sizeof(float) * maxn * H);
	uint32_t *wids = malloc(sizeof(uint32_t) * maxn * K), *gids = malloc(sizeof(uint32_t) * maxn * K);
	struct moe_rng rng = {0x5eed};
	uint32_t extra = 0, compared = 0;

	assert_true(in && want && got && wids && gids);
	for (size_t i = 0; i < (size_t)maxn * H; i++)
		in[i] = (float)moe_rng_normal(&rng);
	for (uint32_t R = 1; R <= 4; R++) {
		uint32_t spare = 2;
		struct moe_engine *e = open_engine(dir, R, spare, &m);
		uint64_t base = moe_engine_weight_bytes(e);
		int32_t *held = fill_spares(e, m, R, &rng);

		assert_int_equal(moe_engine_ranks(e), R);
		for (int trial = 0; trial < 3; trial++) {
			char err[MOE_ERRLEN];
			uint32_t id;

			if (trial && moe_engine_publish(e, random_placement(m, R, spare, held, &rng,
									   &extra),
						       NULL, &id, err))
				fail_msg("publish: %s", err);
			for (uint32_t l = 0; l < m->n_moe_layers; l++) {
				for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
					uint32_t n = sizes[s], layer = m->layers[l].index;

					run(e1, layer, in, want, n, wids);
					memset(got, 0xa5, sizeof(float) * n * H);
					run(e, layer, in, got, n, gids);
					if (memcmp(got, want, sizeof(float) * n * H))
						fail_msg("%s: %u ranks, placement %d, layer %u, %u "
							 "tokens: output differs from one rank", dir,
							 R, trial, layer, n);
					assert_memory_equal(gids, wids, sizeof(uint32_t) * n * K);
					compared++;
				}
			}
		}
		/* rows crossed ranks through the transport (none with one) */
		if (R > 1)
			assert_true(moe_engine_transport_bytes(e) > 0);
		else
			assert_int_equal(moe_engine_transport_bytes(e), 0);
		/* back to the initial placement, every replica dropped: the slot
		 * bytes return to what was loaded (the old epochs retire at
		 * the publish: no batch holds them) */
		{
			struct moe_placement *p;
			char err[MOE_ERRLEN];
			uint32_t id, P = (m->n_experts + R - 1) / R;

			assert_true(moe_engine_weight_bytes(e) > base);
			assert_int_equal(moe_place_initial(m->n_moe_layers, m->n_experts, R, spare,
							   &p), 0);
			assert_int_equal(moe_engine_publish(e, p, NULL, &id, err), 0);
			for (uint32_t l = 0; l < m->n_moe_layers; l++)
				for (uint32_t r = 0; r < R; r++)
					for (uint32_t s = P; s < P + spare; s++)
						assert_int_equal(moe_engine_drop_replica(e, l, r, s,
											  err), 0);
			assert_int_equal(moe_engine_weight_bytes(e), base);
			assert_int_equal(moe_engine_drop_replica(e, 0, 0, P, err), -ENOENT);
		}
		free(held);
		moe_engine_destroy(e);
		moe_model_free(m);
	}
	printf("%s: %u batches on 1-4 ranks, %u replicas in random placements: bit-identical "
	       "to one rank\n", strrchr(dir, '/') + 1, compared, extra);
	assert_true(extra > 0);
	moe_engine_destroy(e1);
	moe_model_free(m1);
	free(in);
	free(want);
	free(got);
	free(wids);
	free(gids);
}

static void test_all_fixtures(void **state)
{
	DIR *d = opendir(MOE_FIXTURES_DIR);
	struct dirent *de;
	int n = 0;

	(void)state;
	assert_non_null(d);
	while ((de = readdir(d))) {
		char dir[1024], cfg[1100];
		struct stat st;

		if (de->d_name[0] == '.')
			continue;
		snprintf(dir, sizeof(dir), "%s/%s", MOE_FIXTURES_DIR, de->d_name);
		snprintf(cfg, sizeof(cfg), "%s/config.json", dir);
		if (stat(cfg, &st))
			continue;
		check_fixture(dir);
		n++;
	}
	closedir(d);
	assert_true(n >= 10);
}

static void test_errors(void **state)
{
	struct moe_model *m;
	struct moe_engine *e;
	char dir[512], err[MOE_ERRLEN];

	(void)state;
	snprintf(dir, sizeof(dir), "%s/qwen2_moe_bf16", MOE_FIXTURES_DIR);
	e = open_engine(dir, 2, 1, &m);
	/* a slot that holds an expert, a bad rank, an expert past the model */
	assert_int_equal(moe_engine_replicate(e, 0, 3, 0, 0, err), -EBUSY);
	assert_int_equal(moe_engine_replicate(e, 0, 3, 2, 0, err), -EINVAL);
	assert_int_equal(moe_engine_replicate(e, 0, m->n_experts, 1, 0, err), -EINVAL);
	/* a placement naming a spare slot before a replica is copied there */
	{
		struct moe_placement *p;
		uint32_t E = m->n_experts, P = (E + 1) / 2, id;

		assert_int_equal(moe_place_initial(m->n_moe_layers, E, 2, 1, &p), 0);
		p->rep[0 * MOE_MAX_REPLICAS + 1] = (struct moe_replica){1, (uint16_t)P};
		p->n_replicas[0] = 2;
		assert_int_equal(moe_engine_publish(e, p, NULL, &id, err), -EINVAL);
		assert_non_null(strstr(err, "does not hold expert 0"));
		/* copied, published, dropped while an epoch holds it: it stays
		 * until that epoch retires, and cannot be named again */
		{
			uint64_t before = moe_engine_weight_bytes(e);
			struct moe_epoch *held;

			assert_int_equal(moe_engine_replicate(e, 0, 0, 1, P, err), 0);
			assert_int_equal(moe_place_initial(m->n_moe_layers, E, 2, 1, &p), 0);
			p->rep[0 * MOE_MAX_REPLICAS + 1] = (struct moe_replica){1, (uint16_t)P};
			p->n_replicas[0] = 2;
			assert_int_equal(moe_engine_publish(e, p, NULL, &id, err), 0);
			held = moe_epoch_acquire(e); /* a batch on it */
			assert_int_equal(moe_place_initial(m->n_moe_layers, E, 2, 1, &p), 0);
			assert_int_equal(moe_engine_publish(e, p, NULL, &id, err), 0);
			assert_int_equal(moe_engine_drop_replica(e, 0, 1, P, err), 0);
			assert_true(moe_engine_weight_bytes(e) > before); /* still held */
			assert_int_equal(moe_place_initial(m->n_moe_layers, E, 2, 1, &p), 0);
			p->rep[0 * MOE_MAX_REPLICAS + 1] = (struct moe_replica){1, (uint16_t)P};
			p->n_replicas[0] = 2;
			assert_int_equal(moe_engine_publish(e, p, NULL, &id, err), -EINVAL);
			assert_non_null(strstr(err, "being dropped"));
			moe_epoch_release(held); /* its last batch: retired, slot freed */
			assert_int_equal(moe_engine_weight_bytes(e), before);
		}
	}
	moe_engine_destroy(e);
	moe_model_free(m);
	/* the CUDA backend stays single-rank */
	{
		struct moe_engine_opts o = {.n_ranks = 2, .backend = "cuda"};

		assert_int_equal(moe_model_open(dir, NULL, &m, err), 0);
		assert_true(moe_engine_create(m, &o, &e, err) < 0);
		moe_model_free(m);
	}
}


/* MOED_TEST_RANK_FAULT's engine side: rank `dead` fails its expert stage in
 * batch `at`; the batch still answers, bit for bit the single-rank
 * engine's, and so do the batches after it, without that rank. */
static void lost_rank_case(const char *fixture, uint32_t R, uint32_t spare, uint32_t dead,
			   const char *dir_override)
{
	struct moe_engine_opts o = {.threads = 2, .max_batch_tokens = 1100, .n_ranks = R,
				    .spare_slots = spare, .test_rank_fault_rank = dead,
				    .test_rank_fault_at = 3};
	struct moe_model *m1, *m;
	struct moe_engine *e1, *e;
	char dir[512], err[MOE_ERRLEN];
	uint32_t n = 1100, H;
	float *in, *want, *got;
	struct moe_rng rng = {77 + R};
	uint64_t loaded;

	snprintf(dir, sizeof(dir), "%s/%s", MOE_FIXTURES_DIR, fixture);
	e1 = open_engine(dir, 1, 0, &m1);
	if (moe_model_open(dir_override ? dir_override : dir, NULL, &m, err) ||
	    moe_engine_create(m, &o, &e, err))
		fail_msg("%s", err);
	loaded = moe_engine_weight_bytes(e);
	H = m->hidden;
	in = malloc(sizeof(float) * n * H), want = malloc(sizeof(float) * n * H);
	got = malloc(sizeof(float) * n * H);
	assert_true(in && want && got);
	for (size_t i = 0; i < (size_t)n * H; i++)
		in[i] = (float)moe_rng_normal(&rng);
	struct moe_epoch *old = NULL;

	for (int b = 1; b <= 5; b++) {
		uint32_t layer = m->layers[(uint32_t)b % m->n_moe_layers].index;
		uint32_t nt = b == 3 ? n : 1 + (uint32_t)b * 37;

		if (b == 3) /* pinned before the loss, used after it (as a split request) */
			old = moe_epoch_acquire(e);

		run(e1, layer, in, want, nt, NULL);
		/* the batch that hits the fault is in place (output over its
		 * input): the round run again still reads its inputs */
		if (b == 3) {
			memcpy(got, in, sizeof(float) * nt * H);
			run(e, layer, got, got, nt, NULL);
		} else {
			memset(got, 0xa5, sizeof(float) * nt * H);
			run(e, layer, in, got, nt, NULL);
		}
		if (memcmp(got, want, sizeof(float) * nt * H))
			fail_msg("%s, %u ranks, rank %u lost at batch 3: batch %d differs", fixture,
				 R, dead, b);
		assert_int_equal(moe_engine_rank_lost(e, dead), b >= 3);
	}
	{
		uint32_t layer = m->layers[0].index;
		struct moe_batch bt = {layer, 300, MOE_DT_F32, in, got, NULL, NULL, 0, NULL, NULL};

		run(e1, layer, in, want, 300, NULL);
		memset(got, 0xa5, sizeof(float) * 300 * H);
		if (moe_engine_forward(e, old, &bt, err))
			fail_msg("forward on the epoch pinned before the loss: %s", err);
		if (memcmp(got, want, sizeof(float) * 300 * H))
			fail_msg("%s: a batch on the epoch pinned before the loss differs", fixture);
		moe_epoch_release(old);
	}
	printf("%s on %u ranks (%u spare): rank %u lost in batch 3 (1100 tokens in place, 2 rounds): "
	       "every batch, and one on the epoch pinned before, bit-identical to one rank; weights %llu -> %llu bytes\n", fixture, R,
	       spare, dead, (unsigned long long)loaded,
	       (unsigned long long)moe_engine_weight_bytes(e));
	/* the lost rank's memory is freed (its shared-expert copies now, its
	 * slots with the last epoch naming them): no more than loaded, less
	 * with shared experts (the experts only it held were read again) */
	assert_true(moe_engine_weight_bytes(e) <= loaded);
	if (m->shared_inter)
		assert_true(moe_engine_weight_bytes(e) < loaded);
	moe_engine_destroy(e);
	moe_engine_destroy(e1);
	moe_model_free(m);
	moe_model_free(m1);
	free(in), free(want), free(got);
}

static void copy_file(const char *src, const char *dst)
{
	FILE *f = fopen(src, "rb"), *g = fopen(dst, "wb");
	char buf[65536];
	size_t k;

	assert_true(f && g);
	while ((k = fread(buf, 1, sizeof(buf), f)) > 0)
		assert_int_equal(fwrite(buf, 1, k, g), k);
	fclose(f), fclose(g);
}

static void test_lost_rank(void **state)
{
	(void)state;
	lost_rank_case("qwen2_moe_bf16", 3, 1, 1, NULL);     /* spare slots first */
	lost_rank_case("deepseek_v3_bf16", 2, 0, 0, NULL);   /* no spare: the room kept */
	lost_rank_case("mixtral_f32_fused", 4, 2, 3, NULL);
	/* the checkpoint rewritten since the load: the lost rank's experts
	 * cannot be read again, the batch fails as a lost device */
	{
		struct moe_engine_opts o = {.threads = 2, .n_ranks = 2, .test_rank_fault_rank = 1,
					    .test_rank_fault_at = 1};
		char *tmp = tu_tmpdir(), src[512], dst[512], err[MOE_ERRLEN];
		static const char *files[] = {"config.json", "model.safetensors"};
		struct moe_model *m;
		struct moe_engine *e;
		struct moe_epoch *ep;
		struct moe_batch b;
		float *in, *out;

		for (int i = 0; i < 2; i++) {
			snprintf(src, sizeof(src), "%s/olmoe_f32/%s", MOE_FIXTURES_DIR, files[i]);
			snprintf(dst, sizeof(dst), "%s/%s", tmp, files[i]);
			copy_file(src, dst);
		}
		if (moe_model_open(tmp, NULL, &m, err) || moe_engine_create(m, &o, &e, err))
			fail_msg("%s", err);
		/* the same bytes, a new file: another inode and mtime */
		snprintf(src, sizeof(src), "%s/model.safetensors", tmp);
		snprintf(dst, sizeof(dst), "%s/model.safetensors.new", tmp);
		copy_file(src, dst);
		assert_int_equal(rename(dst, src), 0);
		in = calloc(m->hidden * 8, sizeof(float)), out = calloc(m->hidden * 8, sizeof(float));
		assert_true(in && out);
		for (uint32_t i = 0; i < m->hidden * 8; i++)
			in[i] = (float)(i % 7) - 3;
		b = (struct moe_batch){m->layers[0].index, 8, MOE_DT_F32, in, out, NULL, NULL, 0, NULL, NULL};
		ep = moe_epoch_acquire(e);
		assert_int_equal(moe_engine_forward(e, ep, &b, err), -ENOTRECOVERABLE);
		printf("checkpoint replaced: %s\n", err);
		assert_non_null(strstr(err, "changed"));
		moe_epoch_release(ep);
		moe_engine_destroy(e);
		moe_model_free(m);
		free(in), free(out);
		tu_rmtree(tmp);
		free(tmp);
	}
	/* one rank: nothing to move to, the batch fails as a lost device */
	{
		struct moe_engine_opts o = {.threads = 1, .n_ranks = 1, .test_rank_fault_rank = 0,
					    .test_rank_fault_at = 1};
		struct moe_model *m;
		struct moe_engine *e;
		char dir[512], err[MOE_ERRLEN];
		float *in, *out;
		struct moe_epoch *ep;
		struct moe_batch b;

		snprintf(dir, sizeof(dir), "%s/olmoe_f32", MOE_FIXTURES_DIR);
		if (moe_model_open(dir, NULL, &m, err) || moe_engine_create(m, &o, &e, err))
			fail_msg("%s", err);
		in = calloc(m->hidden, sizeof(float)), out = calloc(m->hidden, sizeof(float));
		assert_true(in && out);
		in[0] = 1;
		b = (struct moe_batch){m->layers[0].index, 1, MOE_DT_F32, in, out, NULL, NULL, 0, NULL, NULL};
		ep = moe_epoch_acquire(e);
		assert_int_equal(moe_engine_forward(e, ep, &b, err), -ENOTRECOVERABLE);
		printf("one rank: %s\n", err);
		assert_non_null(strstr(err, "rank 0 lost"));
		moe_epoch_release(ep);
		moe_engine_destroy(e);
		moe_model_free(m);
		free(in), free(out);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_all_fixtures),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_lost_rank),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
