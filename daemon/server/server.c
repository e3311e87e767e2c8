/* daemon/server/server.c — see server.h. */
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
	uint64_t loops, status_loop;
	int status_fd;
	uint64_t status_len, status_builds, status_served, status_deferred;
	/* log lines about refused peers, per uid (log_refusal) */
	struct log_slot {
		uid_t uid;
		uint64_t since_ns;
		uint32_t lines, suppressed;
	} log_slots[16];
	uint64_t log_suppressed;
};

/* sd_notify when built with libsystemd and run under systemd (it does
 * nothing without $NOTIFY_SOCKET). */
static void notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void notify(const char *fmt, ...)
{
#ifdef MOE_HAVE_SYSTEMD
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	sd_notify(0, buf);
#else
	(void)fmt;
#endif
}

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* ---- sending ------------------------------------------------------------ */

/* Never blocks: a client that does not read its socket loses doorbells
 * (it still sees its completion ring) or, for replies, is dropped. */
static int send_msg_seq(int fd, uint16_t type, uint32_t seq, const void *payload, uint32_t len,
			int pass_fd)
{
	char buf[MOE_MSG_MAX];
	size_t n = moe_msg_encode(buf, type, seq, payload, len);
	struct iovec iov = {buf, n};
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};

	if (pass_fd >= 0) {
		struct cmsghdr *cm;

		memset(&u, 0, sizeof(u));
		mh.msg_control = u.b;
		mh.msg_controllen = sizeof(u.b);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
	}
	if (sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
		return -errno;
	return 0;
}

static int send_msg(int fd, uint16_t type, const void *payload, uint32_t len, int pass_fd)
{
	return send_msg_seq(fd, type, 0, payload, len, pass_fd);
}

static void send_error(struct client *c, int status, const char *msg)
{
	struct moe_msg_error e = {.status = status};

	snprintf(e.message, sizeof(e.message), "%s", msg);
	send_msg(c->fd, MOE_MSG_ERROR, &e, sizeof(e), -1);
}

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

static void log_refusal(struct server *s, uid_t uid, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void log_refusal(struct server *s, uid_t uid, const char *fmt, ...)
{
	uint64_t now = now_ns();
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
static void log_flush(struct server *s, uint64_t now)
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

/* ---- completions -------------------------------------------------------- */

/* Moves queued completions into the client's ring while there is room. The
 * head is the client's: a value that claims more than the ring holds means
 * the region is corrupt, and the client is dropped. */
static void flush_cq(struct client *c)
{
	uint32_t head, used, i = 0;

	if (!c->attached || c->dead)
		return;
	head = atomic_load_explicit(&c->hdr->cq_head, memory_order_acquire);
	used = c->cq_tail - head;
	if (used > c->cq_entries) {
		moe_log(LOG_WARNING, "client %u (pid %d): completion ring head is corrupt; "
			"dropping it", c->id, (int)c->pid);
		c->dead = true;
		return;
	}
	while (i < c->n_overflow && used < c->cq_entries) {
		c->cq[c->cq_tail & (c->cq_entries - 1)] = c->overflow[i++];
		c->cq_tail++;
		used++;
	}
	if (i) {
		atomic_store_explicit(&c->hdr->cq_tail, c->cq_tail, memory_order_release);
		memmove(c->overflow, c->overflow + i, (c->n_overflow - i) * sizeof(*c->overflow));
		c->n_overflow -= i;
		c->notify = true;
	}
}

static void complete(struct server *s, struct client *c, uint64_t tag, int status)
{
	struct moe_cqe q = {tag, status, 1};

	if (c->n_overflow == c->overflow_cap) {
		uint32_t cap = c->overflow_cap ? 2 * c->overflow_cap : 64;
		struct moe_cqe *v = realloc(c->overflow, cap * sizeof(*v));

		if (!v) {
			c->dead = true; /* cannot answer: drop rather than lose silently */
			return;
		}
		c->overflow = v;
		c->overflow_cap = cap;
	}
	c->overflow[c->n_overflow++] = q;
	if (status) {
		c->errors++;
		s->errors++;
	}
	c->requests++;
	flush_cq(c);
}

static void finish(struct server *s, struct request *r, int status)
{
	struct client *c = r->c;

	c->inflight--;
	c->inflight_tokens -= r->n_tokens;
	s->pending--;
	s->pending_tokens -= r->n_tokens;
	if (status == MOE_ETIMEDOUT)
		s->timeouts++;
	else if (status == MOE_ECANCELED)
		s->cancelled++;
	else if (status == 0)
		s->completed++;
	complete(s, c, r->tag, status);
	free(r);
}

static void notify_clients(struct server *s)
{
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->notify && !c->dead) {
			send_msg(c->fd, MOE_MSG_DOORBELL, NULL, 0, -1); /* EAGAIN: ring has it */
			c->notify = false;
		}
	}
}

/* ---- the client's submission ring --------------------------------------- */

static void enqueue(struct server *s, struct client *c, struct request *r)
{
	r->next = NULL;
	if (c->queue_tail)
		c->queue_tail->next = r;
	else
		c->queue = r;
	c->queue_tail = r;
	c->inflight++;
	c->inflight_tokens += r->n_tokens;
	s->pending++;
	s->pending_tokens += r->n_tokens;
}

/* Validates a copied-out entry (ipc/moe_ring.h); 0 or the MOE_E* code. */
static int check_sqe(struct server *s, struct client *c, const struct moe_sqe *q)
{
	struct moe_sqe_limits l = {
		.hidden = s->m->hidden,
		.data_bytes = c->data_bytes,
		.max_tokens = moe_engine_max_tokens(s->e),
		.max_inflight_tokens = s->o.max_inflight_tokens,
		.n_layers = s->m->n_layers,
		.is_moe = s->is_moe,
	};

	return moe_sqe_validate(q, &l);
}

