// SPDX-License-Identifier: MIT
/*
 * test_config.c - moe.yaml parsing: defaults, every key, and the exact
 * FILE:LINE:COLUMN: key.path: prefix of every kind of error.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "daemon/server/config.h"

#define EXAMPLE MOE_FIXTURES_DIR "/../../moe.yaml.example"

static int load(const char *yaml, struct moe_config *c, char *err)
{
	return moe_cfg_load_string("t.yaml", yaml, strlen(yaml), c, err, MOE_CFG_ERRLEN);
}

/* Parse @yaml, which must succeed; the caller frees @c. */
#define LOAD_OK(yaml, c) load_ok(yaml, c, __FILE__, __LINE__)
static void load_ok(const char *yaml, struct moe_config *c, const char *file, int line)
{
	char err[MOE_CFG_ERRLEN];
	int rc = load(yaml, c, err);

	if (rc)
		print_error("unexpected error: %s\n", err);
	_assert_int_equal(rc, 0, file, line);
}

/*
 * Parsing @yaml fails with -EINVAL and a message that starts with @want
 * (position included), and leaves nothing behind in the config.
 */
#define EXPECT_ERR(yaml, want) expect_err(yaml, want, __FILE__, __LINE__)
static void expect_err(const char *yaml, const char *want, const char *file, int line)
{
	char err[MOE_CFG_ERRLEN], head[MOE_CFG_ERRLEN];
	struct moe_config c;
	int rc = load(yaml, &c, err);

	snprintf(head, sizeof(head), "%.*s", (int)strlen(want), err);
	if (rc != -EINVAL || strcmp(head, want))
		print_error("input:\n%s\nmessage: %s\n", yaml, err);
	_assert_int_equal(rc, -EINVAL, file, line);
	_assert_string_equal(head, want, file, line);
	_assert_true(c.model.path == NULL && c.server.socket == NULL, "config zeroed", file, line);
	moe_cfg_free(&c);
}

/* ------------------------------------------------------------------------ */

static void test_defaults(void **state)
{
	struct moe_config c;

	(void)state;
	assert_int_equal(moe_cfg_defaults(&c), 0);
	assert_null(c.path);
	assert_null(c.model.path);
	assert_null(c.model.family);
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CPU);
	assert_int_equal(c.devices.n_ranks, 1);
	assert_false(c.devices.all_gpus);
	assert_int_equal(c.cpu.threads, 0);
	assert_int_equal(c.cpu.isa, MOE_CFG_ISA_AUTO);
	assert_int_equal(c.placement.spare_slots, 0);
	assert_false(c.placement.auto_rebalance);
	assert_true(c.placement.rebalance_threshold > 1.0);
	assert_int_equal(c.placement.rebalance_interval_s, 60);
	assert_int_equal(c.scheduler.max_batch_tokens, 4096);
	assert_int_equal(c.scheduler.batch_window_us, 200);
	assert_int_equal(c.scheduler.max_queue_requests, 4096);
	assert_int_equal(c.scheduler.request_timeout_ms, 30000);
	assert_string_equal(c.server.socket, "/run/moed/moed.sock");
	assert_int_equal(c.server.socket_mode, 0660);
	assert_string_equal(c.server.group, "");
	assert_string_equal(c.server.admin_group, "");
	assert_int_equal(c.server.max_clients, 64);
	assert_true(c.server.max_client_shm_bytes == 1ULL << 30);
	assert_true(c.server.max_total_shm_bytes == 0); /* a quarter of the host, in main.c */
	assert_int_equal(c.server.max_inflight_requests, 256);
	assert_int_equal(c.server.max_inflight_tokens, 65536);
	assert_string_equal(c.metrics.listen, "");
	assert_int_equal(c.log.level, MOE_CFG_LOG_INFO);
	assert_string_equal(moe_cfg_log_level_name(c.log.level), "info");
	assert_string_equal(moe_cfg_isa_name(c.cpu.isa), "auto");
	moe_cfg_free(&c);
	assert_null(c.server.socket);
	moe_cfg_free(&c); /* twice is fine */
	moe_cfg_free(NULL);
}

/* Only model.path given: everything else is the default. */
static void test_minimal(void **state)
{
	struct moe_config c, d;

	(void)state;
	LOAD_OK("model:\n  path: /srv/m\n", &c);
	assert_string_equal(c.model.path, "/srv/m");
	assert_null(c.path);
	assert_int_equal(moe_cfg_defaults(&d), 0);
	assert_int_equal(c.cpu.threads, d.cpu.threads);
	assert_int_equal(c.scheduler.max_batch_tokens, d.scheduler.max_batch_tokens);
	assert_string_equal(c.server.socket, d.server.socket);
	assert_int_equal(c.log.level, d.log.level);
	assert_int_equal(c.devices.kind, d.devices.kind);
	assert_int_equal(c.devices.n_ranks, d.devices.n_ranks);
	moe_cfg_free(&d);
	moe_cfg_free(&c);

	/* Flow style, quoted path, empty sections, explicit document. */
	LOAD_OK("---\n{model: {path: \"/srv/my model\"}, cpu: {}, log: }\n...\n", &c);
	assert_string_equal(c.model.path, "/srv/my model");
	moe_cfg_free(&c);
}

static void test_example_parses(void **state)
{
	char err[MOE_CFG_ERRLEN];
	struct moe_config c;
	int rc;

	(void)state;
	rc = moe_cfg_load_file(EXAMPLE, &c, err, sizeof(err));
	if (rc)
		print_error("%s\n", err);
	assert_int_equal(rc, 0);
	assert_string_equal(c.path, EXAMPLE);
	assert_string_equal(c.model.path, "/var/lib/moed/models/Qwen3-30B-A3B");
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CPU);
	assert_int_equal(c.devices.n_ranks, 1);
	assert_int_equal(c.scheduler.max_batch_tokens, 4096);
	assert_int_equal(c.log.level, MOE_CFG_LOG_INFO);
	moe_cfg_free(&c);
}

