// SPDX-License-Identifier: MIT
/* daemon/server/config_scalar.c — scalars: reading them, describing a node, refusing anchors,
 * aliases and tags (see config_internal.h). */
#include "daemon/server/config_internal.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *cfg_scalar(const yaml_event_t *ev)
{
	return (const char *)ev->data.scalar.value;
}

bool cfg_is_plain(const yaml_event_t *ev)
{
	return ev->type == YAML_SCALAR_EVENT && ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}

/* YAML's null: a plain empty value ("key:"), ~ or null. */
bool cfg_is_null(const yaml_event_t *ev)
{
	const char *v;

	if (!cfg_is_plain(ev))
		return false;
	v = cfg_scalar(ev);
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
int cfg_scan_int(const char *v, long long *out)
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
int cfg_scan_number(const char *v, double *out)
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
const char *cfg_describe(char *buf, size_t size, const yaml_event_t *ev)
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
	if (cfg_is_null(ev))
		return "no value";
	v = cfg_scalar(ev);
	cfg_echo(echo, v, ev->data.scalar.length);
	if (!cfg_is_plain(ev))
		snprintf(buf, size, "a quoted string (\"%s\")", echo);
	else if (is_bool_word(v))
		snprintf(buf, size, "a boolean (%s)", echo);
	else if (cfg_scan_int(v, &i) != -EINVAL)
		snprintf(buf, size, "%s", echo);
	else if (cfg_scan_number(v, &d) != -EINVAL)
		snprintf(buf, size, "a float (%s)", echo);
	else
		snprintf(buf, size, "'%s'", echo);
	return buf;
}

int cfg_bad_value(struct cfg_parser *p, const char *path, const yaml_event_t *ev,
                  const char *expected)
{
	char got[CFG_DESCRIBE_LEN];

	return cfg_error(p, ev->start_mark, path, "expected %s, got %s", expected,
	                 cfg_describe(got, sizeof(got), ev));
}

/* Anchors, aliases and tags have no use in moe.yaml: refuse them. */
int cfg_check_node(struct cfg_parser *p, const yaml_event_t *ev, const char *path)
{
	const yaml_char_t *anchor = NULL, *tag = NULL;

	switch (ev->type) {
	case YAML_ALIAS_EVENT:
		return cfg_error(p, ev->start_mark, path, "YAML aliases are not supported");
	case YAML_SCALAR_EVENT:
		anchor = ev->data.scalar.anchor;
		tag = ev->data.scalar.tag;
		/* A "\0" escape would cut the value short for every C user. */
		if (strlen(cfg_scalar(ev)) != ev->data.scalar.length)
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
