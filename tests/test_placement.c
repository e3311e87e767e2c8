/* tests/test_placement.c — placements are valid and cover every expert. */
#include <errno.h>
#include <stdlib.h>

#include "daemon/engine/placement.h"
#include "tests/testutil.h"

static void test_initial(void **state)
{
	static const uint32_t Es[] = {1, 7, 8, 60, 64, 256}, Rs[] = {1, 2, 3, 8, 64};

	for (size_t a = 0; a < 6; a++) {
		for (size_t b = 0; b < 5; b++) {
			struct moe_placement *p;
			uint32_t E = Es[a], R = Rs[b], per = (E + R - 1) / R;

			assert_int_equal(moe_place_initial(3, E, R, 1, &p), 0);
			assert_int_equal(p->slots_per_rank, per + 1);
			assert_int_equal(moe_place_validate(p), 0);
			for (uint32_t l = 0; l < 3; l++) {
				uint32_t load[64] = {0};

				for (uint32_t e = 0; e < E; e++) {
					uint32_t n;
					const struct moe_replica *r = moe_place_get(p, l, e, &n);

					assert_int_equal(n, 1);
					load[r->rank]++;
				}
				/* contiguous blocks: no rank holds more than ceil(E/R) */
				for (uint32_t r = 0; r < R; r++)
					assert_true(load[r] <= per);
			}
			moe_place_free(p);
		}
	}
}

static void test_validate_rejects(void **state)
{
	struct moe_placement *p;

	assert_int_equal(moe_place_initial(1, 8, 2, 0, &p), 0);
	/* two experts in one slot */
	p->rep[1 * MOE_MAX_REPLICAS] = p->rep[0];
	assert_int_equal(moe_place_validate(p), -EINVAL);
	/* a slot past the rank's slots */
	p->rep[1 * MOE_MAX_REPLICAS] = (struct moe_replica){0, 9};
	assert_int_equal(moe_place_validate(p), -EINVAL);
	/* an expert with no replica */
	p->rep[1 * MOE_MAX_REPLICAS] = (struct moe_replica){0, 1};
	assert_int_equal(moe_place_validate(p), 0);
	p->n_replicas[3] = 0;
	assert_int_equal(moe_place_validate(p), -EINVAL);
	moe_place_free(p);
	assert_int_equal(moe_place_initial(1, 8, 0, 0, &p), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_initial),
		cmocka_unit_test(test_validate_rejects),
	};

	return cmocka_run_group_tests_name("placement", tests, NULL, NULL);
}