/* The example documents every key (active or commented out). */
static void test_example_documents_every_key(void **state)
{
	static const char *const keys[] = {
	    "model:",
	    "path:",
	    "family:",
	    "devices:",
	    "cpu:",
	    "threads:",
	    "isa:",
	    "placement:",
	    "spare_slots:",
	    "auto_rebalance:",
	    "rebalance_threshold:",
	    "rebalance_interval_s:",
	    "stats_window_s:",
	    "scheduler:",
	    "max_batch_tokens:",
	    "batch_window_us:",
	    "max_queue_requests:",
	    "request_timeout_ms:",
	    "server:",
	    "socket:",
	    "socket_mode:",
	    "group:",
	    "admin_group:",
	    "max_clients:",
	    "max_client_shm_bytes:",
	    "max_inflight_requests:",
	    "max_inflight_tokens:",
	    "metrics:",
	    "listen:",
	    "per_expert:",
	    "slo_p99_ms:",
	    "log:",
	    "level:",
	};
	static char text[65536];
	size_t i, n;
	FILE *f;

	(void)state;
	f = fopen(EXAMPLE, "r");
	assert_non_null(f);
	n = fread(text, 1, sizeof(text) - 1, f);
	fclose(f);
	text[n] = '\0';
	for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (!strstr(text, keys[i]))
			print_error("moe.yaml.example lacks %s\n", keys[i]);
		assert_non_null(strstr(text, keys[i]));
	}
}

/* Every supported key, set to something other than its default. */
static void test_supported_keys_stored(void **state)
{
	struct moe_config c;

	(void)state;
	LOAD_OK("model:\n"
	        "  path: /models/olmoe\n"
	        "  family: olmoe\n"
	        "devices: cpu:1\n"
	        "cpu:\n"
	        "  threads: 12\n"
	        "  isa: avx2\n"
	        "scheduler:\n"
	        "  max_batch_tokens: 1048576\n"
	        "log:\n"
	        "  level: debug\n",
	        &c);
	assert_string_equal(c.model.path, "/models/olmoe");
	assert_string_equal(c.model.family, "olmoe");
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CPU);
	assert_int_equal(c.devices.n_ranks, 1);
	assert_int_equal(c.cpu.threads, 12);
	assert_int_equal(c.cpu.isa, MOE_CFG_ISA_AVX2);
	assert_int_equal(c.scheduler.max_batch_tokens, 1048576);
	assert_int_equal(c.log.level, MOE_CFG_LOG_DEBUG);
	moe_cfg_free(&c);
}

static void test_enum_values(void **state)
{
	static const struct {
		const char *isa;
		enum moe_cfg_isa want;
	} isas[] = {
	    {"auto", MOE_CFG_ISA_AUTO},
	    {"scalar", MOE_CFG_ISA_SCALAR},
	    {"avx2", MOE_CFG_ISA_AVX2},
	    {"avx512", MOE_CFG_ISA_AVX512},
	};
	static const struct {
		const char *level;
		enum moe_cfg_log_level want;
	} levels[] = {
	    {"debug", MOE_CFG_LOG_DEBUG},   {"info", MOE_CFG_LOG_INFO},
	    {"notice", MOE_CFG_LOG_NOTICE}, {"warning", MOE_CFG_LOG_WARNING},
	    {"err", MOE_CFG_LOG_ERR},
	};
	static const char *const families[] = {
	    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
	};
	struct moe_config c;
	char yaml[256];
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(isas) / sizeof(isas[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\ncpu: {isa: %s}\n", isas[i].isa);
		LOAD_OK(yaml, &c);
		assert_int_equal(c.cpu.isa, isas[i].want);
		assert_string_equal(moe_cfg_isa_name(c.cpu.isa), isas[i].isa);
		moe_cfg_free(&c);
	}
	for (i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\nlog: {level: \"%s\"}\n",
		         levels[i].level);
		LOAD_OK(yaml, &c);
		assert_int_equal(c.log.level, levels[i].want);
		assert_string_equal(moe_cfg_log_level_name(c.log.level), levels[i].level);
		moe_cfg_free(&c);
	}
	for (i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m, family: %s}\n", families[i]);
		LOAD_OK(yaml, &c);
		assert_string_equal(c.model.family, families[i]);
		moe_cfg_free(&c);
	}
}

static void test_int_bounds(void **state)
{
	struct moe_config c;

	(void)state;
	LOAD_OK("model: {path: /m}\ncpu: {threads: 1024}\nscheduler: {max_batch_tokens: 1}\n", &c);
	assert_int_equal(c.cpu.threads, 1024);
	assert_int_equal(c.scheduler.max_batch_tokens, 1);
	moe_cfg_free(&c);
	/* YAML 1.2: a leading + or zero is still decimal. */
	LOAD_OK("model: {path: /m}\ncpu: {threads: +010}\n", &c);
	assert_int_equal(c.cpu.threads, 10);
	moe_cfg_free(&c);
}

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */
/* ------------------------------------------------------------------------ */

static void test_unknown_keys(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\nmodle: {}\n",
	           "t.yaml:2:1: modle: unknown key (expected one of: model, devices, cpu, "
	           "placement, reload, scheduler, server, metrics, log)");
	EXPECT_ERR("model:\n  path: /m\n  familly: olmoe\n",
	           "t.yaml:3:3: model.familly: unknown key (expected one of: path, family)");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  threads: 2\n  cores: 4\n",
	           "t.yaml:4:3: cpu.cores: unknown key");
	/* A key of one section in another. */
	EXPECT_ERR("model: {path: /m}\nserver: {threads: 4}\n",
	           "t.yaml:2:10: server.threads: unknown key");
	/* Top-level names of nested keys are not keys of their own. */
	EXPECT_ERR("path: /m\n", "t.yaml:1:1: path: unknown key");
	EXPECT_ERR("model.path: /m\n", "t.yaml:1:1: model.path: unknown key");
	/* Sections do not nest. */
	EXPECT_ERR("model:\n  path: /m\n  cpu: {threads: 1}\n",
	           "t.yaml:3:3: model.cpu: unknown key");
	/* Keys are case-sensitive; control characters are not echoed. */
	EXPECT_ERR("Model: {path: /m}\n", "t.yaml:1:1: Model: unknown key");
	EXPECT_ERR("\"a\\tb\": 1\n", "t.yaml:1:1: a?b: unknown key");
}

