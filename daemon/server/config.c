// SPDX-License-Identifier: MIT
/*
 * config.c - parse moe.yaml with libyaml's event API.
 *
 * The file is read as a stream of events and checked against one static
 * table of keys (cfg_keys[] below): its path, how to parse it, where it is
 * stored, its range, and whether the feature behind it exists yet. The
 * event API (rather than libyaml's document tree) lets us refuse anchors,
 * aliases and tags where they appear and stop at the first error, without
 * ever building or walking a tree that hostile input could make deep.
 */
#include "daemon/server/config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* What the engine can run today. Raise these when it can do more. */
#define CFG_CPU_RANKS_SUPPORTED 1
#define CFG_GPUS_SUPPORTED      1 /* GPUs in a list; cuda:all is checked at start */
#ifdef MOE_HAVE_CUDA
#define CFG_CUDA_BUILT true
#else
#define CFG_CUDA_BUILT false
#endif

/* How much of a user's text is echoed back in a message. */
#define CFG_ECHO_MAX 48
#define CFG_ECHO_LEN (CFG_ECHO_MAX + 4)

struct cfg_parser;

struct cfg_key {
	const char *path; /* "section.key", or "key" at the top level */
	int (*parse)(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
	             void *field);
	size_t offset;            /* of the field in struct moe_config */
	size_t size;              /* of that field */
	long long min, max;       /* integers, sizes, modes; string lengths */
	double fmin, fmax;        /* numbers: fmin < v <= fmax */
	const char *const *names; /* enums, and strings that must be one of */
	const int *values;        /* enum value of each name */
	bool supported;           /* false: refused with "not supported yet" */
};

struct cfg_parser {
	yaml_parser_t yaml;
	const char *name; /* the file name in messages */
	const unsigned char *buf;
	size_t len;
	struct moe_config *c;
	char *err;
	size_t errlen;
	bool seen_key[32];      /* by index in cfg_keys: duplicate keys */
	bool seen_section[32];  /* by index of a section's first key */
	yaml_mark_t root_mark;  /* where "model.path: required" points... */
	yaml_mark_t model_mark; /* ...or here, when there is a model: section */
	bool have_model;
};

typedef int cfg_parse_fn(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                         void *field);
static cfg_parse_fn parse_uint, parse_bool, parse_number, parse_string, parse_enum, parse_size,
    parse_mode, parse_devices;

static const char *const cfg_families[] = {
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", NULL,
};
static const char *const cfg_isa_names[] = {"auto", "scalar", "avx2", "avx512", NULL};
static const int cfg_isa_values[] = {
    MOE_CFG_ISA_AUTO,
    MOE_CFG_ISA_SCALAR,
    MOE_CFG_ISA_AVX2,
    MOE_CFG_ISA_AVX512,
};
static const char *const cfg_log_names[] = {"debug", "info", "notice", "warning", "err", NULL};
static const int cfg_log_values[] = {
    MOE_CFG_LOG_DEBUG, MOE_CFG_LOG_INFO, MOE_CFG_LOG_NOTICE, MOE_CFG_LOG_WARNING, MOE_CFG_LOG_ERR,
};

#define FIELD(f)                                                                                   \
	.offset = offsetof(struct moe_config, f), .size = sizeof(((struct moe_config *)0)->f)
#define UINT(f, lo, hi)   .parse = parse_uint, FIELD(f), .min = (lo), .max = (hi)
#define SIZE(f, lo, hi)   .parse = parse_size, FIELD(f), .min = (lo), .max = (hi)
#define MODE(f, hi)       .parse = parse_mode, FIELD(f), .min = 0, .max = (hi)
#define BOOL(f)           .parse = parse_bool, FIELD(f)
#define NUMBER(f, lo, hi) .parse = parse_number, FIELD(f), .fmin = (lo), .fmax = (hi)
#define STR(f, lo, hi)    .parse = parse_string, FIELD(f), .min = (lo), .max = (hi)
#define CHOICE(f, n)      .parse = parse_string, FIELD(f), .min = 1, .max = 64, .names = (n)
#define ENUM(f, n, v)     .parse = parse_enum, FIELD(f), .names = (n), .values = (v)
#define DEVICES(f)        .parse = parse_devices, FIELD(f)

/*
 * Every key moed knows, grouped by section (the unknown-key hint lists them
 * in this order). When a feature lands, its keys' .supported turns true and
 * nothing else needs to change: keys that are not supported yet are parsed,
 * range-checked and stored first, then refused.
 */
