/* daemon/server/io.c — sending to clients (never blocking), the clock, sd_notify
 * (see internal.h). */
#include "daemon/server/internal.h"

/* sd_notify when built with libsystemd and run under systemd (it does
 * nothing without $NOTIFY_SOCKET). */
void srv_notify(const char *fmt, ...)
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

uint64_t srv_now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* ---- sending ------------------------------------------------------------ */

/* Never blocks: a client that does not read its socket loses doorbells
 * (it still sees its completion ring) or, for replies, is dropped. */
int srv_send_msg_seq(int fd, uint16_t type, uint32_t seq, const void *payload, uint32_t len,
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

int srv_send_msg(int fd, uint16_t type, const void *payload, uint32_t len, int pass_fd)
{
	return srv_send_msg_seq(fd, type, 0, payload, len, pass_fd);
}

int srv_text_reply(struct client *c, uint16_t type, uint32_t seq, int fd, uint64_t len)
{
	struct moe_msg_status_reply r = {0};

	if (fd < 0)
		r.status = MOE_ENOMEM;
	else
		r.json_bytes = len;
	return srv_send_msg_seq(c->fd, type, seq, &r, sizeof(r), fd);
}

int srv_sealed_memfd(const char *name, const char *text, size_t len)
{
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);

	if (fd >= 0 && (write(fd, text, len) != (ssize_t)len ||
			fcntl(fd, F_ADD_SEALS,
			      F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0)) {
		close(fd);
		fd = -1;
	}
	return fd;
}

void srv_send_error(struct client *c, int status, const char *msg)
{
	struct moe_msg_error e = {.status = status};

	snprintf(e.message, sizeof(e.message), "%s", msg);
	if (c->met)
		met_add(&c->met->errors[met_status_index(status)], 1);
	srv_send_msg(c->fd, MOE_MSG_ERROR, &e, sizeof(e), -1);
}

void srv_notify_clients(struct server *s)
{
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->dead)
			continue;
		pthread_mutex_lock(&c->cq_lock); /* notify is the worker's too */
		if (c->notify) {
			srv_send_msg(c->fd, MOE_MSG_DOORBELL, NULL, 0, -1); /* EAGAIN: ring has it */
			c->notify = false;
		}
		pthread_mutex_unlock(&c->cq_lock);
	}
}

/* Tells every client whether a new submission needs a DOORBELL
 * (moe_shm_hdr.sq_no_doorbell). Not needed while both batch slots are
 * taken: the batch that ends wakes the loop through the worker's eventfd,
 * and the loop reads every ring on every iteration. Each doorbell saved
 * is a sendmsg for the client and, as often as not, a wake-up of the loop
 * that takes a CPU from the worker in the middle of a batch. Needed again:
 * the flags are cleared, then a seq_cst fence, before the loop reads the
 * rings (the client publishes its tail, fences, then reads the flag), so
 * an entry is either seen by that read or rung for. What arrives while
 * the flag is set waits for the running batch to end, and misses the
 * waiting batch's top-ups. */
void srv_need_doorbells(struct server *s, bool needed)
{
	if (s->no_doorbell == !needed)
		return;
	s->no_doorbell = !needed;
	for (struct client *c = s->clients; c; c = c->next)
		if (c->attached && !c->dead)
			atomic_store_explicit(&c->hdr->sq_no_doorbell, !needed,
					      memory_order_relaxed);
	if (needed)
		atomic_thread_fence(memory_order_seq_cst);
}