static void test_long_key_is_cut(void **state)
{
	char yaml[512], want[128];

	(void)state;
	memset(yaml, 'k', 300);
	snprintf(yaml + 300, sizeof(yaml) - 300, ": 1\n");
	snprintf(want, sizeof(want), "t.yaml:1:1: %.48s...: unknown key", yaml);
	EXPECT_ERR(yaml, want);
}

static void test_wrong_types(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\ncpu:\n  threads: eight\n",
	           "t.yaml:3:12: cpu.threads: expected an integer between 0 and 1024, got 'eight'");
	EXPECT_ERR(
	    "model: {path: /m}\ncpu:\n  threads: {n: 8}\n",
	    "t.yaml:3:12: cpu.threads: expected an integer between 0 and 1024, got a mapping");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  threads: [8]\n",
	           "t.yaml:3:12: cpu.threads: expected an integer between 0 and 1024, got a list");
	EXPECT_ERR(
	    "model: {path: /m}\ncpu:\n  threads:\n",
	    "t.yaml:3:11: cpu.threads: expected an integer between 0 and 1024, got no value");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  threads: \"8\"\n",
	           "t.yaml:3:12: cpu.threads: expected an integer between 0 and 1024, got a quoted "
	           "string (\"8\")");
	EXPECT_ERR(
	    "model: {path: /m}\ncpu:\n  threads: true\n",
	    "t.yaml:3:12: cpu.threads: expected an integer between 0 and 1024, got a boolean "
	    "(true)");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  threads: 0x10\n",
	           "t.yaml:3:12: cpu.threads: expected an integer between 0 and 1024, got '0x10'");
	EXPECT_ERR("model:\n  path: {dir: /m}\n",
	           "t.yaml:2:9: model.path: expected a string, got a mapping");
	EXPECT_ERR("model:\n  path: [/m]\n",
	           "t.yaml:2:9: model.path: expected a string, got a list");
	EXPECT_ERR("model:\n  path:\n", "t.yaml:2:8: model.path: expected a string, got no value");
	EXPECT_ERR("model: /m\n", "t.yaml:1:8: model: expected a mapping, got '/m'");
	EXPECT_ERR("model: {path: /m}\ncpu: [1, 2]\n",
	           "t.yaml:2:6: cpu: expected a mapping, got a list");
	EXPECT_ERR("model: {path: /m}\nlog: 7\n", "t.yaml:2:6: log: expected a mapping, got 7");
	EXPECT_ERR("model: {path: /m}\n? [a, b]\n: 1\n", "t.yaml:2:3: expected a key, got a list");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  ? {a: 1}\n  : 1\n",
	           "t.yaml:3:5: cpu: expected a key, got a mapping");
}

static void test_out_of_range(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 1025}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got 1025");
	EXPECT_ERR("model: {path: /m}\nscheduler:\n  max_batch_tokens: 0\n",
	           "t.yaml:3:21: scheduler.max_batch_tokens: expected an integer between 1 and "
	           "1048576, got 0");
	EXPECT_ERR("model: {path: /m}\nscheduler:\n  max_batch_tokens: 1048577\n",
	           "t.yaml:3:21: scheduler.max_batch_tokens: expected an integer between 1 and "
	           "1048576, got 1048577");
}

static void test_negative(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: -1}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got -1");
	EXPECT_ERR("model: {path: /m}\nscheduler:\n  max_batch_tokens: -4096\n",
	           "t.yaml:3:21: scheduler.max_batch_tokens: expected an integer between 1 and "
	           "1048576, got -4096");
}

static void test_overflow(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 99999999999999999999}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got "
	           "99999999999999999999");
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: -99999999999999999999}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got "
	           "-99999999999999999999");
	/* 2^32 + 8 must not wrap around to 8 in an unsigned int. */
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 4294967304}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got "
	           "4294967304");
}

static void test_float_for_int(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 1.5}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got a float "
	           "(1.5)");
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 8.0}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got a float "
	           "(8.0)");
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 1e3}\n",
	           "t.yaml:2:16: cpu.threads: expected an integer between 0 and 1024, got a float "
	           "(1e3)");
}

static void test_bad_enum(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: /m}\ncpu:\n  isa: sse4\n",
	           "t.yaml:3:8: cpu.isa: expected one of auto, scalar, avx2, avx512, avx512bf16, amx, got 'sse4'");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  isa: AVX2\n",
	           "t.yaml:3:8: cpu.isa: expected one of");
	EXPECT_ERR("model: {path: /m}\nlog: {level: warn}\n",
	           "t.yaml:2:14: log.level: expected one of debug, info, notice, warning, err, got "
	           "'warn'");
	EXPECT_ERR(
	    "model: {path: /m}\nlog: {level: 3}\n",
	    "t.yaml:2:14: log.level: expected one of debug, info, notice, warning, err, got 3");
	EXPECT_ERR(
	    "model:\n  path: /m\n  family: llama\n",
	    "t.yaml:3:11: model.family: expected one of mixtral, qwen2_moe, qwen3_moe, olmoe, "
	    "deepseek_v2, deepseek_v3, got 'llama'");
	EXPECT_ERR("model:\n  path: /m\n  family:\n", "t.yaml:3:10: model.family: expected one of");
}

static void test_duplicate_keys(void **state)
{
	(void)state;
	EXPECT_ERR("model:\n  path: /a\n  path: /b\n", "t.yaml:3:3: model.path: duplicate key");
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 1}\nlog: {}\ncpu: {isa: auto}\n",
	           "t.yaml:4:1: cpu: duplicate key");
	EXPECT_ERR("model: {path: /m}\ndevices: cpu\ndevices: cpu\n",
	           "t.yaml:3:1: devices: duplicate key");
	/* Even when both say the same, and even for unsupported keys. */
	EXPECT_ERR("model: {path: /m}\nlog: {level: info, \"level\": info}\n",
	           "t.yaml:2:20: log.level: duplicate key");
}

