/* tests/test_transport.c — the `local` transport against a reference:
 * random counts (zeros included), 1-5 ranks, several element sizes; what
 * each rank receives is every rank's block for it, in rank order, byte for
 * byte; counts that do not match are refused (-EPROTO) and nothing moves. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/engine/placement.h"
#include "daemon/engine/threadpool.h"
#include "daemon/engine/transport.h"
#include "tests/testutil.h"
#include "tools/synth.h"

#define MAXR 5

static void check(struct moe_transport *t, uint32_t R, size_t elem, struct moe_rng *rng)
{
	uint32_t sc[MAXR][MAXR], rc[MAXR][MAXR], vec[MAXR][MAXR * 3], got[MAXR][MAXR * 3];
	const uint32_t *vs[MAXR];
	uint32_t *vr[MAXR];
	struct moe_a2a a[MAXR];
	unsigned char *send[MAXR], *recv[MAXR];
	size_t stot[MAXR] = {0}, rtot[MAXR] = {0};

	/* counts: a vector of 3 per pair; the rows are its sum */
	for (uint32_t r = 0; r < R; r++)
		for (uint32_t p = 0; p < R; p++) {
			sc[r][p] = 0;
			for (uint32_t i = 0; i < 3; i++) {
				vec[r][p * 3 + i] = moe_rng_next(rng) % 4 ? (uint32_t)(moe_rng_next(rng) % 9) : 0;
				sc[r][p] += vec[r][p * 3 + i];
			}
		}
	for (uint32_t r = 0; r < R; r++) {
		vs[r] = vec[r];
		vr[r] = got[r];
	}
	assert_int_equal(t->ops->exchange_counts(t, vs, vr, 3), 0);
	for (uint32_t r = 0; r < R; r++)
		for (uint32_t p = 0; p < R; p++) {
			rc[p][r] = 0;
			for (uint32_t i = 0; i < 3; i++) {
				assert_int_equal(got[p][r * 3 + i], vec[r][p * 3 + i]);
				rc[p][r] += got[p][r * 3 + i];
			}
		}
	for (uint32_t r = 0; r < R; r++) {
		for (uint32_t p = 0; p < R; p++) {
			stot[r] += sc[r][p];
			rtot[r] += rc[r][p];
		}
		send[r] = malloc(stot[r] * elem + 1);
		recv[r] = malloc(rtot[r] * elem + 1);
		assert_true(send[r] && recv[r]);
		for (size_t i = 0; i < stot[r] * elem; i++)
			send[r][i] = (unsigned char)moe_rng_next(rng);
		memset(recv[r], 0xee, rtot[r] * elem + 1);
		a[r] = (struct moe_a2a){send[r], sc[r], recv[r], rc[r]};
	}
	assert_int_equal(t->ops->alltoallv(t, a, elem), 0);
	for (uint32_t r = 0; r < R; r++) {
		size_t at = 0;

		for (uint32_t p = 0; p < R; p++) {
			size_t from = 0;

			for (uint32_t q = 0; q < r; q++)
				from += sc[p][q];
			assert_memory_equal(recv[r] + at * elem, send[p] + from * elem,
					    sc[p][r] * elem);
			at += sc[p][r];
		}
		assert_int_equal(at, rtot[r]);
		assert_int_equal(recv[r][rtot[r] * elem], 0xee); /* nothing past the end */
	}
	/* a receiver expecting one element more than is sent: refused */
	if (R > 1) {
		uint32_t bad[MAXR];
		unsigned char before = recv[1][0];

		memcpy(bad, rc[1], sizeof(bad));
		bad[0]++;
		a[1].recv_counts = bad;
		assert_int_equal(t->ops->alltoallv(t, a, elem), -EPROTO);
		assert_int_equal(recv[1][0], before);
	}
	for (uint32_t r = 0; r < R; r++) {
		free(send[r]);
		free(recv[r]);
	}
}

static void test_local(void **state)
{
	struct moe_rng rng = {0x7a5};
	/* 64 KiB elements: exchanges over LOCAL_PARALLEL_BYTES, so the pool's
	 * path runs too */
	static const size_t elems[] = {1, 4, 12, 256, 65536};

	(void)state;
	for (uint32_t R = 1; R <= MAXR; R++) {
		for (int with_pool = 0; with_pool < 2; with_pool++) {
			struct moe_pool *pool = NULL;
			struct moe_transport *t;

			if (with_pool)
				assert_int_equal(moe_pool_create(R, &pool), 0);
			assert_int_equal(moe_transport_local_create(R, pool, &t), 0);
			assert_string_equal(t->ops->name, "local");
			for (int i = 0; i < 20; i++)
				check(t, R, elems[i % 5], &rng);
			moe_transport_destroy(t);
			moe_pool_destroy(pool);
		}
	}
}

static void test_create_errors(void **state)
{
	struct moe_transport *t = NULL;

	(void)state;
	assert_int_equal(moe_transport_local_create(0, NULL, &t), -EINVAL);
	assert_int_equal(moe_transport_local_create(MOE_MAX_RANKS + 1, NULL, &t), -EINVAL);
	assert_null(t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_local),
		cmocka_unit_test(test_create_errors),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
