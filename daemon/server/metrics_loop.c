/* daemon/server/metrics_loop.c — the loop's side of the metrics: its counts
 * copied into the registry, requests counted, and the text for `moectl
 * metrics` (see metrics.h). */
#include "daemon/server/internal.h"

void srv_count_request(struct server *s, int status, uint32_t tokens)
{
	uint32_t i = met_status_index(status);

	met_add(&s->met.requests[i], 1);
	met_add(&s->met.tokens[i], tokens);
	if (status)
		met_add(&s->met.errors[i], 1);
}

/* Once per loop iteration: a few relaxed stores of what the loop keeps in
 * its own fields, so the endpoint's thread never reads those. */
void srv_metrics_sync(struct server *s)
{
	struct srv_metrics *m = &s->met;

	met_set(&m->clients, s->n_clients);
	met_set(&m->queue_requests, s->queued);
	met_set(&m->pending_requests, s->pending);
	met_set(&m->pending_tokens, s->pending_tokens);
	met_set(&m->draining, s->draining);
	met_set(&m->clients_refused, s->refused);
	met_set(&m->auth_refusals, s->refused_auth);
	met_set(&m->config_reloads, s->reloads);
	met_set(&m->config_reloads_failed, s->reloads_refused);
	met_set(&m->tracers, s->trace.n);
	met_set(&m->trace_records, s->trace.records);
	met_set(&m->trace_lost, s->trace.lost);
}

/* As the status JSON (status.c), in a sealed memfd: no datagram limit,
 * and the client cannot change it; built at most once per loop iteration
 * and shared by every client asking in it (a flood of METRICS costs one
 * render per iteration). */
static int metrics_snapshot(struct server *s)
{
	size_t len = 0;
	char *text;
	int fd = -1;

	/* counts past every completion the asking client can have seen */
	if (srv_settle(s) && s->metrics_fd >= 0) {
		close(s->metrics_fd);
		s->metrics_fd = -1;
	}
	if (s->metrics_fd >= 0)
		return s->metrics_fd;
	srv_metrics_sync(s);
	text = met_render(&s->met, &len);
	if (text) {
		fd = srv_sealed_memfd("moed-metrics", text, len);
		free(text);
	}
	s->metrics_fd = fd;
	s->metrics_len = len;
	return fd;
}

void srv_metrics_reply(struct server *s, struct client *c, uint32_t seq)
{
	int fd = metrics_snapshot(s); /* (sets metrics_len: first) */

	met_add(&s->met.scrapes_socket, 1);
	srv_text_reply(c, MOE_MSG_METRICS_REPLY, seq, fd, s->metrics_len);
}