static void test_syntax_errors(void **state)
{
	(void)state;
	/* Unclosed brackets: libyaml notices at the end of the input. */
	EXPECT_ERR("model: {path: /m}\ncpu: {threads: 2\n",
	           "t.yaml:3:1: YAML syntax error: did not find expected ',' or '}' (while parsing "
	           "a flow mapping at line 2 column 6)");
	EXPECT_ERR("model: {path: /m}\ndevices: [0, 1\n",
	           "t.yaml:3:1: YAML syntax error: did not find expected ',' or ']' (while parsing "
	           "a flow sequence at line 2 column 10)");
	/* Bad indentation. */
	EXPECT_ERR(
	    "model:\n  path: /m\n cpu: {}\n",
	    "t.yaml:3:2: YAML syntax error: did not find expected key (while parsing a block "
	    "mapping at line 1 column 1)");
	EXPECT_ERR(
	    "model:\n  path: /m\n    family: olmoe\n",
	    "t.yaml:3:11: YAML syntax error: mapping values are not allowed in this context");
	EXPECT_ERR("model:\n\tpath: /m\n",
	           "t.yaml:2:1: YAML syntax error: found character that cannot start any token (a "
	           "tab: YAML indents with spaces only)");
	EXPECT_ERR("model:\n  path: \"/m\n", "t.yaml:3:1: YAML syntax error: found unexpected end");
	/* Not UTF-8: the reader's byte offset becomes a line and column. */
	EXPECT_ERR("model: {path: /m}\nlog: {level: \xff}\n",
	           "t.yaml:2:14: invalid input: invalid leading UTF-8 octet (byte 0xff)");
	/* A syntax error after an otherwise good file still fails it. */
	EXPECT_ERR("model: {path: /m}\n]\n", "t.yaml:2:1: YAML syntax error:");
}

static void test_missing_model_path(void **state)
{
	(void)state;
	EXPECT_ERR("cpu:\n  threads: 2\n", "t.yaml:1:1: model.path: required");
	/* Pointed at the model section when there is one. */
	EXPECT_ERR("log: {level: info}\n\nmodel:\n  family: olmoe\n",
	           "t.yaml:3:1: model.path: required");
	EXPECT_ERR("log: {level: info}\nmodel:\n", "t.yaml:2:1: model.path: required");
	EXPECT_ERR("{}\n", "t.yaml:1:1: model.path: required");
	EXPECT_ERR("model:\n  path: \"\"\n", "t.yaml:2:9: model.path: must not be empty");
}

static void test_empty_document(void **state)
{
	char err[MOE_CFG_ERRLEN];
	struct moe_config c;

	(void)state;
	EXPECT_ERR("", "t.yaml:1:1: empty configuration: model.path is required");
	EXPECT_ERR("\n\n", "t.yaml:1:1: empty configuration: model.path is required");
	EXPECT_ERR("# nothing but comments\n# here\n",
	           "t.yaml:1:1: empty configuration: model.path is required");
	EXPECT_ERR("---\n", "t.yaml:1:1: empty configuration: model.path is required");
	EXPECT_ERR("~\n", "t.yaml:1:1: empty configuration: model.path is required");
	/* NULL with length 0 is an empty string too. */
	assert_int_equal(moe_cfg_load_string(NULL, NULL, 0, &c, err, sizeof(err)), -EINVAL);
	assert_string_equal(err, "<string>:1:1: empty configuration: model.path is required");
	moe_cfg_free(&c);
}

static void test_top_level_not_mapping(void **state)
{
	(void)state;
	EXPECT_ERR("/srv/model\n", "t.yaml:1:1: expected a mapping at top level, got '/srv/model'");
	EXPECT_ERR("- model: {path: /m}\n",
	           "t.yaml:1:1: expected a mapping at top level, got a list");
	EXPECT_ERR("\n\n  42\n", "t.yaml:3:3: expected a mapping at top level, got 42");
	EXPECT_ERR("model: {path: /m}\n---\nmodel: {path: /n}\n",
	           "t.yaml:2:1: only one YAML document is allowed");
}

static void test_anchors_aliases_tags(void **state)
{
	(void)state;
	EXPECT_ERR("model: {path: &p /m}\n",
	           "t.yaml:1:15: model.path: YAML anchors are not supported");
	EXPECT_ERR("model: &m {path: /m}\n", "t.yaml:1:8: model: YAML anchors are not supported");
	EXPECT_ERR("model: {path: /m}\ncpu: *m\n",
	           "t.yaml:2:6: cpu: YAML aliases are not supported");
	EXPECT_ERR("model: {path: !!str /m}\n",
	           "t.yaml:1:15: model.path: YAML tags are not supported");
	EXPECT_ERR("!!map {model: {path: /m}}\n", "t.yaml:1:1: YAML tags are not supported");
	EXPECT_ERR("model: {path: /m}\ncpu:\n  !!str threads: 1\n",
	           "t.yaml:3:3: cpu: YAML tags are not supported");
	/* A billion laughs never gets far. */
	EXPECT_ERR("a: &a [x, x]\nb: &b [*a, *a]\n", "t.yaml:1:1: a: unknown key");
	EXPECT_ERR("model: {path: /m}\ndevices: [&a 0, *a]\n",
	           "t.yaml:2:11: devices: YAML anchors are not supported");
}

static void test_nul_in_string(void **state)
{
	(void)state;
	/* "/m\0/etc" would be /m to every C function. */
	EXPECT_ERR("model: {path: \"/m\\0/etc\"}\n",
	           "t.yaml:1:15: model.path: contains a NUL character");
	EXPECT_ERR("model: {path: /m}\n\"log\\0x\": {}\n", "t.yaml:2:1: contains a NUL character");
}

