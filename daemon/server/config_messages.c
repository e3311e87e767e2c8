// SPDX-License-Identifier: MIT
/* daemon/server/config_messages.c — error messages, and echoes of the user's text in them
 * (see config_internal.h). */
#include "daemon/server/config_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* A message with no position: the file as a whole is wrong. */
void cfg_msg(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* "NAME:LINE:COLUMN: PATH: message"; libyaml's marks are 0-based. */
int cfg_error(struct cfg_parser *p, yaml_mark_t mark, const char *path, const char *fmt, ...)
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
const char *cfg_echo(char buf[CFG_ECHO_LEN], const char *s, size_t len)
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
void cfg_one_of(char *buf, size_t size, const char *const *names)
{
	size_t n;

	snprintf(buf, size, "one of %s", names[0]);
	for (names++, n = strlen(buf); *names && n + 1 < size; names++) {
		snprintf(buf + n, size - n, ", %s", *names);
		n += strlen(buf + n);
	}
}