static void poll_sq(struct server *s, struct client *c)
{
	uint32_t tail, avail;

	if (!c->attached || c->dead)
		return;
	tail = atomic_load_explicit(&c->hdr->sq_tail, memory_order_acquire);
	avail = tail - c->sq_head;
	if (avail > c->sq_entries) {
		moe_log(LOG_WARNING, "client %u (pid %d): submission ring tail is corrupt; "
			"dropping it", c->id, (int)c->pid);
		send_error(c, MOE_EPROTO, "submission ring tail is corrupt");
		c->dead = true;
		return;
	}
	while (avail--) {
		struct moe_sqe q;
		struct request *r;
		uint64_t timeout;
		int st;

		/* backpressure: leave entries in the ring past the limits,
		 * past the client's fair share of the queue (poll_rings), and
		 * while the client leaves completions uncollected (else a
		 * client that never reads its completion ring grows
		 * c->overflow without bound) */
		if (c->inflight >= s->o.max_inflight_requests ||
		    s->pending >= s->o.max_queue_requests || c->inflight >= s->share ||
		    c->n_overflow)
			break;
		/* copy once, then validate the copy; never re-read the ring */
		memcpy(&q, &c->sq[c->sq_head & (c->sq_entries - 1)], sizeof(q));
		st = check_sqe(s, c, &q);
		/* over the token limit: leave it in the ring (head not yet
		 * published) and take it again once others finish */
		if (!st && !(q.flags & MOE_SQE_NOP) &&
		    c->inflight_tokens + q.n_tokens > s->o.max_inflight_tokens && c->inflight)
			break;
		c->sq_head++;
		atomic_store_explicit(&c->hdr->sq_head, c->sq_head, memory_order_release);
		if (st || (q.flags & MOE_SQE_NOP) || s->stopping || s->draining) {
			bool refuse = !(q.flags & MOE_SQE_NOP) && (s->stopping || s->draining);

			complete(s, c, q.tag,
				 st	  ? st
				 : refuse ? (s->lost ? MOE_EDEVICE : MOE_ESHUTDOWN)
					  : 0);
			continue;
		}
		r = calloc(1, sizeof(*r));
		if (!r) {
			complete(s, c, q.tag, MOE_ENOMEM);
			continue;
		}
		timeout = q.timeout_ms ? q.timeout_ms : s->o.request_timeout_ms;
		*r = (struct request){c, q.tag, q.layer, q.n_tokens, (enum moe_dtype)q.dtype,
				      q.in_off, q.out_off, 0, now_ns(), NULL};
		if (timeout)
			r->deadline_ns = r->queued_ns + timeout * 1000000ull;
		enqueue(s, c, r);
	}
}

static bool has_work(const struct client *c)
{
	return c->attached && !c->dead &&
	       (c->queue ||
		atomic_load_explicit(&c->hdr->sq_tail, memory_order_relaxed) != c->sq_head);
}

/* Takes what every client's ring holds, within the limits. Fairness of
 * admission: while k clients have work, none may hold more than
 * max_queue_requests / k of the queue, so a newcomer (or an old client
 * behind newer ones in the list) always finds room as the others' requests
 * finish; and the rings are polled from a rotating start, so no position
 * in the list goes first every time. (form_batch is fair between what is
 * queued.) */
static void poll_rings(struct server *s)
{
	uint32_t busy = 0, k, i = 0;
	struct client *c;

	for (c = s->clients; c; c = c->next)
		busy += has_work(c);
	s->share = s->o.max_queue_requests / (busy ? busy : 1);
	if (!s->share)
		s->share = 1;
	k = s->n_clients ? s->poll_rr++ % s->n_clients : 0;
	for (c = s->clients; c; c = c->next, i++) {
		if (i < k)
			continue;
		flush_cq(c);
		poll_sq(s, c);
	}
	i = 0;
	for (c = s->clients; c && i < k; c = c->next, i++) {
		flush_cq(c);
		poll_sq(s, c);
	}
}

/* Unlinks r from its client's FIFO. */
static void unqueue(struct client *c, struct request *r)
{
	struct request **pp = &c->queue, *prev = NULL;

	while (*pp && *pp != r)
		prev = *pp, pp = &(*pp)->next;
	if (!*pp)
		return;
	*pp = r->next;
	if (c->queue_tail == r)
		c->queue_tail = prev;
}

/* ---- scheduling --------------------------------------------------------- */

/* The layer of the next batch: that of the oldest request of the next
 * client in round-robin order that has work, so that a client flooding one
 * layer cannot make another client's request on another layer wait for all
 * of its queue (at most one batch per other client goes first). */
static int64_t next_layer(struct server *s)
{
	uint32_t nc = s->n_clients, i = 0;
	struct client *c = s->clients;

	if (!nc)
		return -1;
	/* from the rr-th client round the list once, wrapping to the head */
	for (; c && i < s->rr % nc; c = c->next)
		i++;
	for (uint32_t k = 0; k < nc; k++) {
		if (!c)
			c = s->clients;
		if (c->queue)
			return c->queue->layer;
		c = c->next;
	}
	return -1;
}

/* Round robin over the clients, one request of `layer` from each per round,
 * until max_batch_tokens: every client with work in this layer gets into the
 * batch before any client gets a second request in. */
static uint32_t form_batch(struct server *s, uint32_t layer, uint32_t *tokens)
{
	uint32_t n = 0, t = 0, maxt = moe_engine_max_tokens(s->e), nc = s->n_clients;
	struct client **order;
	bool took = true;
	uint32_t i = 0;

	order = calloc(nc ? nc : 1, sizeof(*order));
	if (!order)
		return 0;
	for (struct client *c = s->clients; c; c = c->next)
		order[i++] = c;
	while (took) {
		took = false;
		for (uint32_t k = 0; k < nc; k++) {
			struct client *c = order[(s->rr + k) % nc];
			struct request *r;

			if (c->dead) /* its requests go with it (reap_dead) */
				continue;
			for (r = c->queue; r && r->layer != layer; r = r->next)
				;
			if (!r || t + r->n_tokens > maxt)
				continue;
			unqueue(c, r);
			s->batch[n++] = r;
			t += r->n_tokens;
			took = true;
		}
	}
	s->rr = nc ? (s->rr + 1) % nc : 0;
	free(order);
	*tokens = t;
	return n;
}