static void test_devices(void **state)
{
	struct moe_config c;

	(void)state;
	LOAD_OK("model: {path: /m}\ndevices: cpu\n", &c);
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CPU);
	assert_int_equal(c.devices.n_ranks, 1);
	moe_cfg_free(&c);
	LOAD_OK("model: {path: /m}\ndevices: \"cpu:1\"\n", &c);
	assert_int_equal(c.devices.n_ranks, 1);
	moe_cfg_free(&c);

	EXPECT_ERR("model: {path: /m}\ndevices: cpu:0\n",
	           "t.yaml:2:10: devices: expected cpu:R with R between 1 and 64, got 'cpu:0'");
	EXPECT_ERR("model: {path: /m}\ndevices: cpu:65\n",
	           "t.yaml:2:10: devices: expected cpu:R with R between 1 and 64, got 'cpu:65'");
	EXPECT_ERR("model: {path: /m}\ndevices: cpu:x\n",
	           "t.yaml:2:10: devices: expected cpu:R with R between 1 and 64, got 'cpu:x'");
	EXPECT_ERR("model: {path: /m}\ndevices: \"cpu:\"\n",
	           "t.yaml:2:10: devices: expected cpu:R with R between 1 and 64, got 'cpu:'");
	LOAD_OK("model: {path: /m}\ndevices: cpu:2\n", &c);
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CPU);
	assert_int_equal(c.devices.n_ranks, 2);
	moe_cfg_free(&c);
	LOAD_OK("model: {path: /m}\ndevices: cpu:64\nplacement: {spare_slots: 3}\n", &c);
	assert_int_equal(c.devices.n_ranks, 64);
	assert_int_equal(c.placement.spare_slots, 3);
	moe_cfg_free(&c);
	LOAD_OK("model: {path: /m}\nplacement: {stats_window_s: 5}\n", &c);
	assert_int_equal(c.placement.stats_window_s, 5);
	moe_cfg_free(&c);
	EXPECT_ERR("model: {path: /m}\nplacement:\n  stats_window_s: 0\n",
	           "t.yaml:3:19: placement.stats_window_s: expected an integer between 1 and 86400");
	EXPECT_ERR("model: {path: /m}\nplacement:\n  spare_slots: -1\n",
	           "t.yaml:3:16: placement.spare_slots: expected an integer between 0 and 1024");
	/* the placement changes' keys */
	LOAD_OK("model: {path: /m}\nplacement:\n  copy_bytes_per_s: 2G\n  auto_rebalance: true\n"
	        "  rebalance_threshold: 1.25\n  rebalance_interval_s: 30\n", &c);
	assert_int_equal(c.placement.copy_bytes_per_s, 2ull << 30);
	assert_true(c.placement.auto_rebalance);
	assert_true(c.placement.rebalance_threshold == 1.25);
	assert_int_equal(c.placement.rebalance_interval_s, 30);
	moe_cfg_free(&c);
	LOAD_OK("model: {path: /m}\n", &c);
	assert_int_equal(c.placement.copy_bytes_per_s, 0);
	assert_false(c.placement.auto_rebalance);
	moe_cfg_free(&c);
	EXPECT_ERR("model: {path: /m}\nplacement:\n  auto_rebalance: yes\n",
	           "t.yaml:3:19: placement.auto_rebalance: expected true or false, got a boolean (yes)");
	EXPECT_ERR("model: {path: /m}\nplacement:\n  rebalance_threshold: 1.0\n",
	           "t.yaml:3:24: placement.rebalance_threshold: expected a number greater than 1 and "
	           "at most 1000, got a float (1.0)");
	EXPECT_ERR("model: {path: /m}\nplacement:\n  rebalance_interval_s: 0\n",
	           "t.yaml:3:25: placement.rebalance_interval_s: expected an integer between 1");
	EXPECT_ERR("model: {path: /m}\nplacement:\n  copy_bytes_per_s: lots\n",
	           "t.yaml:3:21: placement.copy_bytes_per_s: expected a size");
#ifdef MOE_HAVE_CUDA
	LOAD_OK("model: {path: /m}\ndevices: cuda\n", &c);
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CUDA);
	assert_true(c.devices.all_gpus);
	moe_cfg_free(&c);
	LOAD_OK("model: {path: /m}\ndevices: [3]\n", &c);
	assert_int_equal(c.devices.kind, MOE_CFG_DEV_CUDA);
	assert_false(c.devices.all_gpus);
	assert_int_equal(c.devices.n_ranks, 1);
	assert_int_equal(c.devices.gpu_ids[0], 3);
	moe_cfg_free(&c);
	EXPECT_ERR("model: {path: /m}\ndevices: [0, 1, 3]\n",
	           "t.yaml:2:10: devices: not supported yet (one GPU for now)");
	EXPECT_ERR("model: {path: /m}\ndevices:\n  - 0\n  - 63\n",
	           "t.yaml:3:3: devices: not supported yet (one GPU for now)");
#else
	EXPECT_ERR("model: {path: /m}\ndevices: cuda\n",
	           "t.yaml:2:10: devices: this moed was built without CUDA (MOE_CUDA=OFF): use cpu");
	EXPECT_ERR("model: {path: /m}\ndevices: cuda:all\n",
	           "t.yaml:2:10: devices: this moed was built without CUDA (MOE_CUDA=OFF): use cpu");
	EXPECT_ERR("model: {path: /m}\ndevices: [0, 1, 3]\n",
	           "t.yaml:2:10: devices: this moed was built without CUDA (MOE_CUDA=OFF): use cpu");
#endif
	EXPECT_ERR("model: {path: /m}\ndevices: [0, 64]\n",
	           "t.yaml:2:14: devices: expected a GPU id between 0 and 63, got 64");
	EXPECT_ERR("model: {path: /m}\ndevices: [-1]\n",
	           "t.yaml:2:11: devices: expected a GPU id between 0 and 63, got -1");
	EXPECT_ERR("model: {path: /m}\ndevices: [0, [1]]\n",
	           "t.yaml:2:14: devices: expected a GPU id between 0 and 63, got a list");
	EXPECT_ERR("model: {path: /m}\ndevices: [1, 0, 1]\n",
	           "t.yaml:2:17: devices: GPU 1 is listed twice");
	EXPECT_ERR("model: {path: /m}\ndevices: []\n",
	           "t.yaml:2:10: devices: the list of GPU ids is empty");
	EXPECT_ERR(
	    "model: {path: /m}\ndevices: gpu\n",
	    "t.yaml:2:10: devices: expected cpu, cpu:R (R between 1 and 64), cuda, cuda:all or "
	    "a list of GPU ids, got 'gpu'");
	EXPECT_ERR("model: {path: /m}\ndevices: {cpu: 1}\n",
	           "t.yaml:2:10: devices: expected cpu, cpu:R");
	EXPECT_ERR("model: {path: /m}\ndevices:\n", "t.yaml:2:9: devices: expected cpu, cpu:R");
}

/*
 * Keys whose feature does not exist yet: a good value is parsed, then
 * refused at the key; a bad value is reported as bad first.
 */
