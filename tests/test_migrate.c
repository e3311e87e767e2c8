/* tests/test_migrate.c — moe_engine_migrate: from the served placement to
 * random targets (replicas added, dropped, experts moved between ranks) on
 * 2-4 CPU ranks with spare slots, every fixture family: the placement
 * served afterwards is the target (as ranks per expert), outputs stay
 * bit-identical to the single-rank engine after every move, and the slot
 * bytes return to what was loaded once back at the initial placement.
 * Bad targets are refused and change nothing; a target no move can reach
 * (full ranks swapping experts, no spare slot) stops with -ENOSPC on a
 * valid placement; a cancelled move stops with -ECANCELED and leaves no
 * half-copied slot; a paced copy counts every byte. No timing asserted. */
#include <errno.h>
#include <pthread.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/migrate.h"
#include "tests/testutil.h"
#include "tools/synth.h"

static struct moe_engine *open_engine(const char *fixture, uint32_t ranks, uint32_t spare,
				      struct moe_model **m)
{
	struct moe_engine_opts o = {.threads = 2, .max_batch_tokens = 256, .n_ranks = ranks,
				    .spare_slots = spare};
	char dir[512], err[MOE_ERRLEN];
	struct moe_engine *e;

	snprintf(dir, sizeof(dir), "%s/%s", MOE_FIXTURES_DIR, fixture);
	if (moe_model_open(dir, NULL, m, err) || moe_engine_create(*m, &o, &e, err))
		fail_msg("%s: %s", fixture, err);
	return e;
}

static void forward(struct moe_engine *e, const struct moe_model *m, const float *in, float *out,
		    uint32_t n)
{
	char err[MOE_ERRLEN];

	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		struct moe_epoch *ep = moe_epoch_acquire(e);
		struct moe_batch b = {m->layers[l].index, n, MOE_DT_F32, in,
				      out + (size_t)l * n * m->hidden, NULL, NULL, 0, NULL, NULL};

		if (moe_engine_forward(e, ep, &b, err))
			fail_msg("forward: %s", err);
		moe_epoch_release(ep);
	}
}

/* A random target: every expert on one or more ranks, each rank keeping one
 * slot free (as the planner's targets do: with every slot of every rank
 * full, two experts cannot swap ranks without a slot to pass through). */
static void random_target(uint64_t *want, uint32_t L, uint32_t E, uint32_t R, uint32_t S,
			  struct moe_rng *rng)
{
	for (uint32_t l = 0; l < L; l++) {
		uint32_t load[64] = {0};

		for (uint32_t x = 0; x < E; x++)
			want[(size_t)l * E + x] = 0;
		/* one replica each first, on the least loaded rank of a random few */
		for (uint32_t x = 0; x < E; x++) {
			uint32_t best = (uint32_t)(moe_rng_next(rng) % R);

			for (uint32_t t = 0; t < R; t++) {
				uint32_t r = (uint32_t)(moe_rng_next(rng) % R);

				if (load[r] < load[best])
					best = r;
			}
			assert_true(load[best] < S - 1);
			want[(size_t)l * E + x] |= 1ull << best;
			load[best]++;
		}
		/* then extra replicas where there is room */
		for (uint32_t t = 0; t < R * S; t++) {
			uint32_t x = (uint32_t)(moe_rng_next(rng) % E), r = (uint32_t)(moe_rng_next(rng) % R);
			uint64_t *w = &want[(size_t)l * E + x];

			if (load[r] < S - 1 && !((*w >> r) & 1) && moe_rng_next(rng) % 2) {
				*w |= 1ull << r;
				load[r]++;
			}
		}
	}
}

