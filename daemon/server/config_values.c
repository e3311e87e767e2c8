// SPDX-License-Identifier: MIT
/* daemon/server/config_values.c — the value parsers, one per kind of key in cfg_keys[]
 * (see config_internal.h). */
#include "daemon/server/config_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What the engine can run today. Raise these when it can do more. */
#define CFG_CPU_RANKS_SUPPORTED MOE_CFG_MAX_CPU_RANKS
#define CFG_GPUS_SUPPORTED      1 /* GPUs in a list; cuda:all is checked at start */
#ifdef MOE_HAVE_CUDA
#define CFG_CUDA_BUILT true
#else
#define CFG_CUDA_BUILT false
#endif

int cfg_parse_uint(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                   void *field)
{
	char expected[64];
	long long v;

	if (!cfg_is_plain(ev) || cfg_scan_int(cfg_scalar(ev), &v) || v < k->min || v > k->max) {
		snprintf(expected, sizeof(expected), "an integer between %lld and %lld", k->min,
		         k->max);
		return cfg_bad_value(p, k->path, ev, expected);
	}
	if (k->size == sizeof(uint64_t))
		*(uint64_t *)field = (uint64_t)v;
	else
		*(unsigned int *)field = (unsigned int)v;
	return 0;
}

int cfg_parse_bool(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                   void *field)
{
	if (cfg_is_plain(ev) && !strcmp(cfg_scalar(ev), "true"))
		*(bool *)field = true;
	else if (cfg_is_plain(ev) && !strcmp(cfg_scalar(ev), "false"))
		*(bool *)field = false;
	else
		return cfg_bad_value(p, k->path, ev, "true or false");
	return 0;
}