static void test_not_supported_yet(void **state)
{
	static const struct {
		const char *section, *key, *good, *bad, *bad_msg;
	} keys[] = {
	    {"scheduler", "batch_window_us", "0", "1000001",
	     "expected an integer between 0 and "
	     "1000000, got 1000001"},
	};
	char yaml[256], want[256];
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		/* The key at line 3, column 3; its value at column 3 + len + 2. */
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\n%s:\n  %s: %s\n", keys[i].section,
		         keys[i].key, keys[i].good);
		snprintf(want, sizeof(want), "t.yaml:3:3: %s.%s: not supported yet",
		         keys[i].section, keys[i].key);
		EXPECT_ERR(yaml, want);
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\n%s:\n  %s: %s\n", keys[i].section,
		         keys[i].key, keys[i].bad);
		snprintf(want, sizeof(want), "t.yaml:3:%zu: %s.%s: %s", 3 + strlen(keys[i].key) + 2,
		         keys[i].section, keys[i].key, keys[i].bad_msg);
		EXPECT_ERR(yaml, want);
	}
	/* Not even a default value slips through. */
	EXPECT_ERR(
	    "model: {path: /m}\nscheduler:\n  max_batch_tokens: 64\n  batch_window_us: 200\n",
	    "t.yaml:4:3: scheduler.batch_window_us: not supported yet");
}

/* metrics.*: the listen address is checked at the value, with the reason. */
static void test_metrics_keys(void **state)
{
	static const struct {
		const char *v, *msg; /* msg NULL: accepted */
	} listen[] = {
	    {"127.0.0.1:9464", NULL},
	    {"0.0.0.0:0", NULL},
	    {"localhost:9464", NULL},
	    {"\"[::1]:9464\"", NULL},
	    {"\"\"", NULL},
	    {"127.0.0.1", "expected ADDR:PORT"},
	    {"127.0.0.1:65536", "port \"65536\" is not a number in 0..65535"},
	    {"\"127.0.0.1: 9464\"", "port \" 9464\" is not a number"},
	    {"127.0.0.1:-1", "port \"-1\" is not a number"},
	    {"\"127.0.0.1:\"", "port \"\" is not a number"},
	    {"example.com:80", "address \"example.com\" is not a numeric IPv4 address"},
	    {"\"[::1:9464\"", "address \"[::1\" is not a numeric IPv4 address"},
	    {"{}", "expected a string, got a mapping"},
	};
	struct moe_config c;
	char yaml[256], want[256];

	(void)state;
	for (size_t i = 0; i < sizeof(listen) / sizeof(listen[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\nmetrics:\n  listen: %s\n",
		         listen[i].v);
		if (!listen[i].msg) {
			LOAD_OK(yaml, &c);
			moe_cfg_free(&c);
			continue;
		}
		/* the value at line 3, column 11 */
		snprintf(want, sizeof(want), "t.yaml:3:11: metrics.listen: %s", listen[i].msg);
		EXPECT_ERR(yaml, want);
	}
	LOAD_OK("model: {path: /m}\nmetrics:\n  per_expert: true\n  slo_p99_ms: 80\n", &c);
	assert_true(c.metrics.per_expert);
	assert_int_equal(c.metrics.slo_p99_ms, 80);
	moe_cfg_free(&c);
	LOAD_OK("model: {path: /m}\n", &c);
	assert_false(c.metrics.per_expert);
	assert_int_equal(c.metrics.slo_p99_ms, 250);
	moe_cfg_free(&c);
	EXPECT_ERR("model: {path: /m}\nmetrics:\n  slo_p99_ms: 0\n",
	           "t.yaml:3:15: metrics.slo_p99_ms: expected an integer between 1 and 3600000");
}

/* The daemon's keys (server, scheduler limits): good values are stored,
 * bad ones are errors at the value. */
static void test_server_keys(void **state)
{
	static const struct {
		const char *section, *key, *good, *bad, *bad_msg;
	} keys[] = {
	    {"scheduler", "max_queue_requests", "1000000", "0", "expected an integer between 1"},
	    {"scheduler", "request_timeout_ms", "0", "3600001", "expected an integer between 0"},
	    {"server", "socket", "/run/moed/x.sock", "[a]", "expected a string, got a list"},
	    {"server", "socket_mode", "0600", "0800", "expected an octal mode like 0660"},
	    {"server", "max_clients", "65536", "65537", "expected an integer between 1 and 65536"},
	    {"server", "max_client_shm_bytes", "2G", "2GB", "expected a size between 1M and 1T"},
	    {"server", "max_total_shm_bytes", "16T", "17T", "expected a size between 1M and 16T"},
	    {"server", "max_inflight_requests", "1", "1.5",
	     "expected an integer between 1 and 65536, got a float (1.5)"},
	    {"server", "max_inflight_tokens", "100000000", "100000001",
	     "expected an integer between 1 and 100000000"},
	    {"server", "group", "moed", "{a: b}", "expected a string, got a mapping"},
	    {"server", "admin_group", "\"\"", "[]", "expected a string, got a list"},
	    {"server", "handshake_timeout_ms", "250", "0", "expected an integer between 1"},
	};
	char yaml[256], want[256];
	struct moe_config c;

	(void)state;
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\n%s:\n  %s: %s\n", keys[i].section,
		         keys[i].key, keys[i].good);
		LOAD_OK(yaml, &c);
		moe_cfg_free(&c);
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\n%s:\n  %s: %s\n", keys[i].section,
		         keys[i].key, keys[i].bad);
		snprintf(want, sizeof(want), "t.yaml:3:%zu: %s.%s: %s", 3 + strlen(keys[i].key) + 2,
		         keys[i].section, keys[i].key, keys[i].bad_msg);
		EXPECT_ERR(yaml, want);
	}
	LOAD_OK("model: {path: /m}\nserver:\n  socket: /tmp/x.sock\n  socket_mode: 0600\n"
		"  max_clients: 7\n  max_client_shm_bytes: 2G\n  max_inflight_requests: 9\n"
		"  max_total_shm_bytes: 3G\n"
		"  max_inflight_tokens: 1000\nscheduler:\n  request_timeout_ms: 250\n"
		"  max_queue_requests: 33\n",
		&c);
	assert_string_equal(c.server.socket, "/tmp/x.sock");
	assert_int_equal(c.server.socket_mode, 0600);
	assert_int_equal(c.server.max_clients, 7);
	assert_int_equal(c.server.max_client_shm_bytes, 2ull << 30);
	assert_int_equal(c.server.max_total_shm_bytes, 3ull << 30);
	assert_int_equal(c.server.max_inflight_requests, 9);
	assert_int_equal(c.server.max_inflight_tokens, 1000);
	assert_int_equal(c.scheduler.request_timeout_ms, 250);
	assert_int_equal(c.scheduler.max_queue_requests, 33);
	moe_cfg_free(&c);
}

