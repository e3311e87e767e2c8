// SPDX-License-Identifier: MIT
/* daemon/server/config_keys.c — the table of every key, lookups in it, the names of enum values
 * (see config_internal.h). */
#include "daemon/server/config_internal.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

static const char *const cfg_families[] = {
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", NULL,
};
static const char *const cfg_isa_names[] = {"auto",	    "scalar", "avx2", "avx512",
					    "avx512bf16", "amx",    NULL};
static const int cfg_isa_values[] = {
    MOE_CFG_ISA_AUTO,	MOE_CFG_ISA_SCALAR,	MOE_CFG_ISA_AVX2,
    MOE_CFG_ISA_AVX512, MOE_CFG_ISA_AVX512BF16, MOE_CFG_ISA_AMX,
};
static const char *const cfg_precision_names[] = {"auto", "bf16", "fp32", NULL};
static const int cfg_precision_values[] = {
    MOE_CFG_PRECISION_AUTO,
    MOE_CFG_PRECISION_BF16,
    MOE_CFG_PRECISION_FP32,
};
static const char *const cfg_log_names[] = {"debug", "info", "notice", "warning", "err", NULL};
static const int cfg_log_values[] = {
    MOE_CFG_LOG_DEBUG, MOE_CFG_LOG_INFO, MOE_CFG_LOG_NOTICE, MOE_CFG_LOG_WARNING, MOE_CFG_LOG_ERR,
};

#define FIELD(f)                                                                                   \
	.offset = offsetof(struct moe_config, f), .size = sizeof(((struct moe_config *)0)->f)
#define UINT(f, lo, hi)   .parse = cfg_parse_uint, FIELD(f), .min = (lo), .max = (hi)
#define SIZE(f, lo, hi)   .parse = cfg_parse_size, FIELD(f), .min = (lo), .max = (hi)
#define MODE(f, hi)       .parse = cfg_parse_mode, FIELD(f), .min = 0, .max = (hi)
#define BOOL(f)           .parse = cfg_parse_bool, FIELD(f)
#define NUMBER(f, lo, hi) .parse = cfg_parse_number, FIELD(f), .fmin = (lo), .fmax = (hi)
#define STR(f, lo, hi)    .parse = cfg_parse_string, FIELD(f), .min = (lo), .max = (hi)
#define CHOICE(f, n)      .parse = cfg_parse_string, FIELD(f), .min = 1, .max = 64, .names = (n)
#define ENUM(f, n, v)     .parse = cfg_parse_enum, FIELD(f), .names = (n), .values = (v)
#define DEVICES(f)        .parse = cfg_parse_devices, FIELD(f)

/*
 * Every key moed knows, grouped by section (the unknown-key hint lists them
 * in this order). When a feature lands, its keys' .supported turns true and
 * nothing else needs to change: keys that are not supported yet are parsed,
 * range-checked and stored first, then refused. .reload: the key applies on
 * a configuration reload (moe_cfg_reload); every other key's change is
 * reported as needing a restart.
 */
