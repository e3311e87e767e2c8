/* daemon/server/metrics_http.c — the metrics endpoint: GET /metrics over
 * HTTP, served by libmicrohttpd's own thread (see metrics.h).
 *
 * Read-only by construction: the only thing it can do is render the
 * metrics (met_render reads atomics and the engine's statistics); any
 * other path is 404, any method but GET and HEAD 405. moed binds the
 * socket itself (so that port 0 works and the bound address is known), and
 * starts libmicrohttpd's thread with every signal blocked, so that the
 * daemon's signalfd keeps receiving SIGTERM, SIGHUP and the rest.
 * Connections are limited (MAX_CONNS, idle ones closed after
 * CONN_TIMEOUT_S seconds), so a peer that opens many cannot grow it.
 */
#include "daemon/server/metrics.h"

#ifdef MOE_HAVE_MICROHTTPD

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <microhttpd.h>

#include "daemon/engine/log.h"
#include "daemon/server/config.h"

#define MAX_CONNS      32
#define CONN_TIMEOUT_S 10
/* per connection: a scrape's request headers and the reply's (the body is
 * ours; a scraper's request is a few hundred bytes; a larger one is
 * refused); libmicrohttpd's default, 32 KiB, is zeroed for every request */
#define CONN_MEMORY 4096

struct met_http {
	struct MHD_Daemon *d;
	struct srv_metrics *m;
};

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned code, const char *text,
			     const char *allow)
{
	struct MHD_Response *r =
		MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
	enum MHD_Result ret;

	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, "Content-Type", "text/plain; charset=utf-8");
	if (allow)
		MHD_add_response_header(r, "Allow", allow);
	ret = MHD_queue_response(conn, code, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
				  const char *method, const char *version,
				  const char *upload_data, size_t *upload_size, void **state)
{
	struct met_http *h = cls;
	struct MHD_Response *r;
	enum MHD_Result ret;
	size_t len;
	char *text;

	(void)version;
	(void)upload_data;
	if (strcmp(method, "GET") && strcmp(method, "HEAD"))
		return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n", "GET, HEAD");
	if (*upload_size) { /* a GET with a body: ignored */
		*upload_size = 0;
		return MHD_YES;
	}
	if (!*state) { /* the headers: answer on the next call */
		*state = h;
		return MHD_YES;
	}
	if (strcmp(url, "/metrics"))
		return reply(conn, MHD_HTTP_NOT_FOUND, "moed serves /metrics only\n", NULL);
	text = met_render(h->m, &len);
	if (!text)
		return reply(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "out of memory\n", NULL);
	met_add(&h->m->scrapes_http, 1);
	r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
	if (!r) {
		free(text);
		return MHD_NO;
	}
	MHD_add_response_header(r, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
	ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
	MHD_destroy_response(r);
	return ret;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
	char line[256];

	(void)cls;
	vsnprintf(line, sizeof(line), fmt, ap);
	line[strcspn(line, "\n")] = '\0';
	/* what peers cause (a reset connection, oversized headers) at debug:
	 * a remote peer must not be able to flood the log */
	moe_log(LOG_DEBUG, "metrics endpoint: %s", line);
}

static int bind_listen(const char *listen_at, char *bound, size_t bound_len, char *err,
		       size_t err_len)
{
	struct sockaddr_storage ss;
	socklen_t len;
	unsigned int salen;
	char host[INET6_ADDRSTRLEN], why[160];
	int fd, one = 1;

	if (moe_cfg_parse_listen(listen_at, (struct sockaddr *)&ss, &salen, why, sizeof(why))) {
		snprintf(err, err_len, "metrics.listen: %s", why);
		errno = EINVAL;
		return -1;
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&ss, salen) || listen(fd, 64)) {
		int e = errno;

		snprintf(err, err_len, "metrics.listen %s: %s", listen_at, strerror(e));
		if (fd >= 0)
			close(fd);
		errno = e;
		return -1;
	}
	len = sizeof(ss);
	getsockname(fd, (struct sockaddr *)&ss, &len);
	if (ss.ss_family == AF_INET6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;

		inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
		snprintf(bound, bound_len, "[%s]:%u", host, ntohs(a->sin6_port));
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;

		inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
		snprintf(bound, bound_len, "%s:%u", host, ntohs(a->sin_port));
	}
	return fd;
}

int met_http_start(struct srv_metrics *m, const char *listen_at, struct met_http **out,
		   char *bound, size_t bound_len, char *err, size_t err_len)
{
	struct met_http *h = calloc(1, sizeof(*h));
	sigset_t all, old;
	int fd;

	*out = NULL;
	if (!h) {
		snprintf(err, err_len, "out of memory");
		return -1;
	}
	h->m = m;
	fd = bind_listen(listen_at, bound, bound_len, err, err_len);
	if (fd < 0) {
		free(h);
		return -1;
	}
	/* its thread inherits this mask: no signal is delivered to it */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	h->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG,
				0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
				NULL, MHD_OPTION_LISTEN_SOCKET, fd,
				MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNS,
				MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONN_TIMEOUT_S,
				MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)CONN_MEMORY,
				MHD_OPTION_END);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (!h->d) {
		/* (libmicrohttpd closes the socket it was given when it fails) */
		snprintf(err, err_len, "metrics endpoint on %s: libmicrohttpd did not start", bound);
		free(h);
		errno = EIO;
		return -1;
	}
	*out = h;
	return 0;
}

void met_http_stop(struct met_http *h)
{
	if (!h)
		return;
	MHD_stop_daemon(h->d); /* (closes the listening socket) */
	free(h);
}

#else /* built without libmicrohttpd */

#include <stdio.h>

int met_http_start(struct srv_metrics *m, const char *listen_at, struct met_http **out,
		   char *bound, size_t bound_len, char *err, size_t err_len)
{
	(void)m;
	(void)bound;
	(void)bound_len;
	*out = NULL;
	snprintf(err, err_len,
		 "metrics.listen %s: this moed was built without libmicrohttpd "
		 "(Debian: libmicrohttpd-dev); `moectl metrics` still works",
		 listen_at);
	return -1;
}

void met_http_stop(struct met_http *h)
{
	(void)h;
}

#endif
