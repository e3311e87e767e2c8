/* daemon/engine/log.h — logging to stderr with syslog priority prefixes ("<3>..."),
 * which journald turns into priorities. */
#ifndef MOE_LOG_H
#define MOE_LOG_H

#include <syslog.h>

void moe_log_set_level(int max_prio); /* LOG_DEBUG .. LOG_ERR; default LOG_INFO */
int moe_log_level(void);
void moe_log(int prio, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
