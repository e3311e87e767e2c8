/* daemon/server/internal.h — what the files of moed's server share: the
 * session, request and server state, and the functions one file calls in
 * another (prefixed srv_). Not installed, not for the engine side.
 *
 * Ownership: everything here belongs to the serving loop's one thread,
 * except a work item while the engine worker holds it (worker.c) and the
 * worker's own queue fields (under its mutex). The rules:
 *  - the loop is the only consumer of submission rings; completion
 *    entries have two producers, the loop (refusals, no-ops, cancels,
 *    deadlines) and the worker (a batch's requests, posted the moment the
 *    batch ends, so that a result reaches its client without waiting for
 *    the loop to wake): both hold the client's cq_lock, which guards the
 *    ring's tail, the overflow list, `notify`, and `gone` with the socket
 *    (the worker rings a doorbell only while the session is not gone);
 *    the loop keeps every count (inflight, errors, ...) and does them when
 *    the batch comes back;
 *  - a request is the loop's while queued (cancel and deadlines act on it),
 *    the worker's from the moment its batch is posted until the batch comes
 *    back (then nothing cancels it: it runs);
 *  - a completion, of any status, is posted only once the daemon will never
 *    touch that request's output span again;
 *  - a client is freed, and its region released (on the worker), only when
 *    its last reference goes: the session's own and one per request inside
 *    a batch; a client dropped mid-batch is unlinked at once and freed after.
 */
#ifndef MOE_SERVER_INTERNAL_H
#define MOE_SERVER_INTERNAL_H

#include "daemon/server/server.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
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
#include "daemon/server/metrics.h"
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
	bool routing;	    /* MOE_SQE_ROUTING: also write its routing at route_off */
	uint64_t route_off;
	uint64_t deadline_ns; /* 0: none */
	uint64_t queued_ns;
	bool posted; /* its completion is in the client's ring or overflow
			(the worker's early post): the loop only counts it */
	struct request *next; /* the client's FIFO */
};

struct client {
	uint32_t id;
	int fd;
	pid_t pid;
	uid_t uid;
	char name[32];
	bool attached, dead;
	bool gone;	  /* dropped: unlinked, waiting for its last reference
			     (written under cq_lock: the worker reads it) */
	pthread_mutex_t cq_lock; /* the completion side, see the top */
	uint32_t refs;	  /* the session's + one per request inside a batch */
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
	/* completions that did not fit the completion ring yet (cq_lock) */
	struct moe_cqe *overflow;
	uint32_t n_overflow, overflow_cap;
	bool notify; /* completions posted since the last doorbell (cq_lock) */
	uint64_t requests, errors;
	struct srv_metrics *met; /* the server's: error replies are counted */
	struct moe_peer peer;
	uint64_t accepted_ns;
	uint32_t ctrl_loop, ctrl_used; /* control messages in this loop iteration */
	bool tracing;	  /* a tracer (trace.c) */
	bool drain_waiter; /* answer its DRAIN once nothing is queued */
	uint32_t drain_seq;
	struct client *next;
};

/* Work for the engine worker (worker.c). */
enum work_kind { WORK_BATCH, WORK_PIN, WORK_RELEASE };

struct work {
	enum work_kind kind;
	struct work *next;
	bool started; /* the worker took it (set under the worker's lock): a
			 posted batch takes more requests until then */
	/* WORK_BATCH: one request per segment, all of one layer */
	uint32_t layer, n, tokens;
	struct request **reqs;
	struct moe_seg *segs;
	uint32_t epoch; /* out: the epoch it ran on */
	float device_ms; /* out: the backend's device time, < 0 none */
	/* out: when it started and when its completions were posted (ns,
	 * srv_now_ns), the engine's stages */
	uint64_t start_ns, end_ns;
	struct moe_stage_times times;
	/* tracing (trace.c): set by the loop when it forms the batch; then the
	 * worker writes the layer's weights version in the epoch it ran on and
	 * the experts each request hit: request i's are
	 * hits[hit_off[i] .. hit_off[i + 1]), ascending expert (hit_off: one
	 * more entry than reqs; hits grown by the worker) */
	bool trace;
	bool routed; /* out: hits and hit_off are valid (the batch ran, memory) */
	uint32_t wversion;
	uint32_t *hit_off;
	struct moe_trace_hit *hits;
	size_t hits_cap;
	/* WORK_PIN (c holds a reference until collected), WORK_RELEASE */
	struct client *c;
	void *region;
	uint64_t bytes;
	bool pinned;
	int ret; /* out */
	char err[MOE_ERRLEN];
};

