/* formats/errbuf.h — error messages for humans.
 *
 * Functions that can fail for a reason a user must see take `char *err`
 * pointing at MOE_ERRLEN bytes (Redis' anet style) and return a negative
 * errno; the message names the file, the tensor or the key at fault.
 */
#ifndef MOE_ERRBUF_H
#define MOE_ERRBUF_H

#include <stddef.h>

#define MOE_ERRLEN 512

/* Formats into err (if not NULL) and returns `ret` so that callers can write
 * `return moe_err(err, -EINVAL, "%s: ...", path);`. */
int moe_err(char *err, int ret, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