static const struct cfg_key cfg_keys[] = {
    {"model.path", STR(model.path, 1, PATH_MAX - 1), .supported = true},
    {"model.family", CHOICE(model.family, cfg_families), .supported = true},
    {"devices", DEVICES(devices), .supported = true},
    {"cpu.threads", UINT(cpu.threads, 0, 1024), .supported = true},
    {"cpu.isa", ENUM(cpu.isa, cfg_isa_names, cfg_isa_values), .supported = true},
    {"placement.spare_slots", UINT(placement.spare_slots, 0, 1024), .supported = false},
    {"placement.auto_rebalance", BOOL(placement.auto_rebalance), .supported = false},
    {"placement.rebalance_threshold", NUMBER(placement.rebalance_threshold, 1.0, 1000.0),
     .supported = false},
    {"placement.rebalance_interval_s", UINT(placement.rebalance_interval_s, 1, 86400),
     .supported = false},
    {"scheduler.max_batch_tokens", UINT(scheduler.max_batch_tokens, 1, 1048576), .supported = true},
    {"scheduler.batch_window_us", UINT(scheduler.batch_window_us, 0, 1000000), .supported = false},
    {"scheduler.max_queue_requests", UINT(scheduler.max_queue_requests, 1, 1000000),
     .supported = true},
    {"scheduler.request_timeout_ms", UINT(scheduler.request_timeout_ms, 0, 3600000),
     .supported = true},
    /* sun_path holds 108 bytes with the NUL. */
    {"server.socket", STR(server.socket, 1, 107), .supported = true},
    {"server.socket_mode", MODE(server.socket_mode, 0777), .supported = true},
    {"server.group", STR(server.group, 0, 255), .supported = true},
    {"server.admin_group", STR(server.admin_group, 0, 255), .supported = true},
    {"server.handshake_timeout_ms", UINT(server.handshake_timeout_ms, 1, 600000),
     .supported = true},
    {"server.max_clients", UINT(server.max_clients, 1, 65536), .supported = true},
    {"server.max_client_shm_bytes", SIZE(server.max_client_shm_bytes, 1LL << 20, 1LL << 40),
     .supported = true},
    {"server.max_total_shm_bytes", SIZE(server.max_total_shm_bytes, 1LL << 20, 1LL << 44),
     .supported = true},
    {"server.max_inflight_requests", UINT(server.max_inflight_requests, 1, 65536),
     .supported = true},
    {"server.max_inflight_tokens", UINT(server.max_inflight_tokens, 1, 100000000),
     .supported = true},
    {"metrics.listen", STR(metrics.listen, 0, 255), .supported = false},
    {"log.level", ENUM(log.level, cfg_log_names, cfg_log_values), .supported = true},
};

_Static_assert(ARRAY_SIZE(cfg_keys) <= 32, "grow cfg_parser.seen_key");
_Static_assert(sizeof(enum moe_cfg_isa) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(enum moe_cfg_log_level) == sizeof(int), "enums are stored as int");

/* ------------------------------------------------------------------------ */
/* Messages                                                                 */
/* ------------------------------------------------------------------------ */