/* Each request is one segment of the batch: the engine reads its input
 * from the client's region and writes its output there, in the request's
 * dtype (on a GPU, DMA from and to the pinned region). The engine reads
 * every input before it writes any output. On the CPU backend a token's
 * result is the same bits whichever batch it lands in.
 *
 * A lost device (-ENOTRECOVERABLE) is not survived in place: the batch and
 * everything queued are answered MOE_EDEVICE, and moed stops with exit
 * status MOE_EXIT_DEVICE_LOST so that systemd restarts it (crash-only). */
static void run_batch(struct server *s)
{
	uint32_t tokens = 0, n;
	int64_t layer = next_layer(s);
	struct moe_epoch *ep;
	char err[MOE_ERRLEN];
	int ret, status;

	if (layer < 0)
		return;
	n = form_batch(s, (uint32_t)layer, &tokens);
	if (!n)
		return;
	if (s->stall_ms)
		usleep(s->stall_ms * 1000u);
	for (uint32_t i = 0; i < n; i++) {
		struct request *r = s->batch[i];

		s->segs[i] = (struct moe_seg){r->c->data + r->in_off, r->c->data + r->out_off,
					      r->dtype, r->n_tokens};
	}
	ep = moe_epoch_acquire(s->e);
	{
		struct moe_batch b = {.layer = (uint32_t)layer, .n_tokens = tokens,
				      .n_segs = n, .segs = s->segs};

		ret = moe_engine_forward(s->e, ep, &b, err);
	}
	moe_epoch_release(ep);
	status = !ret ? 0 : ret == -ENOTRECOVERABLE ? MOE_EDEVICE : MOE_EINTERNAL;
	if (ret == -ENOTRECOVERABLE) {
		moe_log(LOG_CRIT, "device lost: %s; answering %u in-flight requests with an error "
			"and exiting (status %d) to be restarted", err, s->pending,
			MOE_EXIT_DEVICE_LOST);
		notify("STATUS=device lost: %s", err);
		s->lost = true;
		s->stopping = true;
	} else if (ret) {
		moe_log(LOG_ERR, "batch of %u tokens on layer %lld failed: %s", tokens,
			(long long)layer, err);
	}
	for (uint32_t i = 0; i < n; i++) {
		struct request *r = s->batch[i];

		s->tokens += r->n_tokens;
		finish(s, r, status);
	}
	s->batches++;
}

static void expire(struct server *s)
{
	uint64_t now = now_ns();

	for (struct client *c = s->clients; c; c = c->next) {
		struct request *r = c->queue, *next;

		for (; r; r = next) {
			next = r->next;
			if (r->deadline_ns && r->deadline_ns <= now) {
				unqueue(c, r);
				finish(s, r, MOE_ETIMEDOUT);
			}
		}
	}
}

static void cancel(struct server *s, struct client *c, uint64_t tag)
{
	for (struct request *r = c->queue; r; r = r->next) {
		if (r->tag == tag) {
			unqueue(c, r);
			finish(s, r, MOE_ECANCELED);
			return;
		}
	}
	/* not queued: already running or done, its completion comes anyway */
}

/* ---- sessions ----------------------------------------------------------- */

static void drop_client(struct server *s, struct client *c)
{
	struct client **pp = &s->clients;

	while (*pp && *pp != c)
		pp = &(*pp)->next;
	if (*pp)
		*pp = c->next;
	while (c->queue) {
		struct request *r = c->queue;

		c->queue = r->next;
		s->pending--;
		s->pending_tokens -= r->n_tokens;
		free(r);
	}
	epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	if (c->pinned)
		moe_engine_host_unregister(s->e, c->region);
	if (c->pin_failed)
		s->unpinned--;
	if (c->region) {
		munmap(c->region, c->region_bytes);
		s->shm_bytes -= c->region_bytes;
	}
	/* (one that never attached was logged when refused, if at all) */
	moe_log(c->attached ? LOG_INFO : LOG_DEBUG, "client %u (pid %d, %s) disconnected after "
		"%llu requests", c->id, (int)c->pid, c->name[0] ? c->name : "-",
		(unsigned long long)c->requests);
	free(c->overflow);
	free(c);
	s->n_clients--;
}

static void accept_clients(struct server *s)
{
	for (;;) {
		int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct epoll_event ev = {.events = EPOLLIN};
		struct client *c;

		if (fd < 0)
			return;
		if (s->stopping || s->n_clients >= s->o.max_clients) {
			struct client tmp = {.fd = fd};

			send_error(&tmp, s->stopping ? MOE_ESHUTDOWN : MOE_ELIMIT,
				   s->stopping ? "shutting down" : "too many clients");
			s->refused++;
			close(fd);
			continue;
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->id = ++s->next_id;
		c->accepted_ns = now_ns();
		if (moe_auth_peer(fd, &c->peer) == 0) {
			c->pid = c->peer.pid;
			c->uid = c->peer.uid;
		} else {
			c->peer.uid = (uid_t)-1; /* unknown: grants nothing */
			c->peer.gid = (gid_t)-1;
		}
		ev.data.ptr = c;
		if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			close(fd);
			free(c);
			continue;
		}
		c->next = s->clients;
		s->clients = c;
		s->n_clients++;
	}
}

static int hello_reply(struct server *s, struct client *c, int status)
{
	struct moe_msg_hello_reply r = {.status = status, .proto_version = MOE_PROTO_VERSION};
	const struct moe_model *m = s->m;

	if (!status) {
		snprintf(r.family, sizeof(r.family), "%s", moe_family_name(m->family));
		r.hidden = m->hidden;
		r.n_experts = m->n_experts;
		r.top_k = m->top_k;
		r.dtype = m->dtype == MOE_DT_F32 ? MOE_WIRE_F32
			  : m->dtype == MOE_DT_BF16 ? MOE_WIRE_BF16 : MOE_WIRE_F16;
		r.n_layers = m->n_layers;
		r.n_moe_layers = m->n_moe_layers < MOE_MAX_MOE_LAYERS ? m->n_moe_layers
								      : MOE_MAX_MOE_LAYERS;
		for (uint32_t i = 0; i < r.n_moe_layers; i++)
			r.moe_layers[i] = (uint16_t)m->layers[i].index;
		r.max_batch_tokens = moe_engine_max_tokens(s->e);
		r.max_inflight_requests = s->o.max_inflight_requests;
		r.max_inflight_tokens = s->o.max_inflight_tokens;
		r.data_off = (uint64_t)(c->data - (char *)c->region);
		r.data_bytes = c->data_bytes;
	}
	return send_msg(c->fd, MOE_MSG_HELLO_REPLY, &r, sizeof(r), -1);
}