static void test_sizes(void **state)
{
	static const char *const good[] = {
	    "1048576", "1024K", "256M", "1G", "1GiB", "\"512MiB\"", "512G", "1T", "1TiB", "1024KiB",
	};
	static const char *const bad[] = {
	    "1MB",
	    "1.5G",
	    "1g",
	    "-1G",
	    "1T1",
	    "G",
	    "1 G",
	    "2T",
	    "1048575",
	    "1023K",
	    "99999999999999999999",
	    "16777216T",
	    "true",
	    "1Gi",
	    "0x100000",
	    "[1G]",
	};
	char yaml[256], want[256];
	size_t i;

	(void)state;
	static const unsigned long long good_bytes[] = {
	    1ull << 20, 1ull << 20, 256ull << 20, 1ull << 30, 1ull << 30,
	    512ull << 20, 512ull << 30, 1ull << 40, 1ull << 40, 1ull << 20,
	};
	struct moe_config c;

	for (i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(yaml, sizeof(yaml),
		         "model: {path: /m}\nserver:\n  max_client_shm_bytes: %s\n", good[i]);
		LOAD_OK(yaml, &c);
		assert_int_equal(c.server.max_client_shm_bytes, good_bytes[i]);
		moe_cfg_free(&c);
	}
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(yaml, sizeof(yaml),
		         "model: {path: /m}\nserver:\n  max_client_shm_bytes: %s\n", bad[i]);
		snprintf(
		    want, sizeof(want),
		    "t.yaml:3:25: server.max_client_shm_bytes: expected a size between 1M and 1T "
		    "(bytes, or with a suffix K, M, G, T, KiB, MiB, GiB, TiB), got ");
		EXPECT_ERR(yaml, want);
	}
}

static void test_socket_modes(void **state)
{
	static const char *const good[] = {"0660", "660", "\"0660\"", "0o660", "0", "0777"};
	static const char *const bad[] = {"0668", "01000", "rw",    "-1",
	                                  "0o",   "\"\"",  "07777", "1.0"};
	char yaml[256];
	size_t i;

	(void)state;
	static const unsigned good_modes[] = {0660, 0660, 0660, 0660, 0, 0777};
	struct moe_config c;

	for (i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\nserver:\n  socket_mode: %s\n",
		         good[i]);
		LOAD_OK(yaml, &c);
		assert_int_equal(c.server.socket_mode, good_modes[i]);
		moe_cfg_free(&c);
	}
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(yaml, sizeof(yaml), "model: {path: /m}\nserver:\n  socket_mode: %s\n",
		         bad[i]);
		EXPECT_ERR(yaml,
		           "t.yaml:3:16: server.socket_mode: expected an octal mode like 0660, "
		           "at most 0777, got ");
	}
}

static void test_string_lengths(void **state)
{
	char yaml[512], path[200];

	(void)state;
	/* sun_path holds 107 bytes and a NUL. */
	memset(path, 'a', 108);
	path[0] = '/';
	path[108] = '\0';
	snprintf(yaml, sizeof(yaml), "model: {path: /m}\nserver: {socket: %s}\n", path);
	EXPECT_ERR(yaml, "t.yaml:2:18: server.socket: too long (108 bytes, at most 107)");
	path[107] = '\0';
	snprintf(yaml, sizeof(yaml), "model: {path: /m}\nserver: {socket: %s}\n", path);
	{
		struct moe_config c;

		LOAD_OK(yaml, &c);
		assert_string_equal(c.server.socket, path);
		moe_cfg_free(&c);
	}
	EXPECT_ERR("model: {path: /m}\nserver: {socket: ''}\n",
	           "t.yaml:2:18: server.socket: must not be empty");
}

/* ------------------------------------------------------------------------ */
/* Files and the API's edges                                                */
/* ------------------------------------------------------------------------ */

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	assert_int_equal(fputs(text, f) >= 0, 1);
	assert_int_equal(fclose(f), 0);
}

static void test_load_file(void **state)
{
	char dir[] = "/tmp/moe-test-config-XXXXXX", file[128], err[MOE_CFG_ERRLEN], want[256];
	struct moe_config c;

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(file, sizeof(file), "%s/moe.yaml", dir);

	/* A relative model.path is next to the file. */
	write_file(file, "model:\n  path: models/olmoe\n");
	assert_int_equal(moe_cfg_load_file(file, &c, err, sizeof(err)), 0);
	snprintf(want, sizeof(want), "%s/models/olmoe", dir);
	assert_string_equal(c.model.path, want);
	assert_string_equal(c.path, file);
	moe_cfg_free(&c);

	/* Messages name the file. */
	write_file(file, "model:\n  path: /m\n  size: 7\n");
	assert_int_equal(moe_cfg_load_file(file, &c, err, sizeof(err)), -EINVAL);
	snprintf(want, sizeof(want), "%s:3:3: model.size: unknown key", file);
	assert_int_equal(strncmp(err, want, strlen(want)), 0);
	assert_null(c.path);
	moe_cfg_free(&c);

	assert_int_equal(moe_cfg_load_file(dir, &c, err, sizeof(err)), -EISDIR);
	snprintf(want, sizeof(want), "%s: not a regular file", dir);
	assert_string_equal(err, want);

	assert_int_equal(unlink(file), 0);
	assert_int_equal(moe_cfg_load_file(file, &c, err, sizeof(err)), -ENOENT);
	snprintf(want, sizeof(want), "%s: cannot open: ", file);
	assert_int_equal(strncmp(err, want, strlen(want)), 0);
	moe_cfg_free(&c);
	assert_int_equal(rmdir(dir), 0);
}

