#include "formats/errbuf.h"

#include <stdarg.h>
#include <stdio.h>

int moe_err(char *err, int ret, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return ret;
	va_start(ap, fmt);
	vsnprintf(err, MOE_ERRLEN, fmt, ap);
	va_end(ap);
	return ret;
}