struct worker {
	struct moe_engine *e;
	/* tracing's scratch: the batch's routing, a count per expert and a
	 * bitmap of the experts counted */
	uint32_t *tr_ids, *tr_count;
	uint64_t *tr_seen;
	size_t tr_cap;
	struct srv_metrics *met; /* the histograms: the worker is their only writer */
	uint32_t stall_ms; /* test hook: sleep before each batch */
	pthread_t thread;
	bool started;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct work *todo, *todo_tail, *done, *done_tail;
	bool stop;
	/* the loop has requests that wait for the posted batch to start (a
	 * third batch may not be formed before): the worker writes efd when
	 * it starts one (under lock) */
	bool want_start;
	int efd; /* eventfd: work done (or want_start), collect it */
	_Atomic uint64_t beat_ns; /* when the running item started; 0: idle */
	/* from posting a batch's completions until the batch is on `done`:
	 * a client may have seen a result the loop has not counted yet */
	atomic_bool handing_back;
};

/* An admin job (jobs.c): the loop owns the slot; the job's thread writes
 * only the atomics, message, result and last_epoch, and state last. */
#define MAX_JOBS 8
struct job {
	uint32_t id, op, seq, client_id;
	pthread_t thread;
	bool joined; /* the loop joined it and told its session */
	_Atomic uint32_t state; /* enum moe_job_state */
	_Atomic uint64_t done;
	uint64_t total;
	atomic_bool cancel;
	int32_t result;
	char message[128];
	struct moe_engine *e;
	int efd;
	struct moe_admin_cycle cycle;		  /* MOE_ADMIN_EPOCH_CYCLE */
	struct moe_admin_placement_cycle pcycle; /* MOE_ADMIN_PLACEMENT_CYCLE */
	struct placement_change *change;	  /* REPLICATE, UNREPLICATE, REBALANCE */
	struct reload_req *reload;		  /* RELOAD (reload_ops.c) */
	uint64_t copy_bytes_per_s;
	uint32_t last_epoch;
};

/* Request tracing (trace.c): the ring of records and the tracers. */
#define TRACE_MAX 8
struct tracer {
	struct client *c;
	uint32_t layer; /* or MOE_ADMIN_ALL_LAYERS */
	int32_t pid;	/* 0: any */
	uint64_t want, sent; /* want 0: until stopped */
	uint64_t next;	     /* the next record to look at */
	uint64_t lost;	     /* matching records the ring overwrote before it sent them */
	bool blocked;	     /* its socket was full: wait for the tick */
	uint32_t room;	     /* bytes its socket may hold of records (trace.c) */
};

struct trace {
	unsigned char *ring; /* cap slots of `slot` bytes (a record and its hits) */
	uint32_t cap, slot, max_hits;
	uint64_t head; /* records written: the next one's seq */
	uint64_t records, sent, lost;
	struct tracer t[TRACE_MAX];
	uint32_t n;
};

