/* client/internal.h — what the files of libmoeclient share: the client and
 * slot structs, small helpers, and the functions one file calls in another
 * (prefixed mc_). Not installed; nothing here is exported from the .so.
 *
 * The files: connection.c (the socket's datagrams, the handshake, the
 * region, reconnecting, creating and freeing a client), rings.c (the slot
 * table, the rings, buffers, the checks every request shares), wait.c
 * (draining the socket, the poller and its followers), control.c (control
 * messages: ping, status, admin), forward.c (submit, forward, poll, wait,
 * cancel).
 *
 * Nothing read from the shared region is trusted twice: our ring indices
 * are kept privately, a CQE is copied out once and its tag looked up in our
 * own table.
 */
#ifndef MOE_CLIENT_INTERNAL_H
#define MOE_CLIENT_INTERNAL_H

#include "client/include/moeclient.h"
#include "client/shm_alloc.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET  "/run/moed/moed.sock"
#define DEFAULT_REGION  (64u << 20)
#define DEFAULT_DEPTH   256u
#define HANDSHAKE_MS    10000
#define CONTROL_MS      10000 /* ping, status */
#define SEND_MS         1000  /* a control message waits this long for room */
#define POLL_CAP_MS     1000  /* a sleeping poller looks again at least this often */
#define MAX_STATUS_JSON (64u << 20)
#define TAG_SLOT_BITS   12 /* MOE_RING_MAX == 1 << 12 */
#define NO_DEADLINE     UINT64_MAX

enum slot_state { SLOT_FREE, SLOT_PENDING, SLOT_DONE };

/* A control call waiting for its reply, matched by seq (control.c): a
 * STATUS_REPLY or an ADMIN_REPLY, and, for an op that started a job and a
 * caller that waits for its end, the JOB_DONE with the same seq. One table
 * for every kind, so that calls of any kind from any thread overlap. */
#define MAX_CALLS 8
struct call {
	uint32_t seq;
	uint16_t want;	   /* MOE_MSG_STATUS_REPLY, _METRICS_REPLY or _ADMIN_REPLY; 0: free */
	uint8_t have;	   /* the reply is here */
	uint8_t want_job;  /* then the job's JOB_DONE too */
	uint8_t have_job;
	int fd;		   /* STATUS_REPLY's memfd, or -1 */
	struct moe_msg_status_reply status;
	struct moe_msg_admin_reply admin;
	uint32_t data_len; /* the admin op's result */
	unsigned char data[MOE_ADMIN_DATA_MAX];
	struct moe_admin_job job;
};

/* Trace messages received and not yet read (control.c), from
 * moe_trace_start on: a ring of TRACE_QUEUE messages' records. */
#define TRACE_QUEUE 256 /* more than the daemon's socket buffer holds (a few hundred KiB) */
struct trace_msg {
	uint32_t len, n; /* bytes and records in b */
	uint32_t flags;	 /* MOE_TRACE_MSG_END: the last of a counted trace */
	uint64_t lost;	 /* the daemon's count when it sent this one */
	unsigned char b[MOE_MSG_MAX];
};

struct trace_q {
	struct trace_msg *q; /* TRACE_QUEUE of them, or NULL */
	uint32_t head, n;    /* queued messages */
	uint32_t off, done;  /* in the head message: next record's offset, records read */
	uint64_t want, got;  /* the filter's count (0: none), records returned */
	uint64_t dropped;    /* records dropped here: the queue was full, or a
				message was malformed */
	int on;		     /* tracing, or records still to come */
};

/* One request the client has submitted and not yet delivered. */
struct slot {
	uint64_t tag; /* (generation << TAG_SLOT_BITS) | index */
	uint32_t n_tokens;
	uint8_t state;
	uint8_t orphan; /* its waiter gave up: free it when it completes */
	uint16_t waiters;
	int32_t status;
	uint32_t epoch;
};

struct moe_client {
	pthread_mutex_t mu;
	pthread_cond_t cv; /* CLOCK_MONOTONIC; broadcast on every change */

	/* What moe_reconnect needs. */
	char *path;
	char name[32];
	uint64_t region_bytes;
	uint32_t depth;
	int auto_reconnect;
	uint32_t connect_timeout_ms; /* connect (and reconnect) retries this long */

	int sock; /* -1 once closed */
	int dead; /* connection lost: every call fails or reconnects */
	int evfd; /* kicks the poller */
	int polling;

