#include "daemon/engine/log.h"

#include <stdarg.h>
#include <stdio.h>

static int log_level = LOG_INFO;

void moe_log_set_level(int max_prio)
{
	log_level = max_prio;
}

int moe_log_level(void)
{
	return log_level;
}

void moe_log(int prio, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;

	if (prio > log_level)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	/* one write per line so that concurrent lines do not interleave */
	fprintf(stderr, "<%d>%s\n", prio, buf);
}