/* placement.auto_rebalance's state (placement_ops.c) */
struct auto_rebalance {
	uint32_t runs, job;	 /* runs started, the last one's job */
	uint64_t last_ns;	 /* the last check that planned */
	uint64_t ended_ns;	 /* the last run's job ended (0: running) */
	double measured_before, predicted_after, measured_after;
	bool after_logged;
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
	bool no_doorbell; /* the clients are told no DOORBELL is needed (io.c) */
	uint64_t watchdog_ns, last_ping_ns, last_status_ns;
	uint64_t tick_armed_ns; /* when the one-shot timer fires; 0: not armed (server.c) */
	uint64_t start_ns;
	/* the engine worker, and the two batches that alternate on it: while
	 * it runs one, the loop gathers the next (double buffering) */
	struct worker w;
	struct work batch[2];
	uint32_t batches_out;	/* posted and not yet collected, 0..2 */
	uint32_t queued;	/* requests in the clients' queues (not in a batch) */
	struct client **order;	/* fill_batch's round-robin order, order_cap long */
	uint32_t order_cap;
	float last_device_ms;
	bool lost;	      /* the device failed: answer everything, exit */
	uint8_t *is_moe; /* [n_layers] */
	/* counters */
	uint64_t completed, errors, timeouts, cancelled, tokens, batches, refused, refused_auth;
	uint64_t reloads, reloads_refused;
	/* weight reloads (reload_ops.c), counted as their jobs end */
	uint64_t wreloads_done, wreloads_failed, wreloads_cancelled;
	char wreload_last[200];
	uint64_t admin_calls, admin_refused;
	/* admin jobs (jobs.c) */
	struct job *jobs[MAX_JOBS];
	struct auto_rebalance autob;
	uint32_t next_job;
	uint64_t jobs_started;
	int jobs_efd;
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
	/* metrics (metrics.h): counters written here and by the worker, read
	 * by the HTTP endpoint's thread (http, NULL when off) */
	struct srv_metrics met;
	struct met_http *http;
	char metrics_addr[80]; /* the endpoint's bound address, "" when off */
	int metrics_fd;	       /* `moectl metrics`' text, shared within a loop iteration
				  as status_fd is (-1: none yet) */
	uint64_t metrics_len;
	struct trace trace;
};

/* worker.c: the engine worker */
int srv_worker_start(struct worker *w, struct moe_engine *e, struct srv_metrics *met,
		     uint32_t stall_ms);
void srv_worker_post(struct worker *w, struct work *x);
struct work *srv_worker_collect(struct worker *w);
void srv_worker_stop(struct worker *w);
uint32_t srv_worker_run_left(struct worker *w);
void srv_worker_close(struct worker *w);
bool srv_worker_wedged(struct worker *w, uint64_t now, uint64_t limit_ns);

/* io.c: sending to clients (never blocking), the clock, sd_notify */
void srv_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t srv_now_ns(void);
int srv_send_msg_seq(int fd, uint16_t type, uint32_t seq, const void *payload, uint32_t len,
			int pass_fd);
int srv_send_msg(int fd, uint16_t type, const void *payload, uint32_t len, int pass_fd);
void srv_send_error(struct client *c, int status, const char *msg);
/* `text` in a new memfd, sealed against any change (status, metrics: a
 * reply the client reads and cannot alter); -1 on failure. */
int srv_sealed_memfd(const char *name, const char *text, size_t len);
/* A STATUS_REPLY or METRICS_REPLY: the text's memfd (fd < 0: MOE_ENOMEM,
 * no fd) and its length; what srv_send_msg_seq returns. */
int srv_text_reply(struct client *c, uint16_t type, uint32_t seq, int fd, uint64_t len);
void srv_notify_clients(struct server *s);
void srv_need_doorbells(struct server *s, bool needed);