static void cfg_msg(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int cfg_error(struct cfg_parser *p, yaml_mark_t mark, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A message with no position: the file as a whole is wrong. */
static void cfg_msg(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* "NAME:LINE:COLUMN: PATH: message"; libyaml's marks are 0-based. */
static int cfg_error(struct cfg_parser *p, yaml_mark_t mark, const char *path, const char *fmt, ...)
{
	va_list ap;
	size_t n;

	if (!p->err || !p->errlen)
		return -EINVAL;
	snprintf(p->err, p->errlen, "%s:%zu:%zu: %s%s", p->name, mark.line + 1, mark.column + 1,
	         path ? path : "", path ? ": " : "");
	n = strlen(p->err);
	va_start(ap, fmt);
	vsnprintf(p->err + n, p->errlen - n, fmt, ap);
	va_end(ap);
	return -EINVAL;
}

/*
 * Copy at most CFG_ECHO_MAX bytes of a user's text (into CFG_ECHO_LEN
 * bytes) with control characters replaced, so that a message stays one
 * short line whatever the file holds.
 */
static const char *cfg_echo(char buf[CFG_ECHO_LEN], const char *s, size_t len)
{
	size_t i, n = len < CFG_ECHO_MAX ? len : CFG_ECHO_MAX;

	/* Do not cut a UTF-8 sequence in half. */
	while (n < len && n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
		n--;
	for (i = 0; i < n; i++)
		buf[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
	if (n < len) {
		memcpy(buf + n, "...", 3);
		n += 3;
	}
	buf[n] = '\0';
	return buf;
}

/* "one of a, b, c" */
static void one_of(char *buf, size_t size, const char *const *names)
{
	size_t n;

	snprintf(buf, size, "one of %s", names[0]);
	for (names++, n = strlen(buf); *names && n + 1 < size; names++) {
		snprintf(buf + n, size - n, ", %s", *names);
		n += strlen(buf + n);
	}
}

/* ------------------------------------------------------------------------ */
/* Scalars                                                                  */
/* ------------------------------------------------------------------------ */

static const char *scalar(const yaml_event_t *ev)
{
	return (const char *)ev->data.scalar.value;
}

static bool is_plain(const yaml_event_t *ev)
{
	return ev->type == YAML_SCALAR_EVENT && ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

/* YAML's null: a plain empty value ("key:"), ~ or null. */
static bool is_null(const yaml_event_t *ev)
{
	const char *v;

	if (!is_plain(ev))
		return false;
	v = scalar(ev);
	return !*v || !strcmp(v, "~") || !strcasecmp(v, "null");
}

/* The words YAML 1.1 reads as booleans; only true/false are accepted. */
static bool is_bool_word(const char *v)
{
	static const char *const words[] = {"true", "false", "yes", "no", "on", "off", "y", "n"};
	size_t i;

	for (i = 0; i < ARRAY_SIZE(words); i++)
		if (!strcasecmp(v, words[i]))
			return true;
	return false;
}

/*
 * A decimal integer as YAML 1.2 writes it: [-+]?[0-9]+ (so 0660 is 660).
 * Returns 0, -EINVAL when @v is not one, -ERANGE when it overflows.
 */
static int scan_int(const char *v, long long *out)
{
	const char *d = v + (*v == '-' || *v == '+');
	char *end;

	if (!*d || strspn(d, "0123456789") != strlen(d))
		return -EINVAL;
	errno = 0;
	*out = strtoll(v, &end, 10);
	if (errno == ERANGE)
		return -ERANGE;
	return *end ? -EINVAL : 0;
}

/* A finite number in decimal notation: no inf, nan or hex floats. */
static int scan_number(const char *v, double *out)
{
	locale_t c_locale;
	char *end;
	int rc;

	if (strspn(v, "0123456789.eE+-") != strlen(v) || !strpbrk(v, "0123456789"))
		return -EINVAL;
	/* "1.25" whatever LC_NUMERIC the process runs under. */
	c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
	if (!c_locale)
		return -ENOMEM;
	errno = 0;
	*out = strtod_l(v, &end, c_locale);
	rc = errno == ERANGE ? -ERANGE : 0;
	freelocale(c_locale);
	if (*end)
		return -EINVAL;
	return (rc || !isfinite(*out)) ? -ERANGE : 0;
}

/* What a node is, for "expected X, got Y". */
static const char *describe(char *buf, size_t size, const yaml_event_t *ev)
{
	char echo[CFG_ECHO_LEN];
	const char *v;
	long long i;
	double d;

	if (ev->type == YAML_MAPPING_START_EVENT)
		return "a mapping";
	if (ev->type == YAML_SEQUENCE_START_EVENT)
		return "a list";
	if (ev->type != YAML_SCALAR_EVENT)
		return "something else";
	if (is_null(ev))
		return "no value";
	v = scalar(ev);
	cfg_echo(echo, v, ev->data.scalar.length);
	if (!is_plain(ev))
		snprintf(buf, size, "a quoted string (\"%s\")", echo);
	else if (is_bool_word(v))
		snprintf(buf, size, "a boolean (%s)", echo);
	else if (scan_int(v, &i) != -EINVAL)
		snprintf(buf, size, "%s", echo);
	else if (scan_number(v, &d) != -EINVAL)
		snprintf(buf, size, "a float (%s)", echo);
	else
		snprintf(buf, size, "'%s'", echo);
	return buf;
}

#define CFG_DESCRIBE_LEN (CFG_ECHO_LEN + 32)

static int bad_value(struct cfg_parser *p, const char *path, const yaml_event_t *ev,
                     const char *expected)
{
	char got[CFG_DESCRIBE_LEN];

	return cfg_error(p, ev->start_mark, path, "expected %s, got %s", expected,
	                 describe(got, sizeof(got), ev));
}

/* Anchors, aliases and tags have no use in moe.yaml: refuse them. */
static int check_node(struct cfg_parser *p, const yaml_event_t *ev, const char *path)
{
	const yaml_char_t *anchor = NULL, *tag = NULL;

	switch (ev->type) {
	case YAML_ALIAS_EVENT:
		return cfg_error(p, ev->start_mark, path, "YAML aliases are not supported");
	case YAML_SCALAR_EVENT:
		anchor = ev->data.scalar.anchor;
		tag = ev->data.scalar.tag;
		/* A "\0" escape would cut the value short for every C user. */
		if (strlen(scalar(ev)) != ev->data.scalar.length)
			return cfg_error(p, ev->start_mark, path, "contains a NUL character");
		break;
	case YAML_SEQUENCE_START_EVENT:
		anchor = ev->data.sequence_start.anchor;
		tag = ev->data.sequence_start.tag;
		break;
	case YAML_MAPPING_START_EVENT:
		anchor = ev->data.mapping_start.anchor;
		tag = ev->data.mapping_start.tag;
		break;
	default:
		break;
	}
	if (anchor)
		return cfg_error(p, ev->start_mark, path, "YAML anchors are not supported");
	if (tag)
		return cfg_error(p, ev->start_mark, path, "YAML tags are not supported");
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Events                                                                   */
/* ------------------------------------------------------------------------ */

/* The first byte of the character at @mark (libyaml counts characters). */
static int char_at(const struct cfg_parser *p, yaml_mark_t mark)
{
	size_t i = 0, line = 0, col = 0;

	while (i < p->len && line < mark.line)
		if (p->buf[i++] == '\n')
			line++;
	for (; i < p->len && p->buf[i] != '\n'; i++) {
		if ((p->buf[i] & 0xc0) == 0x80)
			continue;
		if (col++ == mark.column)
			return p->buf[i];
	}
	return -1;
}

/* Turn libyaml's error into "NAME:LINE:COLUMN: YAML syntax error: ...". */
static int syntax_error(struct cfg_parser *p)
{
	const yaml_parser_t *y = &p->yaml;
	const char *problem = y->problem ? y->problem : "unknown error";
	yaml_mark_t mark = y->problem_mark;
	size_t i;

	if (y->error == YAML_MEMORY_ERROR)
		return -ENOMEM;
	if (y->error == YAML_READER_ERROR) {
		/* The reader only knows a byte offset: count lines and
		 * characters up to it. */
		memset(&mark, 0, sizeof(mark));
		for (i = 0; i < y->problem_offset && i < p->len; i++) {
			if (p->buf[i] == '\n') {
				mark.line++;
				mark.column = 0;
			} else if ((p->buf[i] & 0xc0) != 0x80) {
				mark.column++;
			}
		}
		return cfg_error(p, mark, NULL, "invalid input: %s (byte 0x%02x)", problem,
		                 (unsigned int)y->problem_value & 0xff);
	}
	if (char_at(p, mark) == '\t')
		return cfg_error(p, mark, NULL,
		                 "YAML syntax error: %s (a tab: YAML indents with spaces only)",
		                 problem);
	if (y->context)
		return cfg_error(p, mark, NULL, "YAML syntax error: %s (%s at line %zu column %zu)",
		                 problem, y->context, y->context_mark.line + 1,
		                 y->context_mark.column + 1);
	return cfg_error(p, mark, NULL, "YAML syntax error: %s", problem);
}

/* The next event; on success the caller owns it (yaml_event_delete). */
static int next_event(struct cfg_parser *p, yaml_event_t *ev)
{
	return yaml_parser_parse(&p->yaml, ev) ? 0 : syntax_error(p);
}

/* Read one event that libyaml's grammar promises is of @type. */
static int expect_event(struct cfg_parser *p, yaml_event_type_t type)
{
	yaml_event_t ev;
	int rc = next_event(p, &ev);

	if (rc)
		return rc;
	if (ev.type != type)
		rc = cfg_error(p, ev.start_mark, NULL, "unexpected YAML event %d", (int)ev.type);
	yaml_event_delete(&ev);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* Value parsers: one per kind of key in cfg_keys[]                         */
/* ------------------------------------------------------------------------ */

static int parse_uint(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                      void *field)
{
	char expected[64];
	long long v;

	if (!is_plain(ev) || scan_int(scalar(ev), &v) || v < k->min || v > k->max) {
		snprintf(expected, sizeof(expected), "an integer between %lld and %lld", k->min,
		         k->max);
		return bad_value(p, k->path, ev, expected);
	}
	if (k->size == sizeof(uint64_t))
		*(uint64_t *)field = (uint64_t)v;
	else
		*(unsigned int *)field = (unsigned int)v;
	return 0;
}

static int parse_bool(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                      void *field)
{
	if (is_plain(ev) && !strcmp(scalar(ev), "true"))
		*(bool *)field = true;
	else if (is_plain(ev) && !strcmp(scalar(ev), "false"))
		*(bool *)field = false;
	else
		return bad_value(p, k->path, ev, "true or false");
	return 0;
}

static int parse_number(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                        void *field)
{
	char expected[80];
	double v = 0;
	int rc;

	rc = is_plain(ev) ? scan_number(scalar(ev), &v) : -EINVAL;
	if (rc == -ENOMEM)
		return rc;
	if (rc || !(v > k->fmin && v <= k->fmax)) {
		snprintf(expected, sizeof(expected), "a number greater than %g and at most %g",
		         k->fmin, k->fmax);
		return bad_value(p, k->path, ev, expected);
	}
	*(double *)field = v;
	return 0;
}

static bool in_names(const char *const *names, const char *v)
{
	for (; *names; names++)
		if (!strcmp(*names, v))
			return true;
	return false;
}

/* Strings, plain or quoted; a plain null means "" where "" is allowed. */
static int parse_string(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                        void *field)
{
	char expected[160], **slot = field, *copy;
	const char *v = "";
	size_t len;

	if (ev->type == YAML_SCALAR_EVENT && !is_null(ev))
		v = scalar(ev);
	if (ev->type != YAML_SCALAR_EVENT || (is_null(ev) && k->min > 0) ||
	    (k->names && !in_names(k->names, v))) {
		if (k->names)
			one_of(expected, sizeof(expected), k->names);
		else
			snprintf(expected, sizeof(expected), "a string");
		return bad_value(p, k->path, ev, expected);
	}
	len = strlen(v);
	if ((long long)len < k->min)
		return cfg_error(p, ev->start_mark, k->path, "must not be empty");
	if ((long long)len > k->max)
		return cfg_error(p, ev->start_mark, k->path, "too long (%zu bytes, at most %lld)",
		                 len, k->max);
	copy = strdup(v);
	if (!copy)
		return -ENOMEM;
	free(*slot);
	*slot = copy;
	return 0;
}

static int parse_enum(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                      void *field)
{
	char expected[160];
	int i;

	for (i = 0; ev->type == YAML_SCALAR_EVENT && k->names[i]; i++) {
		if (!strcmp(k->names[i], scalar(ev))) {
			*(int *)field = k->values[i];
			return 0;
		}
	}
	one_of(expected, sizeof(expected), k->names);
	return bad_value(p, k->path, ev, expected);
}

/*
 * Sizes: bytes, or a number with a binary suffix: K, M, G, T or KiB, MiB,
 * GiB, TiB (powers of 1024, as systemd reads them). KB, MB, GB are refused:
 * half of the world reads them as powers of 1000.
 */
static int scan_size(const char *v, unsigned long long *out)
{
	static const char units[] = "KMGT";
	unsigned long long n, mult = 1;
	const char *u;
	char *end;

	if (*v < '0' || *v > '9')
		return -EINVAL;
	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno == ERANGE)
		return -ERANGE;
	if (*end) {
		u = strchr(units, *end);
		if (!u || !*u || (end[1] && strcmp(end + 1, "iB")))
			return -EINVAL;
		mult = 1ULL << (10 * (u - units + 1));
	}
	if (n > ULLONG_MAX / mult)
		return -ERANGE;
	*out = n * mult;
	return 0;
}

static int parse_size(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                      void *field)
{
	char expected[128];
	unsigned long long v;

	if (ev->type != YAML_SCALAR_EVENT || scan_size(scalar(ev), &v) ||
	    v < (unsigned long long)k->min || v > (unsigned long long)k->max) {
		snprintf(expected, sizeof(expected),
		         "a size between %lldM and %lldT (bytes, or with a suffix K, M, G, T, KiB, "
		         "MiB, GiB, TiB)",
		         k->min >> 20, k->max >> 40);
		return bad_value(p, k->path, ev, expected);
	}
	*(uint64_t *)field = v;
	return 0;
}

/*
 * Modes are always octal, as chmod(1) reads them: 0660, 660, 0o660, "0660".
 * (YAML 1.1 would read 0660 as octal but 660 as decimal, YAML 1.2 both as
 * decimal; neither is what anyone writing a mode means.)
 */
static int parse_mode(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                      void *field)
{
	const char *v = ev->type == YAML_SCALAR_EVENT ? scalar(ev) : "";
	char expected[64];
	unsigned int mode = 0;
	size_t i;

	if (!strncmp(v, "0o", 2))
		v += 2;
	for (i = 0; i < 5 && v[i] >= '0' && v[i] <= '7'; i++)
		mode = mode * 8 + (unsigned int)(v[i] - '0');
	if (ev->type != YAML_SCALAR_EVENT || i == 0 || v[i] || mode > k->max) {
		snprintf(expected, sizeof(expected), "an octal mode like 0660, at most 0%llo",
		         (unsigned long long)k->max);
		return bad_value(p, k->path, ev, expected);
	}
	*(unsigned int *)field = mode;
	return 0;
}

#define DEVICES_EXPECTED "cpu, cpu:R (R between 1 and 64), cuda, cuda:all or a list of GPU ids"

/* cpu, cpu:R, cuda, cuda:all */
static int parse_dev_scalar(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                            struct moe_config *c)
{
	char echo[CFG_ECHO_LEN];
	const char *v = scalar(ev);
	long long r = 1;

	if (!strcmp(v, "cpu") || !strncmp(v, "cpu:", 4)) {
		if (v[3] && (scan_int(v + 4, &r) || r < 1 || r > MOE_CFG_MAX_CPU_RANKS))
			return cfg_error(p, ev->start_mark, k->path,
			                 "expected cpu:R with R between 1 and %d, got '%s'",
			                 MOE_CFG_MAX_CPU_RANKS,
			                 cfg_echo(echo, v, ev->data.scalar.length));
		c->devices.kind = MOE_CFG_DEV_CPU;
		c->devices.n_ranks = (unsigned int)r;
		c->devices.all_gpus = false;
		return 0;
	}
	if (!strcmp(v, "cuda") || !strcmp(v, "cuda:all")) {
		c->devices.kind = MOE_CFG_DEV_CUDA;
		c->devices.n_ranks = 0; /* known once the GPUs are counted */
		c->devices.all_gpus = true;
		return 0;
	}
	return bad_value(p, k->path, ev, DEVICES_EXPECTED);
}

/* [0, 1, 3]: GPU ids 0..63, each at most once. */
static int parse_gpu_list(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *start,
                          struct moe_config *c)
{
	bool listed[MOE_CFG_MAX_GPUS] = {false};
	unsigned int n = 0;
	yaml_event_t ev;
	long long id = 0;
	int rc;

	for (;;) {
		rc = next_event(p, &ev);
		if (rc)
			return rc;
		if (ev.type == YAML_SEQUENCE_END_EVENT)
			break;
		rc = check_node(p, &ev, k->path);
		if (!rc && (!is_plain(&ev) || scan_int(scalar(&ev), &id) || id < 0 ||
		            id >= MOE_CFG_MAX_GPUS))
			rc = bad_value(p, k->path, &ev, "a GPU id between 0 and 63");
		if (!rc && listed[id])
			rc = cfg_error(p, ev.start_mark, k->path, "GPU %lld is listed twice", id);
		if (!rc) {
			listed[id] = true;
			c->devices.gpu_ids[n++] = (uint8_t)id;
		}
		yaml_event_delete(&ev);
		if (rc)
			return rc;
	}
	yaml_event_delete(&ev);
	if (!n)
		return cfg_error(p, start->start_mark, k->path, "the list of GPU ids is empty");
	c->devices.kind = MOE_CFG_DEV_CUDA;
	c->devices.n_ranks = n;
	c->devices.all_gpus = false;
	return 0;
}

/* devices is one key whose value decides several fields, and whose
 * values are supported one by one. */
static int parse_devices(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                         void *field)
{
	struct moe_config *c = p->c;
	int rc;

	(void)field; /* &c->devices, whose struct has no name */

	if (ev->type == YAML_SEQUENCE_START_EVENT)
		rc = parse_gpu_list(p, k, ev, c);
	else if (ev->type == YAML_SCALAR_EVENT && !is_null(ev))
		rc = parse_dev_scalar(p, k, ev, c);
	else
		rc = bad_value(p, k->path, ev, DEVICES_EXPECTED);
	if (rc)
		return rc;
	if (c->devices.kind == MOE_CFG_DEV_CUDA && !CFG_CUDA_BUILT)
		return cfg_error(p, ev->start_mark, k->path,
		                 "this moed was built without CUDA (MOE_CUDA=OFF): use cpu");
	if (c->devices.kind == MOE_CFG_DEV_CUDA && c->devices.n_ranks > CFG_GPUS_SUPPORTED)
		return cfg_error(p, ev->start_mark, k->path,
		                 "not supported yet (one GPU for now)");
	if (c->devices.kind == MOE_CFG_DEV_CPU && c->devices.n_ranks > CFG_CPU_RANKS_SUPPORTED)
		return cfg_error(p, ev->start_mark, k->path,
		                 "not supported yet (one CPU rank for now)");
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Structure: the stream, the top-level mapping, the sections               */
/* ------------------------------------------------------------------------ */

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

static int find_key(const char *sec, const char *key, size_t len)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_keys); i++)
		if (key_is(&cfg_keys[i], sec, key, len))
			return (int)i;
	return -1;
}

/* The index of the first key of section @key, or -1. */
static int find_section(const char *key, size_t len)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_keys); i++)
		if (strlen(cfg_keys[i].path) > len && !memcmp(cfg_keys[i].path, key, len) &&
		    cfg_keys[i].path[len] == '.')
			return (int)i;
	return -1;
}

/* "model, devices, cpu, ..." or "path, family": the keys valid in @sec. */
static void list_keys(char *buf, size_t size, const char *sec)
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

static int unknown_key(struct cfg_parser *p, const char *sec, const yaml_event_t *key)
{
	char echo[CFG_ECHO_LEN], valid[256];

	list_keys(valid, sizeof(valid), sec);
	cfg_echo(echo, scalar(key), key->data.scalar.length);
	if (!echo[0])
		snprintf(echo, sizeof(echo), "\"\"");
	return cfg_error(p, key->start_mark, NULL, "%s%s%s: unknown key (expected one of: %s)",
	                 sec ? sec : "", sec ? "." : "", echo, valid);
}

/* The value of table key @idx, whose key node was @key. */
static int parse_value(struct cfg_parser *p, int idx, const yaml_event_t *key)
{
	const struct cfg_key *k = &cfg_keys[idx];
	yaml_event_t ev;
	int rc;

	if (p->seen_key[idx])
		return cfg_error(p, key->start_mark, k->path, "duplicate key");
	p->seen_key[idx] = true;
	rc = next_event(p, &ev);
	if (rc)
		return rc;
	rc = check_node(p, &ev, k->path);
	if (!rc)
		rc = k->parse(p, k, &ev, (char *)p->c + k->offset);
	yaml_event_delete(&ev);
	if (!rc && !k->supported)
		rc = cfg_error(p, key->start_mark, k->path, "not supported yet");
	return rc;
}

static int parse_mapping(struct cfg_parser *p, const char *sec);

/* A section: a mapping of its keys; an empty one (null) is allowed. */
static int parse_section(struct cfg_parser *p, int idx, const yaml_event_t *key)
{
	char sec[32];
	yaml_event_t ev;
	int rc;

	snprintf(sec, sizeof(sec), "%.*s", (int)strcspn(cfg_keys[idx].path, "."),
	         cfg_keys[idx].path);
	if (p->seen_section[idx])
		return cfg_error(p, key->start_mark, sec, "duplicate key");
	p->seen_section[idx] = true;
	if (!strcmp(sec, "model")) {
		p->model_mark = key->start_mark;
		p->have_model = true;
	}
	rc = next_event(p, &ev);
	if (rc)
		return rc;
	rc = check_node(p, &ev, sec);
	if (!rc && ev.type == YAML_MAPPING_START_EVENT)
		rc = parse_mapping(p, sec);
	else if (!rc && !is_null(&ev))
		rc = bad_value(p, sec, &ev, "a mapping");
	yaml_event_delete(&ev);
	return rc;
}

static int parse_pair(struct cfg_parser *p, const char *sec, const yaml_event_t *key)
{
	char got[CFG_DESCRIBE_LEN];
	const char *name;
	size_t len;
	int idx;

	if (key->type != YAML_SCALAR_EVENT)
		return cfg_error(p, key->start_mark, sec, "expected a key, got %s",
		                 describe(got, sizeof(got), key));
	name = scalar(key);
	len = key->data.scalar.length;
	idx = find_key(sec, name, len);
	if (idx >= 0)
		return parse_value(p, idx, key);
	idx = sec ? -1 : find_section(name, len);
	if (idx >= 0)
		return parse_section(p, idx, key);
	return unknown_key(p, sec, key);
}

/* The pairs of a mapping whose start has been read; @sec NULL: top level. */
static int parse_mapping(struct cfg_parser *p, const char *sec)
{
	yaml_event_t key;
	int rc;

	for (;;) {
		rc = next_event(p, &key);
		if (rc)
			return rc;
		if (key.type == YAML_MAPPING_END_EVENT)
			break;
		rc = check_node(p, &key, sec);
		if (!rc)
			rc = parse_pair(p, sec, &key);
		yaml_event_delete(&key);
		if (rc)
			return rc;
	}
	yaml_event_delete(&key);
	return 0;
}

static int parse_root(struct cfg_parser *p, const yaml_event_t *ev)
{
	char got[CFG_DESCRIBE_LEN];
	int rc;

	rc = check_node(p, ev, NULL);
	if (rc)
		return rc;
	if (is_null(ev)) /* "---" and nothing else */
		return cfg_error(p, (yaml_mark_t){0}, NULL,
		                 "empty configuration: model.path is required");
	if (ev->type != YAML_MAPPING_START_EVENT)
		return cfg_error(p, ev->start_mark, NULL, "expected a mapping at top level, got %s",
		                 describe(got, sizeof(got), ev));
	p->root_mark = ev->start_mark;
	return parse_mapping(p, NULL);
}

/* One document holding one mapping; anything else is refused. */
static int parse_stream(struct cfg_parser *p)
{
	yaml_event_t ev;
	int rc;

	rc = expect_event(p, YAML_STREAM_START_EVENT);
	if (rc)
		return rc;
	rc = next_event(p, &ev);
	if (rc)
		return rc;
	if (ev.type == YAML_STREAM_END_EVENT) /* nothing, or only comments */
		rc = cfg_error(p, (yaml_mark_t){0}, NULL,
		               "empty configuration: model.path is required");
	yaml_event_delete(&ev);
	if (rc)
		return rc;
	rc = next_event(p, &ev);
	if (rc)
		return rc;
	rc = parse_root(p, &ev);
	yaml_event_delete(&ev);
	if (rc)
		return rc;
	rc = expect_event(p, YAML_DOCUMENT_END_EVENT);
	if (rc)
		return rc;
	rc = next_event(p, &ev);
	if (rc)
		return rc;
	if (ev.type != YAML_STREAM_END_EVENT)
		rc = cfg_error(p, ev.start_mark, NULL, "only one YAML document is allowed");
	yaml_event_delete(&ev);
	if (rc)
		return rc;
	if (!p->c->model.path)
		return cfg_error(p, p->have_model ? p->model_mark : p->root_mark, "model.path",
		                 "required");
	return 0;
}

/* ------------------------------------------------------------------------ */
/* API                                                                      */
/* ------------------------------------------------------------------------ */

int moe_cfg_defaults(struct moe_config *c)
{
	memset(c, 0, sizeof(*c));
	c->devices.kind = MOE_CFG_DEV_CPU;
	c->devices.n_ranks = 1;
	c->cpu.threads = 0;
	c->cpu.isa = MOE_CFG_ISA_AUTO;
	c->placement.spare_slots = 0;
	c->placement.auto_rebalance = false;
	c->placement.rebalance_threshold = 1.5;
	c->placement.rebalance_interval_s = 60;
	c->scheduler.max_batch_tokens = 4096;
	c->scheduler.batch_window_us = 200;
	c->scheduler.max_queue_requests = 4096;
	c->scheduler.request_timeout_ms = 30000;
	c->server.socket_mode = 0660;
	c->server.max_clients = 64;
	c->server.max_client_shm_bytes = 1ULL << 30;
	c->server.max_inflight_requests = 256;
	c->server.max_inflight_tokens = 65536;
	c->server.handshake_timeout_ms = 5000;
	c->log.level = MOE_CFG_LOG_INFO;
	c->server.socket = strdup(MOE_CFG_DEFAULT_SOCKET);
	c->server.group = strdup("");
	c->server.admin_group = strdup("");
	c->metrics.listen = strdup("");
	if (!c->server.socket || !c->server.group || !c->server.admin_group || !c->metrics.listen)
		return -ENOMEM;
	return 0;
}

void moe_cfg_free(struct moe_config *c)
{
	if (!c)
		return;
	free(c->path);
	free(c->model.path);
	free(c->model.family);
	free(c->server.socket);
	free(c->server.group);
	free(c->server.admin_group);
	free(c->metrics.listen);
	memset(c, 0, sizeof(*c));
}

int moe_cfg_load_string(const char *name, const char *yaml, size_t len, struct moe_config *c,
                        char *err, size_t errlen)
{
	struct cfg_parser p;
	int rc;

	memset(&p, 0, sizeof(p));
	p.name = name ? name : "<string>";
	p.buf = (const unsigned char *)(yaml ? yaml : "");
	p.len = yaml ? len : 0;
	p.c = c;
	p.err = err;
	p.errlen = errlen;
	if (err && errlen)
		err[0] = '\0';
	rc = moe_cfg_defaults(c);
	if (rc)
		goto out_nomem;
	if (p.len > MOE_CFG_MAX_FILE_BYTES) {
		cfg_msg(err, errlen, "%s: too large (%zu bytes, at most %u)", p.name, p.len,
		        MOE_CFG_MAX_FILE_BYTES);
		rc = -EFBIG;
		goto out_free_cfg;
	}
	if (!yaml_parser_initialize(&p.yaml))
		goto out_nomem;
	yaml_parser_set_input_string(&p.yaml, p.buf, p.len);
	yaml_parser_set_encoding(&p.yaml, YAML_UTF8_ENCODING);
	rc = parse_stream(&p);
	yaml_parser_delete(&p.yaml);
	if (rc == -ENOMEM)
		goto out_nomem;
	if (rc)
		goto out_free_cfg;
	return 0;

out_nomem:
	cfg_msg(err, errlen, "%s: out of memory", p.name);
	rc = -ENOMEM;
out_free_cfg:
	moe_cfg_free(c);
	return rc;
}

/* All of @file into a new *@buf, refusing what is not a regular file of sane size. */
static int read_file(const char *file, char **buf, size_t *len, char *err, size_t errlen)
{
	struct stat st;
	size_t got = 0, cap;
	ssize_t n;
	int fd, rc;

	/* O_NONBLOCK: a FIFO named by mistake must not hang the daemon. */
	fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		rc = -errno;
		cfg_msg(err, errlen, "%s: cannot open: %s", file, strerror(-rc));
		return rc;
	}
	if (fstat(fd, &st)) {
		rc = -errno;
		cfg_msg(err, errlen, "%s: cannot stat: %s", file, strerror(-rc));
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		cfg_msg(err, errlen, "%s: not a regular file", file);
		rc = S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
		goto out_close;
	}
	if (st.st_size > MOE_CFG_MAX_FILE_BYTES) {
		cfg_msg(err, errlen, "%s: too large (%lld bytes, at most %u)", file,
		        (long long)st.st_size, MOE_CFG_MAX_FILE_BYTES);
		rc = -EFBIG;
		goto out_close;
	}
	/* One byte more than its size, to notice a file that grows while we
	 * read it: half of an edit is not a configuration. */
	cap = (size_t)st.st_size + 1;
	*buf = malloc(cap);
	if (!*buf) {
		cfg_msg(err, errlen, "%s: out of memory", file);
		rc = -ENOMEM;
		goto out_close;
	}
	while (got < cap) {
		n = read(fd, *buf + got, cap - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = -errno;
			cfg_msg(err, errlen, "%s: cannot read: %s", file, strerror(-rc));
			goto out_free_buf;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	if (got == cap) {
		cfg_msg(err, errlen, "%s: changed while being read", file);
		rc = -EAGAIN;
		goto out_free_buf;
	}
	*len = got;
	close(fd);
	return 0;

out_free_buf:
	free(*buf);
	*buf = NULL;
out_close:
	close(fd);
	return rc;
}

/* A relative model.path means: next to the configuration file. */
static int resolve_model_path(struct moe_config *c, const char *file)
{
	const char *slash = strrchr(file, '/');
	size_t dirlen, plen;
	char *full;

	if (c->model.path[0] == '/' || !slash)
		return 0;
	dirlen = (size_t)(slash - file);
	plen = strlen(c->model.path);
	full = malloc(dirlen + 1 + plen + 1);
	if (!full)
		return -ENOMEM;
	memcpy(full, file, dirlen);
	full[dirlen] = '/';
	memcpy(full + dirlen + 1, c->model.path, plen + 1);
	free(c->model.path);
	c->model.path = full;
	return 0;
}

int moe_cfg_load_file(const char *file, struct moe_config *c, char *err, size_t errlen)
{
	char *buf = NULL;
	size_t len = 0;
	int rc;

	memset(c, 0, sizeof(*c));
	if (err && errlen)
		err[0] = '\0';
	rc = read_file(file, &buf, &len, err, errlen);
	if (rc)
		return rc;
	rc = moe_cfg_load_string(file, buf, len, c, err, errlen);
	free(buf);
	if (rc)
		return rc;
	c->path = strdup(file);
	if (!c->path || resolve_model_path(c, file)) {
		cfg_msg(err, errlen, "%s: out of memory", file);
		moe_cfg_free(c);
		return -ENOMEM;
	}
	return 0;
}

const char *moe_cfg_isa_name(enum moe_cfg_isa isa)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(cfg_isa_values); i++)
		if (cfg_isa_values[i] == (int)isa)
			return cfg_isa_names[i];
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
