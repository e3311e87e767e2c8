/* client/moeclient.c — libmoeclient: the control socket, the shared region,
 * the rings, and the table of outstanding requests.
 *
 * Waiting (leader/followers): of the threads that wait for something, one
 * at a time — the poller — sleeps in poll() on the socket and an eventfd
 * without the mutex; the others sleep on a condition variable. Whoever
 * reaps completions (the poller after waking, or moe_poll) broadcasts the
 * condition variable, and kicks the eventfd if a poller sleeps, so no
 * wakeup is lost when one thread drains a doorbell meant for another.
 *
 * Nothing read from the shared region is trusted twice: our ring indices
 * are kept privately, a CQE is copied out once and its tag looked up in our
 * own table.
 */
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

	/* One STATUS request at a time. */
	int status_busy, status_have, status_fd;
	uint32_t status_seq;
	struct moe_msg_status_reply status_msg;
	int admin_busy, admin_have;
	uint32_t admin_seq;
	struct moe_msg_admin_reply admin_msg;
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? NO_DEADLINE : now_ns() + (uint64_t)timeout_ms * 1000000u;
}

/* Milliseconds left until `deadline` (rounded up), capped; -1 for none. */
static int ms_left(uint64_t deadline, int cap)
{
	uint64_t now = now_ns(), ms;

	if (deadline == NO_DEADLINE)
		return cap;
	if (now >= deadline)
		return 0;
	ms = (deadline - now + 999999u) / 1000000u;
	return ms < (uint64_t)cap || cap < 0 ? (int)(ms > INT32_MAX ? INT32_MAX : ms) : cap;
}

static size_t dtype_size(moe_dtype dt)
{
	return dt == MOE_DTYPE_F32 ? 4 : 2;
}

static uint32_t pow2_at_least(uint32_t v)
{
	uint32_t p = 1;

	while (p < v && p < MOE_RING_MAX)
		p <<= 1;
	return p;
}

static void set_err(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *buf, size_t len, const char *fmt, ...)
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
static int wire_status(int32_t s)
{
	return s < 0 ? s : MOE_EPROTO;
}