/* The memfd is the client's: check its type, seals and size before mapping,
 * then copy the header once and check it against the HELLO.
 *
 * What could make a read or write of the mapped region fault (SIGBUS kills
 * moed, and every client with it) is closed here, not caught later:
 *  - a file that shrinks under the mapping: F_SEAL_SHRINK, and the size
 *    must be the HELLO's;
 *  - pages that cannot be provided on a fault: only shmem (a plain memfd,
 *    fstatfs TMPFS_MAGIC) is accepted. A hugetlbfs memfd (MFD_HUGETLB) can be
 *    sized and sealed with no huge page reserved, and its owner can punch
 *    its pages out and exhaust the pool: moed's next touch is SIGBUS.
 *    Holes punched in a shmem file read as zeros and are allocated again on
 *    write (charged to moed: server.max_total_shm_bytes bounds that);
 *  - a mapping that later turns read-only: F_SEAL_SEAL forbids adding
 *    F_SEAL_WRITE or F_SEAL_FUTURE_WRITE after the check, and a region
 *    sealed against writes already cannot be mapped writable. */
static int attach(struct server *s, struct client *c, const struct moe_msg_hello *h, int fd,
		  const char **why)
{
	struct moe_shm_layout lay;
	struct moe_shm_hdr hdr;
	struct statfs sf;
	struct stat st;
	int seals;
	void *p;

	if (fd < 0)
		return *why = "HELLO without a memfd", MOE_EPROTO;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return *why = "the passed fd is not a regular file (memfd)", MOE_EINVAL;
	if (fstatfs(fd, &sf) < 0 || (uint32_t)sf.f_type != SHMEM_MAGIC)
		return *why = "the memfd is not a plain shmem memfd (hugetlbfs and other "
			      "filesystems can fault moed's reads)",
		       MOE_EINVAL;
	seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0 || (seals & SEALS_NEEDED) != SEALS_NEEDED)
		return *why = "the memfd is not sealed against shrink, grow and further sealing",
		       MOE_EINVAL;
	if ((uint64_t)st.st_size != h->region_bytes)
		return *why = "the memfd's size differs from the HELLO's", MOE_EINVAL;
	if (h->region_bytes > s->o.max_client_shm_bytes || h->region_bytes < MIN_REGION)
		return *why = "region size outside [64 KiB, server.max_client_shm_bytes]",
		       MOE_ELIMIT;
	if (s->o.max_total_shm_bytes && /* (a reload may have lowered it below what is held) */
	    (s->shm_bytes > s->o.max_total_shm_bytes ||
	     h->region_bytes > s->o.max_total_shm_bytes - s->shm_bytes))
		return *why = "server.max_total_shm_bytes: the clients' regions already take "
			      "what moed allows in all",
		       MOE_ELIMIT;
	if (moe_shm_layout(h->sq_entries, h->cq_entries, h->region_bytes, &lay))
		return *why = "ring sizes do not fit the region", MOE_EINVAL;
	p = mmap(NULL, h->region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return *why = "cannot map the memfd", MOE_EINVAL;
	memcpy(&hdr, p, offsetof(struct moe_shm_hdr, sq_head));
	if (hdr.magic != MOE_SHM_MAGIC || hdr.version != MOE_SHM_VERSION ||
	    hdr.sq_entries != h->sq_entries || hdr.cq_entries != h->cq_entries ||
	    hdr.region_bytes != h->region_bytes) {
		munmap(p, h->region_bytes);
		return *why = "region header does not match the HELLO", MOE_EINVAL;
	}
	c->region = p;
	c->region_bytes = h->region_bytes;
	s->shm_bytes += c->region_bytes;
	c->hdr = p;
	c->sq = (struct moe_sqe *)((char *)p + lay.sq_off);
	c->cq = (struct moe_cqe *)((char *)p + lay.cq_off);
	c->data = (char *)p + lay.data_off;
	c->data_bytes = lay.data_bytes;
	c->sq_entries = h->sq_entries;
	c->cq_entries = h->cq_entries;
	/* our own copies of the indices we own; the region's are only hints */
	c->sq_head = atomic_load_explicit(&c->hdr->sq_head, memory_order_relaxed);
	c->cq_tail = atomic_load_explicit(&c->hdr->cq_tail, memory_order_relaxed);
	memcpy(c->name, h->client_name, sizeof(c->name));
	c->attached = true;
	{
		char err[MOE_ERRLEN];
		int ret = moe_engine_host_register(s->e, p, h->region_bytes, err);

		c->pinned = ret == 0;
		if (ret && ret != -ENOTSUP) {
			/* correct but slower: the driver stages the copies */
			c->pin_failed = true;
			s->unpinned++;
			moe_log(LOG_WARNING, "client %u: cannot pin its %llu-byte region (%s); its "
				"copies to the GPU are staged", c->id,
				(unsigned long long)h->region_bytes, err);
		}
	}
	return 0;
}

static void status_reply(struct server *s, struct client *c, uint32_t seq);

static void admin_reply(struct client *c, uint32_t seq, int status, const char *msg)
{
	struct moe_msg_admin_reply r = {.status = status};

	snprintf(r.message, sizeof(r.message), "%s", msg);
	send_msg_seq(c->fd, MOE_MSG_ADMIN_REPLY, seq, &r, sizeof(r), -1);
}