static void test_too_large(void **state)
{
	char err[MOE_CFG_ERRLEN];
	struct moe_config c;
	size_t n = MOE_CFG_MAX_FILE_BYTES + 1;
	char *big = malloc(n);

	(void)state;
	assert_non_null(big);
	memset(big, '#', n);
	assert_int_equal(moe_cfg_load_string("big.yaml", big, n, &c, err, sizeof(err)), -EFBIG);
	assert_string_equal(err, "big.yaml: too large (1048577 bytes, at most 1048576)");
	free(big);
}

/* A short or missing error buffer is never overrun. */
static void test_small_error_buffer(void **state)
{
	const char *yaml = "model: {path: /m}\ncpu: {threads: 5000}\n";
	char err[16];
	struct moe_config c;

	(void)state;
	memset(err, 'x', sizeof(err));
	assert_int_equal(moe_cfg_load_string("t.yaml", yaml, strlen(yaml), &c, err, 8), -EINVAL);
	assert_string_equal(err, "t.yaml:");
	assert_int_equal(err[8], 'x');
	assert_int_equal(moe_cfg_load_string("t.yaml", yaml, strlen(yaml), &c, NULL, 0), -EINVAL);
	assert_int_equal(moe_cfg_load_string("t.yaml", yaml, strlen(yaml), &c, err, 0), -EINVAL);
}

/* The input need not be NUL-terminated: only @len bytes are read. */
static void test_length_bounded(void **state)
{
	const char yaml[] = "model: {path: /m}\ncpu: {threads: 5000}\n";
	char err[MOE_CFG_ERRLEN];
	struct moe_config c;

	(void)state;
	assert_int_equal(moe_cfg_load_string("t.yaml", yaml, 18, &c, err, sizeof(err)), 0);
	assert_string_equal(c.model.path, "/m");
	moe_cfg_free(&c);
}

/* The struct is overwritten, so a reload can parse next to the live one. */
static void test_two_configs(void **state)
{
	struct moe_config a, b;

	(void)state;
	LOAD_OK("model: {path: /a}\ncpu: {threads: 1}\n", &a);
	LOAD_OK("model: {path: /b}\ncpu: {threads: 2}\n", &b);
	assert_string_equal(a.model.path, "/a");
	assert_string_equal(b.model.path, "/b");
	assert_int_equal(a.cpu.threads, 1);
	assert_int_equal(b.cpu.threads, 2);
	moe_cfg_free(&a);
	moe_cfg_free(&b);
}

/* A reload: the keys marked .reload take the new value, the others keep
 * the live one and are named; strings stay owned by their config. */
static void test_reload_flags(void **state)
{
	struct moe_config live, next;
	char err[MOE_CFG_ERRLEN], restart[200];

	(void)state;
	assert_int_equal(load("model: {path: /m}\ncpu: {threads: 2}\n"
			      "server: {max_clients: 5, admin_group: ops, socket: /a.sock}\n"
			      "log: {level: info}\n", &live, err), 0);
	assert_int_equal(load("model: {path: /other}\ncpu: {threads: 4}\n"
			      "server: {max_clients: 9, admin_group: wheel, socket: /a.sock}\n"
			      "devices: cpu\nlog: {level: debug}\n", &next, err), 0);
	assert_int_equal(moe_cfg_reload(&live, &next, restart, sizeof(restart)), 4);
	assert_string_equal(restart, "cpu.threads");
	assert_int_equal(live.server.max_clients, 9);
	assert_string_equal(live.server.admin_group, "wheel");
	assert_int_equal(live.log.level, MOE_CFG_LOG_DEBUG);
	/* a new model.path is taken (moed rolls its weights in) */
	assert_string_equal(live.model.path, "/other");
	assert_int_equal(live.cpu.threads, 2);
	assert_string_equal(next.server.admin_group, "ops"); /* swapped, freed with next */
	moe_cfg_free(&next);
	/* the same file again: nothing changes, nothing to restart */
	assert_int_equal(load("model: {path: /other}\ncpu: {threads: 2}\n"
			      "server: {max_clients: 9, admin_group: wheel, socket: /a.sock}\n"
			      "log: {level: debug}\n", &next, err), 0);
	assert_int_equal(moe_cfg_reload(&live, &next, restart, sizeof(restart)), 0);
	assert_string_equal(restart, "");
	moe_cfg_free(&next);
	moe_cfg_free(&live);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_defaults),
	    cmocka_unit_test(test_minimal),
	    cmocka_unit_test(test_example_parses),
	    cmocka_unit_test(test_example_documents_every_key),
	    cmocka_unit_test(test_supported_keys_stored),
	    cmocka_unit_test(test_enum_values),
	    cmocka_unit_test(test_int_bounds),
	    cmocka_unit_test(test_unknown_keys),
	    cmocka_unit_test(test_long_key_is_cut),
	    cmocka_unit_test(test_wrong_types),
	    cmocka_unit_test(test_out_of_range),
	    cmocka_unit_test(test_negative),
	    cmocka_unit_test(test_overflow),
	    cmocka_unit_test(test_float_for_int),
	    cmocka_unit_test(test_bad_enum),
	    cmocka_unit_test(test_duplicate_keys),
	    cmocka_unit_test(test_syntax_errors),
	    cmocka_unit_test(test_missing_model_path),
	    cmocka_unit_test(test_empty_document),
	    cmocka_unit_test(test_top_level_not_mapping),
	    cmocka_unit_test(test_anchors_aliases_tags),
	    cmocka_unit_test(test_nul_in_string),
	    cmocka_unit_test(test_devices),
	    cmocka_unit_test(test_metrics_keys),
	    cmocka_unit_test(test_not_supported_yet),
	    cmocka_unit_test(test_server_keys),
	    cmocka_unit_test(test_sizes),
	    cmocka_unit_test(test_socket_modes),
	    cmocka_unit_test(test_string_lengths),
	    cmocka_unit_test(test_load_file),
	    cmocka_unit_test(test_too_large),
	    cmocka_unit_test(test_small_error_buffer),
	    cmocka_unit_test(test_length_bounded),
	    cmocka_unit_test(test_two_configs),
	    cmocka_unit_test(test_reload_flags),
	};

	return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
