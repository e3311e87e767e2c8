/* daemon/server/internal.h — what the files of moed's server share: the
 * session, request and server state, and the functions one file calls in
 * another (prefixed srv_). Not installed, not for the engine side.
 *
 * Ownership: everything here belongs to the serving loop's one thread.
 */
#ifndef MOE_SERVER_INTERNAL_H
#define MOE_SERVER_INTERNAL_H

#include "daemon/server/server.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "daemon/server/auth.h"
#include "daemon/engine/log.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"
#include "kernels/cpu/convert.h"

#ifdef MOE_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#define TICK_NS	      (10 * 1000000ull) /* deadline resolution */
#define MIN_REGION    (64 * 1024)
#define SEALS_NEEDED  (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
#define SHMEM_MAGIC   0x01021994u /* TMPFS_MAGIC: memfd_create's own filesystem */

struct request {
	struct client *c;
	uint64_t tag;
	uint32_t layer, n_tokens;
	enum moe_dtype dtype;
	uint64_t in_off, out_off;
	uint64_t deadline_ns; /* 0: none */
	uint64_t queued_ns;
	struct request *next; /* the client's FIFO */
};

struct client {
	uint32_t id;
	int fd;
	pid_t pid;
	uid_t uid;
	char name[32];
	bool attached, dead;
	bool pinned;	  /* region registered with the device backend */
	bool pin_failed;  /* the backend wanted it pinned and could not */
	/* the shared region, once attached */
	void *region;
	uint64_t region_bytes;
	struct moe_shm_hdr *hdr;
	struct moe_sqe *sq;
	struct moe_cqe *cq;
	char *data;
	uint64_t data_bytes;
	uint32_t sq_entries, cq_entries, sq_head, cq_tail;
	/* requests taken from the ring and not yet answered */
	struct request *queue, *queue_tail;
	uint32_t inflight, inflight_tokens;
	/* completions that did not fit the completion ring yet */
	struct moe_cqe *overflow;
	uint32_t n_overflow, overflow_cap;
	bool notify; /* completions posted since the last doorbell */
	uint64_t requests, errors;
	struct moe_peer peer;
	uint64_t accepted_ns;
	uint32_t ctrl_loop, ctrl_used; /* control messages in this loop iteration */
	bool drain_waiter; /* answer its DRAIN once nothing is queued */
	uint32_t drain_seq;
	struct client *next;
};

struct server {
	struct moe_engine *e;
	const struct moe_model *m;
	struct moe_server_opts o;
	int epfd, lfd, sfd, tfd; /* -1 until opened */
	struct client *clients;
	uint32_t n_clients, next_id, rr; /* rr: round-robin start */
	uint32_t pending, pending_tokens;
	bool stopping, draining;
	uint64_t watchdog_ns, last_ping_ns, last_status_ns;
	uint32_t stall_ms; /* test hook: MOED_TEST_STALL_MS, every batch sleeps */
	uint64_t start_ns;
	struct request **batch;
	struct moe_seg *segs; /* one per request of the batch */
	bool lost;	      /* the device failed: answer everything, exit */
	uint8_t *is_moe; /* [n_layers] */
	/* counters */
	uint64_t completed, errors, timeouts, cancelled, tokens, batches, refused, refused_auth;
	uint64_t reloads, reloads_refused;
	uint32_t unpinned; /* clients now connected whose region is not pinned */
	uint64_t shm_bytes; /* the attached clients' regions, in all */
	/* fair admission: a client may hold at most `share` of the queue while
	 * others have work too (poll_rings); rings are polled from a rotating
	 * start */
	uint32_t share, poll_rr;
	/* the status JSON, built at most once per loop iteration and passed to
	 * every client that asks in that iteration (one sealed memfd) */
	uint64_t loops;
	int status_fd;
	uint64_t status_len, status_builds, status_served;
	/* log lines about refused peers, per uid (log_refusal) */
	struct log_slot {
		uid_t uid;
		uint64_t since_ns;
		uint32_t lines, suppressed;
	} log_slots[16];
	uint64_t log_suppressed;
};

/* io.c: sending to clients (never blocking), the clock, sd_notify */
void srv_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t srv_now_ns(void);
int srv_send_msg_seq(int fd, uint16_t type, uint32_t seq, const void *payload, uint32_t len,
			int pass_fd);
int srv_send_msg(int fd, uint16_t type, const void *payload, uint32_t len, int pass_fd);
void srv_send_error(struct client *c, int status, const char *msg);
void srv_notify_clients(struct server *s);

/* refusals.c: log lines about refused peers, limited per uid */
void srv_log_refusal(struct server *s, uid_t uid, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void srv_log_flush(struct server *s, uint64_t now);

/* sched.c: the submission rings, the queue (fair shares), batches, completions,
 * deadlines, cancel */
void srv_flush_cq(struct client *c);
void srv_finish(struct server *s, struct request *r, int status);
void srv_poll_sq(struct server *s, struct client *c);
void srv_poll_rings(struct server *s);
void srv_unqueue(struct client *c, struct request *r);
void srv_run_batch(struct server *s);
void srv_expire(struct server *s);
void srv_cancel(struct server *s, struct client *c, uint64_t tag);

/* session.c: accept, the handshake and the shared region, messages, hang-ups */
void srv_drop_client(struct server *s, struct client *c);
void srv_accept_clients(struct server *s);
void srv_read_client(struct server *s, struct client *c);

/* admin.c: operator commands: drain, undrain, configuration reload */
void srv_admin_reply(struct client *c, uint32_t seq, int status, const char *msg);
void srv_status_line(struct server *s);
int srv_reload_config(struct server *s, char *msg, size_t n);
void srv_admin(struct server *s, struct client *c, const struct moe_msg_admin *a, uint32_t seq);
void srv_answer_drain_waiters(struct server *s);

/* status.c: the status JSON, one snapshot per loop iteration */
void srv_status_reply(struct server *s, struct client *c, uint32_t seq);

#endif