static void status_line(struct server *s)
{
	notify("STATUS=%s %s on %s (%s kernels): %llu requests served, %u clients",
	       s->draining ? "draining" : "serving", moe_family_name(s->m->family),
	       moe_engine_backend(s->e), moe_engine_kernels(s->e),
	       (unsigned long long)s->completed, s->n_clients);
}

/* Re-reads the configuration through the caller's hook; serving goes on
 * whatever the outcome. */
static int reload_config(struct server *s, char *msg, size_t n)
{
	struct timespec t;
	int ret;

	if (!s->o.reload) {
		snprintf(msg, n, "no configuration file to reload (started without -c)");
		return -ENOENT;
	}
	clock_gettime(CLOCK_MONOTONIC, &t);
	notify("RELOADING=1\nMONOTONIC_USEC=%llu",
	       (unsigned long long)t.tv_sec * 1000000ull + (unsigned long long)t.tv_nsec / 1000);
	ret = s->o.reload(s->o.reload_arg, &s->o, msg, n);
	if (ret) {
		s->reloads_refused++;
		moe_log(LOG_ERR, "configuration reload refused, serving on: %s", msg);
		notify("READY=1\nSTATUS=configuration reload refused: %.400s", msg);
		return ret;
	}
	s->reloads++;
	moe_log_set_level(s->o.log_level);
	moe_log(LOG_NOTICE, "configuration reloaded: %s", msg);
	notify("READY=1");
	status_line(s);
	return 0;
}

static void admin(struct server *s, struct client *c, const struct moe_msg_admin *a, uint32_t seq)
{
	char msg[240];

	if (!moe_auth_allowed(&s->o.auth, &c->peer, MOE_AUTH_ADMIN)) {
		s->refused_auth++;
		log_refusal(s, c->peer.uid, "client %u (pid %d, uid %d): admin command %u refused: "
			    "not root or in the admin group%s%s", c->id, (int)c->pid, (int)c->uid,
			    a->op, s->o.admin_group && *s->o.admin_group ? " " : "",
			    s->o.admin_group ? s->o.admin_group : "");
		admin_reply(c, seq, MOE_EPERM, "not allowed: root or server.admin_group only");
		return;
	}
	switch (a->op) {
	case MOE_ADMIN_DRAIN:
		/* what clients submitted before the drain is queued, not refused */
		for (struct client *x = s->clients; x; x = x->next)
			poll_sq(s, x);
		if (!s->draining)
			moe_log(LOG_NOTICE, "draining: new requests are refused, %u queued finish",
				s->pending);
		s->draining = true;
		status_line(s);
		if ((a->flags & MOE_ADMIN_WAIT) && s->pending) {
			c->drain_waiter = true;
			c->drain_seq = seq;
			return;
		}
		snprintf(msg, sizeof(msg), "draining; %u requests queued", s->pending);
		admin_reply(c, seq, 0, msg);
		return;
	case MOE_ADMIN_UNDRAIN:
		if (s->draining)
			moe_log(LOG_NOTICE, "undrained: accepting requests again");
		s->draining = false;
		status_line(s);
		admin_reply(c, seq, 0, "accepting requests");
		return;
	case MOE_ADMIN_RELOAD_CONFIG: {
		int ret = reload_config(s, msg, sizeof(msg));

		admin_reply(c, seq, ret ? MOE_EINVAL : 0, msg);
		return;
	}
	}
}

/* Clients waiting for a drain to complete get their answer once idle. */
static void answer_drain_waiters(struct server *s)
{
	if (s->pending)
		return;
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->drain_waiter) {
			admin_reply(c, c->drain_seq, 0, "drained: nothing queued");
			c->drain_waiter = false;
		}
	}
}

/* Every timer tick: deadlines, connections that never said HELLO, the
 * watchdog, and the status line. The tick runs between batches, so a
 * batch that hangs stops the watchdog pings and systemd restarts us. */
static void tick(struct server *s)
{
	uint64_t now = now_ns();

	expire(s);
	for (struct client *c = s->clients; c; c = c->next) {
		if (!c->attached && s->o.handshake_timeout_ms &&
		    now - c->accepted_ns > s->o.handshake_timeout_ms * 1000000ull) {
			log_refusal(s, c->peer.uid, "client %u (pid %d): no HELLO within %u ms; "
				    "dropped", c->id, (int)c->pid, s->o.handshake_timeout_ms);
			send_error(c, MOE_EPROTO, "handshake timeout");
			c->dead = true;
		}
	}
	log_flush(s, now);
	if (s->watchdog_ns && now - s->last_ping_ns >= s->watchdog_ns / 2) {
		notify("WATCHDOG=1");
		s->last_ping_ns = now;
	}
	if (now - s->last_status_ns >= 5000000000ull) {
		status_line(s);
		s->last_status_ns = now;
	}
}