const struct cfg_key cfg_keys[] = {
    /* a changed path starts a rolling reload from it (server/reload_ops.c) */
    {"model.path", STR(model.path, 1, PATH_MAX - 1), .supported = true, .reload = true},
    {"model.family", CHOICE(model.family, cfg_families), .supported = true},
    {"devices", DEVICES(devices), .supported = true},
    {"cpu.threads", UINT(cpu.threads, 0, 1024), .supported = true},
    {"cpu.isa", ENUM(cpu.isa, cfg_isa_names, cfg_isa_values), .supported = true},
    {"cpu.precision", ENUM(cpu.precision, cfg_precision_names, cfg_precision_values),
     .supported = true},
    {"placement.spare_slots", UINT(placement.spare_slots, 0, 1024), .supported = true},
    {"placement.auto_rebalance", BOOL(placement.auto_rebalance), .supported = true,
     .reload = true},
    {"placement.rebalance_threshold", NUMBER(placement.rebalance_threshold, 1.0, 1000.0),
     .supported = true, .reload = true},
    {"placement.copy_bytes_per_s", SIZE(placement.copy_bytes_per_s, 0, 1LL << 40),
     .supported = true, .reload = true},
    {"placement.stats_window_s", UINT(placement.stats_window_s, 1, 86400), .supported = true},
    {"placement.rebalance_interval_s", UINT(placement.rebalance_interval_s, 1, 86400),
     .supported = true, .reload = true},
    {"reload.max_staging_bytes", SIZE(reload.max_staging_bytes, 0, 1LL << 50),
     .supported = true, .reload = true},
    {"reload.keep_previous", BOOL(reload.keep_previous), .supported = true, .reload = true},
    {"reload.bytes_per_s", SIZE(reload.bytes_per_s, 0, 1LL << 40), .supported = true,
     .reload = true},
    {"scheduler.max_batch_tokens", UINT(scheduler.max_batch_tokens, 1, 1048576), .supported = true},
    {"scheduler.batch_window_us", UINT(scheduler.batch_window_us, 0, 1000000), .supported = false},
    {"scheduler.max_queue_requests", UINT(scheduler.max_queue_requests, 1, 1000000),
     .supported = true, .reload = true},
    {"scheduler.request_timeout_ms", UINT(scheduler.request_timeout_ms, 0, 3600000),
     .supported = true, .reload = true},
    /* sun_path holds 108 bytes with the NUL. */
    {"server.socket", STR(server.socket, 1, 107), .supported = true},
    {"server.socket_mode", MODE(server.socket_mode, 0777), .supported = true},
    {"server.group", STR(server.group, 0, 255), .supported = true},
    {"server.admin_group", STR(server.admin_group, 0, 255), .supported = true, .reload = true},
    {"server.handshake_timeout_ms", UINT(server.handshake_timeout_ms, 1, 600000),
     .supported = true, .reload = true},
    {"server.max_clients", UINT(server.max_clients, 1, 65536), .supported = true, .reload = true},
    {"server.max_client_shm_bytes", SIZE(server.max_client_shm_bytes, 1LL << 20, 1LL << 40),
     .supported = true, .reload = true},
    {"server.max_total_shm_bytes", SIZE(server.max_total_shm_bytes, 1LL << 20, 1LL << 44),
     .supported = true, .reload = true},
    {"server.max_inflight_requests", UINT(server.max_inflight_requests, 1, 65536),
     .supported = true, .reload = true},
    {"server.max_inflight_tokens", UINT(server.max_inflight_tokens, 1, 100000000),
     .supported = true, .reload = true},
    {"metrics.listen", .parse = cfg_parse_listen, FIELD(metrics.listen), .min = 0, .max = 255,
     .supported = true},
    {"metrics.per_expert", BOOL(metrics.per_expert), .supported = true, .reload = true},
    {"metrics.slo_p99_ms", UINT(metrics.slo_p99_ms, 1, 3600000), .supported = true,
     .reload = true},
    {"log.level", ENUM(log.level, cfg_log_names, cfg_log_values), .supported = true, .reload = true},
};

_Static_assert(ARRAY_SIZE(cfg_keys) <= 64, "grow cfg_parser.seen_key");
_Static_assert(sizeof(enum moe_cfg_isa) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(enum moe_cfg_precision) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(enum moe_cfg_log_level) == sizeof(int), "enums are stored as int");

/* Is table key @k called @key (@len bytes) in section @sec (NULL: top)? */
static bool key_is(const struct cfg_key *k, const char *sec, const char *key, size_t len)
{
	const char *name = k->path;
	size_t sl;

	if (sec) {
		sl = strlen(sec);
		if (strncmp(name, sec, sl) || name[sl] != '.')
			return false;
		name += sl + 1;
	} else if (strchr(name, '.')) {
		return false;
	}
	return strlen(name) == len && !memcmp(name, key, len);
}

int cfg_find_key(const char *sec, const char *key, size_t len)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_keys); i++)
		if (key_is(&cfg_keys[i], sec, key, len))
			return (int)i;
	return -1;
}