static void check_fixture(const char *fixture, uint32_t R)
{
	struct moe_model *m1, *m;
	struct moe_engine *e1 = open_engine(fixture, 1, 0, &m1);
	struct moe_engine *e = open_engine(fixture, R, 2, &m);
	uint32_t L = m->n_moe_layers, E = m->n_experts, S = moe_engine_slots_per_rank(e), n = 37;
	size_t out_len = (size_t)L * n * m->hidden;
	float *in = malloc(sizeof(float) * n * m->hidden), *want_out = malloc(sizeof(float) * out_len);
	float *got = malloc(sizeof(float) * out_len);
	uint64_t *want = malloc(sizeof(uint64_t) * L * E), *now = malloc(sizeof(uint64_t) * L * E);
	uint64_t *initial = malloc(sizeof(uint64_t) * L * E), base = moe_engine_weight_bytes(e);
	struct moe_rng rng = {0x3196 + R};
	struct moe_migrate_result res;
	uint32_t added = 0, dropped = 0;
	char err[MOE_ERRLEN];

	assert_true(in && want_out && got && want && now && initial);
	for (size_t i = 0; i < (size_t)n * m->hidden; i++)
		in[i] = (float)moe_rng_normal(&rng);
	forward(e1, m1, in, want_out, n);
	moe_engine_placement_masks(e, initial);
	for (int t = 0; t < 12; t++) {
		random_target(want, L, E, R, S, &rng);
		if (moe_engine_migrate(e, want, NULL, &res, err))
			fail_msg("%s, %u ranks, target %d: %s", fixture, R, t, err);
		moe_engine_placement_masks(e, now);
		assert_memory_equal(now, want, sizeof(uint64_t) * L * E);
		memset(got, 0xa5, sizeof(float) * out_len);
		forward(e, m, in, got, n);
		if (memcmp(got, want_out, sizeof(float) * out_len))
			fail_msg("%s, %u ranks, target %d: outputs differ from one rank", fixture,
				 R, t);
		added += res.added;
		dropped += res.dropped;
	}
	/* back where it started: every extra slot freed */
	assert_int_equal(moe_engine_migrate(e, initial, NULL, &res, err), 0);
	added += res.added;
	dropped += res.dropped;
	assert_int_equal(moe_engine_weight_bytes(e), base);
	printf("%s on %u ranks: 13 moves, %u replicas copied, %u dropped; outputs bit-identical, "
	       "slot bytes back to %llu\n", fixture, R, added, dropped, (unsigned long long)base);
	assert_true(added > 0 && dropped > 0);
	moe_engine_destroy(e);
	moe_engine_destroy(e1);
	moe_model_free(m);
	moe_model_free(m1);
	free(in), free(want_out), free(got), free(want), free(now), free(initial);
}

static void test_targets(void **state)
{
	static const char *fx[] = {"mixtral_bf16", "qwen2_moe_bf16", "deepseek_v3_bf16",
				   "olmoe_f32", "qwen3_moe_f16_sharded"};

	(void)state;
	for (size_t i = 0; i < sizeof(fx) / sizeof(fx[0]); i++)
		check_fixture(fx[i], 2 + (uint32_t)(i % 3));
}

static void test_refusals(void **state)
{
	struct moe_model *m;
	struct moe_engine *e = open_engine("mixtral_bf16", 2, 0, &m);
	uint32_t L = m->n_moe_layers, E = m->n_experts, P = (E + 1) / 2;
	uint64_t *want = malloc(sizeof(uint64_t) * L * E), *now = malloc(sizeof(uint64_t) * L * E);
	uint64_t *before = malloc(sizeof(uint64_t) * L * E), base = moe_engine_weight_bytes(e);
	struct moe_migrate_result res;
	char err[MOE_ERRLEN];

	(void)state;
	assert_true(want && now && before);
	moe_engine_placement_masks(e, before);
	memcpy(want, before, sizeof(uint64_t) * L * E);
	want[0] = 0;
	assert_int_equal(moe_engine_migrate(e, want, NULL, &res, err), -EINVAL);
	printf("empty: %s\n", err);
	want[0] = 1ull << 2;
	assert_int_equal(moe_engine_migrate(e, want, NULL, &res, err), -EINVAL);
	printf("rank 2 of 2: %s\n", err);
	want[0] = 3; /* a replica on a rank with no free slot: over capacity */
	assert_int_equal(moe_engine_migrate(e, want, NULL, &res, err), -EINVAL);
	printf("over capacity: %s\n", err);
	moe_engine_placement_masks(e, now);
	assert_memory_equal(now, before, sizeof(uint64_t) * L * E);
	/* experts 0 and P swap ranks with every slot full: no move can start */
	memcpy(want, before, sizeof(uint64_t) * L * E);
	want[0] = 2, want[P] = 1;
	assert_int_equal(moe_engine_migrate(e, want, NULL, &res, err), -ENOSPC);
	printf("swap on full ranks: %s\n", err);
	moe_engine_placement_masks(e, now);
	assert_memory_equal(now, before, sizeof(uint64_t) * L * E);
	assert_int_equal(moe_engine_weight_bytes(e), base);
	moe_engine_destroy(e);
	moe_model_free(m);
	free(want), free(now), free(before);
}