/* One datagram (and maybe fds) from a client. Returns false to drop it. */
static bool handle_msg(struct server *s, struct client *c, const char *buf, size_t n, int *fds,
		       int nfds)
{
	struct moe_msg_hdr hdr;
	int type = moe_msg_peek(buf, n, &hdr);
	int passed = nfds == 1 ? fds[0] : -1;
	bool keep = true;

	if (type == MOE_MSG_HELLO && !c->attached) {
		struct moe_msg_hello h;
		const char *why = "malformed HELLO";
		int st = moe_msg_decode_hello(buf, n, &h);

		/* administrators may connect too (their commands need a session) */
		if (!st && !moe_auth_allowed(&s->o.auth, &c->peer, MOE_AUTH_FORWARD) &&
		    !moe_auth_allowed(&s->o.auth, &c->peer, MOE_AUTH_ADMIN)) {
			st = MOE_EPERM,
			why = "not root, the daemon's user, or in the socket's or admin group";
			s->refused_auth++;
		}
		if (!st && nfds != 1)
			st = MOE_EPROTO, why = "HELLO must carry exactly one fd";
		if (!st)
			st = attach(s, c, &h, passed, &why);
		if (st) {
			log_refusal(s, c->peer.uid, "client %u (pid %d, uid %d): refused: %s", c->id,
				    (int)c->pid, (int)c->peer.uid, why);
			hello_reply(s, c, st);
			keep = false;
		} else if (hello_reply(s, c, 0)) {
			keep = false;
		} else {
			moe_log(LOG_INFO, "client %u (pid %d, uid %d, %s) attached %llu bytes",
				c->id, (int)c->pid, (int)c->uid, c->name[0] ? c->name : "-",
				(unsigned long long)c->region_bytes);
		}
	} else if (!c->attached) {
		send_error(c, MOE_EPROTO, "HELLO expected first");
		keep = false;
	} else if (type == MOE_MSG_DOORBELL && !moe_msg_decode_empty(buf, n, MOE_MSG_DOORBELL)) {
		/* the rings are polled right after */
	} else if (type == MOE_MSG_CANCEL) {
		struct moe_msg_cancel m;

		if (moe_msg_decode_cancel(buf, n, &m)) {
			keep = false;
		} else {
			/* the request may still sit in the ring: take it first */
			poll_sq(s, c);
			cancel(s, c, m.tag);
		}
	} else if (type == MOE_MSG_STATUS && !moe_msg_decode_empty(buf, n, MOE_MSG_STATUS)) {
		status_reply(s, c, hdr.seq);
	} else if (type == MOE_MSG_ADMIN) {
		struct moe_msg_admin a;

		if (moe_msg_decode_admin(buf, n, &a))
			admin_reply(c, hdr.seq, MOE_EINVAL, "malformed or unknown admin command");
		else
			admin(s, c, &a, hdr.seq);
	} else {
		send_error(c, MOE_EPROTO, "malformed or unexpected message");
		keep = false;
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	if (!keep)
		c->dead = true;
	return keep;
}

/* Messages read from one client per loop iteration, of any kind: what is
 * left stays in its socket until the next iteration (epoll is level-
 * triggered), after the batch in between. A client that floods the socket
 * (STATUS, CANCEL, doorbells) then costs each iteration at most this many
 * cheap messages, and never delays the data path by more. */
#define MSGS_PER_LOOP 8

static void read_client(struct server *s, struct client *c)
{
	if (c->ctrl_loop != s->loops) {
		c->ctrl_loop = s->loops;
		c->ctrl_used = 0;
	}
	for (; c->ctrl_used < MSGS_PER_LOOP && !c->dead; c->ctrl_used++) {
		char buf[MOE_MSG_MAX];
		union {
			char b[CMSG_SPACE(sizeof(int) * 8)];
			struct cmsghdr align;
		} u;
		struct iovec iov = {buf, sizeof(buf)};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				    .msg_controllen = sizeof(u.b)};
		int fds[8], nfds = 0;
		ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);

		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n < 0) {
			c->dead = true;
			return;
		}
		/* The fds first, whatever the datagram: a zero-length one can
		 * carry fds too (SOCK_SEQPACKET cannot tell it from EOF), and
		 * every fd received is closed on every path below. */
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			for (size_t k = 0; k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < 8;
			     k++)
				memcpy(&fds[nfds++], CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
		}
		if (n == 0) { /* EOF, or an empty datagram: no message of ours is empty */
			for (int k = 0; k < nfds; k++)
				close(fds[k]);
			c->dead = true;
			return;
		}
		if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
			for (int k = 0; k < nfds; k++)
				close(fds[k]);
			send_error(c, MOE_EPROTO, "message too large");
			c->dead = true;
			return;
		}
		handle_msg(s, c, buf, (size_t)n, fds, nfds);
	}
}

/* ---- status ------------------------------------------------------------- */

static char *status_json(struct server *s)
{
	const struct moe_model *m = s->m;
	cJSON *j = cJSON_CreateObject(), *o, *a;
	char *out;

	cJSON_AddNumberToObject(j, "version", 1);
	cJSON_AddNumberToObject(j, "uptime_s", (double)(now_ns() - s->start_ns) / 1e9);
	cJSON_AddStringToObject(j, "state", s->stopping   ? "stopping"
					    : s->draining ? "draining"
							  : "serving");
	o = cJSON_AddObjectToObject(j, "model");
	cJSON_AddStringToObject(o, "path", s->o.model_path ? s->o.model_path : "");
	cJSON_AddStringToObject(o, "family", moe_family_name(m->family));
	cJSON_AddStringToObject(o, "dtype", moe_dtype_name(m->dtype));
	cJSON_AddNumberToObject(o, "hidden", m->hidden);
	cJSON_AddNumberToObject(o, "experts", m->n_experts);
	cJSON_AddNumberToObject(o, "top_k", m->top_k);
	a = cJSON_AddArrayToObject(o, "moe_layers");
	for (uint32_t i = 0; i < m->n_moe_layers; i++)
		cJSON_AddItemToArray(a, cJSON_CreateNumber(m->layers[i].index));
	o = cJSON_AddObjectToObject(j, "backend");
	cJSON_AddStringToObject(o, "name", moe_engine_backend(s->e));
	cJSON_AddStringToObject(o, "kernels", moe_engine_kernels(s->e));
	cJSON_AddNumberToObject(o, "threads", moe_engine_threads(s->e));
	cJSON_AddStringToObject(o, "device", moe_engine_device(s->e));
	cJSON_AddStringToObject(o, "gpu", s->o.gpu ? s->o.gpu : "none");
	cJSON_AddBoolToObject(o, "device_lost", moe_engine_lost(s->e));
	if (moe_engine_last_device_ms(s->e) >= 0)
		cJSON_AddNumberToObject(o, "last_batch_device_ms", moe_engine_last_device_ms(s->e));
	cJSON_AddNumberToObject(o, "unpinned_clients", (double)s->unpinned);
	a = cJSON_AddArrayToObject(j, "clients");
	for (struct client *c = s->clients; c; c = c->next) {
		cJSON *x = cJSON_CreateObject();

		cJSON_AddNumberToObject(x, "id", c->id);
		cJSON_AddNumberToObject(x, "pid", c->pid);
		cJSON_AddNumberToObject(x, "uid", c->uid);
		cJSON_AddStringToObject(x, "name", c->name);
		cJSON_AddNumberToObject(x, "inflight", c->inflight);
		cJSON_AddNumberToObject(x, "requests", (double)c->requests);
		cJSON_AddNumberToObject(x, "errors", (double)c->errors);
		cJSON_AddItemToArray(a, x);
	}
	o = cJSON_AddObjectToObject(j, "queue");
	cJSON_AddNumberToObject(o, "pending_requests", s->pending);
	cJSON_AddNumberToObject(o, "pending_tokens", s->pending_tokens);
	o = cJSON_AddObjectToObject(j, "requests");
	cJSON_AddNumberToObject(o, "completed", (double)s->completed);
	cJSON_AddNumberToObject(o, "errors", (double)s->errors);
	cJSON_AddNumberToObject(o, "timeouts", (double)s->timeouts);
	cJSON_AddNumberToObject(o, "cancelled", (double)s->cancelled);
	cJSON_AddNumberToObject(o, "tokens", (double)s->tokens);
	cJSON_AddNumberToObject(o, "batches", (double)s->batches);
	cJSON_AddNumberToObject(o, "refused_clients", (double)s->refused);
	cJSON_AddNumberToObject(o, "refused_unauthorized", (double)s->refused_auth);
	cJSON_AddNumberToObject(o, "config_reloads", (double)s->reloads);
	cJSON_AddNumberToObject(o, "config_reloads_refused", (double)s->reloads_refused);
	o = cJSON_AddObjectToObject(j, "control");
	cJSON_AddNumberToObject(o, "loops", (double)s->loops);
	/* this reply's own build and send are not counted yet */
	cJSON_AddNumberToObject(o, "status_builds", (double)s->status_builds);
	cJSON_AddNumberToObject(o, "status_served", (double)s->status_served);
	cJSON_AddNumberToObject(o, "log_lines_suppressed", (double)s->log_suppressed);
	cJSON_AddNumberToObject(o, "shm_bytes", (double)s->shm_bytes);
	cJSON_AddNumberToObject(o, "max_total_shm_bytes", (double)s->o.max_total_shm_bytes);
	cJSON_AddNumberToObject(o, "queue_share", s->share);
	a = cJSON_AddArrayToObject(j, "layers");
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		cJSON *x = cJSON_CreateObject(), *t;

		cJSON_AddNumberToObject(x, "layer", m->layers[l].index);
		t = cJSON_AddArrayToObject(x, "expert_tokens");
		for (uint32_t e = 0; e < m->n_experts; e++)
			cJSON_AddItemToArray(t, cJSON_CreateNumber(
							(double)moe_engine_expert_tokens(s->e, l, e)));
		cJSON_AddItemToArray(a, x);
	}
	out = cJSON_PrintUnformatted(j);
	cJSON_Delete(j);
	return out;
}