/* The index of the first key of section @key, or -1. */
int cfg_find_section(const char *key, size_t len)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_keys); i++)
		if (strlen(cfg_keys[i].path) > len && !memcmp(cfg_keys[i].path, key, len) &&
		    cfg_keys[i].path[len] == '.')
			return (int)i;
	return -1;
}

/* "model, devices, cpu, ..." or "path, family": the keys valid in @sec. */
void cfg_list_keys(char *buf, size_t size, const char *sec)
{
	size_t i, n = 0, len, prev_len = 0;
	const char *name, *prev = "";

	buf[0] = '\0';
	for (i = 0; i < ARRAY_SIZE(cfg_keys) && n + 1 < size; i++) {
		name = cfg_keys[i].path;
		if (sec) {
			len = strlen(sec);
			if (strncmp(name, sec, len) || name[len] != '.')
				continue;
			name += len + 1;
			len = strlen(name);
		} else {
			len = strcspn(name, ".");
			if (len == prev_len && !strncmp(name, prev, len))
				continue;
			prev = name;
			prev_len = len;
		}
		snprintf(buf + n, size - n, "%s%.*s", n ? ", " : "", (int)len, name);
		n += strlen(buf + n);
	}
}

const char *moe_cfg_isa_name(enum moe_cfg_isa isa)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_isa_values); i++)
		if (cfg_isa_values[i] == (int)isa)
			return cfg_isa_names[i];
	return "?";
}

const char *moe_cfg_precision_name(enum moe_cfg_precision p)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_precision_values); i++)
		if (cfg_precision_values[i] == (int)p)
			return cfg_precision_names[i];
	return "?";
}

const char *moe_cfg_log_level_name(enum moe_cfg_log_level level)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_log_values); i++)
		if (cfg_log_values[i] == (int)level)
			return cfg_log_names[i];
	return "?";
}

/* Same value of key @k in @a and @b? */
static bool same(const struct cfg_key *k, const struct moe_config *a, const struct moe_config *b)
{
	const char *fa = (const char *)a + k->offset, *fb = (const char *)b + k->offset;

	if (k->parse == cfg_parse_string || k->parse == cfg_parse_listen) {
		const char *sa = *(char *const *)(const void *)fa, *sb = *(char *const *)(const void *)fb;

		return !strcmp(sa ? sa : "", sb ? sb : "");
	}
	if (k->parse == cfg_parse_devices) /* (a struct: compare its fields, not its padding) */
		return a->devices.kind == b->devices.kind &&
		       a->devices.n_ranks == b->devices.n_ranks &&
		       a->devices.all_gpus == b->devices.all_gpus &&
		       !memcmp(a->devices.gpu_ids, b->devices.gpu_ids, sizeof(a->devices.gpu_ids));
	return !memcmp(fa, fb, k->size); /* integers, enums, sizes, modes, bools, doubles */
}

int moe_cfg_reload(struct moe_config *live, struct moe_config *next, char *restart, size_t n)
{
	size_t len = 0;
	int changed = 0;

	if (n)
		restart[0] = '\0';
	for (size_t i = 0; i < ARRAY_SIZE(cfg_keys); i++) {
		const struct cfg_key *k = &cfg_keys[i];
		char *fl = (char *)live + k->offset, *fn = (char *)next + k->offset;

		if (same(k, live, next))
			continue;
		if (!k->reload || k->size > sizeof(((struct moe_config *)0)->devices)) {
			if (len + 1 < n)
				len += (size_t)snprintf(restart + len, n - len, "%s%s",
							 len ? ", " : "", k->path);
			if (len >= n)
				len = n - 1;
			continue;
		}
		/* swap, so that each config still owns (and frees) its strings */
		{
			char tmp[sizeof(((struct moe_config *)0)->devices)];

			memcpy(tmp, fl, k->size);
			memcpy(fl, fn, k->size);
			memcpy(fn, tmp, k->size);
		}
		changed++;
	}
	return changed;
}