static void close_fds(const int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/* Receives one datagram without blocking. Returns its length, 0 at EOF, or
 * a negative errno; attached descriptors (close-on-exec) go to fds. */
static ssize_t recv_msg(int sock, void *buf, size_t cap, int *fds, int *n_fds)
{
	union {
		char b[CMSG_SPACE(4 * sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {buf, cap};
	struct msghdr mh = {.msg_iov = &iov,
	                    .msg_iovlen = 1,
	                    .msg_control = ctl.b,
	                    .msg_controllen = sizeof(ctl.b)};
	ssize_t n;

	*n_fds = 0;
	do
		n = recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

		for (size_t i = 0; i < k && *n_fds < 4; i++)
			memcpy(&fds[(*n_fds)++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
	}
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		close_fds(fds, *n_fds);
		*n_fds = 0;
		return -EPROTO;
	}
	return n;
}

/* Sends one datagram (and fd if >= 0) without ever blocking longer than
 * wait_ms for room; wait_ms 0 drops it when the socket is full (doorbells).
 * 0 or a negative errno. */
static int send_dgram(int sock, const void *buf, size_t len, int fd, int wait_ms)
{
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {(void *)buf, len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	uint64_t deadline = deadline_after(wait_ms);

	if (fd >= 0) {
		memset(&ctl, 0, sizeof(ctl));
		mh.msg_control = ctl.b;
		mh.msg_controllen = sizeof(ctl.b);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	for (;;) {
		if (sendmsg(sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		if (!wait_ms)
			return 0; /* a doorbell already pending does the job */
		int left = ms_left(deadline, -1);
		struct pollfd p = {sock, POLLOUT, 0};

		if (!left)
			return -ETIMEDOUT;
		if (poll(&p, 1, left) < 0 && errno != EINTR)
			return -errno;
	}
}

/* ------------------------------------------------------------------------ */
/* Slots, rings, the socket — all with c->mu held                           */

static struct slot *find_slot(struct moe_client *c, uint64_t tag)
{
	uint64_t i = tag & ((1u << TAG_SLOT_BITS) - 1);

	if (!c->slots || i >= c->cq_entries || c->slots[i].state == SLOT_FREE ||
	    c->slots[i].tag != tag)
		return NULL;
	return &c->slots[i];
}

static struct slot *get_slot(struct moe_client *c)
{
	struct slot *s;
	uint32_t i;

	if (!c->n_free_slots)
		return NULL;
	i = c->free_slots[--c->n_free_slots];
	s = &c->slots[i];
	memset(s, 0, sizeof(*s));
	s->tag = (++c->tag_gen << TAG_SLOT_BITS) | i;
	return s;
}

static void put_slot(struct moe_client *c, struct slot *s)
{
	s->state = SLOT_FREE;
	s->waiters = 0;
	s->tag = 0;
	c->free_slots[c->n_free_slots++] = (uint32_t)(s - c->slots);
}

/* A pending request has finished (from the CQ, or because the daemon left). */
static void finish(struct moe_client *c, struct slot *s, int status, uint32_t epoch)
{
	c->inflight_reqs--;
	c->inflight_tokens -= s->n_tokens;
	if (s->orphan) {
		put_slot(c, s);
		return;
	}
	s->state = SLOT_DONE;
	s->status = status;
	s->epoch = epoch;
}

/* Something changed: wake every waiter, the poller included. */
static void wake_all(struct moe_client *c)
{
	pthread_cond_broadcast(&c->cv);
	if (c->polling) {
		uint64_t one = 1;

		if (write(c->evfd, &one, sizeof(one)) < 0) {
			/* full counter: it is readable anyway */
		}
	}
}

static void mark_dead(struct moe_client *c);

/* Moves finished entries from the completion ring into the slot table.
 * Returns how many, or -1 if the daemon overran the ring. */
static int reap_ring(struct moe_client *c)
{
	uint32_t tail = atomic_load_explicit(&c->hdr->cq_tail, memory_order_acquire), n = 0;

	if (tail - c->cq_head > c->cq_entries)
		return -1;
	for (; c->cq_head != tail; c->cq_head++, n++) {
		struct moe_cqe e = c->cq[c->cq_head & (c->cq_entries - 1)];
		struct slot *s = find_slot(c, e.tag);

		/* Unknown or repeated tags are ignored. */
		if (s && s->state == SLOT_PENDING)
			finish(c, s, e.status ? wire_status(e.status) : 0, e.epoch);
	}
	if (n) {
		atomic_store_explicit(&c->hdr->cq_head, c->cq_head, memory_order_release);
		wake_all(c);
	}
	return (int)n;
}

static int reap(struct moe_client *c)
{
	int n;

	if (!c->hdr || c->dead)
		return 0;
	n = reap_ring(c);
	if (n < 0) {
		mark_dead(c); /* a daemon that overruns the ring is not one to talk to */
		return 0;
	}
	return n;
}

static void mark_dead(struct moe_client *c)
{
	if (c->dead)
		return;
	if (c->hdr)
		reap_ring(c); /* completions already posted are real */
	c->dead = 1;
	for (uint32_t i = 0; c->slots && i < c->cq_entries; i++)
		if (c->slots[i].state == SLOT_PENDING)
			finish(c, &c->slots[i], MOE_EDAEMON, 0);
	c->inflight_reqs = c->inflight_tokens = 0;
	if (c->status_fd >= 0) {
		close(c->status_fd);
		c->status_fd = -1;
	}
	/* A sleeping poller still polls the socket: it closes it on waking. */
	if (!c->polling && c->sock >= 0) {
		close(c->sock);
		c->sock = -1;
	}
	wake_all(c);
}

/* Reads every datagram waiting on the socket. */
static void drain(struct moe_client *c)
{
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;

	while (!c->dead && c->sock >= 0) {
		int fds[4], n_fds;
		ssize_t n = recv_msg(c->sock, buf.b, sizeof(buf.b), fds, &n_fds);
		struct moe_msg_hdr h;
		int type;

		if (n == -EAGAIN || n == -EWOULDBLOCK)
			return;
		if (n <= 0) {
			mark_dead(c);
			return;
		}
		type = moe_msg_peek(buf.b, (size_t)n, &h);
		if (type == MOE_MSG_STATUS_REPLY && c->status_busy && !c->status_have &&
		    h.seq == c->status_seq &&
		    !moe_msg_decode_status_reply(buf.b, (size_t)n, &c->status_msg)) {
			c->status_have = 1;
			c->status_fd = n_fds ? fds[0] : -1;
			close_fds(fds + 1, n_fds ? n_fds - 1 : 0);
			wake_all(c);
			continue;
		}
		if (type == MOE_MSG_ADMIN_REPLY && c->admin_busy && !c->admin_have &&
		    h.seq == c->admin_seq &&
		    !moe_msg_decode_admin_reply(buf.b, (size_t)n, &c->admin_msg)) {
			c->admin_have = 1;
			close_fds(fds, n_fds);
			wake_all(c);
			continue;
		}
		close_fds(fds, n_fds);
		if (type == MOE_MSG_ERROR) {
			mark_dead(c); /* the daemon hangs up after an ERROR */
			return;
		}
		/* DOORBELL, or something we do not expect: look at the rings. */
	}
}

/* Sends a control message; 0, or MOE_EDAEMON (the connection is then dead). */
static int send_ctl(struct moe_client *c, uint16_t type, const void *p, uint32_t len, uint32_t *seq)
{
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	size_t n;
	int r;

	if (c->dead)
		return MOE_EDAEMON;
	c->seq++;
	if (seq)
		*seq = c->seq;
	n = moe_msg_encode(buf.b, type, c->seq, p, len);
	r = send_dgram(c->sock, buf.b, n, -1, type == MOE_MSG_DOORBELL ? 0 : SEND_MS);
	if (r == -ETIMEDOUT)
		return MOE_EBUSY; /* the daemon does not read: a stuck, not a dead one */
	if (r < 0) {
		mark_dead(c);
		return MOE_EDAEMON;
	}
	return 0;
}

/* One wait: as the poller in poll() on the socket, or on the condition
 * variable, until something may have changed or `deadline`. The caller
 * loops, checking what it waits for, c->dead and the deadline. */
static void wait_step(struct moe_client *c, uint64_t deadline)
{
	struct pollfd p[2];
	int sock = c->sock, timeout, r;

	if (c->polling) {
		if (deadline == NO_DEADLINE) {
			pthread_cond_wait(&c->cv, &c->mu);
		} else {
			struct timespec ts = {(time_t)(deadline / 1000000000u),
			                      (long)(deadline % 1000000000u)};

			pthread_cond_timedwait(&c->cv, &c->mu, &ts);
		}
		return;
	}
	c->polling = 1;
	atomic_store(&c->hdr->client_waiting, 1);
	if (reap(c)) { /* posted before the daemon could see client_waiting */
		c->polling = 0;
		atomic_store(&c->hdr->client_waiting, 0);
		return;
	}
	timeout = ms_left(deadline, POLL_CAP_MS);
	p[0] = (struct pollfd){sock, POLLIN, 0};
	p[1] = (struct pollfd){c->evfd, POLLIN, 0};
	pthread_mutex_unlock(&c->mu);
	r = poll(p, 2, timeout);
	pthread_mutex_lock(&c->mu);
	c->polling = 0;
	atomic_store(&c->hdr->client_waiting, 0);
	if (r > 0 && p[1].revents) {
		uint64_t v;

		if (read(c->evfd, &v, sizeof(v)) < 0) {
			/* EAGAIN: another read got it */
		}
	}
	drain(c);
	reap(c);
	if (c->dead && c->sock >= 0) {
		close(c->sock);
		c->sock = -1;
	}
	pthread_cond_broadcast(&c->cv); /* let another waiter become the poller */
}

/* Waits until the slot for `tag` is done (0), or MOE_ETIMEDOUT / MOE_ENOENT. */
static int wait_tag(struct moe_client *c, uint64_t tag, uint64_t deadline, int *status,
                    uint32_t *epoch)
{
	struct slot *s = find_slot(c, tag);

	if (!s || s->orphan)
		return MOE_ENOENT;
	s->waiters++;
	for (;;) {
		s = find_slot(c, tag);
		if (!s)
			return MOE_ENOENT; /* another waiter of the same tag took it */
		if (s->state == SLOT_DONE) {
			if (status)
				*status = s->status;
			if (epoch)
				*epoch = s->epoch;
			put_slot(c, s);
			wake_all(c); /* a slot is free: blocked submitters may go on */
			return 0;
		}
		if (now_ns() >= deadline) {
			s->waiters--;
			return MOE_ETIMEDOUT;
		}
		wait_step(c, deadline);
	}
}

/* ------------------------------------------------------------------------ */
/* Connecting                                                               */

struct conn {
	int sock;
	void *map; /* the new region, mapped anywhere */
	struct moe_shm_layout lay;
	struct moe_msg_hello_reply reply;
};

/* Waits for the HELLO reply. */
static int read_reply(int sock, struct moe_msg_hello_reply *reply, char *err, size_t errlen,
                      const char *path)
{
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	uint64_t deadline = deadline_after(HANDSHAKE_MS);

	for (;;) {
		struct pollfd p = {sock, POLLIN, 0};
		int fds[4], n_fds, r, left = ms_left(deadline, -1);
		struct moe_msg_hdr h;
		struct moe_msg_error e;
		ssize_t n;

		if (!left) {
			set_err(err, errlen, "%s: no answer to the handshake in %d s", path,
			        HANDSHAKE_MS / 1000);
			return MOE_EDAEMON;
		}
		r = poll(&p, 1, left);
		if (r < 0 && errno != EINTR)
			return MOE_EDAEMON;
		if (r <= 0)
			continue;
		n = recv_msg(sock, buf.b, sizeof(buf.b), fds, &n_fds);
		if (n == -EAGAIN || n == -EWOULDBLOCK || n == -ECONNRESET)
			continue;
		if (n <= 0) {
			set_err(err, errlen,
			        "%s: the daemon closed the connection during the handshake", path);
			return MOE_EDAEMON;
		}
		close_fds(fds, n_fds);
		switch (moe_msg_peek(buf.b, (size_t)n, &h)) {
		case MOE_MSG_HELLO_REPLY:
			r = moe_msg_decode_hello_reply(buf.b, (size_t)n, reply);
			if (r) {
				set_err(err, errlen, "%s: malformed handshake reply", path);
				return r;
			}
			if (reply->status) {
				r = wire_status(reply->status);
				set_err(err, errlen, "%s: the daemon refused the client: %s", path,
				        moe_strerror(r));
				return r;
			}
			return 0;
		case MOE_MSG_ERROR:
			if (moe_msg_decode_error(buf.b, (size_t)n, &e))
				return MOE_EPROTO;
			r = wire_status(e.status);
			set_err(err, errlen, "%s: the daemon refused the client: %s (%s)", path,
			        e.message, moe_strerror(r));
			return r;
		case MOE_MSG_DOORBELL:
			continue;
		default:
			set_err(err, errlen, "%s: protocol error during the handshake", path);
			return MOE_EPROTO;
		}
	}
}

/* Connects, creates and maps a new region, and shakes hands. On success
 * *k holds the socket and the new mapping; the caller installs them. */
static int open_conn(const struct moe_client *c, struct conn *k, char *err, size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct moe_msg_hello hello = {0};
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	struct moe_shm_hdr *hdr;
	int memfd = -1, r, e;
	size_t n;

	memset(k, 0, sizeof(*k));
	k->sock = -1;
	k->map = MAP_FAILED;
	r = moe_shm_layout(c->depth, c->depth, c->region_bytes, &k->lay);
	if (r) {
		set_err(err, errlen, "region of %llu bytes too small for %u ring entries",
		        (unsigned long long)c->region_bytes, c->depth);
		return r;
	}
	if (strlen(c->path) >= sizeof(sa.sun_path)) {
		set_err(err, errlen, "%s: socket path too long", c->path);
		errno = ENAMETOOLONG;
		return MOE_EINVAL;
	}
	strcpy(sa.sun_path, c->path);
	k->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (k->sock < 0) {
		e = errno;
		set_err(err, errlen, "socket: %s", strerror(e));
		r = MOE_EDAEMON;
		goto err_errno;
	}
	if (connect(k->sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		e = errno;
		set_err(err, errlen, "%s: connect: %s", c->path, strerror(e));
		r = e == EACCES || e == EPERM ? MOE_EPERM : MOE_EDAEMON;
		goto err_errno;
	}

	memfd = memfd_create(c->name[0] ? c->name : "moeclient", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (memfd < 0 || ftruncate(memfd, (off_t)c->region_bytes) < 0 ||
	    fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		e = errno;
		set_err(err, errlen, "shared region of %llu bytes: %s",
		        (unsigned long long)c->region_bytes, strerror(e));
		r = MOE_ENOMEM;
		goto err_errno;
	}
	k->map = mmap(NULL, c->region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (k->map == MAP_FAILED) {
		e = errno;
		set_err(err, errlen, "mmap of the shared region: %s", strerror(e));
		r = MOE_ENOMEM;
		goto err_errno;
	}
	hdr = k->map;
	hdr->magic = MOE_SHM_MAGIC;
	hdr->version = MOE_SHM_VERSION;
	hdr->sq_entries = c->depth;
	hdr->cq_entries = c->depth;
	hdr->region_bytes = c->region_bytes;
	/* Indices are 0 in a fresh memfd. */

	hello.sq_entries = c->depth;
	hello.cq_entries = c->depth;
	hello.region_bytes = c->region_bytes;
	memcpy(hello.client_name, c->name, sizeof(hello.client_name) - 1);
	n = moe_msg_encode(buf.b, MOE_MSG_HELLO, 0, &hello, sizeof(hello));
	r = send_dgram(k->sock, buf.b, n, memfd, HANDSHAKE_MS);
	if (r == -EPIPE || r == -ECONNRESET) {
		/* refused before it read our HELLO: its reason may be queued */
		r = read_reply(k->sock, &k->reply, err, errlen, c->path);
		if (!r)
			r = MOE_EPROTO;
		goto err_close;
	}
	if (r < 0) {
		set_err(err, errlen, "%s: sending the handshake: %s", c->path, strerror(-r));
		r = MOE_EDAEMON;
		goto err_close;
	}
	close(memfd);
	memfd = -1;
	r = read_reply(k->sock, &k->reply, err, errlen, c->path);
	if (r)
		goto err_close;
	if (k->reply.proto_version != MOE_PROTO_VERSION) {
		set_err(err, errlen, "%s: protocol version %u, this library speaks %u", c->path,
		        k->reply.proto_version, MOE_PROTO_VERSION);
		r = MOE_EPROTO;
		goto err_close;
	}
	if (k->reply.data_off < k->lay.data_off || k->reply.data_off % MOE_SHM_ALIGN ||
	    !moe_span_ok(k->reply.data_off, k->reply.data_bytes, c->region_bytes) ||
	    (c->data_bytes &&
	     (k->reply.data_off != c->data_off || k->reply.data_bytes != c->data_bytes))) {
		set_err(err, errlen, "%s: the daemon placed the data area at %llu+%llu", c->path,
		        (unsigned long long)k->reply.data_off,
		        (unsigned long long)k->reply.data_bytes);
		r = MOE_EPROTO;
		goto err_close;
	}
	return 0;

err_errno:
	if (memfd >= 0)
		close(memfd);
	if (k->map != MAP_FAILED)
		munmap(k->map, c->region_bytes);
	if (k->sock >= 0)
		close(k->sock);
	errno = e;
	return r;
err_close:
	if (memfd >= 0)
		close(memfd);
	munmap(k->map, c->region_bytes);
	close(k->sock);
	return r;
}

static void set_info(struct moe_client *c, const struct moe_msg_hello_reply *r)
{
	moe_model_info *mi = &c->info;

	memset(mi, 0, sizeof(*mi));
	memcpy(mi->family, r->family, sizeof(mi->family));
	mi->family[sizeof(mi->family) - 1] = '\0';
	mi->hidden = r->hidden;
	mi->n_experts = r->n_experts;
	mi->top_k = r->top_k;
	mi->n_layers = r->n_layers;
	mi->n_moe_layers = r->n_moe_layers;
	memcpy(mi->moe_layers, r->moe_layers, r->n_moe_layers * sizeof(mi->moe_layers[0]));
	mi->dtype = (moe_dtype)r->dtype;
	mi->max_batch_tokens = r->max_batch_tokens;
	mi->max_inflight_requests = r->max_inflight_requests;
	mi->max_inflight_tokens = r->max_inflight_tokens;
	mi->data_bytes = r->data_bytes;
}

/* Makes k the client's connection. On a reconnection the new region takes
 * the old one's address (MAP_FIXED), with the live buffers copied over, so
 * that pointers from moe_buf_alloc stay valid. */
static int install(struct moe_client *c, struct conn *k)
{
	unsigned char *base;

	if (c->region) {
		const unsigned char *old = (unsigned char *)c->region + c->data_off;
		unsigned char *nu = (unsigned char *)k->map + c->data_off;
		void *p;

		for (size_t i = 0; i < c->alloc.n_used; i++)
			memcpy(nu + c->alloc.used[i].off, old + c->alloc.used[i].off,
			       c->alloc.used[i].len);
		p = mremap(k->map, c->region_bytes, c->region_bytes, MREMAP_MAYMOVE | MREMAP_FIXED,
		           c->region);
		if (p == MAP_FAILED) {
			munmap(k->map, c->region_bytes);
			close(k->sock);
			return MOE_ENOMEM;
		}
	} else {
		if (moe_shm_alloc_init(&c->alloc, k->reply.data_bytes)) {
			munmap(k->map, c->region_bytes);
			close(k->sock);
			return MOE_ENOMEM;
		}
		c->region = k->map;
		c->data_off = k->reply.data_off;
		c->data_bytes = k->reply.data_bytes;
	}
	base = c->region;
	c->hdr = c->region;
	c->sq = (struct moe_sqe *)(base + k->lay.sq_off);
	c->cq = (struct moe_cqe *)(base + k->lay.cq_off);
	c->data = base + c->data_off;
	c->sq_entries = c->cq_entries = c->depth;
	c->sq_tail = c->cq_head = 0;
	c->sock = k->sock;
	c->dead = 0;
	c->inflight_reqs = c->inflight_tokens = 0;
	set_info(c, &k->reply);
	return 0;
}

/* With c->mu held and c->dead: connects again. */
static int reconnect_locked(struct moe_client *c)
{
	struct conn k;
	int r;

	while (c->polling) /* the poller closes the old socket on waking */
		pthread_cond_wait(&c->cv, &c->mu);
	if (!c->dead)
		return 0; /* another thread did it meanwhile */
	if (c->sock >= 0) {
		close(c->sock);
		c->sock = -1;
	}
	r = open_conn(c, &k, NULL, 0);
	if (r)
		return r == MOE_EPERM || r == MOE_EPROTO || r == MOE_ELIMIT ? r : MOE_EDAEMON;
	r = install(c, &k);
	wake_all(c);
	return r;
}

/* Every call that talks to the daemon starts here (c->mu held). */
static int enter(struct moe_client *c)
{
	if (!c->dead)
		return 0;
	return c->auto_reconnect ? reconnect_locked(c) : MOE_EDAEMON;
}

static void client_free(struct moe_client *c)
{
	if (c->sock >= 0)
		close(c->sock);
	if (c->evfd >= 0)
		close(c->evfd);
	if (c->status_fd >= 0)
		close(c->status_fd);
	if (c->region)
		munmap(c->region, c->region_bytes);
	moe_shm_alloc_fini(&c->alloc);
	pthread_cond_destroy(&c->cv);
	pthread_mutex_destroy(&c->mu);
	free(c->slots);
	free(c->free_slots);
	free(c->path);
	free(c);
}

MOE_API int moe_connect_opts(const char *socket_path, const moe_connect_options *o,
                             moe_client **out)
{
	static const moe_connect_options defaults;
	struct moe_client *c;
	pthread_condattr_t ca;
	struct conn k;
	const char *name;
	int r, e;
	long page = sysconf(_SC_PAGESIZE);

	if (!out)
		return MOE_EINVAL;
	*out = NULL;
	if (!o)
		o = &defaults;
	if (!socket_path || !*socket_path)
		socket_path = getenv("MOED_SOCKET");
	if (!socket_path || !*socket_path)
		socket_path = DEFAULT_SOCKET;
	if (o->queue_depth > MOE_RING_MAX || o->region_bytes > ((uint64_t)1 << 40)) {
		set_err(o->errbuf, o->errbuf_len, "queue depth or region size out of range");
		return MOE_EINVAL;
	}

	c = calloc(1, sizeof(*c));
	if (!c)
		return MOE_ENOMEM;
	c->sock = c->evfd = c->status_fd = -1;
	pthread_mutex_init(&c->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cv, &ca);
	pthread_condattr_destroy(&ca);
	c->path = strdup(socket_path);
	c->depth = pow2_at_least(o->queue_depth ? o->queue_depth : DEFAULT_DEPTH);
	c->region_bytes = o->region_bytes ? o->region_bytes : DEFAULT_REGION;
	c->region_bytes = (c->region_bytes + (uint64_t)page - 1) & ~((uint64_t)page - 1);
	c->auto_reconnect = o->auto_reconnect;
	name = o->name && *o->name ? o->name : program_invocation_short_name;
	snprintf(c->name, sizeof(c->name), "%s", name ? name : "");
	c->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	c->slots = calloc(c->depth, sizeof(*c->slots));
	c->free_slots = malloc(c->depth * sizeof(*c->free_slots));
	if (!c->path || c->evfd < 0 || !c->slots || !c->free_slots) {
		set_err(o->errbuf, o->errbuf_len, "out of memory");
		r = MOE_ENOMEM;
		goto err_free;
	}
	for (uint32_t i = 0; i < c->depth; i++)
		c->free_slots[i] = c->depth - 1 - i;
	c->n_free_slots = c->depth;
	c->cq_entries = c->depth;

	r = open_conn(c, &k, o->errbuf, o->errbuf_len);
	if (r)
		goto err_free;
	r = install(c, &k);
	if (r)
		goto err_free;
	*out = c;
	return 0;

err_free:
	e = errno;
	client_free(c);
	errno = e;
	return r;
}

MOE_API int moe_connect(const char *socket_path, moe_client **out)
{
	return moe_connect_opts(socket_path, NULL, out);
}

MOE_API void moe_disconnect(moe_client *c)
{
	if (c)
		client_free(c);
}

MOE_API int moe_reconnect(moe_client *c)
{
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = c->dead ? reconnect_locked(c) : 0;
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_get_model_info(moe_client *c, moe_model_info *info)
{
	int r;

	if (!c || !info)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = enter(c);
	if (!r)
		*info = c->info;
	pthread_mutex_unlock(&c->mu);
	return r;
}

/* ------------------------------------------------------------------------ */
/* Buffers                                                                  */

static void *buf_alloc_locked(struct moe_client *c, uint64_t bytes)
{
	uint64_t off;

	if (!c->region || moe_shm_alloc_get(&c->alloc, bytes, &off))
		return NULL;
	return c->data + off;
}

static void buf_free_locked(struct moe_client *c, void *p)
{
	uintptr_t a = (uintptr_t)p, d = (uintptr_t)c->data;

	if (!p || !c->data || a < d || a - d >= c->data_bytes)
		return;
	if (!moe_shm_alloc_put(&c->alloc, a - d))
		wake_all(c);
}

MOE_API void *moe_buf_alloc(moe_client *c, size_t bytes)
{
	void *p;

	if (!c || !bytes)
		return NULL;
	pthread_mutex_lock(&c->mu);
	p = buf_alloc_locked(c, bytes);
	pthread_mutex_unlock(&c->mu);
	return p;
}

MOE_API void moe_buf_free(moe_client *c, void *p)
{
	if (!c || !p)
		return;
	pthread_mutex_lock(&c->mu);
	buf_free_locked(c, p);
	pthread_mutex_unlock(&c->mu);
}

/* ------------------------------------------------------------------------ */
/* Requests                                                                 */

/* The argument checks every request shares; *bytes: of input (= output). */
static int check_request(const struct moe_client *c, uint32_t layer, moe_dtype dtype,
                         uint32_t n_tokens, uint64_t *bytes)
{
	uint64_t row;
	uint32_t i;

	if ((unsigned)dtype > MOE_DTYPE_F16)
		return MOE_EDTYPE;
	for (i = 0; i < c->info.n_moe_layers; i++)
		if (c->info.moe_layers[i] == layer)
			break;
	if (i == c->info.n_moe_layers)
		return MOE_ENOLAYER;
	if (c->info.max_batch_tokens && n_tokens > c->info.max_batch_tokens)
		return MOE_E2BIG;
	if (c->info.max_inflight_tokens && n_tokens > c->info.max_inflight_tokens)
		return MOE_E2BIG;
	row = (uint64_t)c->info.hidden * dtype_size(dtype);
	if (row && n_tokens > UINT64_MAX / row)
		return MOE_ENOMEM;
	*bytes = row * n_tokens;
	return 0;
}

/* Whether one more request of n tokens fits the ring, the slot table and
 * the daemon's per-client limits. */
static int has_room(struct moe_client *c, uint32_t n_tokens)
{
	uint32_t head = atomic_load_explicit(&c->hdr->sq_head, memory_order_acquire);
	const moe_model_info *mi = &c->info;

	if (c->sq_tail - head >= c->sq_entries || !c->n_free_slots)
		return 0;
	if (mi->max_inflight_requests && c->inflight_reqs >= mi->max_inflight_requests)
		return 0;
	if (mi->max_inflight_tokens &&
	    c->inflight_tokens + (uint64_t)n_tokens > mi->max_inflight_tokens)
		return 0;
	return 1;
}

/* Pushes one SQE and rings the doorbell; the caller checked has_room. */
static int push(struct moe_client *c, struct moe_sqe *e, uint64_t *tag)
{
	struct slot *s = get_slot(c);

	e->tag = s->tag;
	s->state = SLOT_PENDING;
	s->n_tokens = e->n_tokens;
	c->inflight_reqs++;
	c->inflight_tokens += e->n_tokens;
	c->sq[c->sq_tail & (c->sq_entries - 1)] = *e;
	c->sq_tail++;
	atomic_store_explicit(&c->hdr->sq_tail, c->sq_tail, memory_order_release);
	*tag = s->tag;
	/* If the doorbell fails the daemon is gone: mark_dead fails the slot. */
	send_ctl(c, MOE_MSG_DOORBELL, NULL, 0, NULL);
	return 0;
}

/* The offset of [p, p + bytes) in the data area, or MOE_ERANGE. */
static int data_offset(const struct moe_client *c, const void *p, uint64_t bytes, uint64_t *off)
{
	uintptr_t a = (uintptr_t)p, d = (uintptr_t)c->data;

	if (!p || a < d || !moe_span_ok(a - d, bytes, c->data_bytes))
		return MOE_ERANGE;
	*off = a - d;
	return 0;
}

MOE_API int moe_submit(moe_client *c, uint32_t layer, moe_dtype dtype, const void *in_buf,
                       void *out_buf, uint32_t n_tokens, uint32_t timeout_ms, uint64_t *tag)
{
	struct moe_sqe e = {0};
	uint64_t bytes;
	int r;

	if (!c || !tag || !n_tokens)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = enter(c);
	if (!r)
		r = check_request(c, layer, dtype, n_tokens, &bytes);
	if (!r)
		r = data_offset(c, in_buf, bytes, &e.in_off);
	if (!r)
		r = data_offset(c, out_buf, bytes, &e.out_off);
	if (!r) {
		drain(c);
		reap(c);
		r = c->dead ? MOE_EDAEMON : has_room(c, n_tokens) ? 0 : MOE_EBUSY;
	}
	if (!r) {
		e.layer = layer;
		e.n_tokens = n_tokens;
		e.dtype = (uint16_t)dtype;
		e.timeout_ms = timeout_ms;
		r = push(c, &e, tag);
	}
	pthread_mutex_unlock(&c->mu);
	return r;
}

/* Waits until one request of n tokens may be pushed (c->mu held). */
static int wait_room(struct moe_client *c, uint32_t n_tokens, uint64_t deadline)
{
	for (;;) {
		drain(c);
		reap(c);
		if (c->dead)
			return MOE_EDAEMON;
		if (has_room(c, n_tokens))
			return 0;
		if (now_ns() >= deadline)
			return MOE_ETIMEDOUT;
		wait_step(c, deadline);
	}
}

MOE_API int moe_forward(moe_client *c, uint32_t layer, moe_dtype dtype, const void *in, void *out,
                        uint32_t n_tokens)
{
	struct moe_sqe e = {0};
	void *bin = NULL, *bout = NULL;
	uint64_t bytes, need, tag;
	int r, status = 0;

	if (!c)
		return MOE_EINVAL;
	if (!n_tokens)
		return 0;
	if (!in || !out)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = enter(c);
	if (!r)
		r = check_request(c, layer, dtype, n_tokens, &bytes);
	if (r)
		goto out_unlock;
	need = (bytes + MOE_SHM_ALIGN - 1) / MOE_SHM_ALIGN * MOE_SHM_ALIGN;
	if (need > c->data_bytes / 2) {
		r = MOE_ENOMEM;
		goto out_unlock;
	}
	c->forwards++;
	/* Room taken by other moe_forward calls comes back; room the caller
	 * holds in its own buffers does not: then fail rather than wait. */
	for (;;) {
		bin = buf_alloc_locked(c, bytes);
		bout = bin ? buf_alloc_locked(c, bytes) : NULL;
		if (bout)
			break;
		buf_free_locked(c, bin);
		bin = NULL;
		if (c->forwards == 1) {
			r = MOE_ENOMEM;
			goto out_forwards;
		}
		if (c->dead) {
			r = MOE_EDAEMON;
			goto out_forwards;
		}
		wait_step(c, NO_DEADLINE);
	}
	memcpy(bin, in, bytes);
	r = wait_room(c, n_tokens, NO_DEADLINE);
	if (r)
		goto out_free;
	e.layer = layer;
	e.n_tokens = n_tokens;
	e.dtype = (uint16_t)dtype;
	e.in_off = (uint64_t)((unsigned char *)bin - c->data);
	e.out_off = (uint64_t)((unsigned char *)bout - c->data);
	push(c, &e, &tag);
	r = wait_tag(c, tag, NO_DEADLINE, &status, NULL);
	if (!r)
		r = status;
	if (!r)
		memcpy(out, bout, bytes);
out_free:
	buf_free_locked(c, bin);
	buf_free_locked(c, bout);
out_forwards:
	c->forwards--;
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_poll(moe_client *c, moe_completion *out, int max)
{
	int n = 0, pending = 0;

	if (!c || max < 0 || (max && !out))
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	drain(c);
	reap(c);
	for (uint32_t i = 0; i < c->cq_entries; i++) {
		struct slot *s = &c->slots[i];

		if (s->state == SLOT_PENDING)
			pending++;
		if (n >= max || s->state != SLOT_DONE || s->waiters || s->orphan)
			continue;
		out[n++] = (moe_completion){s->tag, s->status, s->epoch};
		put_slot(c, s);
	}
	if (n)
		wake_all(c);
	else if (c->dead && !pending)
		n = MOE_EDAEMON; /* nothing will ever come */
	pthread_mutex_unlock(&c->mu);
	return n;
}

MOE_API int moe_wait(moe_client *c, uint64_t tag, int timeout_ms, int *status)
{
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	drain(c);
	reap(c);
	r = wait_tag(c, tag, deadline_after(timeout_ms), status, NULL);
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_cancel(moe_client *c, uint64_t tag)
{
	struct moe_msg_cancel m = {tag};
	struct slot *s;
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	drain(c);
	reap(c);
	s = find_slot(c, tag);
	if (!s || s->orphan)
		r = MOE_ENOENT;
	else if (s->state == SLOT_DONE)
		r = 0; /* finished already: nothing to cancel */
	else
		r = send_ctl(c, MOE_MSG_CANCEL, &m, sizeof(m), NULL);
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_ping(moe_client *c, uint64_t *round_trip_ns)
{
	struct moe_sqe e = {.flags = MOE_SQE_NOP};
	uint64_t deadline = deadline_after(CONTROL_MS), t0, tag;
	int r, status = 0;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = enter(c);
	if (!r)
		r = wait_room(c, 0, deadline);
	if (r)
		goto out_unlock;
	t0 = now_ns();
	push(c, &e, &tag);
	r = wait_tag(c, tag, deadline, &status, NULL);
	if (r == MOE_ETIMEDOUT) {
		struct slot *s = find_slot(c, tag);

		if (s)
			s->orphan = 1; /* nobody will collect it */
		goto out_unlock;
	}
	if (!r)
		r = status;
	if (!r && round_trip_ns)
		*round_trip_ns = now_ns() - t0;
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}

/* Reads the JSON from the memfd of a STATUS_REPLY. */
static int read_status_fd(int fd, uint64_t json_bytes, char **json, size_t *len)
{
	struct stat st;
	char *p;
	uint64_t got = 0;

	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || json_bytes > (uint64_t)st.st_size ||
	    json_bytes > MAX_STATUS_JSON)
		return MOE_EPROTO;
	p = malloc(json_bytes + 1);
	if (!p)
		return MOE_ENOMEM;
	while (got < json_bytes) {
		ssize_t n = pread(fd, p + got, json_bytes - got, (off_t)got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			free(p);
			return MOE_EPROTO;
		}
		got += (uint64_t)n;
	}
	p[json_bytes] = '\0';
	*json = p;
	if (len)
		*len = json_bytes;
	return 0;
}

/* One control round trip (STATUS, ADMIN): waits for its turn (one request
 * of a kind at a time), sends, and waits for the reply that drain() files
 * under *have. Called and returns with c->mu held. *owned tells whether
 * this call took the slot (then the caller reads the reply, clears *busy
 * and *have and wakes the others), whatever the result. */
static int ctl_roundtrip(struct moe_client *c, int *busy, int *have, uint32_t *seq,
			 uint16_t type, const void *p, uint32_t len, uint64_t deadline,
			 int *owned)
{
	int r = enter(c);

	*owned = 0;
	while (!r && *busy) {
		if (now_ns() >= deadline)
			r = MOE_ETIMEDOUT;
		else
			wait_step(c, deadline);
		if (c->dead)
			r = MOE_EDAEMON;
	}
	if (r)
		return r;
	*busy = 1;
	*have = 0;
	*owned = 1;
	r = send_ctl(c, type, p, len, seq);
	while (!r && !*have) {
		drain(c);
		if (*have)
			break;
		if (c->dead)
			r = MOE_EDAEMON;
		else if (now_ns() >= deadline)
			r = MOE_ETIMEDOUT;
		else
			wait_step(c, deadline);
	}
	return r;
}

MOE_API int moe_status_json(moe_client *c, char **json, size_t *len)
{
	uint64_t deadline = deadline_after(CONTROL_MS);
	int r, owned;

	if (!c || !json)
		return MOE_EINVAL;
	*json = NULL;
	pthread_mutex_lock(&c->mu);
	r = ctl_roundtrip(c, &c->status_busy, &c->status_have, &c->status_seq, MOE_MSG_STATUS,
			  NULL, 0, deadline, &owned);
	if (!owned)
		goto out_unlock;
	if (!r) {
		if (c->status_msg.status)
			r = wire_status(c->status_msg.status);
		else if (c->status_fd < 0)
			r = MOE_EPROTO;
		else
			r = read_status_fd(c->status_fd, c->status_msg.json_bytes, json, len);
	}
	if (c->status_fd >= 0) {
		close(c->status_fd);
		c->status_fd = -1;
	}
	c->status_busy = 0;
	c->status_have = 0;
	wake_all(c);
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_admin(moe_client *c, uint32_t op, uint32_t flags, int timeout_ms, char *msg,
		      size_t msglen)
{
	uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : deadline_after((uint32_t)timeout_ms);
	struct moe_msg_admin a = {op, flags};
	int r, owned;

	if (!c)
		return MOE_EINVAL;
	if (msg && msglen)
		msg[0] = '\0';
	pthread_mutex_lock(&c->mu);
	r = ctl_roundtrip(c, &c->admin_busy, &c->admin_have, &c->admin_seq, MOE_MSG_ADMIN, &a,
			  sizeof(a), deadline, &owned);
	if (!owned)
		goto out_unlock;
	if (!r) {
		if (msg && msglen)
			snprintf(msg, msglen, "%s", c->admin_msg.message);
		r = c->admin_msg.status ? wire_status(c->admin_msg.status) : 0;
	}
	c->admin_busy = 0;
	c->admin_have = 0;
	wake_all(c);
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}