/* The JSON goes in a sealed memfd: no datagram size limit, and the client
 * cannot change it under us (nor we under it). It is built at most once per
 * loop iteration (nothing it reports changes within one), and every client
 * asking in that iteration gets the same memfd (they share its file offset:
 * libmoeclient reads it with pread). A STATUS flood thus costs one build
 * per iteration and a send per message, within each client's
 * MSGS_PER_LOOP. */
static int status_snapshot(struct server *s)
{
	char *json;
	int fd;

	if (s->status_fd >= 0 && s->status_loop == s->loops)
		return s->status_fd;
	if (s->status_fd >= 0)
		close(s->status_fd);
	s->status_fd = -1;
	json = status_json(s);
	if (!json)
		return -1;
	s->status_len = strlen(json);
	fd = memfd_create("moed-status", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd >= 0 && (write(fd, json, s->status_len) != (ssize_t)s->status_len ||
			fcntl(fd, F_ADD_SEALS,
			      F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)) {
		close(fd);
		fd = -1;
	}
	free(json);
	s->status_fd = fd;
	s->status_loop = s->loops;
	s->status_builds++;
	return fd;
}

static void status_reply(struct server *s, struct client *c, uint32_t seq)
{
	struct moe_msg_status_reply r = {0};
	int fd = status_snapshot(s);

	if (fd < 0)
		r.status = MOE_ENOMEM;
	else
		r.json_bytes = s->status_len;
	if (!send_msg_seq(c->fd, MOE_MSG_STATUS_REPLY, seq, &r, sizeof(r), fd))
		s->status_served++;
}

/* ---- setup -------------------------------------------------------------- */

/* Binds the socket; a stale socket file (nobody listening) is replaced, a
 * live one is an error: two daemons must not share a path. */
static int listen_on(const char *path, unsigned mode, const struct moe_auth_policy *auth)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int fd, probe;

	if (strlen(path) >= sizeof(a.sun_path)) {
		moe_log(LOG_ERR, "%s: socket path too long", path);
		return -1;
	}
	strcpy(a.sun_path, path);
	probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof(a)) == 0) {
		close(probe);
		moe_log(LOG_ERR, "%s: another daemon is listening on this socket", path);
		return -1;
	}
	if (probe >= 0)
		close(probe);
	unlink(path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    (auth->has_socket_gid && chown(path, (uid_t)-1, auth->socket_gid) < 0) ||
	    chmod(path, mode) < 0 || listen(fd, 128) < 0) {
		moe_log(LOG_ERR, "%s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static int setup(struct server *s)
{
	struct epoll_event ev = {.events = EPOLLIN};
	struct itimerspec its = {{0, TICK_NS}, {0, TICK_NS}};
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	s->sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	s->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	s->epfd = epoll_create1(EPOLL_CLOEXEC);
	s->lfd = s->o.listen_fd >= 0 ? s->o.listen_fd
				     : listen_on(s->o.socket_path, s->o.socket_mode, &s->o.auth);
	if (s->sfd < 0 || s->tfd < 0 || s->epfd < 0 || s->lfd < 0)
		return -1;
	/* Forward requests are for the socket's group: learn it from the
	 * socket file (ours, or systemd's with socket activation). */
	if (!s->o.auth.has_socket_gid) {
		struct sockaddr_un a;
		socklen_t alen = sizeof(a);
		struct stat st;

		if (getsockname(s->lfd, (struct sockaddr *)&a, &alen) == 0 &&
		    alen > offsetof(struct sockaddr_un, sun_path) && a.sun_path[0] &&
		    stat(a.sun_path, &st) == 0) {
			s->o.auth.socket_gid = st.st_gid;
			s->o.auth.has_socket_gid = true;
		}
	}
	s->o.auth.daemon_uid = geteuid();
#ifdef MOE_HAVE_SYSTEMD
	{
		uint64_t usec = 0;

		if (sd_watchdog_enabled(0, &usec) > 0)
			s->watchdog_ns = usec * 1000;
	}
#endif
	{
		const char *stall = getenv("MOED_TEST_STALL_MS");

		if (stall && *stall) {
			s->stall_ms = (uint32_t)strtoul(stall, NULL, 10);
			moe_log(LOG_WARNING, "test hook MOED_TEST_STALL_MS: every batch sleeps %u ms",
				s->stall_ms);
		}
	}
	timerfd_settime(s->tfd, 0, &its, NULL);
	ev.data.ptr = &s->lfd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->lfd, &ev);
	ev.data.ptr = &s->sfd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->sfd, &ev);
	ev.data.ptr = &s->tfd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->tfd, &ev);
	/* a request has at least one token: max_tokens bounds a batch's requests */
	s->batch = malloc((size_t)moe_engine_max_tokens(s->e) * sizeof(*s->batch));
	s->segs = malloc((size_t)moe_engine_max_tokens(s->e) * sizeof(*s->segs));
	s->is_moe = calloc(s->m->n_layers, 1);
	if (!s->segs || !s->batch || !s->is_moe)
		return -1;
	for (uint32_t i = 0; i < s->m->n_moe_layers; i++)
		s->is_moe[s->m->layers[i].index] = 1;
	return 0;
}