/* refusals.c: log lines about refused peers, limited per uid */
void srv_log_refusal(struct server *s, uid_t uid, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void srv_log_flush(struct server *s, uint64_t now);

/* sched.c: the submission rings, the queue (fair shares), batches, completions,
 * deadlines, cancel */
void srv_flush_cq(struct client *c);
void srv_post_batch(struct work *b, int status, uint32_t epoch);
int srv_batch_status(int ret);
void srv_finish(struct server *s, struct request *r, int status, uint32_t epoch);
void srv_poll_sq(struct server *s, struct client *c);
void srv_poll_rings(struct server *s);
void srv_unqueue(struct server *s, struct client *c, struct request *r);
void srv_submit_batch(struct server *s);
void srv_collect(struct server *s);
bool srv_settle(struct server *s);
void srv_expire(struct server *s);
void srv_cancel(struct server *s, struct client *c, uint64_t tag);

/* session.c: accept, the handshake and the shared region, messages, hang-ups */
void srv_drop_client(struct server *s, struct client *c);
void srv_client_put(struct server *s, struct client *c);
void srv_pin_done(struct server *s, struct work *x);
void srv_accept_clients(struct server *s);
void srv_read_client(struct server *s, struct client *c);

/* admin.c: operator commands, one table row per op of ipc/moe_admin.h */
struct admin_call {
	struct server *s;
	struct client *c;
	uint32_t op, flags, seq;
	const void *payload;
};
void srv_admin_reply(struct client *c, uint32_t seq, int status, const char *msg);
/* The reply with the op's result (len bytes, may be 0) after it. */
void srv_admin_reply_with(struct client *c, uint32_t seq, int status, const char *msg,
			  const void *result, uint32_t len);
void srv_status_line(struct server *s);
int srv_reload_config(struct server *s, char *msg, size_t n);
void srv_admin(struct server *s, struct client *c, const void *buf, size_t n, uint32_t seq);
void srv_answer_drain_waiters(struct server *s);

/* placement_ops.c: replicate, unreplicate, rebalance (admin ops) and the
 * job that moves the placement */
const char *srv_check_replica(const void *payload);
const char *srv_check_rebalance(const void *payload);
void srv_op_replicate(const struct admin_call *a);
void srv_op_rebalance(const struct admin_call *a);
void *srv_placement_job(void *job);
/* A change running: a placement change (a job of these ops, or
 * placement-cycle) or a weight reload; they never run together. */
struct job *srv_placement_busy(struct server *s);
/* The tick: placement.auto_rebalance's check (and its run, as a job). */
void srv_auto_rebalance(struct server *s);
uint64_t srv_placement_change_steps(const struct placement_change *pc);
void srv_placement_change_free(struct placement_change *pc);

/* reload_ops.c: reload (and rollback, cancel) and version-info (admin ops),
 * the reload job, and the reload a changed model.path starts */
const char *srv_check_reload(const void *payload);
const char *srv_check_version(const void *payload);
void srv_op_reload(const struct admin_call *a);
void srv_op_version_info(const struct admin_call *a);
void *srv_reload_job(void *job);
/* The reload job running, or NULL. */
struct job *srv_reload_running(struct server *s);
/* A changed model.path (configuration reload): a rolling reload from it;
 * 0, or -1 with msg. */
int srv_reload_model_path(struct server *s, char *msg, size_t n);
/* The job's progress (steps done, total) and the end counted (loop). */
void srv_reload_progress(const struct job *j, uint64_t *done, uint64_t *total);
void srv_reload_ended(struct server *s, const struct job *j);
void srv_reload_req_free(struct reload_req *r);
/* status.c's "weights" object */
void srv_status_weights(struct server *s, cJSON *root);

/* trace.c: request tracing (MOE_ADMIN_TRACE) */
const char *srv_check_trace(const void *payload);
void srv_op_trace(const struct admin_call *a);
/* A batch back from the worker: a record per request (before they are
 * answered and freed). Only while s->trace.n. */
void srv_trace_batch(struct server *s, const struct work *b);
/* Sends the tracers what they have not had; tick: the blocked ones too. */
void srv_trace_flush(struct server *s, bool tick);
void srv_trace_drop(struct server *s, struct client *c);
void srv_trace_status(struct server *s, cJSON *root);
void srv_trace_free(struct server *s);

/* jobs.c: asynchronous admin jobs, one thread each */
int srv_jobs_init(struct server *s);
/* The job's thread, at its end: state, result, and the loop woken. */
void srv_job_end(struct job *j, uint32_t state, int32_t result);
/* c: the client that asked (NULL: moed itself, e.g. auto-rebalance; its
 * JOB_DONE goes nowhere). payload: the op's (admin.c checked it); for
 * replicate, unreplicate and
 * rebalance a struct placement_change (placement_ops.c), taken over */
int srv_job_start(struct server *s, struct client *c, uint32_t op, uint32_t seq,
		  const void *payload, struct job **out, const char **why);
struct job *srv_job_find(struct server *s, uint32_t id);
void srv_job_describe(const struct job *j, struct moe_admin_job *d);
void srv_jobs_collect(struct server *s);
void srv_jobs_stop(struct server *s);

/* status.c: the status JSON, one snapshot per loop iteration */
void srv_status_reply(struct server *s, struct client *c, uint32_t seq);
/* The metrics text (METRICS message), in a sealed memfd as status. */
void srv_metrics_reply(struct server *s, struct client *c, uint32_t seq);
/* The loop's gauges and counters copied into s->met (each loop iteration). */
void srv_metrics_sync(struct server *s);
/* One request answered (not a no-op): counted by status. */
void srv_count_request(struct server *s, int status, uint32_t tokens);

#endif
