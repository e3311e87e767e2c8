/* tests/test_abi.c — the public structs of libmoeclient.so.1, pinned.
 *
 * Every field of a public struct is fixed-width (or a pointer), so its
 * layout is the same for every compiler of an LP64 platform and for an FFI
 * (Python's ctypes in client/python mirrors these numbers). This test
 * fails if a field moves, changes size, or a struct grows: that is an ABI
 * change, which needs a new SONAME (CMakeLists.txt) and a new entry in
 * client/python/moeclient/_abi.py. */
#include <stddef.h>

#include "client/include/moeclient.h"
#include "tests/testutil.h"

#define FIELD(T, f, off, size)                                   \
	do {                                                     \
		assert_int_equal(offsetof(T, f), (off));         \
		assert_int_equal(sizeof(((T *)0)->f), (size));   \
	} while (0)

static void test_model_info(void **state)
{
	(void)state;
	FIELD(moe_model_info, family, 0, 16);
	FIELD(moe_model_info, hidden, 16, 4);
	FIELD(moe_model_info, n_experts, 20, 4);
	FIELD(moe_model_info, top_k, 24, 4);
	FIELD(moe_model_info, n_layers, 28, 4);
	FIELD(moe_model_info, n_moe_layers, 32, 4);
	FIELD(moe_model_info, moe_layers, 36, 1024);
	FIELD(moe_model_info, dtype, 1060, 4);
	FIELD(moe_model_info, max_batch_tokens, 1064, 4);
	FIELD(moe_model_info, max_inflight_requests, 1068, 4);
	FIELD(moe_model_info, max_inflight_tokens, 1072, 4);
	FIELD(moe_model_info, data_bytes, 1080, 8);
	assert_int_equal(sizeof(moe_model_info), 1088);
}

static void test_connect_options(void **state)
{
	(void)state;
	FIELD(moe_connect_options, region_bytes, 0, 8);
	FIELD(moe_connect_options, queue_depth, 8, 4);
	FIELD(moe_connect_options, auto_reconnect, 12, 4);
	FIELD(moe_connect_options, name, 16, 8);
	FIELD(moe_connect_options, errbuf, 24, 8);
	FIELD(moe_connect_options, errbuf_len, 32, 8);
	FIELD(moe_connect_options, connect_timeout_ms, 40, 4);
	FIELD(moe_connect_options, reserved, 44, 28);
	assert_int_equal(sizeof(moe_connect_options), 72);
}

static void test_forward_args(void **state)
{
	(void)state;
	FIELD(moe_forward_args, size, 0, 4);
	FIELD(moe_forward_args, flags, 4, 4);
	FIELD(moe_forward_args, layer, 8, 4);
	FIELD(moe_forward_args, dtype, 12, 4);
	FIELD(moe_forward_args, in, 16, 8);
	FIELD(moe_forward_args, out, 24, 8);
	FIELD(moe_forward_args, n_tokens, 32, 4);
	FIELD(moe_forward_args, timeout_ms, 36, 4);
	FIELD(moe_forward_args, topk_ids, 40, 8);
	FIELD(moe_forward_args, topk_weights, 48, 8);
	FIELD(moe_forward_args, epoch, 56, 8);
	assert_int_equal(sizeof(moe_forward_args), 64);
}