	void *region;
	struct moe_shm_hdr *hdr;
	struct moe_sqe *sq;
	struct moe_cqe *cq;
	unsigned char *data;
	uint64_t data_off, data_bytes;
	uint32_t sq_entries, cq_entries;
	uint32_t sq_tail, cq_head; /* ours; the shared copies are only written */

	moe_model_info info;
	struct moe_shm_alloc alloc;

	struct slot *slots; /* cq_entries of them: bounds what the CQ must hold */
	uint32_t *free_slots, n_free_slots;
	uint64_t tag_gen;
	uint32_t inflight_reqs, inflight_tokens;
	uint32_t forwards; /* moe_forward calls holding bounce buffers */
	uint32_t seq;
	struct call calls[MAX_CALLS]; /* control calls waiting for replies */
	struct trace_q trace;
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? NO_DEADLINE : now_ns() + (uint64_t)timeout_ms * 1000000u;
}

/* Milliseconds left until `deadline` (rounded up), capped; -1 for none. */
static inline int ms_left(uint64_t deadline, int cap)
{
	uint64_t now = now_ns(), ms;

	if (deadline == NO_DEADLINE)
		return cap;
	if (now >= deadline)
		return 0;
	ms = (deadline - now + 999999u) / 1000000u;
	return ms < (uint64_t)cap || cap < 0 ? (int)(ms > INT32_MAX ? INT32_MAX : ms) : cap;
}

static inline size_t dtype_size(moe_dtype dt)
{
	return dt == MOE_DTYPE_F32 ? 4 : 2;
}

static inline uint32_t pow2_at_least(uint32_t v)
{
	uint32_t p = 1;

	while (p < v && p < MOE_RING_MAX)
		p <<= 1;
	return p;
}

static inline void set_err(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static inline void set_err(char *buf, size_t len, const char *fmt, ...)
{
	va_list ap;

	if (!buf || !len)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, len, fmt, ap);
	va_end(ap);
}

/* A failure status from the wire: negative (codes newer than this library
 * pass through; moe_strerror names them "unknown error"). */
static inline int wire_status(int32_t s)
{
	return s < 0 ? s : MOE_EPROTO;
}

static inline void close_fds(const int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/* connection.c */
ssize_t mc_recv_msg(int sock, void *buf, size_t cap, int *fds, int *n_fds);
int mc_send_dgram(int sock, const void *buf, size_t len, int fd, int wait_ms);
int mc_enter(struct moe_client *c);

/* control.c: a TRACE message into the trace queue (c->mu held); false:
 * not one. */
bool mc_file_trace(struct moe_client *c, int type, const void *buf, size_t n);
/* Not tracing, nothing queued (a new connection, a stop). */
void mc_trace_reset(struct moe_client *c);

/* rings.c: all with c->mu held */
struct slot *mc_find_slot(struct moe_client *c, uint64_t tag);
void mc_put_slot(struct moe_client *c, struct slot *s);
void mc_wake_all(struct moe_client *c);
int mc_reap(struct moe_client *c);
void mc_mark_dead(struct moe_client *c);
void *mc_buf_alloc_locked(struct moe_client *c, uint64_t bytes);
void mc_buf_free_locked(struct moe_client *c, void *p);
int mc_check_request(const struct moe_client *c, uint32_t layer, moe_dtype dtype, uint32_t n_tokens,
                     uint64_t *bytes);
int mc_has_room(struct moe_client *c, uint32_t n_tokens);
int mc_push(struct moe_client *c, struct moe_sqe *e, uint64_t *tag);
int mc_data_offset(const struct moe_client *c, const void *p, uint64_t bytes, uint64_t *off);

/* wait.c: all with c->mu held */
void mc_drain(struct moe_client *c);
void mc_wait_step(struct moe_client *c, uint64_t deadline);
int mc_wait_tag(struct moe_client *c, uint64_t tag, uint64_t deadline, int *status,
                uint32_t *epoch);
int mc_wait_room(struct moe_client *c, uint32_t n_tokens, uint64_t deadline);

/* control.c */
int mc_send_ctl(struct moe_client *c, uint16_t type, const void *p, uint32_t len, uint32_t *seq);
/* Files a control reply under its call; false if no call waits for it. */
bool mc_file_reply(struct moe_client *c, int type, const struct moe_msg_hdr *h, const void *buf,
		   size_t n, int *fds, int n_fds);
/* The connection died: every call ends (its fd closed). */
void mc_calls_fail(struct moe_client *c);

#endif /* MOE_CLIENT_INTERNAL_H */
