/* daemon/server/server.h — moed's serving loop: the control socket, client
 * sessions and their shared regions, the scheduler, completions.
 *
 * One thread runs an epoll loop (listening socket, client sockets, a
 * signalfd, a timerfd for deadlines) and, between I/O, the engine: a batch
 * is formed from the queued requests of one layer across all clients (round
 * robin, so a flooding client cannot starve another), run with all the
 * engine's threads, and completed into each client's completion ring. The
 * daemon never blocks on anything a client can reach: every send and
 * receive uses MSG_DONTWAIT; rings are polled between batches; a client's
 * doorbell only wakes an idle loop.
 */
#ifndef MOE_SERVER_H
#define MOE_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "daemon/server/auth.h"
#include "daemon/engine/engine.h"

struct moe_server_opts;

/* Re-reads the configuration (SIGHUP, `moectl reload-config`): applies what
 * can change while serving into *o and returns 0 with a note of what needs
 * a restart in msg, or a negative errno with the reason (serving goes on
 * with the old settings). */
typedef int (*moe_server_reload_fn)(void *arg, struct moe_server_opts *o, char *msg, size_t n);

struct moe_server_opts {
	const char *socket_path;
	unsigned socket_mode;
	int listen_fd; /* >= 0: an already bound, listening socket (activation) */
	uint32_t max_clients;
	uint64_t max_client_shm_bytes;
	uint64_t max_total_shm_bytes;	/* all clients' regions together */
	uint32_t max_inflight_requests; /* per client */
	uint32_t max_inflight_tokens;	/* per client */
	uint32_t max_queue_requests;	/* all clients */
	uint32_t request_timeout_ms;	/* default deadline, 0: none */
	uint32_t handshake_timeout_ms;	/* a connection must HELLO within this */
	uint64_t copy_bytes_per_s;	/* placement changes' weight copies; 0: unpaced */
	bool auto_rebalance;		/* rebalance when the window's max/mean >= threshold */
	double rebalance_threshold;
	uint32_t rebalance_interval_s;	/* at least this between two runs */
	uint64_t reload_max_staging_bytes; /* staged + kept weights of a reload; 0: none */
	bool reload_keep_previous;	/* keep replaced weights for rollback */
	uint64_t reload_bytes_per_s;	/* a reload's reads; 0: unpaced */
	const char *model_path;
	const char *metrics_listen;	/* "host:port", NULL or "": no HTTP endpoint */
	bool metrics_per_expert;
	uint32_t metrics_slo_ms;	/* exported as moed_latency_slo_seconds */
	const char *gpu; /* for status: the GPU served, or why none */
	struct moe_auth_policy auth;	/* socket_gid filled in from the socket */
	const char *admin_group;	/* for messages */
	int log_level;
	moe_server_reload_fn reload;
	void *reload_arg;
	/* test hook (moed: MOED_TEST_STALL_MS): the worker sleeps this long
	 * before every batch, so that tests can act while a batch runs */
	uint32_t test_stall_ms;
	/* test hook (moed: MOED_TEST_TRACE_RING): the trace ring's records
	 * (rounded up to a power of two, at least 64), so that a test can
	 * overrun it with few requests; 0: sized by the model (trace.c) */
	uint32_t test_trace_ring;
};

/* moed's exit status when a device was lost (a sticky CUDA error): the
 * in-flight requests were answered MOE_EDEVICE; systemd restarts it. */
#define MOE_EXIT_DEVICE_LOST 3

/* Serves until SIGTERM/SIGINT (0) or a lost device (MOE_EXIT_DEVICE_LOST);
 * returns the process exit code. */
int moe_server_run(struct moe_engine *e, const struct moe_server_opts *o);

#endif