static void reap_dead(struct server *s)
{
	for (struct client *c = s->clients, *next; c; c = next) {
		next = c->next;
		if (c->dead)
			drop_client(s, c);
	}
}

static void on_signal(struct server *s)
{
	struct signalfd_siginfo si;

	while (read(s->sfd, &si, sizeof(si)) == sizeof(si)) {
		if (si.ssi_signo == SIGHUP) {
			char msg[240];

			reload_config(s, msg, sizeof(msg));
			continue;
		}
		if (!s->stopping)
			moe_log(LOG_NOTICE, "signal %u: stopping (%u requests queued)", si.ssi_signo,
				s->pending);
		s->stopping = true;
	}
}

/* Answers everything queued, then everything still in the rings, with
 * MOE_ESHUTDOWN (as far as each client's completion ring has room). */
static void shutdown_clients(struct server *s)
{
	for (struct client *c = s->clients; c; c = c->next) {
		while (c->queue) {
			struct request *r = c->queue;

			unqueue(c, r);
			finish(s, r, s->lost ? MOE_EDEVICE : MOE_ESHUTDOWN);
		}
		for (int i = 0; i < 4 && !c->dead; i++) {
			flush_cq(c);
			poll_sq(s, c); /* stopping: every entry is answered at once */
		}
	}
	notify_clients(s);
}

int moe_server_run(struct moe_engine *e, const struct moe_server_opts *o)
{
	struct server s = {.e = e, .m = moe_engine_model(e), .o = *o, .epfd = -1, .lfd = -1,
			   .sfd = -1, .tfd = -1, .status_fd = -1,
			   .share = o->max_queue_requests ? o->max_queue_requests : 1};
	struct epoll_event evs[64];
	int code = 0;

	s.start_ns = now_ns();
	if (setup(&s)) {
		moe_log(LOG_ERR, "cannot start serving: %s", strerror(errno));
		code = 1;
		goto out;
	}
	moe_log(LOG_INFO, "serving %s on %s (%s backend, %s kernels, %u threads)",
		moe_family_name(s.m->family),
		o->listen_fd >= 0 ? "the socket systemd passed" : o->socket_path,
		moe_engine_backend(e), moe_engine_kernels(e), moe_engine_threads(e));
	s.last_ping_ns = s.last_status_ns = now_ns();
	notify("READY=1");
	status_line(&s);
	while (!s.stopping) {
		int n = epoll_wait(s.epfd, evs, 64, s.pending ? 0 : -1);

		s.loops++;
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;
			uint64_t ticks;

			if (p == &s.lfd) {
				accept_clients(&s);
			} else if (p == &s.sfd) {
				on_signal(&s);
			} else if (p == &s.tfd) {
				if (read(s.tfd, &ticks, sizeof(ticks)) > 0)
					tick(&s);
			} else {
				struct client *c = p;

				if (evs[i].events & EPOLLIN)
					read_client(&s, c);
				if (evs[i].events & (EPOLLHUP | EPOLLERR))
					c->dead = true;
			}
		}
		reap_dead(&s);
		poll_rings(&s);
		if (s.pending && !s.stopping) {
			/* a request whose deadline passed before it starts is
			 * answered, not run */
			expire(&s);
			run_batch(&s);
		}
		answer_drain_waiters(&s);
		notify_clients(&s);
		reap_dead(&s);
		if (s.status_fd >= 0) { /* valid for this iteration only */
			close(s.status_fd);
			s.status_fd = -1;
		}
	}
	notify("STOPPING=1");
	shutdown_clients(&s);
	if (s.lost)
		code = MOE_EXIT_DEVICE_LOST;
	moe_log(LOG_NOTICE, "stopped: %llu requests completed, %llu errors, %llu batches",
		(unsigned long long)s.completed, (unsigned long long)s.errors,
		(unsigned long long)s.batches);
out:
	while (s.clients)
		drop_client(&s, s.clients);
	if (s.lfd >= 0 && o->listen_fd < 0) {
		close(s.lfd);
		unlink(o->socket_path);
	}
	if (s.epfd >= 0)
		close(s.epfd);
	if (s.sfd >= 0)
		close(s.sfd);
	if (s.tfd >= 0)
		close(s.tfd);
	if (s.status_fd >= 0)
		close(s.status_fd);
	free(s.segs);
	free(s.batch);
	free(s.is_moe);
	return code;
}
