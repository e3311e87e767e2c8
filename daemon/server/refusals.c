/* daemon/server/refusals.c — log lines about refused peers, limited per uid (see internal.h). */
#include "daemon/server/internal.h"

/* ---- refusals in the log ------------------------------------------------ */

#define LOG_WINDOW_NS (10 * 1000000000ull)
#define LOG_PER_WINDOW 5

/* Lines about refused peers (HELLO or admin refused, handshake timeouts)
 * are what an unauthorized process can make moed write at will: at most
 * LOG_PER_WINDOW per uid per 10 s, then one "N similar messages suppressed"
 * line when the window ends (the next line for that uid, or the tick). */
static void log_summary(struct log_slot *l)
{
	if (l->suppressed)
		moe_log(LOG_WARNING, "uid %d: %u similar messages suppressed in the last %llu s",
			(int)l->uid, l->suppressed, LOG_WINDOW_NS / 1000000000ull);
	l->suppressed = 0;
}

void srv_log_refusal(struct server *s, uid_t uid, const char *fmt, ...)
{
	uint64_t now = srv_now_ns();
	struct log_slot *l = NULL, *oldest = &s->log_slots[0];
	char line[512];
	va_list ap;

	for (size_t i = 0; i < sizeof(s->log_slots) / sizeof(s->log_slots[0]); i++) {
		struct log_slot *x = &s->log_slots[i];

		if (x->since_ns && x->uid == uid) {
			l = x;
			break;
		}
		if (x->since_ns < oldest->since_ns)
			oldest = x;
	}
	if (!l) { /* a new peer takes the slot idle longest */
		l = oldest;
		log_summary(l);
		*l = (struct log_slot){.uid = uid, .since_ns = now};
	}
	if (now - l->since_ns >= LOG_WINDOW_NS) {
		log_summary(l);
		l->since_ns = now;
		l->lines = 0;
	}
	if (l->lines >= LOG_PER_WINDOW) {
		l->suppressed++;
		s->log_suppressed++;
		return;
	}
	l->lines++;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	moe_log(LOG_WARNING, "%s", line);
}

/* Summaries of windows that ended with no new line for their uid. */
void srv_log_flush(struct server *s, uint64_t now)
{
	for (size_t i = 0; i < sizeof(s->log_slots) / sizeof(s->log_slots[0]); i++) {
		struct log_slot *l = &s->log_slots[i];

		if (l->since_ns && l->suppressed && now - l->since_ns >= LOG_WINDOW_NS) {
			log_summary(l);
			l->since_ns = now;
			l->lines = 0;
		}
	}
}