int cfg_parse_number(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                     void *field)
{
	char expected[80];
	double v = 0;
	int rc;

	rc = cfg_is_plain(ev) ? cfg_scan_number(cfg_scalar(ev), &v) : -EINVAL;
	if (rc == -ENOMEM)
		return rc;
	if (rc || !(v > k->fmin && v <= k->fmax)) {
		snprintf(expected, sizeof(expected), "a number greater than %g and at most %g",
		         k->fmin, k->fmax);
		return cfg_bad_value(p, k->path, ev, expected);
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
int cfg_parse_string(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                     void *field)
{
	char expected[160], **slot = field, *copy;
	const char *v = "";
	size_t len;

	if (ev->type == YAML_SCALAR_EVENT && !cfg_is_null(ev))
		v = cfg_scalar(ev);
	if (ev->type != YAML_SCALAR_EVENT || (cfg_is_null(ev) && k->min > 0) ||
	    (k->names && !in_names(k->names, v))) {
		if (k->names)
			cfg_one_of(expected, sizeof(expected), k->names);
		else
			snprintf(expected, sizeof(expected), "a string");
		return cfg_bad_value(p, k->path, ev, expected);
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

int cfg_parse_enum(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                   void *field)
{
	char expected[160];
	int i;

	for (i = 0; ev->type == YAML_SCALAR_EVENT && k->names[i]; i++) {
		if (!strcmp(k->names[i], cfg_scalar(ev))) {
			*(int *)field = k->values[i];
			return 0;
		}
	}
	cfg_one_of(expected, sizeof(expected), k->names);
	return cfg_bad_value(p, k->path, ev, expected);
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

int cfg_parse_size(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                   void *field)
{
	char expected[128];
	unsigned long long v;

	if (ev->type != YAML_SCALAR_EVENT || scan_size(cfg_scalar(ev), &v) ||
	    v < (unsigned long long)k->min || v > (unsigned long long)k->max) {
		snprintf(expected, sizeof(expected),
		         "a size between %lldM and %lldT (bytes, or with a suffix K, M, G, T, KiB, "
		         "MiB, GiB, TiB)",
		         k->min >> 20, k->max >> 40);
		return cfg_bad_value(p, k->path, ev, expected);
	}
	*(uint64_t *)field = v;
	return 0;
}

/*
 * Modes are always octal, as chmod(1) reads them: 0660, 660, 0o660, "0660".
 * (YAML 1.1 would read 0660 as octal but 660 as decimal, YAML 1.2 both as
 * decimal; neither is what anyone writing a mode means.)
 */
int cfg_parse_mode(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                   void *field)
{
	const char *v = ev->type == YAML_SCALAR_EVENT ? cfg_scalar(ev) : "";
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
		return cfg_bad_value(p, k->path, ev, expected);
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
	const char *v = cfg_scalar(ev);
	long long r = 1;

	if (!strcmp(v, "cpu") || !strncmp(v, "cpu:", 4)) {
		if (v[3] && (cfg_scan_int(v + 4, &r) || r < 1 || r > MOE_CFG_MAX_CPU_RANKS))
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
	return cfg_bad_value(p, k->path, ev, DEVICES_EXPECTED);
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
		rc = cfg_next_event(p, &ev);
		if (rc)
			return rc;
		if (ev.type == YAML_SEQUENCE_END_EVENT)
			break;
		rc = cfg_check_node(p, &ev, k->path);
		if (!rc && (!cfg_is_plain(&ev) || cfg_scan_int(cfg_scalar(&ev), &id) || id < 0 ||
		            id >= MOE_CFG_MAX_GPUS))
			rc = cfg_bad_value(p, k->path, &ev, "a GPU id between 0 and 63");
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
int cfg_parse_devices(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                      void *field)
{
	struct moe_config *c = p->c;
	int rc;

	(void)field; /* &c->devices, whose struct has no name */

	if (ev->type == YAML_SEQUENCE_START_EVENT)
		rc = parse_gpu_list(p, k, ev, c);
	else if (ev->type == YAML_SCALAR_EVENT && !cfg_is_null(ev))
		rc = parse_dev_scalar(p, k, ev, c);
	else
		rc = cfg_bad_value(p, k->path, ev, DEVICES_EXPECTED);
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

int moe_cfg_parse_listen(const char *s, struct sockaddr *sa, unsigned int *salen, char *why,
                         size_t whylen)
{
	const char *colon = strrchr(s, ':'), *port;
	char host[64];
	size_t hl;
	char *end;
	unsigned long p;

	if (!colon) {
		snprintf(why, whylen, "expected ADDR:PORT (e.g. 127.0.0.1:9464), got \"%s\"", s);
		return -EINVAL;
	}
	port = colon + 1;
	hl = (size_t)(colon - s);
	errno = 0;
	p = strtoul(port, &end, 10);
	if (*port < '0' || *port > '9' || *end || errno || p > 65535) {
		snprintf(why, whylen, "port \"%s\" is not a number in 0..65535", port);
		return -EINVAL;
	}
	if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)(void *)sa;

		if (hl - 2 >= sizeof(host))
			goto bad;
		memcpy(host, s + 1, hl - 2);
		host[hl - 2] = '\0';
		memset(a, 0, sizeof(*a));
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)p);
		if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
			goto bad;
		*salen = sizeof(*a);
		return 0;
	}
	if (hl >= sizeof(host))
		goto bad;
	memcpy(host, s, hl);
	host[hl] = '\0';
	{
		struct sockaddr_in *a = (struct sockaddr_in *)(void *)sa;

		memset(a, 0, sizeof(*a));
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)p);
		if (!strcmp(host, "localhost"))
			strcpy(host, "127.0.0.1");
		if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
			goto bad;
		*salen = sizeof(*a);
	}
	return 0;
bad:
	snprintf(why, whylen,
	         "address \"%.*s\" is not a numeric IPv4 address, [IPv6] address or localhost",
	         (int)(hl < 80 ? hl : 80), s);
	return -EINVAL;
}

int cfg_parse_listen(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                     void *field)
{
	struct sockaddr_in6 sa;
	unsigned int len;
	char why[160];
	int ret = cfg_parse_string(p, k, ev, field);
	const char *v = *(char **)field;

	if (ret || !v[0])
		return ret;
	if (moe_cfg_parse_listen(v, (struct sockaddr *)&sa, &len, why, sizeof(why)))
		return cfg_error(p, ev->start_mark, k->path, "%s", why);
	return 0;
}