static void test_pace_and_cancel(void **state)
{
	struct moe_model *m;
	struct moe_engine *e = open_engine("mixtral_bf16", 2, 2, &m);
	uint32_t L = m->n_moe_layers, E = m->n_experts;
	uint64_t *want = malloc(sizeof(uint64_t) * L * E), *now = malloc(sizeof(uint64_t) * L * E);
	uint64_t *before = malloc(sizeof(uint64_t) * L * E), base = moe_engine_weight_bytes(e);
	_Atomic uint64_t copied = 0, steps = 0;
	atomic_bool cancel = true;
	struct moe_migrate_opts o = {.bytes_per_s = 1 << 20, .copied = &copied, .steps = &steps};
	struct moe_migrate_result res;
	char err[MOE_ERRLEN];

	(void)state;
	assert_true(want && now && before);
	moe_engine_placement_masks(e, before);
	memcpy(want, before, sizeof(uint64_t) * L * E);
	want[0] = 3; /* expert 0 of layer 0 on both ranks: one copy */
	assert_int_equal(moe_engine_migrate(e, want, &o, &res, err), 0);
	assert_int_equal(res.added, 1);
	assert_int_equal(res.bytes, atomic_load(&copied));
	assert_int_equal(moe_engine_weight_bytes(e), base + res.bytes);
	assert_int_equal(atomic_load(&steps), 1);
	printf("paced at 1 MiB/s: %llu bytes copied, %u publishes\n",
	       (unsigned long long)res.bytes, res.publishes);
	/* cancelled before the copy: nothing changes, nothing half-filled */
	want[1] = 3;
	o.cancel = &cancel;
	assert_int_equal(moe_engine_migrate(e, want, &o, &res, err), -ECANCELED);
	moe_engine_placement_masks(e, now);
	assert_int_equal(now[1], before[1]);
	assert_int_equal(moe_engine_weight_bytes(e), base + atomic_load(&copied));
	/* and back */
	o.cancel = NULL;
	assert_int_equal(moe_engine_migrate(e, before, &o, &res, err), 0);
	assert_int_equal(res.dropped, 1);
	assert_int_equal(moe_engine_weight_bytes(e), base);
	moe_engine_destroy(e);
	moe_model_free(m);
	free(want), free(now), free(before);
}

struct bg_move {
	struct moe_engine *e;
	const uint64_t *want;
	struct moe_migrate_opts o;
	struct moe_migrate_result res;
	int ret;
	char err[MOE_ERRLEN];
};

static void *bg_move_main(void *arg)
{
	struct bg_move *b = arg;

	b->ret = moe_engine_migrate(b->e, b->want, &b->o, &b->res, b->err);
	return NULL;
}

/* Cancelled in the middle of a round, after one of its copies: what was
 * copied is published (or dropped), never left in a slot nothing names. */
static void test_cancel_mid_round(void **state)
{
	struct moe_model *m;
	struct moe_engine *e = open_engine("mixtral_bf16", 2, 2, &m);
	uint32_t L = m->n_moe_layers, E = m->n_experts;
	uint64_t *want = malloc(sizeof(uint64_t) * L * E), *before = malloc(sizeof(uint64_t) * L * E);
	uint64_t *now = malloc(sizeof(uint64_t) * L * E), base = moe_engine_weight_bytes(e), slot;
	_Atomic uint64_t copied = 0;
	atomic_bool cancel = false;
	struct bg_move b = {.e = e, .want = want};
	struct moe_migrate_result res;
	char err[MOE_ERRLEN];
	uint32_t extra = 0;
	pthread_t th;

	(void)state;
	assert_true(want && before && now);
	moe_engine_placement_masks(e, before);
	/* the size of one slot */
	memcpy(want, before, sizeof(uint64_t) * L * E);
	want[0] = 3;
	assert_int_equal(moe_engine_migrate(e, want, NULL, &res, err), 0);
	slot = moe_engine_weight_bytes(e) - base;
	assert_int_equal(moe_engine_migrate(e, before, NULL, &res, err), 0);
	/* two copies into rank 1, paced: cancelled once the first is done */
	want[0] = 3, want[1] = 3;
	b.o = (struct moe_migrate_opts){.bytes_per_s = 64 << 10, .cancel = &cancel,
					.copied = &copied};
	assert_int_equal(pthread_create(&th, NULL, bg_move_main, &b), 0);
	while (atomic_load(&copied) < slot + slot / 4)
		usleep(1000);
	atomic_store(&cancel, true);
	pthread_join(th, NULL);
	printf("cancelled after %llu bytes: %s\n", (unsigned long long)atomic_load(&copied), b.err);
	assert_int_equal(b.ret, -ECANCELED);
	moe_engine_placement_masks(e, now);
	for (uint32_t i = 0; i < L * E; i++)
		extra += (uint32_t)__builtin_popcountll(now[i]) - 1;
	/* the completed copy is published; no other slot holds memory */
	assert_int_equal(extra, 1);
	assert_int_equal(moe_engine_weight_bytes(e), base + slot);
	assert_int_equal(moe_engine_migrate(e, before, NULL, &res, err), 0);
	assert_int_equal(moe_engine_weight_bytes(e), base);
	moe_engine_destroy(e);
	moe_model_free(m);
	free(want), free(before), free(now);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_targets),
		cmocka_unit_test(test_refusals),
		cmocka_unit_test(test_pace_and_cancel),
		cmocka_unit_test(test_cancel_mid_round),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