static void test_completion_and_admin(void **state)
{
	(void)state;
	FIELD(moe_completion, tag, 0, 8);
	FIELD(moe_completion, status, 8, 4);
	FIELD(moe_completion, epoch, 12, 4);
	assert_int_equal(sizeof(moe_completion), 16);
	FIELD(moe_admin_req, op, 0, 4);
	FIELD(moe_admin_req, flags, 4, 4);
	FIELD(moe_admin_req, payload, 8, 8);
	FIELD(moe_admin_req, payload_len, 16, 4);
	FIELD(moe_admin_req, timeout_ms, 20, 4);
	FIELD(moe_admin_req, wait_job, 24, 4);
	assert_int_equal(sizeof(moe_admin_req), 32);
	FIELD(moe_admin_res, status, 0, 4);
	FIELD(moe_admin_res, message, 4, 244);
	FIELD(moe_admin_res, result_len, 248, 4);
	FIELD(moe_admin_res, result, 252, 3832);
	FIELD(moe_admin_res, job, 4088, sizeof(struct moe_admin_job));
	assert_int_equal(sizeof(struct moe_admin_job), 160);
	assert_int_equal(sizeof(struct moe_admin_epoch_info), 24);
	/* the placement commands' payloads and result */
	FIELD(struct moe_admin_replica, layer, 0, 4);
	FIELD(struct moe_admin_replica, expert, 4, 4);
	FIELD(struct moe_admin_replica, rank, 8, 4);
	FIELD(struct moe_admin_replica, reserved, 12, 4);
	FIELD(struct moe_admin_rebalance, layer, 0, 4);
	FIELD(struct moe_admin_rebalance, mode, 4, 4);
	assert_int_equal(sizeof(struct moe_admin_rebalance), 8);
	FIELD(struct moe_admin_plan, layers, 0, 4);
	FIELD(struct moe_admin_plan, layers_changed, 4, 4);
	FIELD(struct moe_admin_plan, added, 8, 4);
	FIELD(struct moe_admin_plan, dropped, 12, 4);
	FIELD(struct moe_admin_plan, moved, 16, 4);
	FIELD(struct moe_admin_plan, copy_bytes, 24, 8);
	FIELD(struct moe_admin_plan, before, 32, 8);
	FIELD(struct moe_admin_plan, after, 40, 8);
	assert_int_equal(sizeof(struct moe_admin_plan), 48);
	/* reload and version-info */
	FIELD(struct moe_admin_reload, flags, 0, 4);
	FIELD(struct moe_admin_reload, max_parallel, 4, 4);
	FIELD(struct moe_admin_reload, layers, 8, 32);
	FIELD(struct moe_admin_reload, experts, 40, 128);
	FIELD(struct moe_admin_reload, model, 168, 1024);
	assert_int_equal(sizeof(struct moe_admin_reload), 1192);
	FIELD(struct moe_admin_version_ref, layer, 0, 4);
	FIELD(struct moe_admin_version_ref, version, 4, 4);
	FIELD(struct moe_admin_version_ref, first_expert, 8, 4);
	assert_int_equal(sizeof(struct moe_admin_version_ref), 16);
	FIELD(struct moe_admin_version, layer, 0, 4);
	FIELD(struct moe_admin_version, version, 4, 4);
	FIELD(struct moe_admin_version, router_version, 8, 4);
	FIELD(struct moe_admin_version, router_source, 12, 4);
	FIELD(struct moe_admin_version, flags, 16, 4);
	FIELD(struct moe_admin_version, total_experts, 20, 4);
	FIELD(struct moe_admin_version, first_expert, 24, 4);
	FIELD(struct moe_admin_version, n_experts, 28, 4);
	assert_int_equal(sizeof(struct moe_admin_version), 32);
	assert_int_equal(MOE_ADMIN_RELOAD, 12);
	assert_int_equal(MOE_ADMIN_VERSION_INFO, 13);
	/* trace: the filter, the records on the wire */
	assert_int_equal(MOE_ADMIN_TRACE, 14);
	FIELD(struct moe_admin_trace, layer, 0, 4);
	FIELD(struct moe_admin_trace, pid, 4, 4);
	FIELD(struct moe_admin_trace, count, 8, 8);
	FIELD(struct moe_admin_trace, flags, 16, 4);
	assert_int_equal(sizeof(struct moe_admin_trace), 24);
	FIELD(struct moe_trace_record, seq, 0, 8);
	FIELD(struct moe_trace_record, tag, 8, 8);
	FIELD(struct moe_trace_record, unix_ns, 16, 8);
	FIELD(struct moe_trace_record, latency_ns, 24, 8);
	FIELD(struct moe_trace_record, stage_ns, 32, 64);
	FIELD(struct moe_trace_record, pid, 96, 4);
	FIELD(struct moe_trace_record, client, 100, 4);
	FIELD(struct moe_trace_record, client_name, 104, 32);
	FIELD(struct moe_trace_record, layer, 136, 4);
	FIELD(struct moe_trace_record, tokens, 140, 4);
	FIELD(struct moe_trace_record, dtype, 144, 4);
	FIELD(struct moe_trace_record, status, 148, 4);
	FIELD(struct moe_trace_record, epoch, 152, 4);
	FIELD(struct moe_trace_record, weights_version, 156, 4);
	FIELD(struct moe_trace_record, batch_requests, 160, 4);
	FIELD(struct moe_trace_record, batch_tokens, 164, 4);
	FIELD(struct moe_trace_record, n_hits, 168, 4);
	FIELD(struct moe_trace_record, flags, 172, 4);
	assert_int_equal(sizeof(struct moe_trace_record), 176);
	assert_int_equal(sizeof(struct moe_trace_hit), 8);
	assert_int_equal(MOE_TRACE_STAGES, 8);
	assert_int_equal(MOE_TRACE_MAX_HITS, 480);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_model_info),
		cmocka_unit_test(test_connect_options),
		cmocka_unit_test(test_forward_args),
		cmocka_unit_test(test_completion_and_admin),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
